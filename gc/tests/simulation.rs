//! Deterministic simulation of the GC protocol: writers, volume commits and rollbacks, forget
//! and GC interleaved over one `InMemory` bucket, with crashes, checking after every write to
//! the bucket that each committed snapshot is fully readable and each volume head names one.
//!
//! Everything runs on one current-thread tokio runtime with paused time; a wrapper store
//! yields a seeded random number of times before each request, so proptest explores
//! interleavings and reproduces any failure from its seed. GC, forget, leases and the format
//! are the real code. The writer is a small one built from the same parts as `push` (lease,
//! then GC state, then index; no dedup against condemned packs), because `push` itself runs
//! its walk on blocking threads that a deterministic runtime cannot schedule.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_gc::{forget, gc, ForgetOptions, GcOptions, Policy};
use cairn_store::format::config::Chunking;
use cairn_store::format::index::{self, IndexSegment, IndexedPack};
use cairn_store::format::lease::{Lease, LeaseState};
use cairn_store::format::pack::{self, Codec, PackBuilder, PackKind};
use cairn_store::format::snapshot::{Kind, Snapshot, SnapshotStats};
use cairn_store::format::tree::{self, Content, Extent, Node, NodeKind, Tree};
use cairn_store::format::volume::{self, Head};
use cairn_store::lease::WriterLease;
use cairn_store::push::NoProgress;
use cairn_store::{Id, Repository};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

tokio::task_local! {
    static ACTOR: usize;
}

/// Shared by every actor's store handle: the seeded scheduler and the crash plan.
struct World {
    rng: Mutex<rand::rngs::StdRng>,
    /// Per actor: requests made so far, and the request at which it "dies".
    ops: Mutex<HashMap<usize, usize>>,
    crash_at: HashMap<usize, usize>,
    /// Actors that sleep (in paused time) before each request: whole GC runs can happen
    /// between two of their requests, as with a stalled process on another host.
    slow: HashSet<usize>,
    /// An actor held before its first lease write until released (scripted scenarios).
    gate: Option<Gate>,
    gate_passed: std::sync::atomic::AtomicBool,
    violations: Mutex<Vec<String>>,
}

type Gate = (usize, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>);

impl World {
    fn new(
        seed: u64,
        crash_at: HashMap<usize, usize>,
        slow: HashSet<usize>,
        gate: Option<Gate>,
    ) -> Arc<World> {
        Arc::new(World {
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            ops: Mutex::new(HashMap::new()),
            crash_at,
            slow,
            gate,
            gate_passed: Default::default(),
            violations: Mutex::new(Vec::new()),
        })
    }
}

#[derive(Debug)]
struct SimStore {
    inner: Arc<InMemory>,
    world: Arc<World>,
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("World")
    }
}

impl fmt::Display for SimStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimStore")
    }
}

fn dead() -> object_store::Error {
    object_store::Error::Generic { store: "sim", source: "this actor crashed".into() }
}

impl SimStore {
    /// Yield a random number of times (the interleaving), then fail if the actor is dead.
    async fn step(&self) -> object_store::Result<()> {
        let yields = self.world.rng.lock().unwrap().random_range(0..4);
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        let actor = ACTOR.try_with(|a| *a).unwrap_or(usize::MAX);
        if self.world.slow.contains(&actor) {
            let ms = self.world.rng.lock().unwrap().random_range(0..50);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut ops = self.world.ops.lock().unwrap();
        let n = ops.entry(actor).or_default();
        *n += 1;
        match self.world.crash_at.get(&actor) {
            Some(at) if *n >= *at => Err(dead()),
            _ => Ok(()),
        }
    }

    fn after_write(&self) {
        if let Err(v) = check(&self.inner) {
            self.world.violations.lock().unwrap().push(v);
        }
    }
}

#[async_trait]
impl ObjectStore for SimStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.step().await?;
        if let Some((actor, arrived, release)) = &self.world.gate {
            if ACTOR.try_with(|a| *a) == Ok(*actor)
                && location.as_ref().starts_with("leases/")
                && !self.world.gate_passed.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                arrived.notify_one();
                release.notified().await;
            }
        }
        let r = self.inner.put_opts(location, payload, opts).await;
        self.after_write();
        r
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.step().await?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.step().await?;
        self.inner.get_opts(location, options).await
    }
    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.step().await?;
        self.inner.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        use futures::StreamExt;
        let inner = self.inner.clone();
        let world = self.world.clone();
        let me = SimStore { inner: inner.clone(), world };
        let me = Arc::new(me);
        locations
            .then(move |p| {
                let me = me.clone();
                async move {
                    let p = p?;
                    me.step().await?;
                    me.inner.delete(&p).await?;
                    me.after_write();
                    Ok(p)
                }
            })
            .boxed()
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        // Listing is one request; its interleaving point is the step before the first item.
        let actor = ACTOR.try_with(|a| *a).unwrap_or(usize::MAX);
        let crashed = {
            let mut ops = self.world.ops.lock().unwrap();
            let n = ops.entry(actor).or_default();
            *n += 1;
            self.world.crash_at.get(&actor).is_some_and(|at| *n >= *at)
        };
        if crashed {
            return Box::pin(futures::stream::once(async { Err(dead()) }));
        }
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.step().await?;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.step().await?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.after_write();
        r
    }
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.step().await?;
        let r = self.inner.rename_opts(from, to, options).await;
        self.after_write();
        r
    }
}

/// The invariant, read straight from the bucket: every chunk of every committed snapshot
/// (root under `snapshots/` or committed lease) is listed by an index segment for a pack that
/// exists and whose own table holds it.
fn check(store: &InMemory) -> Result<(), String> {
    futures::executor::block_on(async {
        use futures::TryStreamExt;
        let all: Vec<ObjectMeta> = store.list(None).try_collect().await.map_err(|e| e.to_string())?;
        let get = |p: &Path| {
            let p = p.clone();
            async move { store.get(&p).await.unwrap().bytes().await.unwrap() }
        };
        let mut in_packs: HashMap<Id, (Id, pack::PackEntry)> = HashMap::new();
        let mut pack_bytes: HashMap<Id, Bytes> = HashMap::new();
        let mut indexed: HashSet<(Id, Id)> = HashSet::new();
        let mut roots: Vec<(String, Snapshot)> = Vec::new();
        let mut heads: Vec<(String, Id)> = Vec::new();
        for m in &all {
            let name = m.location.to_string();
            if let Some(rest) = name.strip_prefix("packs/") {
                let id: Id = rest.rsplit('/').next().unwrap().parse().unwrap();
                let bytes = get(&m.location).await;
                let (_, entries) = pack::decode_table_of(&bytes, &name).map_err(|e| e.to_string())?;
                for e in entries {
                    in_packs.insert(e.id, (id, e));
                }
                pack_bytes.insert(id, bytes);
            }
        }
        for m in &all {
            let name = m.location.to_string();
            let bytes = || get(&m.location);
            if name.starts_with("index/") {
                let seg = IndexSegment::decode(&bytes().await, &name).map_err(|e| e.to_string())?;
                for p in seg.packs {
                    for c in p.chunks {
                        indexed.insert((c.id, p.id));
                    }
                }
            } else if let Some(h) = name.strip_prefix("snapshots/") {
                let id: Id = h.parse().unwrap();
                roots.push((name.clone(), Snapshot::decode(&bytes().await, &id).map_err(|e| e.to_string())?));
            } else if name.starts_with("volumes/") {
                let h = Head::decode(&bytes().await, &name).map_err(|e| e.to_string())?;
                heads.push((name, h.snapshot));
            } else if name.starts_with("leases/") {
                let lease = Lease::decode(&bytes().await, &name).map_err(|e| e.to_string())?;
                if let LeaseState::Committed { snapshot, root } = lease.state {
                    roots.push((
                        name,
                        Snapshot::decode(root.as_bytes(), &snapshot).map_err(|e| e.to_string())?,
                    ));
                }
            }
        }
        for (name, snap) in &heads {
            if !roots.iter().any(|(r, _)| r == &format!("snapshots/{snap}")) {
                return Err(format!("{name} names snapshot {snap}, which is not under snapshots/"));
            }
        }
        let readable = |id: &Id| -> Result<Vec<u8>, String> {
            let (p, e) = in_packs.get(id).ok_or(format!("chunk {id} is in no pack"))?;
            if !indexed.iter().any(|(c, ip)| c == id && pack_bytes.contains_key(ip)) {
                return Err(format!("chunk {id} is in no indexed pack that exists"));
            }
            let b = &pack_bytes[p];
            pack::open_chunk(e, &b[e.stored_range()], "pack").map_err(|e| e.to_string())
        };
        for (name, snap) in roots {
            let mut stack = vec![snap.root.clone()];
            while let Some(n) = stack.pop() {
                match n.kind {
                    NodeKind::Dir { tree } => {
                        match Tree::decode(&readable(&tree).map_err(|e| format!("{name}: {e}"))?, "t") {
                            Ok(Tree::Leaf(nodes)) => stack.extend(nodes),
                            other => return Err(format!("{name}: unexpected tree {other:?}")),
                        }
                    }
                    NodeKind::File { content: Content::Extents(ex), .. } => {
                        for e in ex {
                            if let Some(c) = e.chunk {
                                readable(&c).map_err(|e| format!("{name}: {e}"))?;
                            }
                        }
                    }
                    NodeKind::File { content: Content::Lists(pages), .. } => {
                        for page in pages {
                            let bytes = readable(&page.id).map_err(|e| format!("{name}: {e}"))?;
                            let ex = tree::decode_list(&bytes, &page, "l").map_err(|e| e.to_string())?;
                            for c in ex.iter().filter_map(|e| e.chunk) {
                                readable(&c).map_err(|e| format!("{name}: {e}"))?;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    })
}

fn file(name: Vec<u8>, size: u64, content: Content) -> Node {
    Node {
        name,
        kind: NodeKind::File { size, content },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        xattrs: vec![],
        link_group: None,
    }
}

/// A writer built from push's parts: lease → GC state → index; no dedup against condemned packs.
async fn write_snapshot(
    repo: &Repository,
    host: &str,
    blobs: &[Vec<u8>],
    tags: BTreeMap<String, String>,
) -> cairn_store::Result<Id> {
    let lease = WriterLease::acquire(repo.store().clone(), host).await?;
    let result = async {
        repo.sync_index().await?;
        let known = |id: &Id| -> cairn_store::Result<bool> {
            Ok(repo.cache()?.chunk(id)?.is_some_and(|l| !lease.condemned().contains(&l.pack)))
        };
        let mut data = PackBuilder::new(PackKind::Data, 1 << 16);
        let mut added = HashSet::new();
        let mut nodes = Vec::new();
        for (i, b) in blobs.iter().enumerate() {
            let id = Id::of(b);
            if !known(&id)? && added.insert(id) {
                data.add(id, b.len() as u32, Codec::Raw, b);
            }
            if blobs.len() >= 2 && i + 1 == blobs.len() {
                continue; // named only by the chunk list below
            }
            let content = Content::Extents(vec![Extent { chunk: Some(id), len: b.len() as u64 }]);
            nodes.push(file(format!("f{i}").into_bytes(), b.len() as u64, content));
        }
        // A file long enough to keep its extents in chunk-list objects (metadata that names
        // data, shared between snapshots made of the same blobs).
        let mut lists = Vec::new();
        if blobs.len() >= 2 {
            let extents: Vec<Extent> = (0..tree::INLINE_EXTENTS + 1)
                .map(|i| if i == 0 { &blobs[blobs.len() - 1] } else { &blobs[i % blobs.len()] })
                .map(|b| Extent { chunk: Some(Id::of(b)), len: b.len() as u64 })
                .collect();
            let size = extents.iter().map(|e| e.len).sum();
            let (content, objects) = tree::build_content(extents);
            lists = objects;
            nodes.push(file(b"many".to_vec(), size, content));
        }
        let trees = Tree::build(nodes);
        let top = trees.last().unwrap().id;
        let mut meta = PackBuilder::new(PackKind::Meta, 1 << 16);
        for t in lists.iter().chain(&trees) {
            if !known(&t.id)? && added.insert(t.id) {
                meta.add(t.id, t.bytes.len() as u32, Codec::Raw, &t.bytes);
            }
        }
        let mut seg = IndexSegment::default();
        let mut meta_packs = Vec::new();
        for b in [data, meta] {
            if b.is_empty() {
                continue;
            }
            let p = b.finish();
            repo.put(&pack::object_name(&p.id), p.bytes.clone()).await?;
            if p.kind == PackKind::Meta {
                meta_packs.push(p.id);
            }
            seg.packs.push(IndexedPack {
                id: p.id,
                kind: p.kind,
                len: p.bytes.len() as u64,
                chunks: p.entries,
            });
        }
        if !seg.packs.is_empty() {
            let (id, bytes) = seg.encode();
            repo.put(&index::object_name(&id), bytes).await?;
        }
        let snap = Snapshot {
            format: 1,
            time: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            host: host.into(),
            source: tags.get(volume::TAG).map(|n| format!("volume:{n}")).unwrap_or_else(|| "/sim".into()),
            kind: Kind::Fs,
            tags,
            parent: None,
            expires: None,
            root: Node {
                name: b"sim".to_vec(),
                kind: NodeKind::Dir { tree: top },
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
                xattrs: vec![],
                link_group: None,
            },
            meta_packs,
            stats: SnapshotStats::default(),
        };
        let (id, bytes) = snap.encode();
        lease.commit(id, &bytes).await?;
        repo.put(&cairn_store::format::snapshot::object_name(&id), bytes).await?;
        lease.release().await?;
        Ok(id)
    }
    .await;
    if result.is_err() {
        let _ = lease.release().await;
    }
    result
}

/// A volume version made by the simulated writer: a snapshot tagged as the next version,
/// then the head moved by a conditional write.
async fn commit_volume(repo: &Repository, blobs: &[Vec<u8>]) -> cairn_store::Result<()> {
    let current = cairn_store::volume::read(repo, VOLUME).await?;
    let tags = BTreeMap::from([
        (volume::TAG.to_string(), VOLUME.to_string()),
        (volume::ID_TAG.to_string(), current.head.id.clone()),
        (volume::VERSION_TAG.to_string(), (current.head.version + 1).to_string()),
    ]);
    let id = write_snapshot(repo, "hv", blobs, tags).await?;
    cairn_store::volume::advance(repo, &current, id, cairn_store::volume::Origin::how("push"))
        .await
        .map(|_| ())
}

const VOLUME: &str = "v";

#[derive(Clone, Debug)]
enum Act {
    Write {
        host: u8,
        blobs: Vec<u8>,
    },
    /// Commit the next version of the volume.
    VolumeCommit {
        blobs: Vec<u8>,
    },
    /// A derived snapshot: reuses an older version's trees without storing anything.
    Rollback {
        to: u8,
    },
    Forget,
    Gc {
        revoke_at_once: bool,
        /// Interrupt the run (as Ctrl-C does) after this many milliseconds of simulated
        /// time, then run again at once: the interrupted run released its claim.
        interrupt_after_ms: Option<u16>,
    },
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => (0u8..3, proptest::collection::vec(0u8..10, 1..5)).prop_map(|(host, blobs)| Act::Write { host, blobs }),
        2 => proptest::collection::vec(0u8..10, 1..4).prop_map(|blobs| Act::VolumeCommit { blobs }),
        2 => (0u8..4).prop_map(|to| Act::Rollback { to }),
        1 => Just(Act::Forget),
        2 => (any::<bool>(), proptest::option::of(0u16..50))
            .prop_map(|(revoke_at_once, interrupt_after_ms)| Act::Gc { revoke_at_once, interrupt_after_ms }),
    ]
}

fn blob(i: u8) -> Vec<u8> {
    (0..2000u32).map(|j| (j.wrapping_mul(31) ^ (i as u32 * 7919)) as u8).collect()
}

fn run_world(
    seed: u64,
    acts: Vec<Act>,
    crashes: Vec<(usize, usize)>,
    slow: Vec<usize>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(InMemory::new());
    let world = World::new(seed, crashes.into_iter().collect(), slow.into_iter().collect(), None);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let store: Arc<dyn ObjectStore> = Arc::new(SimStore { inner: inner.clone(), world: world.clone() });
        Repository::init_on(store.clone(), "sim://", Chunking::default(), &tmp.path().join("init"))
            .await
            .unwrap();
        {
            let repo = Repository::open_on(store.clone(), "sim://", &tmp.path().join("setup")).await.unwrap();
            let first = ACTOR
                .scope(usize::MAX - 2, async {
                    let id = write_snapshot(&repo, "hv", &[blob(0)], BTreeMap::new()).await?;
                    cairn_store::volume::create(&repo, VOLUME, Some(&id.to_hex())).await
                })
                .await;
            first.unwrap();
        }
        // Every actor is its own process: its own repository handle and local cache.
        let mut tasks = Vec::new();
        for (i, a) in acts.into_iter().enumerate() {
            let store = store.clone();
            let cache = tmp.path().join(format!("actor{i}"));
            tasks.push(tokio::task::spawn_local(ACTOR.scope(i, async move {
                let repo = match Repository::open_on(store, "sim://", &cache).await {
                    Ok(r) => r,
                    Err(_) => return, // crashed while opening
                };
                match a {
                    Act::Write { host, blobs } => {
                        let blobs: Vec<Vec<u8>> = blobs.into_iter().map(blob).collect();
                        let _ = write_snapshot(&repo, &format!("h{host}"), &blobs, BTreeMap::new()).await;
                    }
                    Act::VolumeCommit { blobs } => {
                        let blobs: Vec<Vec<u8>> = blobs.into_iter().map(blob).collect();
                        let _ = commit_volume(&repo, &blobs).await;
                    }
                    Act::Rollback { to } => {
                        let _ = cairn_store::volume::rollback(&repo, VOLUME, 1 + to as u64).await;
                    }
                    Act::Forget => {
                        let opts = ForgetOptions {
                            policy: Policy { keep_last: Some(1), ..Default::default() },
                            ..Default::default()
                        };
                        let _ = forget(&repo, &opts, SystemTime::now()).await;
                    }
                    Act::Gc { revoke_at_once, interrupt_after_ms } => {
                        let opts = GcOptions {
                            lease_timeout: if revoke_at_once {
                                Duration::ZERO
                            } else {
                                Duration::from_secs(3600)
                            },
                            poll: Duration::from_millis(5),
                            max_wait: Duration::from_secs(2),
                            ..Default::default()
                        };
                        let cancel = Arc::new(AtomicBool::new(false));
                        if let Some(ms) = interrupt_after_ms {
                            let flag = cancel.clone();
                            tokio::task::spawn_local(async move {
                                tokio::time::sleep(Duration::from_millis(ms.into())).await;
                                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            });
                        }
                        let first = gc(&repo, &opts, &NoProgress, &cancel).await;
                        if matches!(first, Err(cairn_store::Error::Interrupted)) {
                            let _ = gc(&repo, &opts, &NoProgress, &AtomicBool::new(false)).await;
                        }
                    }
                }
            })));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Afterwards, with nobody else running: a GC that revokes the dead finishes the job.
        let repo = Repository::open_on(store.clone(), "sim://", &tmp.path().join("final")).await.unwrap();
        let opts =
            GcOptions { lease_timeout: Duration::ZERO, poll: Duration::from_millis(5), ..Default::default() };
        ACTOR
            .scope(usize::MAX - 1, async {
                gc(&repo, &opts, &NoProgress, &AtomicBool::new(false)).await.map_err(|e| e.to_string())
            })
            .await?;
        // Whatever is committed is readable through the index, and nothing dead is left. Read
        // as the next process would: GC reads the index from the bucket and leaves the local
        // chunk index of its handle as it was, naming packs it repacked and deleted.
        let repo = Repository::open_on(store.clone(), "sim://", &tmp.path().join("check")).await.unwrap();
        for (id, snap) in repo.snapshots().await.map_err(|e| e.to_string())? {
            let mut stack = vec![snap.root.clone()];
            while let Some(n) = stack.pop() {
                if let NodeKind::Dir { tree } = n.kind {
                    stack.extend(repo.read_dir(&tree).await.map_err(|e| format!("{id}: {e}"))?);
                } else if let NodeKind::File { content, .. } = &n.kind {
                    for e in repo.extents(content).await.map_err(|e| e.to_string())? {
                        repo.read_chunk(&e.chunk.unwrap())
                            .await
                            .map_err(|e| format!("snapshot {id}: {e}"))?;
                    }
                }
            }
        }
        let leases = repo.list("leases").await.map_err(|e| e.to_string())?;
        if !leases.is_empty() {
            return Err(format!("leases left after the final gc: {leases:?}"));
        }
        Ok::<(), String>(())
    })?;
    let v = world.violations.lock().unwrap();
    if let Some(first) = v.first() {
        return Err(format!("{} violations, first: {first}", v.len()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn committed_snapshots_stay_readable_under_any_interleaving(
        seed in any::<u64>(),
        acts in proptest::collection::vec(act(), 2..8),
        crashes in proptest::collection::vec((0usize..8, 1usize..40), 0..3),
        slow in proptest::collection::vec(0usize..8, 0..5),
    ) {
        let r = run_world(seed, acts, crashes, slow);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// The case the second base check exists for, scripted: a rollback reads its target version,
/// stalls before creating its lease, and meanwhile forget removes that version and GC
/// deletes the chunks only it held. The rollback must then commit nothing.
#[test]
fn a_rollback_whose_base_was_collected_meanwhile_commits_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(InMemory::new());
    let (arrived, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    const ROLLBACK: usize = 7;
    let world =
        World::new(1, HashMap::new(), HashSet::new(), Some((ROLLBACK, arrived.clone(), release.clone())));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let store: Arc<dyn ObjectStore> = Arc::new(SimStore { inner: inner.clone(), world: world.clone() });
        Repository::init_on(store.clone(), "sim://", Chunking::default(), &tmp.path().join("init"))
            .await
            .unwrap();
        let open = |name: &str| {
            let (store, cache) = (store.clone(), tmp.path().join(name));
            async move { Repository::open_on(store, "sim://", &cache).await }
        };
        let setup = open("setup").await.unwrap();
        let first = write_snapshot(&setup, "hv", &[blob(0)], BTreeMap::new()).await.unwrap();
        cairn_store::volume::create(&setup, VOLUME, Some(&first.to_hex())).await.unwrap();
        // Version 2 alone holds these bytes; version 3 is the head.
        let only_v2: Vec<u8> = (0..3000u32).map(|i| (i * 13 + 7) as u8).collect();
        commit_volume(&setup, std::slice::from_ref(&only_v2)).await.unwrap();
        commit_volume(&setup, &[blob(1)]).await.unwrap();

        let rollback = tokio::task::spawn_local(ACTOR.scope(ROLLBACK, {
            let repo = open("rollback").await.unwrap();
            async move { cairn_store::volume::rollback(&repo, VOLUME, 2).await }
        }));
        arrived.notified().await;
        let other = open("operator").await.unwrap();
        let opts = ForgetOptions {
            policy: Policy { keep_last: Some(1), ..Default::default() },
            volume: Some(VOLUME.into()),
            ..Default::default()
        };
        let report = forget(&other, &opts, SystemTime::now()).await.unwrap();
        assert_eq!(report.removed, 2, "versions 1 and 2 go, the head stays");
        let opts =
            GcOptions { lease_timeout: Duration::ZERO, poll: Duration::from_millis(5), ..Default::default() };
        let collected = gc(&other, &opts, &NoProgress, &AtomicBool::new(false)).await.unwrap();
        assert!(collected.packs_deleted >= 1, "the pack only version 2 used is deleted");
        release.notify_one();
        let result = rollback.await.unwrap();
        assert!(
            matches!(result, Err(cairn_store::Error::Conflict(_))),
            "the rollback must refuse, not commit over deleted chunks: {result:?}"
        );
        let head = cairn_store::volume::read(&other, VOLUME).await.unwrap().head;
        assert_eq!(head.version, 3);
    });
    let v = world.violations.lock().unwrap();
    assert!(v.is_empty(), "{} violations, first: {}", v.len(), v[0]);
}
