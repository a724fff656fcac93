//! [`Repository`]: one bucket (or directory) in the Cairn format, plus its local cache.
//! Every read of a chunk or metadata object goes through here and is verified against its id.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::backend::{self, Counters, CountingStore, RequestStats};
use crate::cache::{LocalCache, Location};
use crate::error::{Error, Result};
use crate::format::config::{Chunking, Config, CONFIG_OBJECT};
use crate::format::index::{self, SegmentReader};
use crate::format::pack::{self, PackEntry};
use crate::format::snapshot::{self, Snapshot};
use crate::format::tree::{self, Content, Extent, Node, Tree};
use crate::id::{ChunkId, Id, PackId};

/// Chunks read together decode on the blocking pool from this many plain bytes on.
const OFFLOAD_DECODE: u64 = 256 << 10;
/// How many objects are fetched at once when many are needed (index segments, snapshots).
const FETCH_CONCURRENCY: usize = 16;
/// At most this many index segments are fetched at once (see SEGMENT_BYTES_IN_FLIGHT).
const SEGMENT_CONCURRENCY: usize = 8;
/// Index segments being fetched and decoded at once, by stored size: many small segments
/// (one per push) go in parallel, full ones (100,000 chunks, about 3.4 MB stored; decoded a
/// window at a time) a few at a time, which bounds memory for a 10M-chunk index.
const SEGMENT_BYTES_IN_FLIGHT: u64 = 16 << 20;

pub struct Repository {
    store: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
    config: Config,
    url: String,
    /// None when opened with [`Repository::open_bare`].
    cache: Option<LocalCache>,
    /// Metadata chunks fetched ahead by [`Repository::preload_meta`], already verified.
    meta: std::sync::RwLock<HashMap<ChunkId, Arc<Vec<u8>>>>,
    /// Held while the chunk index is brought up to date: readers that all found a pack gone
    /// refresh it once, not each on their own.
    index_sync: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("url", &self.url).field("id", &self.config.id).finish()
    }
}

impl Repository {
    /// Create a repository. The config is written with a conditional create, so of two
    /// concurrent inits exactly one succeeds and the other gets `AlreadyInitialized`.
    pub async fn init(
        url: &str,
        chunking: Chunking,
        zstd_level: Option<i32>,
        cache_root: &Path,
    ) -> Result<Repository> {
        let mut config = Config::new(chunking)?;
        if let Some(level) = zstd_level {
            config.zstd_level = level;
        }
        Self::init_with(backend::open_url(url, true)?, url, config, cache_root).await
    }

    pub async fn init_on(
        inner: Arc<dyn ObjectStore>,
        url: &str,
        chunking: Chunking,
        cache_root: &Path,
    ) -> Result<Repository> {
        Self::init_with(inner, url, Config::new(chunking)?, cache_root).await
    }

    async fn init_with(
        inner: Arc<dyn ObjectStore>,
        url: &str,
        config: Config,
        cache_root: &Path,
    ) -> Result<Repository> {
        let counting = CountingStore::new(inner);
        let counters = counting.counters();
        let store: Arc<dyn ObjectStore> = Arc::new(counting);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match store.put_opts(&ObjectPath::from(CONFIG_OBJECT), PutPayload::from(config.encode()), opts).await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyInitialized(url.into()))
            }
            Err(e) => return Err(Error::store(CONFIG_OBJECT, e)),
        }
        let cache = Some(LocalCache::open(cache_root, &config.id)?);
        Ok(Repository {
            store,
            counters,
            config,
            url: url.into(),
            cache,
            meta: Default::default(),
            index_sync: Default::default(),
        })
    }

    /// Open an existing repository and bring the local chunk index up to date.
    pub async fn open(url: &str, cache_root: &Path) -> Result<Repository> {
        Self::open_on(backend::open_url(url, false)?, url, cache_root).await
    }

    pub async fn open_on(inner: Arc<dyn ObjectStore>, url: &str, cache_root: &Path) -> Result<Repository> {
        let mut repo = Self::open_bare_on(inner, url).await?;
        repo.cache = Some(LocalCache::open(cache_root, &repo.config.id)?);
        repo.sync_index().await?;
        Ok(repo)
    }

    /// Open an existing repository without its local cache: no chunk index, no cached
    /// snapshot roots, every read goes to the bucket. For work that must see exactly what the
    /// bucket holds and finds its chunks itself (GC reads the index segments as it goes), and
    /// must not pay for RocksDB's memory or for bringing the chunk index up to date.
    pub async fn open_bare(url: &str) -> Result<Repository> {
        Self::open_bare_on(backend::open_url(url, false)?, url).await
    }

    pub async fn open_bare_on(inner: Arc<dyn ObjectStore>, url: &str) -> Result<Repository> {
        let counting = CountingStore::new(inner);
        let counters = counting.counters();
        let store: Arc<dyn ObjectStore> = Arc::new(counting);
        let bytes = match store.get(&ObjectPath::from(CONFIG_OBJECT)).await {
            Ok(r) => r.bytes().await.map_err(|e| Error::store(CONFIG_OBJECT, e))?,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::NotARepository(url.into())),
            Err(e) => return Err(Error::store(CONFIG_OBJECT, e)),
        };
        let config = Config::decode(&bytes)?;
        Ok(Repository {
            store,
            counters,
            config,
            url: url.into(),
            cache: None,
            meta: Default::default(),
            index_sync: Default::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn requests(&self) -> RequestStats {
        self.counters.stats()
    }

    /// The local cache; an error for a repository opened with [`Repository::open_bare`].
    pub fn cache(&self) -> Result<&LocalCache> {
        self.cache.as_ref().ok_or_else(|| {
            Error::Usage("this needs the local cache, and the repository was opened without it".into())
        })
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let r = self.store.get(&ObjectPath::from(name)).await.map_err(|e| Error::store(name, e))?;
        r.bytes().await.map_err(|e| Error::store(name, e))
    }

    pub async fn put(&self, name: &str, bytes: impl Into<PutPayload>) -> Result<()> {
        let payload = bytes.into();
        self.store.put(&ObjectPath::from(name), payload).await.map_err(|e| Error::store(name, e))?;
        Ok(())
    }

    /// Names and sizes of all objects under `prefix/`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.store
            .list(Some(&ObjectPath::from(prefix)))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .map_err(|e| Error::store(format!("{prefix}/"), e))
    }

    /// Read index segments the cache has not seen. If the cache knows segments the bucket no
    /// longer has (GC compacted them), rebuild it from scratch.
    pub async fn sync_index(&self) -> Result<()> {
        let _one_at_a_time = self.index_sync.lock().await;
        // A garbage collection may replace segments between our listing and our reads; the
        // replacement lists everything live, so list again and read that.
        let mut attempts = 0;
        loop {
            match self.sync_index_once().await {
                Err(Error::NotFound(what)) if what.starts_with("index/") && attempts < 5 => {
                    tracing::debug!("{what} vanished while reading the index (gc compaction); listing again");
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn sync_index_once(&self) -> Result<()> {
        let sizes: HashMap<Id, u64> = self
            .list("index")
            .await?
            .into_iter()
            .filter_map(|(name, size)| Some((name.strip_prefix("index/")?.parse().ok()?, size)))
            .collect();
        let listed: HashSet<Id> = sizes.keys().copied().collect();
        let cache = self.cache()?;
        let mut known = cache.segments()?;
        if !known.is_subset(&listed) {
            tracing::info!("index segments were removed from the bucket; rebuilding the chunk index");
            cache.reset_index()?;
            known.clear();
        }
        let missing: Vec<Id> = listed.difference(&known).copied().collect();
        if !missing.is_empty() {
            tracing::debug!("reading {} new index segments", missing.len());
        }
        const UNIT: u64 = 64 << 10;
        let budget = tokio::sync::Semaphore::new((SEGMENT_BYTES_IN_FLIGHT / UNIT) as usize);
        let (budget, sizes) = (&budget, &sizes);
        let mut fetches = futures::stream::iter(missing.into_iter().map(|id| async move {
            let units =
                sizes.get(&id).copied().unwrap_or(0).div_ceil(UNIT).clamp(1, SEGMENT_BYTES_IN_FLIGHT / UNIT);
            let _permit = budget.acquire_many(units as u32).await.map_err(|e| Error::Usage(e.to_string()))?;
            let packs = self.read_segment(&id).await?;
            // Ingested a pack at a time while the permit is held: the budget covers the
            // decoded segment too.
            cache.ingest(&id, packs)
        }))
        .buffer_unordered(SEGMENT_CONCURRENCY);
        while let Some(done) = fetches.next().await {
            done?;
        }
        Ok(())
    }

    /// An index segment from the bucket, checked against its name, to be read a pack at a
    /// time.
    pub async fn read_segment(&self, id: &Id) -> Result<SegmentReader> {
        SegmentReader::open(self.fetch_segment(id).await?, &index::object_name(id))
    }

    /// A whole index segment, checked against its name.
    async fn fetch_segment(&self, id: &Id) -> Result<Bytes> {
        let name = index::object_name(id);
        let bytes = self.get(&name).await?;
        if Id::of(&bytes) != *id {
            return Err(Error::corrupt(&name, "content does not match its id"));
        }
        Ok(bytes)
    }

    /// Read an index segment as it downloads, without holding the object: `visit` runs on
    /// this thread over a reader of the bytes as they arrive (the runtime's other workers
    /// drive the download). The object's hash is checked once all of it has been read, and a
    /// mismatch fails the call: act on what `visit` saw only once this returns. A GC pass
    /// over 10M chunks so holds one 64 KiB window instead of one 3.4 MB segment at a time.
    /// On a current-thread runtime, which cannot block this way, the object is fetched
    /// whole first.
    pub async fn visit_segment<T>(
        &self,
        id: &Id,
        visit: impl FnOnce(&mut SegmentReader<Box<dyn std::io::BufRead + Send>>) -> Result<T>,
    ) -> Result<T> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let name = index::object_name(id);
        if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
            let bytes = self.fetch_segment(id).await?;
            let source: Box<dyn std::io::BufRead + Send> = Box::new(std::io::Cursor::new(bytes));
            return visit(&mut SegmentReader::from_source(source, &name)?);
        }
        let got =
            self.store.get(&ObjectPath::from(name.as_str())).await.map_err(|e| Error::store(&name, e))?;
        let seen = Arc::new(std::sync::Mutex::new(Hashed::default()));
        let stream = got.into_stream().map_err(std::io::Error::other);
        let bridge = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
        let hashing = Hashing { inner: bridge, seen: seen.clone() };
        let source: Box<dyn std::io::BufRead + Send> =
            Box::new(std::io::BufReader::with_capacity(64 << 10, hashing));
        tokio::task::block_in_place(|| {
            let failed_read = |e: Error| match seen.lock().expect("hash lock").error.take() {
                // The download failed, not the content.
                Some(io) => {
                    Error::store(&name, object_store::Error::Generic { store: "download", source: io.into() })
                }
                None => e,
            };
            let mut reader = SegmentReader::from_source(source, &name).map_err(failed_read)?;
            let out = visit(&mut reader).map_err(failed_read)?;
            std::io::copy(&mut reader.into_source(), &mut std::io::sink())
                .map_err(|e| failed_read(Error::corrupt(&name, format!("reading to its end: {e}"))))?;
            let hash = seen.lock().expect("hash lock").hasher.finalize();
            if Id(*hash.as_bytes()) != *id {
                return Err(Error::corrupt(&name, "content does not match its id"));
            }
            Ok(out)
        })
    }

    /// Visit index segments in order, each as [`Repository::visit_segment`] does. Small ones
    /// (a push's segment is often a few KiB) are fetched whole, up to 16 ahead of the visit,
    /// so a pass over thousands of them costs about one round trip per 16, not one each;
    /// large ones stream one at a time. Holds at most 4 MiB of fetched small segments.
    /// `segments` are ids with their sizes from a listing.
    pub async fn visit_segments(
        &self,
        segments: &[(Id, u64)],
        mut visit: impl FnMut(&Id, &mut SegmentReader<Box<dyn std::io::BufRead + Send>>) -> Result<()>,
    ) -> Result<()> {
        const SMALL: u64 = 256 << 10;
        const AHEAD: usize = 16;
        let mut fetched = futures::stream::iter(segments.iter().map(|(id, size)| async move {
            match *size <= SMALL {
                true => self.fetch_segment(id).await.map(Some),
                false => Ok(None),
            }
        }))
        .buffered(AHEAD);
        for (id, _) in segments {
            match fetched.next().await.unwrap_or(Ok(None))? {
                Some(bytes) => {
                    let source: Box<dyn std::io::BufRead + Send> = Box::new(std::io::Cursor::new(bytes));
                    visit(id, &mut SegmentReader::from_source(source, &index::object_name(id))?)?;
                }
                None => self.visit_segment(id, |reader| visit(id, reader)).await?,
            }
        }
        Ok(())
    }

    pub fn locate(&self, id: &ChunkId) -> Result<Location> {
        self.cache()?.chunk(id)?.ok_or(Error::MissingChunk(*id))
    }

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.cache()?.chunk(id)?.is_some())
    }

    /// Fetch whole metadata packs (a snapshot's `meta_packs`) in parallel, so walking its
    /// trees costs a few large reads instead of one small read per directory. Chunks are
    /// verified as they are taken in; a pack that fails is skipped (its trees are then read
    /// one by one, and fail there with a precise error).
    pub async fn preload_meta(&self, packs: &[PackId], budget_bytes: u64) -> Result<()> {
        let sizes: HashMap<String, u64> = futures::stream::iter(packs.iter().map(|id| async move {
            let name = pack::object_name(id);
            let meta = self.store.head(&ObjectPath::from(name.as_str())).await;
            (name, meta.map(|m| m.size).unwrap_or(u64::MAX))
        }))
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect()
        .await;
        if sizes.values().fold(0u64, |a, s| a.saturating_add(*s)) > budget_bytes {
            tracing::debug!("metadata packs exceed the preload budget; trees are read on demand");
            return Ok(());
        }
        let mut fetches = futures::stream::iter(packs.iter().map(|id| async move {
            let name = pack::object_name(id);
            let bytes = self.get(&name).await?;
            let (_, entries) = pack::decode_table_of(&bytes, &name)?;
            let mut chunks = Vec::with_capacity(entries.len());
            for e in entries {
                let stored = &bytes[e.stored_range()];
                chunks.push((e.id, pack::open_chunk(&e, stored, &name)?));
            }
            Ok::<_, Error>(chunks)
        }))
        .buffer_unordered(FETCH_CONCURRENCY);
        while let Some(result) = fetches.next().await {
            match result {
                Ok(chunks) => {
                    let mut meta = self.meta.write().expect("meta lock");
                    for (id, bytes) in chunks {
                        meta.insert(id, Arc::new(bytes));
                    }
                }
                Err(e) => tracing::warn!("preloading metadata: {e}"),
            }
        }
        Ok(())
    }

    /// Drop what [`Repository::preload_meta`] holds (a walker done with one snapshot).
    pub fn drop_preloaded(&self) {
        self.meta.write().expect("meta lock").clear();
    }

    /// Read one chunk and verify it against its id.
    pub async fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(bytes) = self.meta.read().expect("meta lock").get(id) {
            return Ok(bytes.as_ref().clone());
        }
        match self.read_chunk_once(id).await {
            Err(e) if self.pack_gone(&e).await? => self.read_chunk_once(id).await,
            r => r,
        }
    }

    /// After a read found a pack gone, or no pack for a chunk: true if the chunk index was
    /// brought up to date, so the read is worth trying again. GC deletes packs only once no
    /// committed snapshot needs them, but it repacks live chunks into new packs first: a
    /// long-lived handle (a mount, a restore running while gc runs) can hold an index that
    /// predates the move, or be rebuilding it (another reader's refresh) right now.
    async fn pack_gone(&self, e: &Error) -> Result<bool> {
        let gone = match e {
            Error::NotFound(what) => what.starts_with("packs/"),
            Error::MissingChunk(_) => true,
            _ => false,
        };
        if !gone || self.cache.is_none() {
            return Ok(false);
        }
        tracing::info!("{e} (moved by gc?); refreshing the chunk index");
        self.sync_index().await?;
        Ok(true)
    }

    async fn read_chunk_once(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let name = pack::object_name(&loc.pack);
        let e = loc.entry;
        let stored = self
            .store
            .get_range(
                &ObjectPath::from(name.as_str()),
                e.offset as u64..e.offset as u64 + e.stored_len as u64,
            )
            .await
            .map_err(|err| Error::store(&name, err))?;
        pack::open_chunk(&e, &stored, &name)
    }

    /// Read chunks that live in one pack with one ranged request per run of neighbours.
    pub async fn read_pack_chunks(&self, pack_id: &PackId, entries: &[PackEntry]) -> Result<Vec<Vec<u8>>> {
        let name = pack::object_name(pack_id);
        let ranges: Vec<_> =
            entries.iter().map(|e| e.offset as u64..e.offset as u64 + e.stored_len as u64).collect();
        let parts = self
            .store
            .get_ranges(&ObjectPath::from(name.as_str()), &ranges)
            .await
            .map_err(|err| Error::store(&name, err))?;
        let raw: u64 = entries.iter().map(|e| e.raw_len as u64).sum();
        let entries = entries.to_vec();
        let decode = move || {
            entries.iter().zip(parts).map(|(e, stored)| pack::open_chunk(e, &stored, &name)).collect()
        };
        if raw < OFFLOAD_DECODE {
            return decode();
        }
        // Decompressing and hashing are the CPU of a restore; on the caller's task they would
        // run on one core however many reads are in flight.
        tokio::task::spawn_blocking(decode).await.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(Error::Interrupted), // the runtime is shutting down
        })
    }

    /// Read chunks from anywhere, grouped by pack. Returns them by id.
    pub async fn read_chunks(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Arc<Vec<u8>>>> {
        match self.read_chunks_once(ids).await {
            Err(e) if self.pack_gone(&e).await? => self.read_chunks_once(ids).await,
            r => r,
        }
    }

    async fn read_chunks_once(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Arc<Vec<u8>>>> {
        let mut by_pack: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
        let mut seen = HashSet::new();
        for id in ids {
            if seen.insert(*id) {
                let loc = self.locate(id)?;
                by_pack.entry(loc.pack).or_default().push(loc.entry);
            }
        }
        let mut out = HashMap::with_capacity(seen.len());
        let mut reads = futures::stream::iter(by_pack.into_iter().map(|(pack, mut entries)| async move {
            entries.sort_by_key(|e| e.offset);
            let chunks = self.read_pack_chunks(&pack, &entries).await?;
            Ok::<_, Error>(entries.into_iter().zip(chunks).collect::<Vec<_>>())
        }))
        .buffer_unordered(8);
        while let Some(batch) = reads.next().await {
            for (e, chunk) in batch? {
                out.insert(e.id, Arc::new(chunk));
            }
        }
        Ok(out)
    }

    pub async fn read_tree(&self, id: &Id) -> Result<Tree> {
        let bytes = self.read_chunk(id).await?;
        Tree::decode(&bytes, &format!("tree {id}"))
    }

    /// All nodes of a directory, in name order.
    pub async fn read_dir(&self, id: &Id) -> Result<Vec<Node>> {
        match self.read_tree(id).await? {
            Tree::Leaf(nodes) => Ok(nodes),
            Tree::Pages(pages) => {
                let mut out = Vec::new();
                for page in pages {
                    match self.read_tree(&page.id).await? {
                        Tree::Leaf(nodes) => out.extend(nodes),
                        Tree::Pages(_) => {
                            return Err(Error::corrupt(format!("tree {}", page.id), "nested pages"))
                        }
                    }
                }
                if !out.windows(2).all(|w| w[0].name < w[1].name) {
                    return Err(Error::corrupt(format!("tree {id}"), "pages overlap"));
                }
                Ok(out)
            }
        }
    }

    /// Find one name in a directory, decoding at most one page.
    pub async fn lookup(&self, dir: &Id, name: &[u8]) -> Result<Option<Node>> {
        let leaf = match self.read_tree(dir).await? {
            Tree::Leaf(nodes) => nodes,
            Tree::Pages(pages) => {
                let i = match pages.binary_search_by(|p| p.first.as_slice().cmp(name)) {
                    Ok(i) => i,
                    Err(0) => return Ok(None),
                    Err(i) => i - 1,
                };
                match self.read_tree(&pages[i].id).await? {
                    Tree::Leaf(nodes) => nodes,
                    Tree::Pages(_) => return Err(Error::corrupt(format!("tree {dir}"), "nested pages")),
                }
            }
        };
        Ok(leaf.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| leaf[i].clone()))
    }

    /// Resolve `/a/b/c` below the directory `root`.
    pub async fn walk_path(&self, root: &Node, path: &str) -> Result<Node> {
        let mut node = root.clone();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let tree::NodeKind::Dir { tree } = node.kind else {
                return Err(Error::NotFound(format!("{path} (a component is not a directory)")));
            };
            node = self
                .lookup(&tree, part.as_bytes())
                .await?
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
        }
        Ok(node)
    }

    /// A file's extents, reading its chunk lists when it has them.
    pub async fn extents(&self, content: &Content) -> Result<Vec<Extent>> {
        match content {
            Content::Extents(e) => Ok(e.clone()),
            Content::Lists(pages) => {
                let mut out = Vec::new();
                for page in pages {
                    let bytes = self.read_chunk(&page.id).await?;
                    out.extend(tree::decode_list(&bytes, page, &format!("chunk list {}", page.id))?);
                }
                Ok(out)
            }
        }
    }

    pub async fn snapshot_ids(&self) -> Result<Vec<Id>> {
        let mut ids: Vec<Id> = self
            .list("snapshots")
            .await?
            .into_iter()
            .filter_map(|(name, _)| name.strip_prefix("snapshots/").and_then(|h| h.parse().ok()))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// A snapshot root: from the local cache when it holds a copy whose hash still matches
    /// (roots never change), else from the bucket. Listing snapshots so costs one LIST, not
    /// one GET per snapshot.
    pub async fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        if let Some(bytes) = self.cache.as_ref().map(|c| c.snapshot_root(id)).transpose()?.flatten() {
            if let Ok(snap) = Snapshot::decode(&bytes, id) {
                return Ok(snap);
            }
        }
        self.fetch_snapshot(id).await
    }

    /// A snapshot root read from the bucket itself (as `check` must), then cached.
    pub async fn fetch_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let bytes = self.get(&snapshot::object_name(id)).await?;
        let snap = Snapshot::decode(&bytes, id)?;
        if let Some(cache) = &self.cache {
            cache.put_snapshot_root(id, &bytes)?;
        }
        Ok(snap)
    }

    /// Every readable snapshot, oldest first. A root removed since the listing (a concurrent
    /// forget) is left out; so is a damaged one, with a warning: one bad object must not stop
    /// every push (`--parent auto`), listing and forget of the repository. `check` reports it
    /// and `gc` refuses to run until it is removed (docs/operations.md). Bucket errors fail.
    pub async fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let ids = self.snapshot_ids().await?;
        let loaded: Vec<Option<(Id, Snapshot)>> =
            futures::stream::iter(ids.into_iter().map(|id| async move {
                match self.load_snapshot(&id).await {
                    Ok(snap) => Ok(Some((id, snap))),
                    Err(Error::NotFound(_)) => Ok(None),
                    Err(e @ Error::Corrupt { .. }) => {
                        tracing::warn!("skipping snapshot {id}: {e}");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }))
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        let mut all: Vec<(Id, Snapshot)> = loaded.into_iter().flatten().collect();
        all.sort_by(|a, b| a.1.time().cmp(&b.1.time()).then(a.0.cmp(&b.0)));
        Ok(all)
    }

    /// A snapshot by unique id prefix, or `latest`.
    pub async fn resolve_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        if spec == "latest" {
            let all = self.snapshots().await?;
            return all.into_iter().last().ok_or_else(|| Error::NotFound("any snapshot".into()));
        }
        // A full id needs no listing: one GET keeps mounts fast. From the bucket, not the
        // cache: a forgotten snapshot must not resolve.
        if let Ok(id) = spec.parse::<Id>() {
            return Ok((id, self.fetch_snapshot(&id).await?));
        }
        let spec_lc = spec.to_ascii_lowercase();
        if spec_lc.is_empty() || !spec_lc.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Usage(format!("{spec:?} is not a snapshot id (hex prefix) or `latest`")));
        }
        let matches: Vec<Id> =
            self.snapshot_ids().await?.into_iter().filter(|id| id.to_hex().starts_with(&spec_lc)).collect();
        match matches.as_slice() {
            [id] => Ok((*id, self.load_snapshot(id).await?)),
            [] => Err(Error::NotFound(format!("snapshot {spec}"))),
            _ => {
                let some: Vec<String> =
                    matches.iter().take(5).map(|id| id.to_hex()[..16].to_string()).collect();
                let more = if matches.len() > 5 { ", …" } else { "" };
                Err(Error::Usage(format!(
                    "snapshot prefix {spec} is ambiguous ({} matches: {}{more}); give more digits",
                    matches.len(),
                    some.join(", ")
                )))
            }
        }
    }
}

/// What a streamed object's bytes hashed to so far, and the first read error.
#[derive(Default)]
struct Hashed {
    hasher: blake3::Hasher,
    error: Option<std::io::Error>,
}

/// Hashes every byte read through it (see [`Repository::visit_segment`]).
struct Hashing<R> {
    inner: R,
    seen: Arc<std::sync::Mutex<Hashed>>,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut seen = self.seen.lock().expect("hash lock");
        match self.inner.read(buf) {
            Ok(n) => {
                seen.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                seen.error.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
        }
    }
}
