//! `cairn forget` through the real binary: expiry, retention rules, scopes, dry runs.

use cairn_tests::*;

#[test]
fn forget_applies_expiry_and_retention_and_dry_run_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let mut ids = Vec::new();
    for i in 0..4 {
        std::fs::write(src.join("f"), format!("version {i}")).unwrap();
        let mut extra = vec!["--host", "h1"];
        if i == 0 {
            extra.extend(["--tag", "pin=yes"]);
        }
        if i == 1 {
            extra.extend(["--expire-in", "1s"]);
        }
        ids.push(repo.push(&src, &extra));
    }
    let other = repo.push(&src, &["--host", "h2"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let count = || repo.json(&["snapshots"]).as_array().unwrap().len();
    assert_eq!(count(), 5);

    // Without rules only expiry removes; a dry run only reports it.
    let dry = repo.json(&["forget", "--dry-run"]);
    assert_eq!(dry["removed"], 1, "{dry}");
    let gone: Vec<&str> =
        dry["decisions"].as_array().unwrap().iter().filter(|d| d["keep"] == false).map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(gone, vec![ids[1].as_str()]);
    assert_eq!(count(), 5);
    repo.ok(&["forget"]);
    assert_eq!(count(), 4);

    // keep-last 1 per host+path, pins kept, other hosts out of scope untouched.
    let out = repo.json(&["forget", "--host", "h1", "--keep-last", "1", "--keep-tag", "pin=yes"]);
    assert_eq!(out["removed"], 1, "{out}");
    let left: Vec<String> =
        repo.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    let mut expected = vec![ids[0].clone(), ids[3].clone(), other];
    expected.sort();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, expected);
    // Data of the remaining snapshots is intact (forget removes roots only).
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &ids[0], out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "version 0");
}
