//! The real `cairn` binary against a real S3-compatible server (moto) on 127.0.0.1.

use cairn_tests::*;

#[test]
fn s3_push_restore_check_round_trip() {
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::s3(&moto, "cairn-test");
    repo.ok(&["init"]);
    // A second init must not clobber the first (conditional create).
    let again = repo.run(&["init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let src = tmp.path().join("src");
    make_rich_tree(&src);
    let push = repo.json(&["push", src.to_str().unwrap()]);
    assert!(push["requests"]["puts"].as_u64().unwrap() >= 4, "{push}");
    let id = push["snapshot"].as_str().unwrap().to_string();

    // A fresh cache: the chunk index is rebuilt from the bucket's index segments.
    let fresh = Repo { url: repo.url.clone(), cache: tempfile::tempdir().unwrap(), env: repo.env.clone() };
    let out = tmp.path().join("out");
    fresh.ok(&["restore", &id, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    let check = fresh.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");

    // Incremental push over S3 stores nothing new when nothing changed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = repo.json(&["push", src.to_str().unwrap()]);
    assert_eq!(second["stats"]["new_chunks"], 0, "{second}");
}

#[test]
fn s3_unreachable_is_a_clear_error() {
    let moto = Moto::start();
    let repo = Repo::s3(&moto, "gone");
    repo.ok(&["init"]);
    let port = moto.port;
    drop(moto);
    let mut cmd = repo.cmd(&["snapshots"]);
    cmd.env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(300));
}
