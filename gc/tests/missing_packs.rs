//! A pack the index names but the bucket lost leaves the index at the next gc, so pushes
//! stop deduplicating against chunks that are gone.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cairn_gc::{gc, GcOptions};
use cairn_store::commands::check;
use cairn_store::format::config::Chunking;
use cairn_store::format::pack::{self, PackKind};
use cairn_store::push::{push, ParentSpec, PushOptions, PushProgress};
use cairn_store::{Kind, Repository};
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

struct Quiet;
impl PushProgress for Quiet {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pack_leaves_the_index_and_the_next_push_stores_its_chunks_again() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
    std::fs::write(src.join("f"), &data).unwrap();
    let inner = Arc::new(InMemory::new());
    let store: Arc<dyn ObjectStore> = inner.clone();
    let repo = Repository::init_on(store.clone(), "memory://", Chunking::default(), &tmp.path().join("c1"))
        .await
        .unwrap();
    let opts = PushOptions { parent: ParentSpec::None, ..PushOptions::new(&src, Kind::Fs) };
    let first = push(&repo, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap();

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

    let report = gc(&repo, &GcOptions::default()).await.unwrap();
    assert_eq!(report.packs_missing, 1, "{report:?}");
    assert_eq!(report.packs_deleted, 0, "{report:?}");

    // Another host pushes the same data: it must store it again, not point at the lost pack.
    let other = Repository::open_on(store.clone(), "memory://", &tmp.path().join("c2")).await.unwrap();
    push(&other, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap();
    // The first snapshot did lose its data; once it is forgotten, everything left is whole.
    inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first.snapshot))).await.unwrap();
    let checked = check(&other, true).await.unwrap();
    assert!(checked.is_ok(), "{:?}", checked.damage);
    assert_eq!(checked.snapshots, 1);
}
