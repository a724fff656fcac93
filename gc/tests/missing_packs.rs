//! A pack the index names but the bucket lost leaves the index at the next gc, so pushes
//! stop deduplicating against chunks that are gone.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cairn_gc::{gc, GcOptions};
use cairn_store::commands::check;
use cairn_store::format::config::Chunking;
use cairn_store::format::index::{IndexSegment, IndexedPack};
use cairn_store::format::pack::{self, PackKind};
use cairn_store::push::NoProgress;
use cairn_store::push::{push, ParentSpec, PushOptions, PushProgress};
use cairn_store::{Kind, Repository};
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

struct Quiet;
impl PushProgress for Quiet {}

/// An empty `src/` under `tmp`.
fn source(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    src
}

/// A new repository on a fresh in-memory bucket, its local cache under `tmp/cache`.
async fn repository(tmp: &tempfile::TempDir, cache: &str) -> (Arc<InMemory>, Repository) {
    let inner = Arc::new(InMemory::new());
    let repo = Repository::init_on(inner.clone(), "memory://", Chunking::default(), &tmp.path().join(cache))
        .await
        .unwrap();
    (inner, repo)
}

/// Push `dir` without a parent; the new snapshot's id.
async fn push_dir(repo: &Repository, dir: &std::path::Path) -> cairn_store::Id {
    let opts = PushOptions { parent: ParentSpec::None, ..PushOptions::new(dir, Kind::Fs) };
    push(repo, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap().snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pack_leaves_the_index_and_the_next_push_stores_its_chunks_again() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
    std::fs::write(src.join("f"), &data).unwrap();
    let (inner, repo) = repository(&tmp, "c1").await;
    let store: Arc<dyn ObjectStore> = inner.clone();
    let first = push_dir(&repo, &src).await;

    // The bucket loses the data pack.
    let packs: Vec<Path> =
        inner.list(Some(&Path::from("packs"))).map_ok(|m| m.location).try_collect().await.unwrap();
    let mut lost = 0;
    for p in packs {
        let bytes = inner.get(&p).await.unwrap().bytes().await.unwrap();
        if pack::decode_table_of(&bytes, p.as_ref()).unwrap().0 == PackKind::Data {
            inner.delete(&p).await.unwrap();
            lost += 1;
        }
    }
    assert_eq!(lost, 1);

    let report = gc(&repo, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await.unwrap();
    assert_eq!(report.packs_missing, 1, "{report:?}");
    assert_eq!(report.packs_deleted, 0, "{report:?}");

    // Another host pushes the same data: it must store it again, not point at the lost pack.
    let other = Repository::open_on(store.clone(), "memory://", &tmp.path().join("c2")).await.unwrap();
    push_dir(&other, &src).await;
    // The first snapshot did lose its data; once it is forgotten, everything left is whole.
    inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first))).await.unwrap();
    let checked = check(&other, true).await.unwrap();
    assert!(checked.is_ok(), "{:?}", checked.damage);
    assert_eq!(checked.snapshots, 1);
}

/// A handle opened before a gc that repacked its chunks (a mount, a long restore) reads
/// them from their new pack: it refreshes its chunk index when the old pack is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_older_than_a_repack_reads_the_moved_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    let bytes = |seed: u32| -> Vec<u8> {
        (0..75_000u32).flat_map(|i| (i ^ seed).wrapping_mul(2_654_435_761).to_le_bytes()).collect()
    };
    let (x, y) = (bytes(1), bytes(0xdead_beef));
    std::fs::write(src.join("x"), &x).unwrap();
    std::fs::write(src.join("y"), &y).unwrap();
    let (inner, old) = repository(&tmp, "c1").await;
    let store: Arc<dyn ObjectStore> = inner.clone();
    let first = push_dir(&old, &src).await;
    std::fs::remove_file(src.join("y")).unwrap();
    let second = push_dir(&old, &src).await;
    inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first))).await.unwrap();

    // Another host collects: x's chunks move to a new pack, their old pack (half y) goes.
    let collector = Repository::open_bare_on(store.clone(), "memory://").await.unwrap();
    let report = gc(
        &collector,
        &GcOptions { repack_below: 0.9, ..Default::default() },
        &NoProgress,
        &AtomicBool::new(false),
    )
    .await
    .unwrap();
    assert!(report.packs_repacked >= 1 && report.packs_deleted >= 1, "{report:?}");

    // The old handle's chunk index still names the deleted pack.
    let snap = old.load_snapshot(&second).await.unwrap();
    let cairn_store::format::tree::NodeKind::Dir { tree } = snap.root.kind else { panic!("a directory") };
    let nodes = old.read_dir(&tree).await.unwrap();
    let file = nodes.iter().find(|n| n.name == b"x").unwrap();
    let cairn_store::format::tree::NodeKind::File { content, .. } = &file.kind else { panic!("a file") };
    let ids: Vec<_> = old.extents(content).await.unwrap().iter().filter_map(|e| e.chunk).collect();
    let chunks = old.read_chunks(&ids).await.unwrap();
    let read: Vec<u8> = ids.iter().flat_map(|id| chunks[id].iter().copied()).collect();
    assert_eq!(read, x);
    assert_eq!(old.read_chunk(&ids[0]).await.unwrap(), chunks[&ids[0]].as_ref().clone());
}

/// A push deduplicates a directory's tree object against any stored chunk, so a file that
/// holds exactly those bytes (a sandbox can write one on purpose) leaves the tree only in a
/// data pack. GC must still find it, not fail on every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_stored_only_in_a_data_pack_is_still_found() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    std::fs::write(src.join("a"), b"hello").unwrap();

    // The bytes of src's tree object, from a scratch repository.
    let (_, scratch) = repository(&tmp, "c0").await;
    let pushed = push_dir(&scratch, &src).await;
    let snap = scratch.load_snapshot(&pushed).await.unwrap();
    let cairn_store::format::tree::NodeKind::Dir { tree } = snap.root.kind else { panic!("a directory") };
    let tree_bytes = scratch.read_chunk(&tree).await.unwrap();

    // A file holding exactly those bytes is pushed first; then src itself.
    let decoy = tmp.path().join("decoy");
    std::fs::create_dir_all(&decoy).unwrap();
    std::fs::write(decoy.join("t"), &tree_bytes).unwrap();
    let (inner, repo) = repository(&tmp, "c1").await;
    push_dir(&repo, &decoy).await;
    push_dir(&repo, &src).await;

    // The premise: the tree is in a data pack and in no metadata pack.
    let packs: Vec<IndexedPack> = segments(&inner).await.into_iter().flat_map(|(_, s)| s.packs).collect();
    let holds = |kind| packs.iter().any(|p| p.kind == kind && p.chunks.iter().any(|e| e.id == tree));
    assert!(holds(PackKind::Data) && !holds(PackKind::Meta));
    let report = gc(&repo, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await.unwrap();
    assert_eq!(report.snapshots, 2, "{report:?}");
    let checked = check(&repo, true).await.unwrap();
    assert!(checked.is_ok(), "{:?}", checked.damage);
}

/// Every segment of the bucket, decoded.
async fn segments(inner: &InMemory) -> Vec<(Path, IndexSegment)> {
    let names: Vec<Path> =
        inner.list(Some(&Path::from("index"))).map_ok(|m| m.location).try_collect().await.unwrap();
    let mut out = Vec::new();
    for n in names {
        let bytes = inner.get(&n).await.unwrap().bytes().await.unwrap();
        out.push((n.clone(), IndexSegment::decode(&bytes, n.as_ref()).unwrap()));
    }
    out
}

/// A tree indexed in two packs, one of which the bucket lost: GC reads the copy that
/// exists, whatever order the index lists them in, and drops the lost pack from the index.
async fn lost_metadata_pack_with_a_copy(copy_sorts_first: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    std::fs::write(src.join("a"), b"hello").unwrap();
    let (inner, repo) = repository(&tmp, "c1").await;
    let store: Arc<dyn ObjectStore> = inner.clone();
    push_dir(&repo, &src).await;

    // The metadata pack and the segment that names it.
    let segs = segments(&inner).await;
    assert_eq!(segs.len(), 1);
    let (original_name, original) = &segs[0];
    let meta = original.packs.iter().find(|p| p.kind == PackKind::Meta).unwrap().clone();
    // A copy of it under another name, indexed by a segment that sorts before (or after) the
    // original's, so the original's entries are the ones seen last (or first).
    let copy_id = cairn_store::Id::of(b"a copy of the metadata pack");
    let bytes = inner.get(&Path::from(pack::object_name(&meta.id))).await.unwrap().bytes().await.unwrap();
    inner.put(&Path::from(pack::object_name(&copy_id)), bytes.into()).await.unwrap();
    let original_id = original_name.as_ref().rsplit('/').next().unwrap().to_string();
    let (seg_id, seg_bytes) = (0u32..)
        .map(|n| {
            IndexSegment {
                packs: vec![IndexedPack { id: copy_id, ..meta.clone() }],
                supersedes: vec![cairn_store::Id::of(&n.to_le_bytes())],
            }
            .encode()
        })
        .find(|(id, _)| (id.to_hex() < original_id) == copy_sorts_first)
        .unwrap();
    inner.put(&Path::from(cairn_store::format::index::object_name(&seg_id)), seg_bytes.into()).await.unwrap();
    // The bucket loses the original.
    inner.delete(&Path::from(pack::object_name(&meta.id))).await.unwrap();

    let collector = Repository::open_bare_on(store.clone(), "memory://").await.unwrap();
    let report = gc(&collector, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await.unwrap();
    assert_eq!(report.packs_missing, 1, "{report:?}");
    assert_eq!(report.snapshots, 1, "{report:?}");
    // The index now names the copy alone (which `check` would flag: it is not named by its
    // content), and the metadata reads from it.
    let reader = Repository::open_on(store, "memory://", &tmp.path().join("c2")).await.unwrap();
    for e in &meta.chunks {
        reader.read_chunk(&e.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_metadata_pack_with_a_copy_indexed_before_it_does_not_stop_gc() {
    lost_metadata_pack_with_a_copy(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_metadata_pack_with_a_copy_indexed_after_it_does_not_stop_gc() {
    lost_metadata_pack_with_a_copy(false).await;
}

/// A tree whose metadata pack the bucket lost, with a copy in a *data* pack (another host
/// stored a file holding the same bytes without knowing of the tree): GC finds the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_metadata_pack_with_a_copy_in_a_data_pack_does_not_stop_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    std::fs::write(src.join("a"), b"hello").unwrap();
    let (inner, repo) = repository(&tmp, "c1").await;
    let store: Arc<dyn ObjectStore> = inner.clone();
    let pushed = push_dir(&repo, &src).await;
    let snap = repo.load_snapshot(&pushed).await.unwrap();
    let cairn_store::format::tree::NodeKind::Dir { tree } = snap.root.kind else { panic!("a directory") };
    let tree_bytes = repo.read_chunk(&tree).await.unwrap();
    let meta = segments(&inner).await[0].1.packs.iter().find(|p| p.kind == PackKind::Meta).unwrap().clone();
    assert!(meta.chunks.iter().any(|e| e.id == tree));

    // The other host's data pack, built in a bucket of its own, then indexed here alone.
    let decoy = tmp.path().join("decoy");
    std::fs::create_dir_all(&decoy).unwrap();
    std::fs::write(decoy.join("t"), &tree_bytes).unwrap();
    let (elsewhere, other) = repository(&tmp, "c0").await;
    push_dir(&other, &decoy).await;
    let data = segments(&elsewhere)
        .await
        .into_iter()
        .flat_map(|(_, s)| s.packs)
        .find(|p| p.kind == PackKind::Data && p.chunks.iter().any(|e| e.id == tree))
        .expect("the tree's bytes in a data pack");
    let name = Path::from(pack::object_name(&data.id));
    inner.put(&name, elsewhere.get(&name).await.unwrap().bytes().await.unwrap().into()).await.unwrap();
    let (seg_id, seg_bytes) = IndexSegment { packs: vec![data], supersedes: vec![] }.encode();
    inner.put(&Path::from(cairn_store::format::index::object_name(&seg_id)), seg_bytes.into()).await.unwrap();
    inner.delete(&Path::from(pack::object_name(&meta.id))).await.unwrap();

    let collector = Repository::open_bare_on(store.clone(), "memory://").await.unwrap();
    let report = gc(&collector, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await.unwrap();
    assert_eq!(report.packs_missing, 1, "{report:?}");
    assert_eq!(report.snapshots, 1, "{report:?}");
    let reader = Repository::open_on(store, "memory://", &tmp.path().join("c2")).await.unwrap();
    assert_eq!(reader.read_chunk(&tree).await.unwrap(), tree_bytes);
}

/// A mostly dead pack that the bucket lost is not a repacking candidate (it cannot be read):
/// it leaves the index, and GC carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_mostly_dead_pack_is_dropped_not_repacked() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp);
    let bytes = |seed: u32| -> Vec<u8> {
        (0..75_000u32).flat_map(|i| (i ^ seed).wrapping_mul(2_654_435_761).to_le_bytes()).collect()
    };
    std::fs::write(src.join("x"), bytes(1)).unwrap();
    std::fs::write(src.join("y"), bytes(0xdead_beef)).unwrap();
    let (inner, repo) = repository(&tmp, "c1").await;
    let store: Arc<dyn ObjectStore> = inner.clone();
    let first = push_dir(&repo, &src).await;
    std::fs::remove_file(src.join("y")).unwrap();
    push_dir(&repo, &src).await;
    inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first))).await.unwrap();
    // The data pack, half of it y's (now dead), is lost.
    let data = segments(&inner)
        .await
        .into_iter()
        .flat_map(|(_, s)| s.packs)
        .find(|p| p.kind == PackKind::Data)
        .unwrap();
    inner.delete(&Path::from(pack::object_name(&data.id))).await.unwrap();

    let collector = Repository::open_bare_on(store.clone(), "memory://").await.unwrap();
    let opts = GcOptions { repack_below: 0.9, ..Default::default() };
    let report = gc(&collector, &opts, &NoProgress, &AtomicBool::new(false)).await.unwrap();
    assert_eq!(report.packs_missing, 1, "{report:?}");
    assert_eq!(report.packs_repacked, 0, "{report:?}");
    let left = segments(&inner).await;
    assert!(left.iter().all(|(_, s)| s.packs.iter().all(|p| p.id != data.id)), "still indexed");
}
