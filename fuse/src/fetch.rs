//! [`Fetcher`]: every chunk a mount reads comes through here.
//!
//! Order of lookup: this mount's memory, the host chunk cache, a fetch already in flight
//! (joined, never repeated), and only then the bucket. Misses are grouped by pack and merged
//! into range reads of up to [`MAX_RANGE`] (neighbours closer than [`MAX_GAP`] are read
//! through), so a 4 KiB read of a cold file costs one request for the file's next megabytes.
//! Each chunk is verified against its BLAKE3 before anyone sees it; a bad one is an error for
//! its readers and is never cached.
//!
//! On-demand reads have priority: background prefetch ([`Fetcher::prefetch`]) only starts a
//! request while no on-demand fetch is in flight.
//!
//! Fetched chunks are written to the host cache in the background; at most
//! [`CACHE_WRITE_BUDGET`] bytes may wait for that, and a batch that does not fit is served but
//! not cached, so a bucket faster than the cache disk cannot pile them up in memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_store::format::pack::{self, PackEntry};
use cairn_store::{ChunkId, PackId, Repository};
use futures::future::{BoxFuture, FutureExt, Shared};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::cache::ChunkCache;
use crate::stats::MountStats;

/// Longest single range read.
pub const MAX_RANGE: u64 = 4 << 20;
/// Bytes between two wanted chunks that are cheaper to read through than to ask for twice.
pub const MAX_GAP: u64 = 128 << 10;
/// A miss is amplified to at least this many bytes of the pack that follow it: neighbours in
/// a pack were pushed together (the next files of a directory), so they are read together.
pub const AMPLIFY: u64 = 1 << 20;
/// Pack tables (46 bytes per chunk) kept in memory for amplification.
const TABLES: usize = 512;
/// Fetched bytes that may wait in memory to be written to the host cache.
pub const CACHE_WRITE_BUDGET: u64 = 256 << 20;

pub type Chunk = Arc<Vec<u8>>;

/// Why a chunk could not be served; cloneable so every joined reader gets it.
#[derive(Clone, Debug)]
pub struct FetchError {
    msg: Arc<str>,
    /// The chunk index named no pack for it, or a pack the bucket no longer has: the index
    /// may predate a gc that moved the chunk (see [`Fetcher::chunks`]).
    gone: bool,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl FetchError {
    fn new(msg: impl std::fmt::Display) -> FetchError {
        FetchError { msg: msg.to_string().into(), gone: false }
    }

    fn gone(msg: impl std::fmt::Display) -> FetchError {
        FetchError { msg: msg.to_string().into(), gone: true }
    }
}

type BatchResult = Arc<HashMap<ChunkId, Result<Chunk, FetchError>>>;
type Batch = Shared<BoxFuture<'static, BatchResult>>;
type Table = Option<Arc<Vec<PackEntry>>>;

struct MemCache {
    lru: lru::LruCache<ChunkId, Chunk>,
    bytes: u64,
    cap: u64,
}

impl MemCache {
    fn get(&mut self, id: &ChunkId) -> Option<Chunk> {
        self.lru.get(id).cloned()
    }

    fn put(&mut self, id: ChunkId, chunk: Chunk) {
        let len = chunk.len() as u64;
        if let Some(old) = self.lru.put(id, chunk) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += len;
        while self.bytes > self.cap {
            match self.lru.pop_lru() {
                Some((_, c)) => self.bytes -= c.len() as u64,
                None => break,
            }
        }
    }
}

/// Bytes waiting to be written to the host cache, bounded.
struct WriteBudget {
    queued: AtomicU64,
    max: u64,
}

/// Bytes taken from a [`WriteBudget`], given back when dropped (also if the writer panics).
struct WriteReservation {
    budget: Arc<WriteBudget>,
    bytes: u64,
}

impl WriteBudget {
    fn new(max: u64) -> Arc<WriteBudget> {
        Arc::new(WriteBudget { queued: AtomicU64::new(0), max })
    }

    fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<WriteReservation> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(bytes).filter(|&n| n <= self.max)
            })
            .ok()?;
        Some(WriteReservation { budget: self.clone(), bytes })
    }
}

impl Drop for WriteReservation {
    fn drop(&mut self) {
        self.budget.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Chunks a mount touched, first touch first.
#[derive(Default)]
pub struct TraceRecorder {
    seen: HashSet<ChunkId>,
    pub order: Vec<ChunkId>,
}

pub struct Fetcher {
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    mem: Mutex<MemCache>,
    inflight: Mutex<HashMap<ChunkId, Batch>>,
    /// Chunk tables of packs, sorted by offset, for amplification.
    tables: Mutex<lru::LruCache<PackId, Arc<Vec<PackEntry>>>>,
    /// Table reads in flight, so concurrent cold readers of one pack read its table once.
    table_reads: Mutex<HashMap<PackId, Shared<BoxFuture<'static, Table>>>>,
    stats: Arc<MountStats>,
    trace: Mutex<Option<TraceRecorder>>,
    demand_active: AtomicUsize,
    cache_writes: Arc<WriteBudget>,
}

impl Fetcher {
    pub fn new(
        repo: Arc<Repository>,
        cache: Arc<ChunkCache>,
        stats: Arc<MountStats>,
        mem_bytes: u64,
        record_trace: bool,
    ) -> Fetcher {
        Fetcher {
            repo,
            cache,
            mem: Mutex::new(MemCache { lru: lru::LruCache::unbounded(), bytes: 0, cap: mem_bytes }),
            inflight: Mutex::new(HashMap::new()),
            tables: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(TABLES).expect("nonzero"))),
            table_reads: Mutex::new(HashMap::new()),
            stats,
            trace: Mutex::new(record_trace.then(TraceRecorder::default)),
            demand_active: AtomicUsize::new(0),
            cache_writes: WriteBudget::new(CACHE_WRITE_BUDGET),
        }
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn take_trace(&self) -> Option<Vec<ChunkId>> {
        self.trace.lock().expect("trace lock").take().map(|t| t.order)
    }

    pub fn trace_snapshot(&self) -> Option<Vec<ChunkId>> {
        self.trace.lock().expect("trace lock").as_ref().map(|t| t.order.clone())
    }

    pub async fn chunk(self: &Arc<Self>, id: ChunkId) -> Result<Chunk, FetchError> {
        Ok(self.chunks(&[id], &[]).await?.pop().expect("one chunk asked, one returned"))
    }

    /// The `wanted` chunks, in order. `ahead` are chunks the caller will probably want next:
    /// they ride along in the same range reads and are cached, but nobody waits for them.
    ///
    /// A mount lives for days and reads through the chunk index it had when it started. A gc
    /// meanwhile may move live chunks (repack) and delete their old packs: a chunk whose pack
    /// is gone, or that the index does not name, is asked for once more after the index is
    /// brought up to date.
    pub async fn chunks(
        self: &Arc<Self>,
        wanted: &[ChunkId],
        ahead: &[ChunkId],
    ) -> Result<Vec<Chunk>, FetchError> {
        match self.chunks_once(wanted, ahead).await {
            Err(e) if e.gone => {
                tracing::info!("{e}; refreshing the chunk index and reading again");
                self.repo
                    .sync_index()
                    .await
                    .map_err(|e| FetchError::new(format!("refreshing the chunk index: {e}")))?;
                self.tables.lock().expect("table lock").clear();
                // Read-ahead started before the refresh may still be in flight from the old
                // pack: start afresh rather than join it.
                self.inflight.lock().expect("inflight lock").retain(|id, _| !wanted.contains(id));
                self.chunks_once(wanted, &[]).await
            }
            r => r,
        }
    }

    async fn chunks_once(
        self: &Arc<Self>,
        wanted: &[ChunkId],
        ahead: &[ChunkId],
    ) -> Result<Vec<Chunk>, FetchError> {
        if let Some(t) = self.trace.lock().expect("trace lock").as_mut() {
            for id in wanted {
                if t.seen.insert(*id) {
                    t.order.push(*id);
                }
            }
        }
        let mut found: HashMap<ChunkId, Chunk> = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for id in wanted {
            if found.contains_key(id) || missing.contains(id) {
                continue;
            }
            let in_memory = self.mem.lock().expect("mem lock").get(id);
            if let Some(c) = in_memory {
                MountStats::bump(&self.stats.memory_hits, 1);
                found.insert(*id, c);
            } else if let Some(bytes) = self.cache_get(id).await {
                MountStats::bump(&self.stats.cache_hits, 1);
                let c = Arc::new(bytes);
                self.mem.lock().expect("mem lock").put(*id, c.clone());
                found.insert(*id, c);
            } else {
                missing.push(*id);
            }
        }
        if missing.is_empty() {
            if !ahead.is_empty() {
                self.start_ahead(ahead);
            }
            return Ok(wanted.iter().map(|id| found[id].clone()).collect());
        }
        let ahead: Vec<ChunkId> = ahead.iter().filter(|id| !self.cache.contains(id)).copied().collect();
        self.demand_active.fetch_add(1, Ordering::SeqCst);
        let packs: HashSet<PackId> =
            missing.iter().filter_map(|id| self.repo.locate(id).ok()).map(|l| l.pack).collect();
        for pack in packs {
            self.pack_table(pack).await;
        }
        let batches = self.start(&missing, &ahead, true);
        let mut results = Vec::new();
        for batch in batches {
            results.push(batch.await);
        }
        self.demand_active.fetch_sub(1, Ordering::SeqCst);
        for id in &missing {
            let r = results.iter().find_map(|r| r.get(id)).cloned();
            match r {
                Some(Ok(c)) => {
                    found.insert(*id, c);
                }
                Some(Err(e)) => return Err(e),
                None => return Err(FetchError::new(format!("chunk {id} was not in the range read for it"))),
            }
        }
        Ok(wanted.iter().map(|id| found[id].clone()).collect())
    }

    async fn cache_get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        if !self.cache.contains(id) {
            return None;
        }
        let cache = self.cache.clone();
        let id = *id;
        tokio::task::spawn_blocking(move || cache.get(&id)).await.ok().flatten()
    }

    fn start_ahead(self: &Arc<Self>, ahead: &[ChunkId]) {
        let todo: Vec<ChunkId> = {
            let mut mem = self.mem.lock().expect("mem lock");
            ahead.iter().filter(|id| mem.get(id).is_none() && !self.cache.contains(id)).copied().collect()
        };
        if !todo.is_empty() {
            self.start(&[], &todo, false);
        }
    }

    /// Register and spawn range reads for `missing` (and `ahead`) chunks not already in
    /// flight; return the batches that will deliver every `missing` chunk. `demand` says
    /// whether a reader waits (for the miss counters).
    fn start(self: &Arc<Self>, missing: &[ChunkId], ahead: &[ChunkId], demand: bool) -> Vec<Batch> {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let mut waits: Vec<Batch> = Vec::new();
        let mut to_fetch: Vec<ChunkId> = Vec::new();
        let mut failed: HashMap<ChunkId, Result<Chunk, FetchError>> = HashMap::new();
        let mut seen = HashSet::new();
        for (i, id) in missing.iter().chain(ahead).enumerate() {
            let is_missing = i < missing.len();
            if !seen.insert(*id) {
                continue;
            }
            if let Some(b) = inflight.get(id) {
                if is_missing {
                    MountStats::bump(&self.stats.joined_fetches, 1);
                    waits.push(b.clone());
                }
                continue;
            }
            // A batch may have finished between the caller's lookups and this lock.
            if let Some(c) = self.mem.lock().expect("mem lock").get(id) {
                if is_missing {
                    failed.insert(*id, Ok(c));
                }
                continue;
            }
            if is_missing && demand {
                MountStats::bump(&self.stats.misses, 1);
            }
            to_fetch.push(*id);
        }
        tracing::debug!(
            "start: missing {:?} ahead {:?} fetch {:?}",
            missing.iter().map(|i| i.short()).collect::<Vec<_>>(),
            ahead.iter().map(|i| i.short()).collect::<Vec<_>>(),
            to_fetch.iter().map(|i| i.short()).collect::<Vec<_>>()
        );
        let mut by_pack: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
        for id in &to_fetch {
            match self.repo.locate(id) {
                Ok(loc) => by_pack.entry(loc.pack).or_default().push(loc.entry),
                Err(e) if missing.contains(id) => {
                    failed.insert(*id, Err(FetchError::gone(e)));
                }
                Err(_) => {}
            }
        }
        if !failed.is_empty() {
            waits.push(futures::future::ready(Arc::new(failed)).boxed().shared());
        }
        for (pack_id, mut entries) in by_pack {
            entries.sort_by_key(|e| e.offset);
            let table = self.tables.lock().expect("table lock").get(&pack_id).cloned();
            if let Some(table) = &table {
                // Amplify each run, then merge the union: chunks of this pack are not in file
                // order (push compresses in parallel), so amplified runs overlap each other.
                let mut all: std::collections::BTreeMap<u32, PackEntry> =
                    entries.iter().map(|e| (e.offset, *e)).collect();
                let mem = self.mem.lock().expect("mem lock");
                for mut run in merge_ranges(entries.clone()) {
                    // Only chunks nobody has or is fetching: amplification must not fetch twice.
                    amplify(&mut run, table, |id| {
                        !inflight.contains_key(id) && !mem.lru.contains(id) && !self.cache.contains(id)
                    });
                    all.extend(run.into_iter().map(|e| (e.offset, e)));
                }
                drop(mem);
                entries = all.into_values().collect();
            }
            for run in merge_ranges(entries) {
                let ids: Vec<ChunkId> = run.iter().map(|e| e.id).collect();
                let me = self.clone();
                let task = tokio::spawn(async move { me.fetch_range(pack_id, run).await });
                let batch: Batch = async move {
                    task.await.unwrap_or_else(|e| {
                        let err = FetchError::new(format!("range read task failed: {e}"));
                        Arc::new(HashMap::from([(ChunkId::of(b""), Err(err))]))
                    })
                }
                .boxed()
                .shared();
                let wanted_here = ids.iter().any(|id| missing.contains(id));
                for id in ids {
                    inflight.insert(id, batch.clone());
                }
                if wanted_here {
                    waits.push(batch);
                }
            }
        }
        waits
    }

    async fn fetch_range(self: Arc<Self>, pack_id: PackId, run: Vec<PackEntry>) -> BatchResult {
        let name = pack::object_name(&pack_id);
        let start = run[0].offset as u64;
        let end = run.iter().map(end_of).max().unwrap_or(start);
        MountStats::bump(&self.stats.range_reads, 1);
        tracing::debug!("range read {name} [{start}..{end}) for {} chunks", run.len());
        let got = self.repo.store().get_range(&ObjectPath::from(name.as_str()), start..end).await;
        let mut out: HashMap<ChunkId, Result<Chunk, FetchError>> = HashMap::with_capacity(run.len());
        match got {
            Err(e) => {
                tracing::warn!("reading {name} [{start}..{end}): {e}");
                let not_found = matches!(e, object_store::Error::NotFound { .. });
                let err = FetchError { msg: format!("{name}: {e}").into(), gone: not_found };
                for entry in &run {
                    out.insert(entry.id, Err(err.clone()));
                }
            }
            Ok(bytes) => {
                MountStats::bump(&self.stats.fetched_bytes, bytes.len() as u64);
                let stats = self.stats.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    run.iter()
                        .map(|e| {
                            let lo = (e.offset as u64 - start) as usize;
                            let hi = lo + e.stored_len as usize;
                            let stored = bytes.get(lo..hi).unwrap_or(&[]);
                            let r = pack::open_chunk(e, stored, &name).map(Arc::new).map_err(|err| {
                                MountStats::bump(&stats.bad_chunks, 1);
                                tracing::error!("{err}");
                                FetchError::new(err)
                            });
                            (e.id, r)
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let mut mem = self.mem.lock().expect("mem lock");
                for (id, r) in opened {
                    if let Ok(c) = &r {
                        MountStats::bump(&self.stats.fetched_chunks, 1);
                        mem.put(id, c.clone());
                    }
                    out.insert(id, r);
                }
            }
        }
        let out = Arc::new(out);
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for id in out.keys() {
                inflight.remove(id);
            }
        }
        self.fill_cache(&out);
        out
    }

    /// Write a batch's good chunks to the host cache in the background, if the bytes already
    /// waiting for that leave room; otherwise skip it (it is only a cache) rather than hold it.
    fn fill_cache(&self, batch: &BatchResult) {
        let bytes: u64 = batch.values().filter_map(|r| r.as_ref().ok()).map(|c| c.len() as u64).sum();
        if bytes == 0 {
            return;
        }
        let Some(reservation) = self.cache_writes.try_reserve(bytes) else {
            tracing::debug!("chunk cache writes are behind; not caching a batch of {bytes} bytes");
            return;
        };
        let cache = self.cache.clone();
        let fill = batch.clone();
        tokio::task::spawn_blocking(move || {
            let _reservation = reservation;
            for (id, r) in fill.iter() {
                if let Ok(c) = r {
                    cache.insert(id, c);
                }
            }
        });
    }

    /// Fetch `ids` into the host cache below on-demand reads in priority. Returns the bytes
    /// fetched from the bucket.
    pub async fn prefetch(self: &Arc<Self>, ids: &[ChunkId]) -> u64 {
        self.yield_to_demand().await;
        let todo: Vec<ChunkId> = ids.iter().filter(|id| !self.cache.contains(id)).copied().collect();
        if todo.is_empty() {
            return 0;
        }
        let before = self.stats.fetched_bytes.load(Ordering::Relaxed);
        let batches = self.start(&todo, &[], false);
        let mut n = 0;
        for b in batches {
            n += b.await.values().filter(|r| r.is_ok()).count() as u64;
        }
        let bytes = self.stats.fetched_bytes.load(Ordering::Relaxed).saturating_sub(before);
        MountStats::bump(&self.stats.prefetched_chunks, n);
        MountStats::bump(&self.stats.prefetched_bytes, bytes);
        bytes
    }

    /// Fetch a whole metadata pack into the host cache (one GET for many directories).
    pub async fn prefetch_pack(self: &Arc<Self>, pack_id: PackId) -> Result<u64, FetchError> {
        self.yield_to_demand().await;
        let name = pack::object_name(&pack_id);
        let bytes = self.repo.get(&name).await.map_err(FetchError::new)?;
        let len = bytes.len() as u64;
        MountStats::bump(&self.stats.fetched_bytes, len);
        MountStats::bump(&self.stats.prefetched_bytes, len);
        let cache = self.cache.clone();
        let stats = self.stats.clone();
        tokio::task::spawn_blocking(move || {
            let (_, entries) = pack::decode_table_of(&bytes, &name).map_err(FetchError::new)?;
            for e in entries {
                if cache.contains(&e.id) {
                    continue;
                }
                let stored = &bytes[e.offset as usize..end_of(&e) as usize];
                match pack::open_chunk(&e, stored, &name) {
                    Ok(raw) => {
                        cache.insert(&e.id, &raw);
                        MountStats::bump(&stats.prefetched_chunks, 1);
                    }
                    Err(err) => {
                        MountStats::bump(&stats.bad_chunks, 1);
                        tracing::error!("{err}");
                    }
                }
            }
            Ok(len)
        })
        .await
        .map_err(|e| FetchError::new(format!("prefetch task failed: {e}")))?
    }

    async fn yield_to_demand(&self) {
        while self.demand_active.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The chunk table of a pack: from memory, else its footer and table (two small reads).
    /// `None` if it cannot be read; amplification is then skipped, nothing else.
    async fn pack_table(self: &Arc<Self>, pack_id: PackId) -> Table {
        let read = {
            let mut reads = self.table_reads.lock().expect("table reads lock");
            // Checked under the reads lock: a finished read stores its table before it leaves
            // `table_reads`, so a table is either cached here or its read is still listed.
            if let Some(t) = self.tables.lock().expect("table lock").get(&pack_id) {
                return Some(t.clone());
            }
            reads
                .entry(pack_id)
                .or_insert_with(|| {
                    let me = self.clone();
                    async move {
                        let table = me.read_pack_table(pack_id).await;
                        if let Some(t) = &table {
                            me.tables.lock().expect("table lock").put(pack_id, t.clone());
                        }
                        me.table_reads.lock().expect("table reads lock").remove(&pack_id);
                        table
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        read.await
    }

    async fn read_pack_table(&self, pack_id: PackId) -> Table {
        let name = pack::object_name(&pack_id);
        let path = ObjectPath::from(name.as_str());
        let suffix =
            GetOptions { range: Some(GetRange::Suffix(pack::FOOTER_LEN as u64)), ..Default::default() };
        let got = self.repo.store().get_opts(&path, suffix).await.ok()?;
        let len = got.meta.size;
        let footer = pack::Footer::decode(&got.bytes().await.ok()?, &name).ok()?;
        let range = footer.table_range(len, &name).ok()?;
        let table = self.repo.store().get_range(&path, range.clone()).await.ok()?;
        let mut entries = footer.decode_table(&table, range.start, &name).ok()?;
        entries.sort_by_key(|e| e.offset);
        Some(Arc::new(entries))
    }

    /// The chunks if every one is in memory or in the host cache, without waiting on anything
    /// but a local file read: the FUSE thread can answer at once.
    pub fn try_local(&self, wanted: &[ChunkId]) -> Option<Vec<Chunk>> {
        let mut out = Vec::with_capacity(wanted.len());
        for id in wanted {
            let hit = self.mem.lock().expect("mem lock").get(id);
            match hit {
                Some(c) => {
                    MountStats::bump(&self.stats.memory_hits, 1);
                    out.push(c)
                }
                None => {
                    let bytes = self.cache.get(id)?;
                    MountStats::bump(&self.stats.cache_hits, 1);
                    let c = Arc::new(bytes);
                    self.mem.lock().expect("mem lock").put(*id, c.clone());
                    out.push(c);
                }
            }
        }
        if let Some(t) = self.trace.lock().expect("trace lock").as_mut() {
            for id in wanted {
                if t.seen.insert(*id) {
                    t.order.push(*id);
                }
            }
        }
        Some(out)
    }

    /// The chunks if every one is in memory or in the host cache, leaving no trace: neither the
    /// access trace nor this mount's memory (priming reads what the reader may never want).
    pub fn local_untraced(&self, wanted: &[ChunkId]) -> Option<Vec<Chunk>> {
        let mut out = Vec::with_capacity(wanted.len());
        for id in wanted {
            let hit = self.mem.lock().expect("mem lock").lru.peek(id).cloned();
            match hit {
                Some(c) => out.push(c),
                None => out.push(Arc::new(self.cache.get(id)?)),
            }
        }
        Some(out)
    }

    /// Start fetching read-ahead chunks in the background (from any thread).
    pub fn read_ahead(self: &Arc<Self>, rt: &tokio::runtime::Handle, ahead: Vec<ChunkId>) {
        // Most calls on a warm mount find every chunk local: checking here saves a task wake-up
        // per read, which on few cores costs more than the read itself.
        let todo: Vec<ChunkId> = {
            let mem = self.mem.lock().expect("mem lock");
            ahead.into_iter().filter(|id| !mem.lru.contains(id) && !self.cache.contains(id)).collect()
        };
        if todo.is_empty() {
            return;
        }
        let me = self.clone();
        rt.spawn(async move { me.start_ahead(&todo) });
    }

    /// Chunks that are neither in memory nor in the host cache (for read-ahead decisions).
    pub fn is_local(&self, id: &ChunkId) -> bool {
        self.mem.lock().expect("mem lock").lru.contains(id)
            || self.inflight.lock().expect("inflight lock").contains_key(id)
            || self.cache.contains(id)
    }
}

fn end_of(e: &PackEntry) -> u64 {
    e.offset as u64 + e.stored_len as u64
}

/// Extend a run with the pack's next chunks until it spans [`AMPLIFY`] bytes.
fn amplify(run: &mut Vec<PackEntry>, table: &[PackEntry], take: impl Fn(&ChunkId) -> bool) {
    let start = run[0].offset as u64;
    let mut end = run.iter().map(end_of).max().unwrap_or(start);
    let have: HashSet<ChunkId> = run.iter().map(|e| e.id).collect();
    let from = table.partition_point(|e| (e.offset as u64) < end);
    for e in &table[from..] {
        if end - start >= AMPLIFY || e.offset as u64 > end + MAX_GAP || end_of(e) - start > MAX_RANGE {
            break;
        }
        if !have.contains(&e.id) && take(&e.id) {
            run.push(*e);
            end = end.max(end_of(e));
        }
    }
}

/// Split a pack's wanted entries (sorted by offset) into runs that one range read serves.
fn merge_ranges(entries: Vec<PackEntry>) -> Vec<Vec<PackEntry>> {
    let mut runs: Vec<Vec<PackEntry>> = Vec::new();
    for e in entries {
        if let Some(run) = runs.last_mut() {
            let start = run[0].offset as u64;
            let end = run.iter().map(end_of).max().unwrap_or(start);
            let new_end = end.max(end_of(&e));
            if e.offset as u64 <= end + MAX_GAP && new_end - start <= MAX_RANGE {
                run.push(e);
                continue;
            }
        }
        runs.push(vec![e]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_store::format::pack::Codec;

    fn entry(offset: u64, len: u32) -> PackEntry {
        let id = ChunkId::of(&offset.to_le_bytes());
        PackEntry { id, offset: offset as u32, stored_len: len, raw_len: len, codec: Codec::Raw }
    }

    #[test]
    fn neighbours_merge_and_far_or_long_runs_split() {
        let runs = merge_ranges(vec![entry(8, 100), entry(108, 100), entry(108 + 100 + MAX_GAP, 10)]);
        assert_eq!(runs.len(), 1);
        let runs = merge_ranges(vec![entry(8, 100), entry(208 + MAX_GAP + 1, 10)]);
        assert_eq!(runs.len(), 2);
        let big = (MAX_RANGE / 2) as u32;
        let runs = merge_ranges(vec![entry(0, big), entry(big as u64, big), entry(2 * big as u64, 1)]);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn write_budget_refuses_past_its_max_and_frees_on_drop() {
        let budget = WriteBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(41).is_none());
        let b = budget.try_reserve(40).unwrap();
        assert!(budget.try_reserve(1).is_none());
        assert!(budget.try_reserve(u64::MAX).is_none());
        drop(a);
        assert_eq!(budget.queued.load(Ordering::Relaxed), 40);
        let _c = budget.try_reserve(60).unwrap();
        drop(b);
        assert_eq!(budget.queued.load(Ordering::Relaxed), 60);
    }
}

#[cfg(test)]
mod fetch_tests {
    use std::sync::atomic::AtomicBool;

    use cairn_store::format::config::Chunking;
    use cairn_store::format::tree::{Content, NodeKind};
    use cairn_store::push::{push, ParentSpec, PushOptions, PushProgress};
    use cairn_store::Kind;

    use super::*;
    use crate::cache::CacheConfig;

    struct Quiet;
    impl PushProgress for Quiet {}

    /// A repository holding one 3 MB file; its data and the ids of its chunks, in order.
    async fn repo_with_file(tmp: &std::path::Path) -> (Arc<Repository>, Vec<u8>, Vec<ChunkId>) {
        let src = tmp.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(src.join("f"), &data).unwrap();
        let store = Arc::new(object_store::memory::InMemory::new());
        let repo =
            Repository::init_on(store, "memory://t", Chunking::default(), &tmp.join("c")).await.unwrap();
        let opts = PushOptions {
            source: src,
            kind: Kind::Fs,
            tags: Default::default(),
            parent: ParentSpec::None,
            expire_in: None,
            host: None,
            label: None,
            overlay: None,
        };
        let summary = push(&repo, &opts, &Quiet, &AtomicBool::new(false)).await.unwrap();
        let snap = repo.load_snapshot(&summary.snapshot).await.unwrap();
        let node = repo.walk_path(&snap.root, "/f").await.unwrap();
        let NodeKind::File { content, .. } = &node.kind else { panic!("a file") };
        let Content::Extents(extents) = content else { panic!("inline extents") };
        let ids: Vec<ChunkId> = extents.iter().filter_map(|e| e.chunk).collect();
        assert!(ids.len() > 10);
        (Arc::new(repo), data, ids)
    }

    fn cache_in(dir: std::path::PathBuf) -> Arc<ChunkCache> {
        Arc::new(ChunkCache::open(CacheConfig { dir, max_bytes: 64 << 20, min_free_bytes: 0 }).unwrap())
    }

    /// Cache writes wait within their budget: a full budget skips caching (the reader is still
    /// served), and finished writes give their bytes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_writes_stay_within_their_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let (repo, data, ids) = repo_with_file(tmp.path()).await;
        let stats = Arc::new(MountStats::default());

        let cache = cache_in(tmp.path().join("full"));
        let mut fetcher = Fetcher::new(repo.clone(), cache.clone(), stats.clone(), 64 << 20, false);
        fetcher.cache_writes = WriteBudget::new(0);
        let fetcher = Arc::new(fetcher);
        let chunks = fetcher.chunks(&ids, &[]).await.unwrap();
        assert_eq!(chunks.iter().flat_map(|c| c.iter().copied()).collect::<Vec<u8>>(), data);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.stats().chunks, 0, "cached past a full write budget");

        let cache = cache_in(tmp.path().join("open"));
        let fetcher = Arc::new(Fetcher::new(repo, cache.clone(), stats, 64 << 20, false));
        fetcher.chunks(&ids, &[]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fetcher.cache_writes.queued.load(Ordering::Acquire) > 0 {
            assert!(std::time::Instant::now() < deadline, "write budget never given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(ids.iter().all(|id| cache.contains(id)));
    }

    /// Many readers asking for one cold file at once cost one set of range reads, and every
    /// chunk arrives verified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_a_cold_file_share_one_fetch() {
        let tmp = tempfile::tempdir().unwrap();
        let (repo, data, ids) = repo_with_file(tmp.path()).await;
        let cache = cache_in(tmp.path().join("cc"));
        let stats = Arc::new(MountStats::default());
        let fetcher = Arc::new(Fetcher::new(repo.clone(), cache, stats.clone(), 64 << 20, false));
        let gets_before = repo.requests().gets;
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (f, ids) = (fetcher.clone(), ids.clone());
                tokio::spawn(async move { f.chunks(&ids, &[]).await.unwrap() })
            })
            .collect();
        for r in readers {
            let chunks = r.await.unwrap();
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, data);
        }
        let gets = repo.requests().gets - gets_before;
        // One range read per 4 MiB, plus the pack's footer and table (read once, for amplification).
        let runs = (data.len() as u64).div_ceil(MAX_RANGE);
        assert!(gets <= runs + 2, "{gets} reads for a file that needs {runs} range reads and one pack table");
        assert!(stats.fetched_bytes.load(Ordering::Relaxed) < 2 * data.len() as u64);
    }
}
