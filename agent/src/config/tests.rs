//! Every documented example parses, and flags > file > defaults.

use std::time::{Duration, UNIX_EPOCH};

use clap::{CommandFactory, FromArgMatches, Parser};

use super::*;

/// Every file in docs/config-examples, by name.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "minimal.toml",
        include_str!("../../../docs/config-examples/minimal.toml"),
    ),
    (
        "backup-user.toml",
        include_str!("../../../docs/config-examples/backup-user.toml"),
    ),
    (
        "full.toml",
        include_str!("../../../docs/config-examples/full.toml"),
    ),
];

fn example(name: &str) -> Loaded {
    let (_, text) = EXAMPLES.iter().find(|(n, _)| *n == name).unwrap();
    parse(Path::new(name), text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// 2026-11-22T03:12:52Z
fn moment() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_317_172)
}

#[test]
fn every_documented_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config-examples");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = EXAMPLES.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "an example is not parsed by this test");
    for (name, _) in EXAMPLES {
        example(name);
    }

    let minimal = example("minimal.toml").config;
    assert_eq!(
        minimal.connection.socket.as_deref(),
        Some(Path::new("/run/mysqld/mysqld.sock"))
    );
    assert_eq!(minimal.backup, BackupOptions::default());
    assert_eq!(
        minimal.target.resolve(moment()).unwrap(),
        Some(PathBuf::from("/backups/20261122T031252Z"))
    );

    let user = example("backup-user.toml").config;
    assert_eq!(user.connection.port, Some(3306));
    assert_eq!(
        user.target.resolve(moment()).unwrap(),
        Some(PathBuf::from("/srv/backups/db1-20261122T031252Z"))
    );

    let full = example("full.toml").config;
    assert_eq!(full.backup.copy.exclude, ["tmp/*", "*.TMD"]);
    assert_eq!(full.backup.lock_wait_timeout, 60);
    // The full example's values are the defaults where it says so.
    assert_eq!(
        full.backup.copy,
        crate::CopyOptions {
            exclude: full.backup.copy.exclude.clone(),
            ..Default::default()
        }
    );
}

#[derive(Parser)]
struct Backup {
    #[command(flatten)]
    connection: ConnectionOptions,
    #[command(flatten)]
    options: BackupOptions,
}

/// The options of `args` with `file` overlaid, as `hotbackup backup` merges them.
fn merged(args: &[&str], file: &str) -> (ConnectionOptions, BackupOptions) {
    let matches = Backup::command().get_matches_from(args);
    let flags = Backup::from_arg_matches(&matches).unwrap();
    let loaded = parse(Path::new("t.toml"), file).unwrap();
    let given = given_in(&matches);
    let section = |name| loaded.table.get(name).and_then(|v| v.as_table());
    (
        overlay(
            &flags.connection,
            &loaded.config.connection,
            section("connection"),
            &given,
        ),
        overlay(
            &flags.options,
            &loaded.config.backup,
            section("backup"),
            &given,
        ),
    )
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let file = "[connection]\nuser = \"backup\"\nport = 3307\n\
                [backup]\nlock_wait_timeout = 5\n[backup.copy]\nparallel = 4\n";
    let (conn, opts) = merged(&["x", "--port", "3308", "--parallel", "3"], file);
    assert_eq!(conn.user.as_deref(), Some("backup"), "file over default");
    assert_eq!(conn.port, Some(3308), "flag over file");
    assert_eq!(opts.lock_wait_timeout, 5, "file over default");
    assert_eq!(opts.copy.parallel, 3, "flag over file (nested)");
    assert_eq!(opts.safe_slave_backup_timeout, 300, "default kept");
    // A flag given with its default's value still wins.
    let (_, opts) = merged(&["x", "--lock-wait-timeout", "60"], file);
    assert_eq!(opts.lock_wait_timeout, 60);
    // No file: the flags as they are.
    let (conn, opts) = merged(&["x", "--user", "u"], "");
    assert_eq!(conn.user.as_deref(), Some("u"));
    assert_eq!(opts, BackupOptions::default());
}

#[test]
fn mistakes_in_the_file_are_named() {
    let err = |text: &str| {
        parse(Path::new("/etc/h.toml"), text)
            .unwrap_err()
            .to_string()
    };
    let e = err("[connection]\npassword = \"secret\"\n");
    assert!(
        e.contains("holds a password") && e.contains("defaults_extra_file"),
        "{e}"
    );
    assert!(!e.contains("secret"));
    let e = err("[backup]\nlock_wait = 5\n");
    assert!(e.contains("/etc/h.toml") && e.contains("lock_wait"), "{e}");
    let e = err("[backup.copy]\nparallel = \"two\"\n");
    assert!(e.contains("parallel") || e.contains("integer"), "{e}");
    let both = TargetConfig {
        dir: Some("/b/%Y".into()),
        root: Some("/b".into()),
    };
    assert!(both.resolve(moment()).is_err());
    let e = expand("/b/%Q", moment()).unwrap_err().to_string();
    assert!(e.contains("%Q"), "{e}");
    assert_eq!(
        expand("/b/%Y-%m-%d_%H.%M.%S%%", moment()).unwrap(),
        "/b/2026-11-22_03.12.52%"
    );
}

#[test]
fn a_missing_default_file_is_no_configuration_but_a_named_one_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let e = load(Some(&missing)).unwrap_err().to_string();
    assert!(e.contains("none.toml"), "{e}");
    let file = dir.path().join("h.toml");
    std::fs::write(&file, "[target]\nroot = \"/b\"\n").unwrap();
    let loaded = load(Some(&file)).unwrap();
    assert_eq!(loaded.path.as_deref(), Some(file.as_path()));
    assert_eq!(loaded.config.target.root.as_deref(), Some(Path::new("/b")));
}
