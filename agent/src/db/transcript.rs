//! A recorded conversation with a server, replayed as the [`Sql`] of a test: the backup's
//! protocol runs against each flavor's answers as its server gives them.
//!
//! A recording is what `mariadb -vvv` / `mysql -vvv` print for statements ended with
//! `\G`: each statement between two `--------------` lines, then its answer (`Query OK`,
//! `Empty set`, vertical rows, or `ERROR code (state): message`, which the client prints
//! first and a recording puts after the statement). Two lines are ours: `# ...` is a
//! comment, and `=== stop capture ===` is where the capture session must stop. Errors
//! 2006 and 2013 are a lost connection.
//!
//! Replay is strict: a statement other than the next recorded one, or a stop anywhere
//! else than where the recording has it, fails the test at once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::{DbError, Row, Sql};

/// One column of a recorded row, in the server's order.
type Cells = Vec<(String, Option<String>)>;

#[derive(Debug)]
enum Answer {
    Rows(Vec<Cells>),
    Error { code: u16, message: String },
}

#[derive(Debug)]
enum Step {
    Statement { sql: String, answer: Answer },
    StopCapture,
}

/// What the recording still holds and what the client did, shared with [`Capture`].
struct Replay {
    name: String,
    steps: VecDeque<Step>,
    sent: Vec<String>,
}

/// The marker of the capture stop in [`Transcript::sent`].
pub const STOP: &str = "=== stop capture ===";

/// A recording being replayed.
pub struct Transcript(Rc<RefCell<Replay>>);

/// The capture session's side of a [`Transcript`]: records the stop in the conversation.
pub struct Capture(Rc<RefCell<Replay>>);

impl Transcript {
    /// Reads a recording (`name` says which in failure messages).
    pub fn parse(name: &str, text: &str) -> Transcript {
        let mut steps = VecDeque::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let line = line.trim_end();
            if line == STOP {
                steps.push_back(Step::StopCapture);
            } else if line == "--------------" {
                let sql = lines.next().unwrap_or_default().trim().to_string();
                assert_eq!(lines.next().map(str::trim_end), Some("--------------"));
                let mut answer = Vec::new();
                while let Some(next) = lines.peek() {
                    let next = next.trim_end();
                    if next == "--------------" || next == STOP {
                        break;
                    }
                    answer.push(next);
                    lines.next();
                }
                steps.push_back(Step::Statement {
                    answer: parse_answer(name, &sql, &answer),
                    sql,
                });
            } else {
                assert!(
                    line.is_empty() || line.starts_with('#') || line == "Bye",
                    "{name}: a line outside any statement: {line:?}"
                );
            }
        }
        Transcript(Rc::new(RefCell::new(Replay {
            name: name.to_string(),
            steps,
            sent: Vec::new(),
        })))
    }

    /// The capture session's side, for the stop.
    pub fn capture(&self) -> Capture {
        Capture(Rc::clone(&self.0))
    }

    /// Every statement the client sent, with [`STOP`] where the capture stopped.
    pub fn sent(&self) -> Vec<String> {
        self.0.borrow().sent.clone()
    }

    /// Fails unless the whole recording was played.
    pub fn assert_played_out(&self) {
        let replay = self.0.borrow();
        assert!(
            replay.steps.is_empty(),
            "{}: the client stopped before the recording ended; next: {:?}",
            replay.name,
            replay.steps.front()
        );
    }

    fn answer(&mut self, sql: &str) -> Result<Vec<Cells>, DbError> {
        let mut replay = self.0.borrow_mut();
        replay.sent.push(sql.to_string());
        let name = replay.name.clone();
        match replay.steps.pop_front() {
            Some(Step::Statement {
                sql: recorded,
                answer,
            }) => {
                assert_eq!(sql, recorded, "{name}: the client sent another statement");
                match answer {
                    Answer::Rows(rows) => Ok(rows),
                    Answer::Error {
                        code: 2006 | 2013,
                        message,
                    } => Err(DbError::Lost {
                        sql: sql.into(),
                        detail: message,
                    }),
                    Answer::Error { code, message } => Err(DbError::Query {
                        sql: sql.into(),
                        code,
                        message,
                    }),
                }
            }
            other => panic!("{name}: the client sent {sql:?} where the recording has {other:?}"),
        }
    }
}

impl Capture {
    /// The capture stops here; fails unless the recording has the stop next.
    pub fn record_stop(&self) {
        let mut replay = self.0.borrow_mut();
        replay.sent.push(STOP.to_string());
        let next = replay.steps.pop_front();
        assert!(
            matches!(next, Some(Step::StopCapture)),
            "{}: the capture stopped where the recording has {next:?}",
            replay.name
        );
    }
}

impl Sql for Transcript {
    fn exec(&mut self, sql: &str) -> Result<(), DbError> {
        self.answer(sql).map(drop)
    }

    fn rows(&mut self, sql: &str) -> Result<Vec<Row>, DbError> {
        Ok(self
            .answer(sql)?
            .into_iter()
            .map(|cells| cells.into_iter().collect())
            .collect())
    }

    fn value(&mut self, sql: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .answer(sql)?
            .into_iter()
            .next()
            .and_then(|cells| cells.into_iter().next())
            .and_then(|(_, v)| v))
    }
}

/// A statement's answer: an error, or the rows printed vertically (none for `Query OK`
/// or `Empty set`).
fn parse_answer(name: &str, sql: &str, lines: &[&str]) -> Answer {
    let mut rows: Vec<Cells> = Vec::new();
    for line in lines {
        if let Some(error) = line.strip_prefix("ERROR ") {
            // `ERROR 1205 (HY000) at line 2: Lock wait timeout exceeded; ...`
            let (code, rest) = error.split_once(' ').unwrap_or((error, ""));
            let message = rest.split_once(": ").map_or(rest, |(_, m)| m);
            return Answer::Error {
                code: code
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {sql}: an error without a code: {line:?}")),
                message: message.to_string(),
            };
        }
        if line.starts_with("***************************") {
            rows.push(Vec::new());
            continue;
        }
        let Some(row) = rows.last_mut() else {
            continue; // blank lines, `Query OK`, `Empty set`
        };
        if line.is_empty() || line.contains(" in set (") || *line == "Bye" {
            continue;
        }
        match column(line) {
            Some((column, value)) => row.push((
                column.to_string(),
                (value != "NULL").then(|| value.to_string()),
            )),
            // A value on several lines (a MySQL GTID set breaks after each comma).
            None => match row.last_mut() {
                Some((_, Some(value))) => {
                    value.push('\n');
                    value.push_str(line);
                }
                _ => panic!("{name}: {sql}: a line outside any column: {line:?}"),
            },
        }
    }
    Answer::Rows(rows)
}

/// `   Column_name: value` (the name right-aligned, the value possibly empty).
fn column(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start();
    let end = line.find(':')?;
    let name = &line[..end];
    let rest = &line[end + 1..];
    let is_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '@')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '@' | '.'));
    (is_name && (rest.is_empty() || rest.starts_with(' '))).then(|| (name, rest.trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDING: &str = "\
--------------
SHOW MASTER STATUS
--------------

*************************** 1. row ***************************
             File: mysql-bin.000003
         Position: 194
     Binlog_Do_DB:
 Binlog_Ignore_DB:
Executed_Gtid_Set: 3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,
4c9c3ad1-71ca-11e1-9e33-c80aa9429562:1-3
1 row in set (0.00 sec)

=== stop capture ===
--------------
UNLOCK BINLOG
--------------

ERROR 2013 (HY000) at line 3: Lost connection to MySQL server during query
";

    #[test]
    fn a_recording_replays_rows_errors_and_the_stop_in_order() {
        let mut t = Transcript::parse("test", RECORDING);
        let rows = t.rows("SHOW MASTER STATUS").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["Position"].as_deref(), Some("194"));
        assert_eq!(rows[0]["Binlog_Do_DB"].as_deref(), Some(""));
        assert_eq!(
            rows[0]["Executed_Gtid_Set"].as_deref(),
            Some(
                "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,\n4c9c3ad1-71ca-11e1-9e33-c80aa9429562:1-3"
            )
        );
        t.capture().record_stop();
        match t.exec("UNLOCK BINLOG") {
            Err(DbError::Lost { detail, .. }) => {
                assert_eq!(detail, "Lost connection to MySQL server during query")
            }
            other => panic!("{other:?}"),
        }
        t.assert_played_out();
        assert_eq!(t.sent(), ["SHOW MASTER STATUS", STOP, "UNLOCK BINLOG"]);
    }

    #[test]
    #[should_panic(expected = "the client sent another statement")]
    fn a_statement_out_of_order_fails_the_test() {
        let mut t = Transcript::parse("test", RECORDING);
        let _ = t.exec("UNLOCK BINLOG");
    }

    #[test]
    #[should_panic(expected = "the capture stopped where the recording has")]
    fn a_stop_out_of_place_fails_the_test() {
        Transcript::parse("test", RECORDING).capture().record_stop();
    }
}
