//! Everything that speaks SQL: the connection (options like the MariaDB client's, option
//! files, the password never required on the command line), the server's flavor and
//! facts, and each flavor's statement plan for the validity point.

pub mod coordinates;
pub mod flavor;
pub mod optfile;
pub mod server;
#[cfg(test)]
pub(crate) mod transcript;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use mysql::prelude::Queryable;
use serde::{Deserialize, Serialize};

/// Where the server is and who we are, as the MariaDB client and mariabackup take it.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionOptions {
    /// The server's Unix socket.
    #[arg(long, short = 'S', value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The server's host (TCP); `localhost` means the socket, as for the client.
    #[arg(long, short = 'H', value_name = "HOST")]
    pub host: Option<String>,
    /// The server's TCP port.
    #[arg(long, short = 'P')]
    pub port: Option<u16>,
    /// The user to connect as (default: the login name).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// The password; `--password` alone asks for it. Better: MYSQL_PWD or an option file.
    #[arg(long, short = 'p', num_args = 0..=1, require_equals = true, default_missing_value = "\u{0}prompt")]
    #[serde(skip)]
    pub password: Option<String>,
    /// Read only this option file.
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// Read this option file after the usual ones.
    #[arg(long, value_name = "FILE")]
    pub defaults_extra_file: Option<PathBuf>,
    /// Read no option file.
    #[arg(long)]
    pub no_defaults: bool,
}

/// The option file groups read, as mariabackup reads them (and ours).
pub const OPTION_GROUPS: &[&str] = &["client", "client-server", "mariadb-backup", "hotbackup"];

const PROMPT: &str = "\u{0}prompt";

/// A connection target with everything resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub socket: Option<PathBuf>,
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

impl Target {
    /// How the target reads in messages.
    pub fn describe(&self) -> String {
        match (&self.socket, &self.host) {
            (Some(s), _) => format!("the server on socket {}", s.display()),
            (None, Some(h)) => format!("the server at {h}:{}", self.port),
            (None, None) => "the server".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Options(String),
    #[error(
        "cannot connect to {target}: {detail}; is the server running? Pass --socket or --host/--port to name it"
    )]
    Unreachable { target: String, detail: String },
    #[error(
        "{target} refused user {user:?}: {detail}; check the user and password (--user, MYSQL_PWD, or an option file)"
    )]
    AccessDenied {
        target: String,
        user: String,
        detail: String,
    },
    #[error("`{sql}` failed: {message} (error {code})")]
    Query {
        sql: String,
        code: u16,
        message: String,
    },
    #[error("the connection to the server failed during `{sql}`: {detail}")]
    Lost { sql: String, detail: String },
}

impl DbError {
    /// The server's error code, for a statement the server refused.
    pub fn code(&self) -> Option<u16> {
        match self {
            DbError::Query { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl ConnectionOptions {
    /// Applies option files, MYSQL_PWD and the defaults; asks for the password through
    /// `prompt` only when `--password` was given without a value.
    pub fn resolve(
        &self,
        prompt: impl FnOnce() -> std::io::Result<String>,
    ) -> Result<Target, DbError> {
        let files = if self.no_defaults {
            Vec::new()
        } else if let Some(f) = &self.defaults_file {
            vec![f.clone()]
        } else {
            let mut files = optfile::default_files();
            files.extend(self.defaults_extra_file.clone());
            files
        };
        let required: Vec<PathBuf> = self
            .defaults_file
            .iter()
            .chain(self.defaults_extra_file.iter())
            .cloned()
            .collect();
        let set = optfile::read(&files, &required, OPTION_GROUPS)
            .map_err(|e| DbError::Options(e.to_string()))?;
        let port = match self.port {
            Some(p) => p,
            None => match set.get("port") {
                Some(p) => p.parse().map_err(|_| {
                    DbError::Options(format!("port {p:?} in an option file is not a number"))
                })?,
                None => 3306,
            },
        };
        let host = self
            .host
            .clone()
            .or_else(|| set.get("host").map(str::to_string));
        // As for the client: no host, or `localhost`, means the Unix socket.
        let by_socket = host.as_deref().is_none_or(|h| h == "localhost");
        let socket = if by_socket {
            Some(
                self.socket
                    .clone()
                    .or_else(|| set.get("socket").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("/run/mysqld/mysqld.sock")),
            )
        } else {
            None
        };
        let user = self
            .user
            .clone()
            .or_else(|| set.get("user").map(str::to_string))
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".into());
        let password = match self.password.as_deref() {
            Some(PROMPT) => Some(
                prompt()
                    .map_err(|e| DbError::Options(format!("could not read the password: {e}")))?,
            ),
            Some(p) => Some(p.to_string()),
            None => std::env::var("MYSQL_PWD")
                .ok()
                .or_else(|| set.get("password").map(str::to_string)),
        };
        Ok(Target {
            socket,
            host: if by_socket { None } else { host },
            port,
            user,
            password,
        })
    }
}

/// One connection to the server.
pub struct Db {
    conn: mysql::Conn,
    pub target: Target,
}

/// A result row: column name → value as text (None for NULL).
pub type Row = BTreeMap<String, Option<String>>;

impl Db {
    pub fn connect(target: &Target) -> Result<Db, DbError> {
        let mut opts = mysql::OptsBuilder::new()
            .user(Some(target.user.clone()))
            .pass(target.password.clone())
            .tcp_connect_timeout(Some(Duration::from_secs(10)))
            .prefer_socket(false);
        opts = match (&target.socket, &target.host) {
            (Some(socket), _) => opts.socket(Some(socket.to_string_lossy().into_owned())),
            (None, Some(host)) => opts
                .ip_or_hostname(Some(host.clone()))
                .tcp_port(target.port),
            (None, None) => opts,
        };
        let conn = mysql::Conn::new(opts).map_err(|e| match e {
            mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1698 => {
                DbError::AccessDenied {
                    target: target.describe(),
                    user: target.user.clone(),
                    detail: m.message,
                }
            }
            other => DbError::Unreachable {
                target: target.describe(),
                detail: other.to_string(),
            },
        })?;
        Ok(Db {
            conn,
            target: target.clone(),
        })
    }

    fn err(sql: &str, e: mysql::Error) -> DbError {
        match e {
            mysql::Error::MySqlError(m) => DbError::Query {
                sql: sql.into(),
                code: m.code,
                message: m.message,
            },
            other => DbError::Lost {
                sql: sql.into(),
                detail: other.to_string(),
            },
        }
    }
}

/// The calls the backup makes on a connection, so that its protocol runs the same
/// against a server (`Db`) and against a recorded transcript in the tests.
pub trait Sql {
    /// Runs a statement that returns no rows (or whose rows are not wanted).
    fn exec(&mut self, sql: &str) -> Result<(), DbError>;
    /// Every row of a query, by column name.
    fn rows(&mut self, sql: &str) -> Result<Vec<Row>, DbError>;
    /// The first column of the first row (None for no row or NULL).
    fn value(&mut self, sql: &str) -> Result<Option<String>, DbError>;
}

impl Sql for Db {
    fn exec(&mut self, sql: &str) -> Result<(), DbError> {
        self.conn.query_drop(sql).map_err(|e| Self::err(sql, e))
    }

    fn rows(&mut self, sql: &str) -> Result<Vec<Row>, DbError> {
        let rows: Vec<mysql::Row> = self.conn.query(sql).map_err(|e| Self::err(sql, e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let names: Vec<String> = row
                    .columns_ref()
                    .iter()
                    .map(|c| c.name_str().into_owned())
                    .collect();
                let values = row.unwrap();
                names
                    .into_iter()
                    .zip(values.into_iter().map(text))
                    .collect()
            })
            .collect())
    }

    fn value(&mut self, sql: &str) -> Result<Option<String>, DbError> {
        let row: Option<mysql::Row> = self.conn.query_first(sql).map_err(|e| Self::err(sql, e))?;
        Ok(row
            .and_then(|r| r.unwrap().into_iter().next())
            .and_then(text))
    }
}

fn text(v: mysql::Value) -> Option<String> {
    match v {
        mysql::Value::NULL => None,
        mysql::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        mysql::Value::Int(i) => Some(i.to_string()),
        mysql::Value::UInt(u) => Some(u.to_string()),
        mysql::Value::Float(f) => Some(f.to_string()),
        mysql::Value::Double(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A string as an SQL literal (for the few statements we build with values).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_option_files_and_environment_resolve_like_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("my.cnf");
        std::fs::write(
            &file,
            "[client]\nuser = backup\npassword = fromfile\nsocket = /run/db.sock\n[mariadb-backup]\nport = 3310\n",
        )
        .unwrap();
        let opts = ConnectionOptions {
            defaults_file: Some(file.clone()),
            ..Default::default()
        };
        let t = opts.resolve(|| unreachable!()).unwrap();
        assert_eq!(t.user, "backup");
        assert_eq!(
            t.socket.as_deref(),
            Some(std::path::Path::new("/run/db.sock"))
        );
        assert_eq!(t.port, 3310);
        // The command line wins; TCP when a host other than localhost is named.
        let opts = ConnectionOptions {
            defaults_file: Some(file.clone()),
            host: Some("127.0.0.1".into()),
            user: Some("other".into()),
            password: Some(PROMPT.into()),
            ..Default::default()
        };
        let t = opts.resolve(|| Ok("typed".into())).unwrap();
        assert_eq!(
            (t.host.as_deref(), t.socket.as_deref()),
            (Some("127.0.0.1"), None)
        );
        assert_eq!(
            (t.user.as_str(), t.password.as_deref()),
            ("other", Some("typed"))
        );
        // A named option file that is missing is refused.
        let opts = ConnectionOptions {
            defaults_file: Some(dir.path().join("missing.cnf")),
            ..Default::default()
        };
        assert!(matches!(
            opts.resolve(|| unreachable!()),
            Err(DbError::Options(_))
        ));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("it's a \\ test"), "'it''s a \\\\ test'");
    }
}
