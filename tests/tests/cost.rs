//! What commands cost in requests: counted by the repository's `CountingStore`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cairn_store::format::config::Chunking;
use cairn_store::push::{NoProgress, ParentSpec, PushOptions};
use cairn_store::{Kind, Repository};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_snapshots_twice_costs_one_list_and_no_gets() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let cache = tmp.path().join("cache");
    let repo = Repository::init_on(store.clone(), "mem", Chunking::default(), &cache).await.unwrap();
    let cancel = AtomicBool::new(false);
    for _ in 0..3 {
        let opts = PushOptions {
            source: src.clone(),
            kind: Kind::Fs,
            tags: Default::default(),
            parent: ParentSpec::None,
            expire_in: None,
            host: None,
            label: None,
            overlay: None,
        };
        cairn_store::push::push(&repo, &opts, &NoProgress, &cancel).await.unwrap();
    }
    drop(repo);
    let repo = Repository::open_on(store.clone(), "mem", &cache).await.unwrap();
    assert_eq!(repo.snapshots().await.unwrap().len(), 3);
    let before = repo.requests();
    assert_eq!(repo.snapshots().await.unwrap().len(), 3);
    let after = repo.requests();
    assert_eq!(after.lists - before.lists, 1);
    assert_eq!(after.gets, before.gets, "cached snapshot roots were fetched again");

    // check reads roots from the bucket, not the cache: damage there is found.
    let id = repo.snapshot_ids().await.unwrap()[0];
    let name = object_store::path::Path::from(format!("snapshots/{id}"));
    store.put(&name, PutPayload::from_static(b"{}")).await.unwrap();
    let report = cairn_store::commands::check(&repo, false).await.unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    assert!(report.damage[0].problem.contains("corrupt"));
}
