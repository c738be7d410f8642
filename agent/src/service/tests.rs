//! Tests of the generated units: escaping, the template, instances, the timer, install.

use super::*;

/// Whether `text` has `line` as one of its lines.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

fn options(mountpoint: &str) -> ServiceOptions {
    ServiceOptions {
        mountpoint: mountpoint.into(),
        backing: None,
        server_unit: "mariadb.service".into(),
        timer: None,
    }
}

#[test]
fn paths_are_escaped_like_systemd_escape_path() {
    let e = |p: &str| escape_path(Path::new(p)).unwrap();
    assert_eq!(e("/var/lib/mysql"), "var-lib-mysql");
    assert_eq!(e("/var//lib/mysql/"), "var-lib-mysql");
    assert_eq!(e("/srv/my-db"), "srv-my\\x2ddb");
    assert_eq!(e("/srv/a b"), "srv-a\\x20b");
    assert_eq!(e("/.hidden/x.y"), "\\x2ehidden-x.y");
    assert_eq!(e("/"), "-");
    assert_eq!(
        escape_path(Path::new("var/lib")),
        Err(ServiceError::NotAbsolute("var/lib".into()))
    );
    assert_eq!(
        escape_path(Path::new("/var/../lib")),
        Err(ServiceError::NotNormal("/var/../lib".into()))
    );
}

#[test]
fn template_runs_the_given_binary_as_a_notify_service() {
    let t = agent_template(Path::new("/opt/hot backup/bin/hotbackup"));
    assert!(t.contains(
        "ExecStart=\"/opt/hot backup/bin/hotbackup\" agent --mountpoint %f \
         --backing ${HOTBACKUP_BACKING} $HOTBACKUP_AGENT_OPTIONS\n"
    ));
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "EnvironmentFile=/etc/hotbackup/agent-%i.env",
        "DeviceAllow=/dev/fuse rw",
        "DeviceAllow=block-loop rw",
    ] {
        assert!(has_line(&t, line), "missing {line}");
    }
    let caps = t
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap();
    assert!(caps.split(' ').any(|c| c == "CAP_SYS_ADMIN"));
    // Anything that gives the service its own mount namespace would hide the mount.
    for key in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateMounts=",
        "ReadOnlyPaths=",
        "ProtectKernelModules=",
    ] {
        assert!(!t.lines().any(|l| l.starts_with(key)), "{key} set");
    }
}

#[test]
fn specifiers_and_variables_in_the_binary_path_are_escaped() {
    let t = agent_template(Path::new("/opt/50%$x\"/hotbackup"));
    assert!(t.contains("ExecStart=\"/opt/50%%$$x\\\"/hotbackup\" agent"));
}

#[test]
fn units_for_a_mountpoint_name_its_instance_everywhere() {
    let files = units(&options("/var/lib/mysql"), Path::new("/usr/bin/hotbackup")).unwrap();
    let paths: Vec<_> = files.iter().map(|f| f.path.to_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "etc/systemd/system/hotbackup-agent@.service",
            "etc/hotbackup/agent-var-lib-mysql.env",
            "etc/systemd/system/mariadb.service.d/hotbackup.conf",
        ]
    );
    assert!(has_line(
        &files[1].text,
        "HOTBACKUP_BACKING=\"/var/lib/mysql.backing\""
    ));
    let dropin = &files[2].text;
    assert!(has_line(
        dropin,
        "Requires=hotbackup-agent@var-lib-mysql.service"
    ));
    assert!(has_line(
        dropin,
        "After=hotbackup-agent@var-lib-mysql.service"
    ));
}

#[test]
fn backing_and_server_unit_can_be_chosen() {
    let mut o = options("/srv/db");
    o.backing = Some("/data/db \"files\"".into());
    o.server_unit = "mysql.service".into();
    let files = units(&o, Path::new("/usr/bin/hotbackup")).unwrap();
    assert!(
        files[1]
            .text
            .contains("HOTBACKUP_BACKING=\"/data/db \\\"files\\\"\"\n")
    );
    assert_eq!(
        files[2].path,
        Path::new("etc/systemd/system/mysql.service.d/hotbackup.conf")
    );
}

#[test]
fn bad_options_are_refused_by_name() {
    let exe = Path::new("/usr/bin/hotbackup");
    assert_eq!(units(&options("/"), exe), Err(ServiceError::Root));
    assert_eq!(
        units(&options("db"), exe),
        Err(ServiceError::NotAbsolute("db".into()))
    );
    let mut o = options("/srv/db");
    o.server_unit = "mariadb".into();
    assert_eq!(
        units(&o, exe),
        Err(ServiceError::ServerUnit("mariadb".into()))
    );
    o = options("/srv/db");
    o.backing = Some("/a\nb".into());
    assert_eq!(units(&o, exe), Err(ServiceError::Newline("/a\nb".into())));
}

#[test]
fn a_timer_adds_the_scheduled_backup_after_the_server_and_its_agent() {
    let mut o = options("/var/lib/mysql");
    assert_eq!(units(&o, Path::new("/usr/bin/hotbackup")).unwrap().len(), 3);
    o.timer = Some("*-*-* 02:30:00".into());
    let files = units(&o, Path::new("/usr/bin/hotbackup")).unwrap();
    let service = &files[3].text;
    assert!(has_line(
        service,
        "ExecStart=\"/usr/bin/hotbackup\" backup --progress=none"
    ));
    assert!(has_line(
        service,
        "After=mariadb.service hotbackup-agent@var-lib-mysql.service"
    ));
    assert!(!service.lines().any(|l| l.starts_with("Requires=")));
    assert!(has_line(&files[4].text, "OnCalendar=*-*-* 02:30:00"));
    o.timer = Some("daily\nExecStart=/bin/sh".into());
    assert!(matches!(
        units(&o, Path::new("/usr/bin/hotbackup")),
        Err(ServiceError::Calendar(_))
    ));
}

#[test]
fn install_writes_every_file_under_the_root() {
    let root = tempfile::tempdir().unwrap();
    let files = units(&options("/var/lib/mysql"), Path::new("/usr/bin/hotbackup")).unwrap();
    let written = install(root.path(), &files).unwrap();
    assert_eq!(written.len(), files.len());
    for (file, path) in files.iter().zip(&written) {
        assert_eq!(path, &root.path().join(&file.path));
        assert_eq!(fs::read_to_string(path).unwrap(), file.text);
    }
    // Installing again replaces the files and leaves no temporary behind.
    install(root.path(), &files).unwrap();
    let dir = root.path().join(UNIT_DIR);
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}
