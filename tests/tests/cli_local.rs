//! The real `cairn` binary against a local directory repository.

use cairn_tests::*;

fn setup() -> (tempfile::TempDir, Repo) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    (tmp, repo)
}

#[test]
fn push_restore_round_trip_is_exact() {
    let (tmp, repo) = setup();
    let src = tmp.path().join("src");
    make_rich_tree(&src);
    let id = repo.push(&src, &["--tag", "env=test"]);
    assert_eq!(id.len(), 64, "last stdout line is the snapshot id: {id}");

    let snaps = repo.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["snapshot"]["tags"]["env"], "test");

    let out = tmp.path().join("out");
    repo.ok(&["restore", &id[..8], out.to_str().unwrap()]);
    assert_same_tree(&src, &out);

    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    assert!(check["packs_read"].as_u64().unwrap() >= 2);
}

#[test]
fn ls_cat_show_stats() {
    let (tmp, repo) = setup();
    let src = tmp.path().join("src");
    make_rich_tree(&src);
    let id = repo.push(&src, &[]);
    let ls = repo.json(&["ls", &format!("{id}:/usr")]);
    let paths: Vec<&str> = ls.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/usr/bin", "/usr/hostname-hardlink", "/usr/link"]);
    assert_eq!(ls[2]["target"], "../etc/hostname");
    let all = repo.json(&["ls", "-R", &id]);
    assert!(all.as_array().unwrap().iter().any(|e| e["path"] == "/usr/bin/big"));

    let cat = repo.cmd(&["cat", &format!("{}:/usr/bin/big", &id[..10])]).output().unwrap();
    assert!(cat.status.success());
    assert_eq!(cat.stdout, std::fs::read(src.join("usr/bin/big")).unwrap());
    let sparse = repo.cmd(&["cat", &format!("{id}:/sparse")]).output().unwrap();
    assert_eq!(sparse.stdout, std::fs::read(src.join("sparse")).unwrap());

    let show = repo.json(&["show", "latest"]);
    assert_eq!(show["id"], id.as_str());
    assert!(show["snapshot"]["stats"]["files"].as_u64().unwrap() >= 5);
    let stats = repo.json(&["stats"]);
    assert_eq!(stats["snapshots"], 1);
    assert!(stats["data_packs"].as_u64().unwrap() >= 1 && stats["meta_packs"].as_u64().unwrap() >= 1);

    let missing = repo.run(&["cat", &format!("{id}:/no/such")]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
fn incremental_push_reads_and_stores_only_what_changed() {
    let (tmp, repo) = setup();
    let src = tmp.path().join("src");
    make_rich_tree(&src);
    settle();
    let first = repo.json(&["push", src.to_str().unwrap()]);
    assert!(first["stats"]["new_chunks"].as_u64().unwrap() > 5);

    std::fs::write(src.join("etc/hostname"), "changed\n").unwrap();
    std::fs::create_dir(src.join("new-dir")).unwrap();
    std::fs::write(src.join("new-dir/file"), "x").unwrap();
    let second = repo.json(&["push", src.to_str().unwrap()]);
    assert_eq!(second["parent"], first["snapshot"]);
    // Unchanged files are not read: only the two changed/new files (hard link: 2 names).
    let read = second["stats"]["bytes_read"].as_u64().unwrap();
    assert!(read < 100, "second push read {read} bytes; unchanged files must be skipped");
    assert!(second["files_unchanged"].as_u64().unwrap() >= 3, "{second}");
    // New data chunks: the changed hostname and the new file; plus new trees up the path.
    assert!(second["stats"]["new_chunks"].as_u64().unwrap() <= 2, "{second}");

    let a = first["snapshot"].as_str().unwrap();
    let b = second["snapshot"].as_str().unwrap();
    let diff = repo.json(&["diff", a, b]);
    let changes: Vec<(String, String)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap().to_string(), c["change"].as_str().unwrap().to_string()))
        .collect();
    assert!(changes.contains(&("/etc/hostname".into(), "modified".into())), "{changes:?}");
    assert!(changes.contains(&("/new-dir".into(), "added".into())), "{changes:?}");
    assert!(changes.contains(&("/new-dir/file".into(), "added".into())), "{changes:?}");

    let out = tmp.path().join("out");
    repo.ok(&["restore", b, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

/// Wait until every ctime is over a second old: the change cache does
/// not trust files changed in the last second.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

#[test]
fn memory_image_holes_are_never_stored_and_restore_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init", "--memory-chunk", "65536"]);
    let img = tmp.path().join("mem.raw");
    let f = std::fs::File::create(&img).unwrap();
    use std::os::unix::fs::FileExt;
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    for p in [0u64, 1, 2, 300, 301, 4000] {
        f.write_all_at(&page.iter().map(|b| b ^ p as u8).collect::<Vec<_>>(), p * 65536).unwrap();
    }
    // A page of explicit zeros written as data: still a hole in the snapshot.
    f.write_all_at(&[0u8; 65536], 100 * 65536).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let first = repo.json(&["push", "--kind", "memory", img.to_str().unwrap()]);
    assert_eq!(first["stats"]["chunks"], 6, "{first}");
    assert!(first["stats"]["stored_bytes"].as_u64().unwrap() < 1 << 20);

    let out = tmp.path().join("out");
    let id = first["snapshot"].as_str().unwrap();
    repo.ok(&["restore", id, out.to_str().unwrap()]);
    let restored = out.join("mem.raw");
    assert_eq!(std::fs::read(&restored).unwrap(), std::fs::read(&img).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&restored).unwrap().blocks() * 512 < 2 << 20, "holes stay holes");

    // A second image sharing all but one page stores one chunk.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[1u8; 10], 301 * 65536 + 5).unwrap();
    drop(f);
    let second = repo.json(&["push", "--kind", "memory", img.to_str().unwrap()]);
    assert_eq!(second["stats"]["new_chunks"], 1, "{second}");
}
