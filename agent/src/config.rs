//! The configuration file (`/etc/hotbackup/hotbackup.toml`, or `--config`, or
//! `HOTBACKUP_CONFIG`): the same option structs as the command line, read with serde, so a
//! scheduled `hotbackup backup` needs no flags. Precedence: flags, then the file, then
//! the defaults.
//!
//! Passwords are not accepted in it: a password belongs in a MariaDB option file of mode
//! 0600 (`defaults_extra_file`), which the server's own tools read the same way.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backup::BackupOptions;
use crate::db::ConnectionOptions;

/// Where the configuration is read from unless `--config` or `HOTBACKUP_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/hotbackup/hotbackup.toml";
/// The environment variable naming the configuration file.
pub const ENV: &str = "HOTBACKUP_CONFIG";

/// The whole file; every section is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How `backup` reaches the server (`hotbackup backup --socket ...`).
    pub connection: ConnectionOptions,
    /// `hotbackup backup`'s options (`[backup.copy]` for --parallel, --throttle, --exclude).
    pub backup: BackupOptions,
    /// Where each backup goes.
    pub target: TargetConfig,
}

/// Where scheduled backups go: a new directory per run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    /// A pattern: `%Y %m %d %H %M %S` become the start time (UTC), e.g.
    /// `/backups/%Y%m%dT%H%M%SZ`.
    pub dir: Option<String>,
    /// Each run makes a new directory under it, named by the start time (UTC):
    /// `<root>/20261122T031252Z`.
    pub root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the configuration {path}: {error}; fix it or pass --config")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the configuration {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "the configuration {0} holds a password; put it in a MariaDB option file of mode 0600 and name that file as defaults_extra_file"
    )]
    Password(PathBuf),
    #[error("{0}")]
    Target(String),
}

/// A configuration as read: the typed options and which keys the file actually set (so
/// that a default in the file's struct never hides a flag's default, and the other way).
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub path: Option<PathBuf>,
    pub config: Config,
    pub table: toml::Table,
}

/// The file to read: `explicit` (--config), else `HOTBACKUP_CONFIG`, else the default,
/// which alone may be missing.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let named = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ENV).map(PathBuf::from));
    let path = named.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if named.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded::default());
        }
        Err(error) => return Err(ConfigError::Read { path, error }),
    };
    parse(&path, &text)
}

/// Parses a configuration's text (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let bad = |e: toml::de::Error| ConfigError::Parse {
        path: path.into(),
        message: e.to_string().trim().replace('\n', " "),
    };
    let table: toml::Table = toml::from_str(text).map_err(bad)?;
    let has_password = table
        .get("connection")
        .and_then(|c| c.as_table())
        .is_some_and(|c| c.contains_key("password"));
    if has_password {
        return Err(ConfigError::Password(path.into()));
    }
    let config: Config = toml::from_str(text).map_err(bad)?;
    Ok(Loaded {
        path: Some(path.into()),
        config,
        table,
    })
}

/// `flags` with every key the file's `section` sets taken from `from_file`, except the
/// keys `given` says were on the command line. Keys are the option structs' field names,
/// which are also clap's argument ids.
pub fn overlay<T: Serialize + DeserializeOwned>(
    flags: &T,
    from_file: &T,
    section: Option<&toml::Table>,
    given: &dyn Fn(&str) -> bool,
) -> T {
    let mut out = serde_json::to_value(flags).expect("options serialize");
    if let Some(section) = section {
        let file = serde_json::to_value(from_file).expect("options serialize");
        merge(&mut out, &file, section, given);
    }
    serde_json::from_value(out).expect("options round-trip")
}

fn merge(
    out: &mut serde_json::Value,
    file: &serde_json::Value,
    section: &toml::Table,
    given: &dyn Fn(&str) -> bool,
) {
    for (key, value) in section {
        match (value, out.get_mut(key), file.get(key)) {
            (toml::Value::Table(sub), Some(o @ serde_json::Value::Object(_)), Some(f)) => {
                merge(o, f, sub, given)
            }
            (_, _, Some(f)) if !given(key) => out[key.as_str()] = f.clone(),
            _ => {}
        }
    }
}

/// Whether the argument `id` was given on the command line (not a default), for
/// [`overlay`]; ids that are no argument of `matches` were not.
pub fn given_in(matches: &clap::ArgMatches) -> impl Fn(&str) -> bool + '_ {
    move |id| {
        matches
            .try_get_raw(id)
            .ok()
            .flatten()
            .and_then(|_| matches.value_source(id))
            == Some(clap::parser::ValueSource::CommandLine)
    }
}

impl TargetConfig {
    /// This run's target directory, if the file names one.
    pub fn resolve(&self, now: SystemTime) -> Result<Option<PathBuf>, ConfigError> {
        match (&self.dir, &self.root) {
            (Some(_), Some(_)) => Err(ConfigError::Target(
                "the configuration sets both target.dir and target.root; keep one".into(),
            )),
            (Some(pattern), None) => expand(pattern, now).map(|d| Some(d.into())),
            (None, Some(root)) => Ok(Some(root.join(expand("%Y%m%dT%H%M%SZ", now)?))),
            (None, None) => Ok(None),
        }
    }
}

/// Replaces `%Y %m %d %H %M %S` with the UTC time `now` and `%%` with `%`.
pub fn expand(pattern: &str, now: SystemTime) -> Result<String, ConfigError> {
    // 2026-11-22T03:12:52Z
    let t = humantime::format_rfc3339_seconds(now).to_string();
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let part = match chars.next() {
            Some('Y') => &t[0..4],
            Some('m') => &t[5..7],
            Some('d') => &t[8..10],
            Some('H') => &t[11..13],
            Some('M') => &t[14..16],
            Some('S') => &t[17..19],
            Some('%') => "%",
            other => {
                return Err(ConfigError::Target(format!(
                    "target.dir {pattern:?} has %{}, which is not one of %Y %m %d %H %M %S %%",
                    other.map(String::from).unwrap_or_default()
                )));
            }
        };
        out.push_str(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
