//! `hotbackup backup`'s options from the flags and the configuration file: flags win, then
//! the file, then the defaults (agent::config decides; this only hands it the matches).

use std::path::PathBuf;

use agent::backup::BackupOptions;
use agent::config::{self, given_in, overlay};
use agent::db::ConnectionOptions;
use anyhow::bail;

/// The connection, target directory and options a backup runs with.
pub fn backup_options(
    matches: &clap::ArgMatches,
    config_path: Option<&std::path::Path>,
    flags_connection: &ConnectionOptions,
    target_dir: Option<PathBuf>,
    flags: &BackupOptions,
) -> anyhow::Result<(ConnectionOptions, PathBuf, BackupOptions)> {
    let loaded = config::load(config_path)?;
    let given = given_in(matches);
    let section = |name| loaded.table.get(name).and_then(|v| v.as_table());
    let mut connection = overlay(
        flags_connection,
        &loaded.config.connection,
        section("connection"),
        &given,
    );
    // Never read from a file, so never serialized: carried over from the flags as is.
    connection.password = flags_connection.password.clone();
    let options = overlay(flags, &loaded.config.backup, section("backup"), &given);
    let target = match target_dir {
        Some(dir) => dir,
        None => match loaded.config.target.resolve(std::time::SystemTime::now())? {
            Some(dir) => dir,
            None => match &loaded.path {
                Some(p) => bail!(
                    "no target: pass --target-dir DIR or set target.root or target.dir in {}",
                    p.display()
                ),
                None => bail!(
                    "no target: pass --target-dir DIR, or set target.root in {} (or the file --config or {} names)",
                    config::DEFAULT_PATH,
                    config::ENV
                ),
            },
        },
    };
    Ok((connection, target, options))
}
