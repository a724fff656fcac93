//! GC fails closed: a listing or read error anywhere before the sweep deletes nothing.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_gc::{gc, GcOptions};
use cairn_store::format::config::Chunking;
use cairn_store::format::lease::GcState;
use cairn_store::push::NoProgress;
use cairn_store::push::{push, ParentSpec, PushOptions, PushProgress};
use cairn_store::{Kind, Repository};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// Fails every list and get whose path starts with `prefix` while `armed`. With `usurp_at`
/// = n, right after the n-th write of `gc/state` another run takes the state over.
#[derive(Debug)]
struct Faulty {
    inner: Arc<InMemory>,
    prefix: String,
    armed: AtomicBool,
    usurp_at: AtomicUsize,
    state_puts: AtomicUsize,
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Faulty")
    }
}

impl Faulty {
    fn new(inner: Arc<InMemory>, prefix: &str) -> Faulty {
        Faulty {
            inner,
            prefix: prefix.into(),
            armed: AtomicBool::new(false),
            usurp_at: AtomicUsize::new(0),
            state_puts: AtomicUsize::new(0),
        }
    }

    fn hit(&self, p: &str) -> bool {
        self.armed.load(Ordering::SeqCst) && p.starts_with(&self.prefix)
    }
    fn err() -> object_store::Error {
        object_store::Error::Generic { store: "faulty", source: "injected failure".into() }
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
        let r = self.inner.put_opts(l, p, o).await?;
        if l.as_ref() == "gc/state"
            && self.state_puts.fetch_add(1, Ordering::SeqCst) + 1 == self.usurp_at.load(Ordering::SeqCst)
        {
            let bytes = self.inner.get(l).await?.bytes().await?;
            let mut theirs = GcState::decode(&bytes).expect("gc state");
            theirs.run = "another-run".into();
            self.inner.put(l, PutPayload::from(theirs.encode())).await?;
        }
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
        if self.hit(l.as_ref()) {
            return Err(Self::err());
        }
        self.inner.get_opts(l, o).await
    }
    async fn get_ranges(&self, l: &Path, r: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        if self.hit(l.as_ref()) {
            return Err(Self::err());
        }
        self.inner.get_ranges(l, r).await
    }
    fn delete_stream(
        &self,
        s: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(s)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.hit(prefix.map(|p| p.as_ref()).unwrap_or("")) {
            return Box::pin(futures::stream::once(async { Err(Faulty::err()) }));
        }
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        o: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, o)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, f: &Path, t: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
    async fn rename_opts(&self, f: &Path, t: &Path, o: RenameOptions) -> object_store::Result<()> {
        self.inner.rename_opts(f, t, o).await
    }
}

struct Quiet;
impl PushProgress for Quiet {}

async fn object_count(store: &InMemory) -> usize {
    use futures::TryStreamExt;
    store.list(None).try_collect::<Vec<_>>().await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_or_read_errors_before_the_sweep_delete_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), vec![7u8; 100_000]).unwrap();
    // Every failure point GC passes before it may delete: snapshots, trees/packs, index, leases.
    for prefix in ["snapshots", "packs", "index", "leases", "gc"] {
        let inner = Arc::new(InMemory::new());
        let faulty = Arc::new(Faulty::new(inner.clone(), prefix));
        let repo = Repository::init_on(
            faulty.clone(),
            "memory://",
            Chunking::default(),
            &tmp.path().join(format!("c-{prefix}")),
        )
        .await
        .unwrap();
        let opts = PushOptions { parent: ParentSpec::None, ..PushOptions::new(&src, Kind::Fs) };
        let first = push(&repo, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap();
        std::fs::write(src.join("f"), vec![8u8; 100_000]).unwrap();
        push(&repo, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap();
        std::fs::write(src.join("f"), vec![7u8; 100_000]).unwrap();
        // The first snapshot's data becomes garbage once its root is gone.
        inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first.snapshot))).await.unwrap();
        let objects = object_count(&inner).await;
        faulty.armed.store(true, Ordering::SeqCst);
        let deletes_before = repo.requests().deletes;
        let result = gc(&repo, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await;
        assert!(result.is_err(), "gc went on despite failing reads of {prefix}/");
        assert_eq!(
            repo.requests().deletes,
            deletes_before,
            "gc deleted something after a failure in {prefix}/"
        );
        assert!(object_count(&inner).await >= objects, "objects disappeared ({prefix})");
        // Disarmed, the same gc frees the garbage.
        faulty.armed.store(false, Ordering::SeqCst);
        let report = gc(&repo, &GcOptions::default(), &NoProgress, &AtomicBool::new(false)).await.unwrap();
        assert!(report.packs_deleted >= 1, "{prefix}: {report:?}");
    }
}

async fn names(store: &InMemory, prefix: &str) -> Vec<Path> {
    use futures::TryStreamExt;
    let mut v: Vec<Path> =
        store.list(Some(&Path::from(prefix))).map_ok(|m| m.location).try_collect().await.unwrap();
    v.sort();
    v
}

/// A run that another took over (it was paused past the lease timeout and looked dead)
/// must not act on its stale view: it finds out at its next renewal of `gc/state`, which
/// comes before it writes the index or deletes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_lost_its_claim_touches_neither_index_nor_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let inner = Arc::new(InMemory::new());
    let faulty = Arc::new(Faulty::new(inner.clone(), "-"));
    let repo = Repository::init_on(faulty.clone(), "memory://", Chunking::default(), &tmp.path().join("c"))
        .await
        .unwrap();
    let opts = |n: u8| {
        std::fs::write(src.join("f"), vec![n; 100_000]).unwrap();
        PushOptions { parent: ParentSpec::None, ..PushOptions::new(&src, Kind::Fs) }
    };
    let first = push(&repo, &opts(1), &Quiet, &AtomicBool::new(false)).await.unwrap();
    push(&repo, &opts(2), &Quiet, &AtomicBool::new(false)).await.unwrap();
    inner.delete(&Path::from(cairn_store::format::snapshot::object_name(&first.snapshot))).await.unwrap();
    let (packs, index) = (names(&inner, "packs").await, names(&inner, "index").await);
    // The claim is the first write of gc/state, the condemnation the second.
    faulty.usurp_at.store(2, Ordering::SeqCst);
    let deletes_before = repo.requests().deletes;
    let result = gc(
        &repo,
        &GcOptions { lease_timeout: std::time::Duration::from_secs(60), ..Default::default() },
        &NoProgress,
        &AtomicBool::new(false),
    )
    .await;
    assert!(matches!(result, Err(cairn_store::Error::Conflict(_))), "{result:?}");
    assert_eq!(repo.requests().deletes, deletes_before, "a usurped run deleted something");
    assert_eq!(names(&inner, "packs").await, packs);
    assert_eq!(names(&inner, "index").await, index, "a usurped run rewrote the index");
}
