//! MariaDB/MySQL option files, read the way the client reads them: `[group]` sections of
//! `key = value` lines, `!include FILE` and `!includedir DIR`, quotes and escapes in
//! values, later settings winning over earlier ones.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Settings of the groups asked for, in the order the files gave them (the last wins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptionSet {
    pub values: BTreeMap<String, String>,
    /// Files that were read, in order.
    pub files: Vec<PathBuf>,
}

impl OptionSet {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// The files the MariaDB client reads by default, in order (missing ones are skipped).
pub fn default_files() -> Vec<PathBuf> {
    let mut files = vec![
        PathBuf::from("/etc/my.cnf"),
        PathBuf::from("/etc/mysql/my.cnf"),
    ];
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".my.cnf"));
    }
    files
}

/// Reads `files` (missing ones skipped, unless `required`) keeping the settings of
/// `groups`. Keys are normalized as the server does (`-` and `_` are the same).
pub fn read(files: &[PathBuf], required: &[PathBuf], groups: &[&str]) -> io::Result<OptionSet> {
    let mut set = OptionSet::default();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => parse_into(&mut set, file, &text, groups, 0)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required.contains(file) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read option file {}: {e}", file.display()),
                ));
            }
        }
    }
    Ok(set)
}

fn parse_into(
    set: &mut OptionSet,
    file: &Path,
    text: &str,
    groups: &[&str],
    depth: usize,
) -> io::Result<()> {
    if depth > 10 {
        return Err(io::Error::other(format!(
            "option file {} includes too deeply (a loop?)",
            file.display()
        )));
    }
    set.files.push(file.to_path_buf());
    let mut in_group = false;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("!includedir") {
            let dir = Path::new(rest.trim());
            let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "cnf"))
                    .collect(),
                Err(_) => Vec::new(),
            };
            names.sort();
            for name in names {
                if let Ok(text) = std::fs::read_to_string(&name) {
                    parse_into(set, &name, &text, groups, depth + 1)?;
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("!include") {
            let inc = PathBuf::from(rest.trim());
            if let Ok(text) = std::fs::read_to_string(&inc) {
                parse_into(set, &inc, &text, groups, depth + 1)?;
            }
            continue;
        }
        if let Some(group) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_group = groups.iter().any(|g| g.eq_ignore_ascii_case(group.trim()));
            continue;
        }
        if !in_group {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), unquote(v.trim())),
            None => (line, String::new()),
        };
        let key = key.replace('_', "-").to_ascii_lowercase();
        let key = key.strip_prefix("loose-").unwrap_or(&key).to_string();
        set.values.insert(key, value);
    }
    Ok(())
}

/// A value without its quotes and with the client's escapes resolved; an unquoted
/// value ends at a ` #` comment.
fn unquote(v: &str) -> String {
    let quote = v.chars().next().filter(|c| *c == '"' || *c == '\'');
    let Some(q) = quote else {
        let v = match v.find(" #") {
            Some(i) => &v[..i],
            None => v,
        };
        return v.trim_end().to_string();
    };
    let mut out = String::new();
    let mut chars = v[1..].chars();
    while let Some(c) = chars.next() {
        match c {
            c if c == q => break,
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('s') => out.push(' '),
                Some(other) => out.push(other),
                None => {}
            },
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_includes_quotes_and_the_last_setting_win() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf.d");
        std::fs::create_dir(&conf_d).unwrap();
        std::fs::write(
            conf_d.join("50-client.cnf"),
            "[client]\nsocket = /run/other.sock\n[mysqld]\nuser = mysql\n",
        )
        .unwrap();
        std::fs::write(conf_d.join("ignored.txt"), "[client]\nuser = nobody\n").unwrap();
        let main = dir.path().join("my.cnf");
        std::fs::write(
            &main,
            format!(
                "# comment\n[client]\nuser=backup\npassword = \"se\\\"cret #1\"\nport=3307 # a comment\n\
                 [mysqld]\nport = 9999\n[hotbackup]\nloose_socket = /run/first.sock\n\
                 !includedir {}\n",
                conf_d.display()
            ),
        )
        .unwrap();
        let set = read(
            &[main.clone(), dir.path().join("missing.cnf")],
            &[],
            &["client", "hotbackup"],
        )
        .unwrap();
        assert_eq!(set.get("user"), Some("backup"));
        assert_eq!(set.get("password"), Some("se\"cret #1"));
        assert_eq!(set.get("port"), Some("3307"));
        // The included file comes later and wins.
        assert_eq!(set.get("socket"), Some("/run/other.sock"));
        assert_eq!(set.files.len(), 2);
        // A required file that is missing is an error.
        let missing = dir.path().join("nope.cnf");
        assert!(
            read(
                std::slice::from_ref(&missing),
                std::slice::from_ref(&missing),
                &["client"]
            )
            .is_err()
        );
    }
}
