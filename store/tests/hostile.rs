//! Crafted manifests: whatever a snapshot says, restore never writes outside its target.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use cairn_store::format::config::Chunking;
use cairn_store::format::index::{self, IndexSegment, IndexedPack};
use cairn_store::format::pack::{self, PackBuilder, PackKind};
use cairn_store::format::snapshot::{self, Kind, Snapshot, SnapshotStats};
use cairn_store::format::tree::{Content, Extent, Node, NodeKind, Tree};
use cairn_store::{Id, Repository};

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        xattrs: vec![],
        link_group: None,
    }
}

fn file(name: &[u8], data: &[u8]) -> Node {
    node(
        name,
        NodeKind::File {
            size: data.len() as u64,
            content: Content::Extents(vec![Extent { chunk: Some(Id::of(data)), len: data.len() as u64 }]),
        },
    )
}

/// Commit a snapshot made of raw tree objects (not checked by `Tree::build`'s callers).
async fn commit(repo: &Repository, objects: Vec<Vec<u8>>, data: &[&[u8]], root_tree: Id) -> Snapshot {
    let mut b = PackBuilder::new(PackKind::Meta, 1 << 20);
    for o in objects.iter().map(|o| o.as_slice()).chain(data.iter().copied()) {
        b.add(Id::of(o), o.len() as u32, pack::Codec::Raw, o);
    }
    let p = b.finish();
    repo.put(&pack::object_name(&p.id), p.bytes.clone()).await.unwrap();
    let seg = IndexSegment {
        packs: vec![IndexedPack { id: p.id, kind: p.kind, len: p.bytes.len() as u64, chunks: p.entries }],
        supersedes: vec![],
    };
    let (sid, bytes) = seg.encode();
    repo.put(&index::object_name(&sid), bytes).await.unwrap();
    repo.sync_index().await.unwrap();
    let snap = Snapshot {
        format: 1,
        time: "2026-01-01T00:00:00Z".into(),
        host: "evil".into(),
        source: "/".into(),
        kind: Kind::Fs,
        tags: BTreeMap::new(),
        parent: None,
        expires: None,
        root: node(b"root", NodeKind::Dir { tree: root_tree }),
        meta_packs: vec![p.id],
        stats: SnapshotStats::default(),
    };
    let (id, bytes) = snap.encode();
    repo.put(&snapshot::object_name(&id), bytes).await.unwrap();
    repo.load_snapshot(&id).await.unwrap()
}

/// A raw tree object, bypassing the sorted-names invariant `Tree::build` keeps.
fn raw_tree(nodes: Vec<Node>) -> Vec<u8> {
    let mut out = b"CRNT\x01".to_vec();
    out.extend(postcard::to_stdvec(&Tree::Leaf(nodes)).unwrap());
    out
}

async fn repo_in(dir: &Path) -> Repository {
    Repository::init(dir.join("repo").to_str().unwrap(), Chunking::default(), None, &dir.join("cache"))
        .await
        .unwrap()
}

async fn restore_into(repo: &Repository, snap: &Snapshot, target: &Path) -> cairn_store::Result<()> {
    let cancel = AtomicBool::new(false);
    cairn_store::restore::restore(repo, snap, None, target, &cairn_store::restore::NoProgress, &cancel)
        .await?;
    Ok(())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            out.push(p.display().to_string());
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_names_are_refused_and_nothing_outside_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "original").unwrap();
    for evil in [&b".."[..], b".", b"../outside/victim", b"/etc/passwd", b"a/../../x", b""] {
        let tree = raw_tree(vec![file(evil, b"pwned")]);
        let root = Id::of(&tree);
        let snap = commit(&repo, vec![tree], &[b"pwned"], root).await;
        let target = tmp.path().join("target");
        let err = restore_into(&repo, &snap, &target).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("corrupt") && msg.contains("tree"), "{evil:?}: {msg}");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"original");
        assert!(listing(&target).is_empty(), "{evil:?} wrote {:?}", listing(&target));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_names_cannot_smuggle_a_symlinked_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // "d" as a symlink to outside, then "d" as a directory holding a file.
    let inner = raw_tree(vec![file(b"victim", b"pwned")]);
    let tree = raw_tree(vec![
        node(b"d", NodeKind::Symlink { target: outside.to_str().unwrap().as_bytes().to_vec() }),
        node(b"d", NodeKind::Dir { tree: Id::of(&inner) }),
    ]);
    let root = Id::of(&tree);
    let snap = commit(&repo, vec![inner, tree], &[b"pwned"], root).await;
    let err = restore_into(&repo, &snap, &tmp.path().join("target")).await.unwrap_err();
    assert!(err.to_string().contains("not sorted"), "{err}");
    assert!(listing(&outside).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_symlink_in_the_target_is_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("etc")).unwrap();
    let inner = raw_tree(vec![file(b"passwd", b"root:x:0:0")]);
    let tree = raw_tree(vec![node(b"etc", NodeKind::Dir { tree: Id::of(&inner) })]);
    let root = Id::of(&tree);
    let snap = commit(&repo, vec![inner, tree], &[b"root:x:0:0"], root).await;
    restore_into(&repo, &snap, &target).await.unwrap();
    assert!(listing(&outside).is_empty(), "wrote through the symlink: {:?}", listing(&outside));
    assert!(!target.join("etc").is_symlink());
    assert_eq!(std::fs::read(target.join("etc/passwd")).unwrap(), b"root:x:0:0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_does_not_add_up_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let mut bad = file(b"f", b"abc");
    if let NodeKind::File { size, .. } = &mut bad.kind {
        *size = 1 << 40; // claims a terabyte
    }
    let tree = raw_tree(vec![bad]);
    let root = Id::of(&tree);
    let snap = commit(&repo, vec![tree], &[b"abc"], root).await;
    let err = restore_into(&repo, &snap, &tmp.path().join("t")).await.unwrap_err();
    assert!(err.to_string().contains("does not add up"), "{err}");
}
