//! `hotbackup systemd` and the agent under a service manager: the installed units pass
//! `systemd-analyze verify`, and the agent speaks sd_notify (READY=1 once the mount is
//! live, STOPPING=1 on SIGTERM) to a NOTIFY_SOCKET the test listens on.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, hotbackup, hotbackup_bin, is_mounted};

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "hotbackup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn print_shows_every_unit_with_this_binary_in_exec_start() {
    let out = stdout(&hotbackup(&[
        "systemd",
        "--print",
        "--mountpoint",
        "/srv/db",
    ]));
    for header in [
        "### /etc/systemd/system/hotbackup-agent@.service",
        "### /etc/hotbackup/agent-srv-db.env",
        "### /etc/systemd/system/mariadb.service.d/hotbackup.conf",
    ] {
        assert!(out.lines().any(|l| l == header), "no {header} in:\n{out}");
    }
    let exec = format!("ExecStart=\"{}\" agent ", hotbackup_bin().display());
    assert!(
        out.lines().any(|l| l.starts_with(&exec)),
        "no {exec} in:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l == "HOTBACKUP_BACKING=\"/srv/db.backing\"")
    );
    assert!(
        out.lines()
            .any(|l| l == "Requires=hotbackup-agent@srv-db.service")
    );
}

#[test]
fn a_mistaken_mountpoint_is_named() {
    let out = hotbackup(&["systemd", "--print", "--mountpoint", "db"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("db is not an absolute path"), "{err}");
}

/// `systemd-analyze verify NAMES` with the units found through `unit_path`; fails on
/// any complaint about a file in `units` (it exits 0 on unknown keys and bad values, such
/// as a calendar it cannot parse, and only logs them).
fn verify(unit_path: &str, units: &Path, names: &[&str]) {
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no"])
        .args(names)
        .env("SYSTEMD_UNIT_PATH", unit_path)
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "verify failed:\n{err}");
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(units.to_str().unwrap()))
        .collect();
    assert!(ours.is_empty(), "verify complained:\n{err}");
}

/// `hotbackup systemd --install --root ROOT --mountpoint /var/lib/mysql EXTRA...`.
fn install(root: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "systemd",
        "--install",
        "--root",
        root.to_str().unwrap(),
        "--mountpoint",
        "/var/lib/mysql",
    ];
    args.extend(extra);
    stdout(&hotbackup(&args))
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let out = install(root.path(), &["--backing", "/var/lib/mysql.backing"]);
    assert!(out.contains("systemctl enable --now hotbackup-agent@var-lib-mysql.service"));
    let units = root.path().join("etc/systemd/system");
    assert!(units.join("hotbackup-agent@.service").is_file());
    assert!(units.join("mariadb.service.d/hotbackup.conf").is_file());
    let env =
        fs::read_to_string(root.path().join("etc/hotbackup/agent-var-lib-mysql.env")).unwrap();
    assert!(
        env.lines()
            .any(|l| l == "HOTBACKUP_BACKING=\"/var/lib/mysql.backing\"")
    );

    // Offline: systemd is not PID 1 here. `--root` would look for the binary and the
    // system's targets inside the temp root too, so the units are found through
    // SYSTEMD_UNIT_PATH instead (the trailing colon keeps the system's own unit
    // directories, for sysinit.target and mariadb.service).
    let mut unit_path = format!("{}:", units.display());
    let stub = tempfile::tempdir().unwrap();
    if !Path::new("/lib/systemd/system/mariadb.service").exists()
        && !Path::new("/etc/systemd/system/mariadb.service").exists()
    {
        // Without mariadb-server the drop-in needs a unit to attach to.
        fs::write(
            stub.path().join("mariadb.service"),
            "[Service]\nExecStart=/bin/true\n",
        )
        .unwrap();
        unit_path.push_str(&format!("{}:", stub.path().display()));
    }
    verify(
        &unit_path,
        &units,
        &["hotbackup-agent@var-lib-mysql.service", "mariadb.service"],
    );

    // The drop-in took effect: the server requires and starts after the agent instance.
    let deps = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no"])
        .env("SYSTEMD_UNIT_PATH", &unit_path)
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .arg("mariadb.service")
        .output()
        .expect("run systemd-analyze");
    let dump = String::from_utf8_lossy(&deps.stdout);
    for line in [
        "Requires: hotbackup-agent@var-lib-mysql.service",
        "After: hotbackup-agent@var-lib-mysql.service",
    ] {
        assert!(
            dump.lines().any(|l| l.trim().starts_with(line)),
            "mariadb.service lacks {line}:\n{dump}"
        );
    }
}

/// Receives one notification, waiting up to `timeout`.
fn receive(socket: &UnixDatagram, timeout: Duration) -> String {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// Starts an agent that notifies `notify_socket`, asserts READY=1 arrives with the mount
/// already live, then SIGTERM and STOPPING=1 with a clean exit.
fn ready_then_stopping(listener: &UnixDatagram, notify_socket: &OsStr) {
    let mut agent = Agent::launch(&[], &[("NOTIFY_SOCKET", notify_socket)]);
    let started = Instant::now();
    let ready = receive(listener, Duration::from_secs(20));
    // Checked before anything else waits: READY=1 must not come before the mount.
    let mounted = is_mounted(&agent.mountpoint);
    let socket = agent.socket.exists();
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification is {ready:?}"
    );
    assert!(mounted, "READY=1 came before the mount was live");
    assert!(socket, "READY=1 came before the control socket existed");
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving ")),
        "{ready:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    let (status, stderr) = agent.stop();
    assert!(status.success(), "agent exited {status}: {stderr}");
    let stopping = receive(listener, Duration::from_secs(5));
    assert!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "after SIGTERM: {stopping:?}"
    );
    assert!(!is_mounted(&agent.mountpoint));
}

#[test]
fn agent_notifies_ready_and_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    ready_then_stopping(&listener, path.as_os_str());
}

#[test]
fn agent_notifies_ready_and_stopping_on_an_abstract_socket() {
    let name = format!("hotbackup-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixDatagram::bind_addr(&addr).unwrap();
    ready_then_stopping(&listener, OsStr::new(&format!("@{name}")));
}

/// Restart=on-failure only recovers if a restarted agent can mount again: the SIGKILLed
/// agent's mount stays behind, dead ("Transport endpoint is not connected"), and the new
/// agent must detach it itself.
#[test]
fn a_restarted_agent_clears_the_dead_mount_a_crash_left() {
    let mut agent = Agent::start();
    fs::write(agent.mnt("t1.ibd"), b"rows before the crash").unwrap();
    // A server's open file at the crash, like mariadbd's tablespaces.
    let held = fs::File::open(agent.mnt("t1.ibd")).unwrap();

    agent.kill9();
    // Attributes the kernel cached a moment ago may still answer; over io_uring, while
    // the kernel tears down the dead agent's rings, a request can fail with ECANCELED or
    // ECONNABORTED; after that, every request fails with ENOTCONN.
    let started = Instant::now();
    loop {
        let err = match fs::metadata(&agent.mountpoint) {
            Ok(_) => None,
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => break,
            Err(e) => Some(e),
        };
        let transient = err
            .as_ref()
            .is_none_or(|e| matches!(e.raw_os_error(), Some(libc::ECANCELED | libc::ECONNABORTED)));
        assert!(
            transient && started.elapsed() < Duration::from_secs(10),
            "after SIGKILL: {err:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        is_mounted(&agent.mountpoint),
        "the dead mount is still in the table"
    );
    // The host's status says what happened and what to do.
    let host: serde_json::Value =
        serde_json::from_str(&stdout(&hotbackup(&["status", "--json"]))).unwrap();
    let ours = host["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["mountpoint"] == agent.mountpoint.to_str().unwrap())
        .expect("the dead mount in the host's status");
    let said = ours["error"].as_str().unwrap();
    assert!(
        said.contains("the mount is dead") && said.contains("restart the agent"),
        "{said}"
    );

    agent.restart();
    assert_eq!(
        fs::read(agent.mnt("t1.ibd")).unwrap(),
        b"rows before the crash"
    );
    fs::write(agent.mnt("t2.ibd"), b"after").unwrap();
    assert_eq!(fs::read(agent.backing.join("t2.ibd")).unwrap(), b"after");
    // Exactly one hotbackup mount there now: the dead one was detached, not stacked on.
    let here = capture::mountinfo::mounts()
        .into_iter()
        .filter(|m| m.mountpoint == agent.mountpoint.canonicalize().unwrap())
        .count();
    assert_eq!(here, 1);
    // The descriptor held across the crash fails; it never reaches the new agent.
    use std::os::unix::fs::FileExt;
    assert!(held.read_at(&mut [0u8; 4], 0).is_err());
    drop(held);
    let (status, stderr) = agent.stop();
    assert!(status.success(), "agent exited {status}: {stderr}");
}

/// `--timer` adds a scheduled backup that needs no flags; both units pass verify.
#[test]
fn the_backup_timer_and_service_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let out = install(root.path(), &["--timer", "*-*-* 02:30:00"]);
    assert!(
        out.contains("systemctl enable --now hotbackup-backup.timer"),
        "{out}"
    );
    let units = root.path().join("etc/systemd/system");
    let service = fs::read_to_string(units.join("hotbackup-backup.service")).unwrap();
    let exec = format!(
        "ExecStart=\"{}\" backup --progress=none",
        hotbackup_bin().display()
    );
    assert!(service.lines().any(|l| l == exec), "{service}");
    verify(
        &format!("{}:", units.display()),
        &units,
        &["hotbackup-backup.timer", "hotbackup-backup.service"],
    );
    let timer = fs::read_to_string(units.join("hotbackup-backup.timer")).unwrap();
    let calendar = timer
        .lines()
        .find_map(|l| l.strip_prefix("OnCalendar="))
        .expect("OnCalendar");
    let parsed = Command::new("systemd-analyze")
        .args(["calendar", calendar])
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
}
