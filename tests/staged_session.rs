//! The staged backup session over the agent's control socket, as the database
//! coordinator drives it: copied → (the client's own work) → stop → finish. Progress in
//! every stage, the session tied to its connection, late work before the stop.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::Duration;

use agent::AgentAddress;
use agent::client::{ClientError, StagedClient};
use agent::control::{ExtraFile, Report};
use capture::session::SessionOptions;
use common::Agent;

const IDLE: Duration = Duration::from_secs(60);

fn begin(agent: &Agent, target: &std::path::Path, exclude: &[&str]) -> (StagedClient, Vec<Report>) {
    let mut reports = Vec::new();
    let options = SessionOptions {
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        ..SessionOptions::default()
    };
    let (client, copied) = StagedClient::begin(
        &AgentAddress::Socket(agent.socket.clone()),
        target,
        options,
        IDLE,
        |r| reports.push(r.clone()),
    )
    .expect("begin");
    assert_eq!(copied.files_copied, copied.files_total, "{copied:?}");
    (client, reports)
}

fn incomplete_reason(target: &std::path::Path) -> String {
    fs::read_to_string(target.join("INCOMPLETE")).expect("the target must stay marked incomplete")
}

#[test]
fn a_staged_session_stops_where_told_and_finishes_with_the_clients_files() {
    let agent = Agent::start();
    fs::create_dir(agent.mnt("db")).unwrap();
    fs::write(agent.mnt("db/t.ibd"), vec![1u8; 3 << 20]).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(agent.mnt("db/t.ibd"))
        .unwrap();
    let target = agent.dir.path().join("target");
    let (mut client, _) = begin(&agent, &target, &[]);
    // Between copied and stop (where a coordinator blocks commits): mirrored.
    f.write_all_at(b"before the stop", 1000).unwrap();
    let stopped = client.stop(|_| {}).expect("stop");
    assert!(!stopped.validity_point.is_empty());
    // After the stop: not in the image.
    f.write_all_at(b"after the stop!", 1000).unwrap();
    assert!(
        target.join("INCOMPLETE").exists(),
        "marked incomplete until finished"
    );
    let mut finishing = Vec::new();
    let summary = client
        .finish(
            "backup",
            serde_json::json!({ "server": "test" }),
            vec![ExtraFile {
                name: "hotbackup_binlog_info".into(),
                contents: "bin.000001\t42\t0-1-7\n".into(),
            }],
            |r| finishing.extend(r.finishing.clone()),
        )
        .expect("finish");
    assert_eq!(summary.files, 1);
    let last = finishing
        .last()
        .expect("the finishing pass reports progress");
    assert_eq!((last.files_done, last.files_total), (1, 1), "{finishing:?}");
    assert_eq!(last.bytes_done, 3 << 20);
    let image = fs::read(target.join("data/db/t.ibd")).unwrap();
    assert_eq!(&image[1000..1015], b"before the stop");
    let info = target.join("hotbackup_binlog_info");
    assert_eq!(
        fs::read_to_string(&info).unwrap(),
        "bin.000001\t42\t0-1-7\n"
    );
    assert_eq!(
        fs::metadata(&info).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["kind"], "backup");
    assert_eq!(manifest["database"]["server"], "test");
    assert!(!target.join("INCOMPLETE").exists());
    agent.wait_no_session();
}

#[test]
fn a_client_gone_before_the_stop_aborts_the_session_and_the_next_one_works() {
    let agent = Agent::start();
    fs::write(agent.mnt("f"), vec![2u8; 1 << 20]).unwrap();
    let target = agent.dir.path().join("t1");
    let (client, _) = begin(&agent, &target, &[]);
    drop(client);
    agent.wait_no_session();
    // The agent ends the session first and then records why in the marker.
    common::wait_for("the reason in the marker", Duration::from_secs(20), || {
        incomplete_reason(&target).contains("client went away")
    });
    // The agent and mount serve on, and a new session works.
    fs::write(agent.mnt("g"), b"still serving").unwrap();
    let target2 = agent.dir.path().join("t2");
    let (mut client, _) = begin(&agent, &target2, &[]);
    client.stop(|_| {}).unwrap();
    client
        .finish("copy", serde_json::Value::Null, vec![], |_| {})
        .unwrap();
    assert_eq!(fs::read(target2.join("data/g")).unwrap(), b"still serving");
}

#[test]
fn cancel_ends_the_session_with_the_reason_recorded() {
    let agent = Agent::start();
    fs::write(agent.mnt("f"), b"x").unwrap();
    let target = agent.dir.path().join("t");
    let (client, _) = begin(&agent, &target, &[]);
    client.cancel("the lock wait timed out");
    agent.wait_no_session();
    common::wait_for("the reason in the marker", Duration::from_secs(20), || {
        incomplete_reason(&target).contains("cancelled")
    });
    let reason = incomplete_reason(&target);
    assert!(
        reason.contains("cancelled: the lock wait timed out"),
        "{reason}"
    );
}

#[test]
fn a_file_moved_in_after_the_copy_phase_is_copied_before_the_stop() {
    let agent = Agent::start();
    fs::create_dir(agent.mnt("tmp")).unwrap();
    fs::write(agent.mnt("tmp/late"), vec![5u8; 2 << 20]).unwrap();
    let target = agent.dir.path().join("t");
    let (mut client, _) = begin(&agent, &target, &["tmp"]);
    fs::rename(agent.mnt("tmp/late"), agent.mnt("late")).unwrap();
    client
        .stop(|_| {})
        .expect("the stop copies late work first");
    client
        .finish("copy", serde_json::Value::Null, vec![], |_| {})
        .unwrap();
    assert_eq!(
        fs::read(target.join("data/late")).unwrap(),
        vec![5u8; 2 << 20]
    );
    assert!(!target.join("data/tmp").exists());
}

#[test]
fn out_of_order_steps_and_bad_file_names_are_refused() {
    let agent = Agent::start();
    fs::write(agent.mnt("f"), b"x").unwrap();
    // A stray Stop outside a session.
    match agent::client::call(
        &AgentAddress::Socket(agent.socket.clone()),
        &agent::Request::Stop,
    ) {
        Ok(agent::Response::Error { message, .. }) => {
            assert!(message.contains("Begin"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // A file name that would escape the target.
    let target = agent.dir.path().join("t");
    let (mut client, _) = begin(&agent, &target, &[]);
    client.stop(|_| {}).unwrap();
    let err = client
        .finish(
            "backup",
            serde_json::Value::Null,
            vec![ExtraFile {
                name: "../escape".into(),
                contents: "x".into(),
            }],
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, ClientError::Agent { .. }), "{err}");
    assert!(!agent.dir.path().join("escape").exists());
    assert!(incomplete_reason(&target).contains("not a plain file name"));
}
