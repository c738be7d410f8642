//! An image's life in a repository: an upload cut off by the network is never listed
//! and resumes where it stopped; `delete` and `prune` work the same on a directory and
//! on a bucket and never take the newest backup or one still being written. The images
//! are raw tree copies (`hotbackup copy`) of a small tree with a sparse file.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::s3::{BUCKET, CutProxy, Moto};
use common::{Agent, ok};

/// Eight 1 MiB files of random bytes (they do not compress) and a 64 MiB sparse file
/// with 4 KiB of data, copied into `target` with `hotbackup copy`.
fn image(agent: &Agent, target: &Path) {
    let mut random = fs::File::open("/dev/urandom").unwrap();
    for i in 0..8 {
        let mut buf = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut random, &mut buf).unwrap();
        fs::write(agent.mnt(&format!("f{i}")), buf).unwrap();
    }
    if !agent.mnt("sparse").exists() {
        let f = fs::File::create(agent.mnt("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 32 << 20).unwrap();
    }
    ok(&agent.copy(target, &["--progress=none"]));
}

#[test]
fn an_upload_cut_off_is_never_listed_and_resumes_where_it_stopped() {
    let moto = Moto::start();
    let agent = Agent::start();
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("img");
    image(&agent, &local);
    let url = moto.url("cut/img");
    let local_s = local.to_str().unwrap();

    // The network goes away after 3.5 MiB: three or so objects are finished.
    let proxy = CutProxy::start(&moto.endpoint, 7 << 19);
    let out = moto.hotbackup_with(
        &[
            "upload",
            local_s,
            &url,
            "--transfers",
            "1",
            "--s3-retries",
            "1",
        ],
        &[("AWS_ENDPOINT_URL", &proxy.endpoint)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the upload went through the cut");
    // The step it was in, then one sentence.
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[1].contains("cannot reach"), "{stderr}");
    drop(proxy);
    let stored = moto.keys("cut/img/");
    assert!(!stored.is_empty(), "nothing was stored before the cut");
    assert!(
        !stored.iter().any(|k| k.ends_with("hotbackup-repo.json")),
        "{stored:?}"
    );
    let listed = moto.hotbackup(&["list", &moto.url("cut")]);
    assert!(
        ok(&listed.clone()).trim().is_empty(),
        "a partial upload is listed"
    );
    assert!(String::from_utf8_lossy(&listed.stderr).contains("1 incomplete (img)"));
    let info = moto.hotbackup(&["info", &url]);
    let info_text = String::from_utf8_lossy(&info.stdout);
    assert_eq!(info.status.code(), Some(1));
    assert!(
        info_text.contains("is not a complete backup"),
        "{info_text}"
    );

    // Again, with the network back: what was finished is not sent again.
    let again = ok(&moto.hotbackup(&["upload", local_s, &url, "--transfers", "1"]));
    let skipped: usize = again
        .split(" already there")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{again}"));
    assert!((1..10).contains(&skipped), "{again}");
    eprintln!("resumed upload: {skipped} objects skipped");
    assert!(ok(&moto.hotbackup(&["verify", &url])).contains("all checksums match"));
    // The sparse file's 64 MiB cost almost nothing stored.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&moto.hotbackup(&["list", &moto.url("cut"), "--json"]))).unwrap();
    let stored_bytes = json[0]["stored_bytes"].as_u64().unwrap();
    assert_eq!(json[0]["bytes"].as_u64().unwrap(), 72 << 20);
    assert!(stored_bytes < 9 << 20, "{stored_bytes} bytes stored");
}

/// `name`s in `hotbackup list LOCATION`, oldest first.
fn names(moto: &Moto, location: &str) -> Vec<String> {
    ok(&moto.hotbackup(&["list", location]))
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn delete_and_prune_work_the_same_on_a_directory_and_a_bucket() {
    let moto = Moto::start();
    let agent = Agent::start();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("repo");
    fs::create_dir(&dir).unwrap();
    let names_in_order = ["a", "b", "c", "d"];
    for name in names_in_order {
        image(&agent, &dir.join(name));
        ok(&moto.hotbackup(&[
            "upload",
            dir.join(name).to_str().unwrap(),
            &moto.url(&format!("p/{name}")),
        ]));
    }
    // One still being written: locally an INCOMPLETE image, in the bucket a stray object.
    let partial = dir.join("e");
    fs::create_dir_all(partial.join("data")).unwrap();
    fs::File::create(partial.join("INCOMPLETE"))
        .unwrap()
        .write_all(b"this backup is not usable: copying\n")
        .unwrap();
    moto.python(&format!(
        "s3().put_object(Bucket={BUCKET:?}, Key='p/e/data/f0.zst', Body=b'x')"
    ));

    for location in [dir.to_str().unwrap().to_string(), moto.url("p")] {
        assert_eq!(names(&moto, &location), names_in_order, "{location}");
        let dry = ok(&moto.hotbackup(&["prune", &location, "--keep-last", "2", "--dry-run"]));
        assert!(
            dry.contains("would delete a") && dry.contains("would delete b"),
            "{dry}"
        );
        assert!(dry.contains("1 incomplete image(s) kept"), "{dry}");
        assert_eq!(names(&moto, &location), names_in_order, "a dry run deleted");
        ok(&moto.hotbackup(&["prune", &location, "--keep-last", "2"]));
        assert_eq!(names(&moto, &location), ["c", "d"], "{location}");
        // One a week: the newest of this week.
        ok(&moto.hotbackup(&[
            "prune",
            &location,
            "--keep-daily",
            "0",
            "--keep-last",
            "0",
            "--keep-weekly",
            "1",
        ]));
        assert_eq!(names(&moto, &location), ["d"], "{location}");
        ok(&moto.hotbackup(&["delete", &format!("{location}/d")]));
        assert!(names(&moto, &location).is_empty(), "{location}");
    }
    // Nothing of the pruned images is left in the bucket; the partial one is untouched.
    let left: Vec<PathBuf> = moto.keys("p/").into_iter().map(PathBuf::from).collect();
    assert_eq!(left, [PathBuf::from("p/e/data/f0.zst")]);
    assert!(partial.join("INCOMPLETE").exists());
}
