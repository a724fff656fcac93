//! `gc`: delete packs no committed snapshot needs, safely while other hosts push.
//!
//! The protocol and the argument for it are in `docs/gc.md`. In order:
//! 1. read everything (index segments, pack listing, snapshot roots, leases) and mark what
//!    committed snapshots reference; any error here aborts before anything changes;
//! 2. condemn the packs holding nothing live, in `gc/state` (conditional write);
//! 3. list leases; wait until each is committed, gone or revoked (revoking silent ones);
//! 4. mark again from everything committed meanwhile; take back condemned packs it needs;
//! 5. write one compacted index without the condemned packs, delete the old segments;
//! 6. delete the condemned packs; 7. clear `gc/state`.
//!
//! A run killed at any step leaves a consistent repository; the next run finishes the job.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_store::backend::RequestStats;
use cairn_store::format::index::{self, IndexSegment, IndexedPack, SegmentWriter, MAX_CHUNKS_PER_SEGMENT};
use cairn_store::format::lease::{GcState, Lease, LeaseState, GC_STATE};
use cairn_store::format::pack::{self, PackBuilder, PackKind};
use cairn_store::format::snapshot::{self, Snapshot};
use cairn_store::lease::read_gc_state;
use cairn_store::{Error, Id, PackId, Repository, Result};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;

use crate::liveset::LiveSet;
use crate::mark::{mark, MetaIndex};

/// An index of this many segments more than a compaction would leave is compacted even when
/// nothing is deleted.
const COMPACT_ABOVE_SEGMENTS: usize = 64;

#[derive(Clone, Debug)]
pub struct GcOptions {
    pub dry_run: bool,
    /// A lease whose heartbeat is older than this (by this host's clock) is revoked. Clocks
    /// decide only when a silent writer is given up on, never whether data is safe.
    pub lease_timeout: Duration,
    /// How often leases are polled while waiting for writers.
    pub poll: Duration,
    /// Give up (leaving the condemnation in place for the next run) after waiting this long.
    pub max_wait: Duration,
    /// Repack packs whose live bytes are under this fraction of their size (0 = never).
    pub repack_below: f64,
    /// Read at most this many bytes of packs to repack in one run.
    pub max_repack: u64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            lease_timeout: Duration::from_secs(15 * 60),
            poll: Duration::from_millis(500),
            max_wait: Duration::from_secs(3600),
            repack_below: 0.5,
            max_repack: 4 << 30,
        }
    }
}

/// What a long GC run is doing, for progress bars. Each phase replaces the last; `advance`
/// counts towards the phase's `total` (snapshots marked, segments written, packs deleted).
pub trait GcProgress: Sync {
    fn phase(&self, _name: &str, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
}

impl GcProgress for cairn_store::push::NoProgress {}

/// Stop at the next point where stopping is clean: [`gc`] then releases its claim on
/// `gc/state`, so the next run can start at once and finish the job.
fn stop_if(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub live_chunks: usize,
    pub packs: usize,
    pub packs_deleted: usize,
    pub packs_taken_back: usize,
    /// Mostly dead packs whose live chunks were copied into new packs (then deleted).
    pub packs_repacked: usize,
    pub bytes_repacked: u64,
    pub bytes_freed: u64,
    /// Staging files of writers killed mid-write (local repositories only).
    pub staging_removed: usize,
    /// Packs the index named that the bucket does not have, dropped from the index.
    pub packs_missing: usize,
    pub segments_written: usize,
    pub segments_deleted: usize,
    pub leases_waited: usize,
    pub leases_revoked: usize,
    pub leases_rolled_forward: usize,
    pub requests: RequestStats,
    /// Seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
}

struct Phases {
    at: Instant,
    list: Vec<(String, f64)>,
}

impl Phases {
    fn done(&mut self, name: &str) {
        self.list.push((name.to_string(), self.at.elapsed().as_secs_f64()));
        self.at = Instant::now();
    }
}

/// The index segments and, per indexed pack, its size, its live bytes and whether it holds a
/// live chunk no repacked copy holds. Segments are streamed (small ones fetched a few
/// ahead), so memory holds a few MiB of them and a few numbers per pack, not every table.
struct IndexView {
    /// With their sizes.
    segments: Vec<(Id, u64)>,
    /// Chunk entries each segment lists.
    segment_chunks: HashMap<Id, usize>,
    packs: HashMap<PackId, PackUse>,
}

#[derive(Default, Clone, Copy)]
struct PackUse {
    len: u64,
    /// Stored bytes of all its chunks, and of its live ones (tables and headers left out, so
    /// packs of tiny chunks do not look mostly dead).
    chunk_bytes: u64,
    live_bytes: u64,
    needed: bool,
}

impl IndexView {
    fn needed(&self, p: &PackId) -> bool {
        self.packs.get(p).is_some_and(|u| u.needed)
    }
}

/// The index segments, with their sizes, in name order.
async fn segment_ids(repo: &Repository) -> Result<Vec<(Id, u64)>> {
    let mut segments: Vec<(Id, u64)> = repo
        .list("index")
        .await?
        .into_iter()
        .filter_map(|(n, size)| n.strip_prefix("index/").and_then(|h| h.parse().ok()).map(|id| (id, size)))
        .collect();
    segments.sort();
    Ok(segments)
}

async fn read_index(repo: &Repository, live: &LiveSet, copied: &HashSet<Id>) -> Result<IndexView> {
    let segments = segment_ids(repo).await?;
    let mut packs: HashMap<PackId, PackUse> = HashMap::new();
    let mut segment_chunks: HashMap<Id, usize> = HashMap::new();
    repo.visit_segments(&segments, |id, reader| {
        let listed = segment_chunks.entry(*id).or_insert(0);
        while let Some(head) = reader.next_head()? {
            *listed = listed.saturating_add(head.chunks);
            if packs.contains_key(&head.id) {
                continue; // indexed twice: counted once
            }
            let mut u = PackUse { len: head.len, ..Default::default() };
            while let Some(c) = reader.next_entry()? {
                u.chunk_bytes += c.stored_len as u64;
                if live.contains(&c.id) {
                    u.live_bytes += c.stored_len as u64;
                    u.needed |= !copied.contains(&c.id);
                }
            }
            packs.insert(head.id, u);
        }
        reader.supersedes().map(drop)
    })
    .await?;
    Ok(IndexView { segments, segment_chunks, packs })
}

/// Copy the live chunks of mostly dead packs into new packs (stored bytes as they are, each
/// verified first) and index them. The old packs then hold nothing that is not also elsewhere
/// and are condemned like dead ones. A chunk that fails verification is not copied, so its
/// pack stays needed.
async fn repack(
    repo: &Repository,
    view: &IndexView,
    listed: &HashMap<PackId, u64>,
    live: &LiveSet,
    opts: &GcOptions,
    copied: &mut HashSet<Id>,
    report: &mut GcReport,
) -> Result<HashSet<PackId>> {
    let mut candidates: Vec<(&PackId, &PackUse)> = view
        .packs
        .iter()
        // Not packs the bucket lost: they cannot be read, and leave the index instead.
        .filter(|(p, u)| {
            listed.contains_key(p)
                && u.needed
                && u.chunk_bytes > 0
                && (u.live_bytes as f64) < opts.repack_below * u.chunk_bytes as f64
        })
        .collect();
    candidates.sort_by(|a, b| {
        let fa = a.1.live_bytes as f64 / a.1.chunk_bytes as f64;
        let fb = b.1.live_bytes as f64 / b.1.chunk_bytes as f64;
        fa.total_cmp(&fb).then(a.0.cmp(b.0))
    });
    let pack_size = repo.config().pack_size as usize;
    // Made on first use: each reserves a whole pack.
    let mut builders: [Option<PackBuilder>; 2] = [None, None];
    let mut segment = IndexSegment::default();
    let mut budget = opts.max_repack;
    for (pack_id, u) in candidates {
        if u.len > budget {
            continue;
        }
        budget -= u.len;
        let name = pack::object_name(pack_id);
        let bytes = repo.get(&name).await?;
        let (kind, entries) = pack::decode_table_of(&bytes, &name)?;
        let slot = if kind == PackKind::Data { 0 } else { 1 };
        for e in entries {
            if !live.contains(&e.id) || copied.contains(&e.id) {
                continue;
            }
            let stored = &bytes[e.stored_range()];
            if let Err(err) = pack::open_chunk(&e, stored, &name) {
                tracing::error!("not repacking {}: {err}", e.id);
                continue;
            }
            let builder = builders[slot].get_or_insert_with(|| PackBuilder::new(kind, pack_size));
            builder.add(e.id, e.raw_len, e.codec, stored);
            copied.insert(e.id);
            if builder.len() >= pack_size {
                if let Some(full) = builders[slot].take() {
                    store_pack(repo, full, &mut segment, report).await?;
                }
            }
        }
        report.packs_repacked += 1;
    }
    for b in builders.into_iter().flatten() {
        if !b.is_empty() {
            store_pack(repo, b, &mut segment, report).await?;
        }
    }
    // Packs are named by content: a repacked pack can come out byte for byte as an existing
    // one (a pack with one live chunk), which must then not be condemned.
    let written: HashSet<PackId> = segment.packs.iter().map(|p| p.id).collect();
    if !segment.packs.is_empty() {
        let (id, bytes) = segment.encode();
        repo.put(&index::object_name(&id), bytes).await?;
    }
    Ok(written)
}

async fn store_pack(
    repo: &Repository,
    b: PackBuilder,
    segment: &mut IndexSegment,
    report: &mut GcReport,
) -> Result<()> {
    let p = b.finish();
    repo.put(&pack::object_name(&p.id), p.bytes.clone()).await?;
    report.bytes_repacked += p.bytes.len() as u64;
    segment.packs.push(IndexedPack { id: p.id, kind: p.kind, len: p.bytes.len() as u64, chunks: p.entries });
    Ok(())
}

async fn list_packs(repo: &Repository) -> Result<HashMap<PackId, u64>> {
    Ok(repo
        .list("packs")
        .await?
        .into_iter()
        .filter_map(|(n, size)| n.rsplit('/').next().and_then(|h| h.parse().ok()).map(|id| (id, size)))
        .collect())
}

struct LeaseEntry {
    name: String,
    lease: Lease,
    version: UpdateVersion,
}

async fn read_leases(repo: &Repository) -> Result<Vec<LeaseEntry>> {
    let store = repo.store();
    let names: Vec<String> = repo.list("leases").await?.into_iter().map(|(n, _)| n).collect();
    let mut out = Vec::new();
    for name in names {
        match store.get(&ObjectPath::from(name.as_str())).await {
            Ok(r) => {
                let version = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
                let bytes = r.bytes().await.map_err(|e| Error::store(&name, e))?;
                out.push(LeaseEntry { lease: Lease::decode(&bytes, &name)?, name, version });
            }
            Err(object_store::Error::NotFound { .. }) => {} // released between list and get
            Err(e) => return Err(Error::store(&name, e)),
        }
    }
    Ok(out)
}

/// Snapshots to mark from: every root under `snapshots/` and every committed lease.
async fn committed(repo: &Repository, leases: &[LeaseEntry]) -> Result<Vec<(Id, Snapshot)>> {
    let mut out = Vec::new();
    for id in repo.snapshot_ids().await? {
        // From the bucket, not the local cache: GC must see exactly what is there.
        out.push((id, repo.fetch_snapshot(&id).await?));
    }
    for l in leases {
        if let LeaseState::Committed { snapshot, root } = &l.lease.state {
            out.push((*snapshot, Snapshot::decode(root.as_bytes(), snapshot)?));
        }
    }
    Ok(out)
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// This run's hold on `gc/state`. Another run takes an unfinished state over once its
/// heartbeat is older than the lease timeout (the run looks dead). So a live run renews it
/// while it waits, and renews it (a conditional update: it fails if another run took over)
/// right before every step that writes the index or deletes: a run that was paused past the
/// timeout and resumes learns that it lost the claim before it acts on a stale view.
struct Claim {
    version: UpdateVersion,
    at: Instant,
    every: Duration,
}

impl Claim {
    async fn renew(&mut self, store: &dyn ObjectStore, state: &mut GcState) -> Result<()> {
        state.heartbeat = now();
        self.version = put_state(store, state, Some(&self.version)).await?;
        self.at = Instant::now();
        Ok(())
    }

    async fn renew_if_due(&mut self, store: &dyn ObjectStore, state: &mut GcState) -> Result<()> {
        if self.at.elapsed() >= self.every {
            self.renew(store, state).await?;
        }
        Ok(())
    }
}

async fn put_state(
    store: &dyn ObjectStore,
    state: &GcState,
    prev: Option<&UpdateVersion>,
) -> Result<UpdateVersion> {
    let mode = match prev {
        Some(v) => PutMode::Update(v.clone()),
        None => PutMode::Create,
    };
    let r = store
        .put_opts(
            &ObjectPath::from(GC_STATE),
            PutPayload::from(state.encode()),
            PutOptions { mode, ..Default::default() },
        )
        .await
        .map_err(|e| match e {
            object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
                Error::Conflict("another garbage collection changed gc/state; run gc again".into())
            }
            e => Error::store(GC_STATE, e),
        })?;
    Ok(UpdateVersion { e_tag: r.e_tag, version: r.version })
}

async fn delete(store: &dyn ObjectStore, name: &str) -> Result<()> {
    match store.delete(&ObjectPath::from(name)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::store(name, e)),
    }
}

/// Collect. `cancel` stops the run at the next clean point (between snapshots while marking,
/// while waiting for writers, between segments and between pack deletes) with
/// [`Error::Interrupted`]; whatever it had done is then finished by the next run.
pub async fn gc(
    repo: &Repository,
    opts: &GcOptions,
    progress: &dyn GcProgress,
    cancel: &AtomicBool,
) -> Result<GcReport> {
    let run = hex_id();
    let result = run_gc(repo, opts, &run, progress, cancel).await;
    if result.is_err() && !opts.dry_run {
        release_claim(repo, &run).await;
    }
    result
}

/// After a failed run: mark our claim finished (keeping anything condemned, which writers must
/// still avoid), so the next run need not wait for the lease timeout. Best effort.
async fn release_claim(repo: &Repository, run: &str) {
    let store = repo.store().clone();
    if let Ok(Some((mut s, v))) = read_gc_state(store.as_ref()).await {
        if s.run == run && !s.finished {
            s.finished = true;
            let _ = put_state(store.as_ref(), &s, Some(&v)).await;
        }
    }
}

async fn run_gc(
    repo: &Repository,
    opts: &GcOptions,
    run: &str,
    progress: &dyn GcProgress,
    cancel: &AtomicBool,
) -> Result<GcReport> {
    let before = repo.requests();
    let store: Arc<dyn ObjectStore> = repo.store().clone();
    let mut report = GcReport { dry_run: opts.dry_run, ..Default::default() };
    let mut phases = Phases { at: Instant::now(), list: Vec::new() };

    // 1. Read and mark. Nothing has changed yet; any error aborts here.
    let state = read_gc_state(store.as_ref()).await?;
    if let Some((s, _)) = &state {
        let beat = if s.heartbeat.is_empty() { &s.started } else { &s.heartbeat };
        let beat = humantime::parse_rfc3339(beat).unwrap_or(SystemTime::UNIX_EPOCH);
        let recent = SystemTime::now().duration_since(beat).unwrap_or_default() < opts.lease_timeout;
        if !s.finished && recent && !opts.dry_run {
            return Err(Error::Conflict(format!(
                "garbage collection {} started at {} has not finished; if it died, run gc again after {}",
                s.run,
                s.started,
                humantime::format_duration(opts.lease_timeout)
            )));
        }
    }
    // Claim gc/state (conditionally) so two runs cannot interleave; keep what an unfinished
    // earlier run condemned until this run has decided about it.
    let run = run.to_string();
    let mut version = None;
    let mut gc_state = GcState {
        format: 1,
        run: run.clone(),
        started: now(),
        heartbeat: now(),
        condemned: state.as_ref().map(|(s, _)| s.condemned.clone()).unwrap_or_default(),
        finished: false,
    };
    if !opts.dry_run {
        version = Some(put_state(store.as_ref(), &gc_state, state.as_ref().map(|(_, v)| v)).await?);
    }
    // Heads before roots: every snapshot a head read here names was committed before this
    // read, so it must be among the roots listed next (forget never removes a head).
    let heads = cairn_store::volume::list(repo).await?;
    let leases = read_leases(repo).await?;
    let listed = list_packs(repo).await?;
    let roots = committed(repo, &leases).await?;
    // Listed after the roots: a root's chunks were indexed before it was committed.
    let mut meta = MetaIndex::new(&listed);
    meta.update(repo, &segment_ids(repo).await?).await?;
    for h in &heads {
        if !roots.iter().any(|(id, _)| *id == h.snapshot) {
            // The head may have moved on and its old snapshot been forgotten since we read it.
            match cairn_store::volume::read(repo, &h.name).await {
                Ok(now) if now.head.version != h.version => continue,
                Err(Error::NotFound(_)) => continue,
                _ => {}
            }
            return Err(Error::corrupt(
                format!("volumes/{}", h.name),
                format!("its head names snapshot {} which is missing; refusing to collect", h.snapshot),
            ));
        }
    }
    let mut live = LiveSet::with_capacity(meta.indexed());
    progress.phase("mark", Some(roots.len() as u64));
    for (_, snap) in &roots {
        stop_if(cancel)?;
        mark(repo, &mut meta, snap, &mut live).await?;
        progress.advance(1);
    }
    live.seal_for_lookups();
    let mut copied: HashSet<Id> = HashSet::new();
    let mut protected: HashSet<PackId> = HashSet::new();
    let mut view = read_index(repo, &live, &copied).await?;
    report.snapshots = roots.len();
    report.packs = listed.len();
    phases.done("mark");

    // Packs holding nothing live: indexed ones by their tables, unindexed ones (a push that
    // died, or one in flight: the lease wait below protects those) whole. A previous run's
    // condemned packs are considered again the same way.
    let mut condemned: HashSet<PackId> = listed.keys().filter(|p| !view.needed(p)).copied().collect();
    if opts.dry_run {
        report.packs_deleted = condemned.len();
        report.bytes_freed = condemned.iter().map(|p| listed[p]).sum();
        report.live_chunks = live.len();
        report.requests = repo.requests().since(&before);
        report.phases = phases.list;
        return Ok(report);
    }

    // Repack mostly dead packs; their originals then join the condemned.
    if opts.repack_below > 0.0 {
        stop_if(cancel)?;
        progress.phase("repack", None);
        let new_packs = repack(repo, &view, &listed, &live, opts, &mut copied, &mut report).await?;
        if report.packs_repacked > 0 {
            view = read_index(repo, &live, &copied).await?;
            condemned.extend(listed.keys().filter(|p| view.packs.contains_key(p) && !view.needed(p)));
            condemned.retain(|p| !new_packs.contains(p));
            protected = new_packs;
        }
        phases.done("repack");
    }

    // 2. Condemn, in gc/state (with the earlier run's condemned: a superset is safe).
    let mut all_condemned = condemned.clone();
    all_condemned.extend(gc_state.condemned.iter().copied());
    gc_state.condemned = sorted(&all_condemned);
    gc_state.heartbeat = now();
    let version = put_state(store.as_ref(), &gc_state, version.as_ref()).await?;
    let mut claim = Claim { version, at: Instant::now(), every: opts.lease_timeout / 4 };
    phases.done("condemn");

    // 3. Wait for every lease that may predate the condemnation.
    progress.phase("wait for writers", None);
    let seen: HashSet<String> = read_leases(repo).await?.into_iter().map(|l| l.name).collect();
    report.leases_waited = seen.len();
    let waiting_since = Instant::now();
    let mut final_leases;
    loop {
        final_leases = read_leases(repo).await?;
        let mut pending = 0;
        for l in &final_leases {
            if !seen.contains(&l.name) {
                continue;
            }
            match &l.lease.state {
                LeaseState::Active => {
                    let beat = humantime::parse_rfc3339(&l.lease.heartbeat).unwrap_or(SystemTime::UNIX_EPOCH);
                    if SystemTime::now().duration_since(beat).unwrap_or_default() > opts.lease_timeout {
                        let mut revoked = l.lease.clone();
                        revoked.state = LeaseState::Revoked { by: run.clone() };
                        let put = store
                            .put_opts(
                                &ObjectPath::from(l.name.as_str()),
                                PutPayload::from(revoked.encode()),
                                PutOptions { mode: PutMode::Update(l.version.clone()), ..Default::default() },
                            )
                            .await;
                        match put {
                            Ok(_) => report.leases_revoked += 1,
                            // The writer moved first (heartbeat or commit): look again.
                            Err(object_store::Error::Precondition { .. })
                            | Err(object_store::Error::NotFound { .. }) => pending += 1,
                            Err(e) => return Err(Error::store(&l.name, e)),
                        }
                    } else {
                        pending += 1;
                    }
                }
                LeaseState::Committed { .. } | LeaseState::Revoked { .. } => {}
            }
        }
        if pending == 0 {
            break;
        }
        if waiting_since.elapsed() > opts.max_wait {
            return Err(Error::Conflict(format!(
                "{pending} writers still hold leases after {}; the condemnation stays in gc/state and \
                 the next gc run continues",
                humantime::format_duration(opts.max_wait)
            )));
        }
        stop_if(cancel)?;
        // A long wait must not make this run look dead to the next one.
        claim.renew_if_due(store.as_ref(), &mut gc_state).await?;
        tokio::time::sleep(opts.poll).await;
    }
    // The last look may predate its own revocations.
    final_leases = read_leases(repo).await?;
    phases.done("wait for writers");

    // 4. Mark again: snapshots committed meanwhile may use chunks of condemned packs.
    stop_if(cancel)?;
    progress.phase("mark again", None);
    let now_committed = committed(repo, &final_leases).await?;
    let segments_now = segment_ids(repo).await?;
    let indexed_before = meta.indexed();
    meta.update(repo, &segments_now).await?;
    let indexed = meta.indexed();
    live.reserve(indexed - indexed_before);
    let mut marked_more = false;
    for (id, snap) in now_committed {
        if !roots.iter().any(|(r, _)| *r == id) {
            mark(repo, &mut meta, &snap, &mut live).await?;
            report.snapshots += 1;
            marked_more = true;
        }
    }
    // Same marks and the same (immutable) segments give the same view: reading the whole
    // index again is needed only when something was committed or indexed meanwhile.
    if marked_more || segments_now != view.segments {
        live.seal_for_lookups();
        view = read_index(repo, &live, &copied).await?;
    }
    let before_take_back = condemned.len();
    condemned.retain(|p| !view.needed(p) && !protected.contains(p));
    report.packs_taken_back = before_take_back - condemned.len();
    if report.packs_taken_back > 0 {
        gc_state.condemned = sorted(&condemned);
        claim.renew(store.as_ref(), &mut gc_state).await?;
    }
    report.live_chunks = live.len();
    let missing = missing_packs(repo, &view, &listed).await?;
    report.packs_missing = missing.len();
    // Decided: the rest works from the condemned set, and this is the run's largest allocation.
    drop((live, meta));
    phases.done("mark again");

    // Roll committed leases forward: their roots become ordinary snapshots.
    for l in &final_leases {
        match &l.lease.state {
            LeaseState::Committed { snapshot, root } => {
                repo.put(&snapshot::object_name(snapshot), root.clone().into_bytes()).await?;
                delete(store.as_ref(), &l.name).await?;
                report.leases_rolled_forward += 1;
            }
            LeaseState::Revoked { .. } if seen.contains(&l.name) => delete(store.as_ref(), &l.name).await?,
            _ => {}
        }
    }

    // 5. One compacted index without the condemned packs; then the old segments go. Read
    // and written a segment at a time. Skipped when the index names no pack to be deleted
    // (only unindexed leftovers of dead pushes, or nothing) and is not fragmented: a rewrite
    // would only make every host rebuild its chunk index.
    let names_condemned = condemned.iter().any(|p| view.packs.contains_key(p)) || !missing.is_empty();
    // Compaction cuts between inputs, so two neighbouring outputs hold more than one
    // segment's worth: it leaves at most twice the minimum.
    let compacted = 2 * indexed.div_ceil(MAX_CHUNKS_PER_SEGMENT);
    if !names_condemned
        && report.packs_repacked == 0
        && view.segments.len() <= compacted + COMPACT_ABOVE_SEGMENTS
    {
        phases.done("compact index (not needed)");
    } else {
        let dropped: HashSet<PackId> = condemned.union(&missing).copied().collect();
        progress.phase("compact index", Some(view.segments.len() as u64));
        let mut writer =
            Compactor { claim: &mut claim, state: &mut gc_state, written: HashSet::new(), cancel };
        compact_index(repo, &view, &dropped, &mut writer, progress, &mut report).await?;
        phases.done("compact index");
    }

    // 6. Delete the condemned packs, still holding the claim (see `Claim`).
    stop_if(cancel)?;
    progress.phase("delete packs", Some(condemned.len() as u64));
    claim.renew(store.as_ref(), &mut gc_state).await?;
    for p in &condemned {
        stop_if(cancel)?;
        progress.advance(1);
        claim.renew_if_due(store.as_ref(), &mut gc_state).await?;
        delete(store.as_ref(), &pack::object_name(p)).await?;
        report.packs_deleted += 1;
        report.bytes_freed += listed.get(p).copied().unwrap_or(0);
    }
    // Staging files that writers killed mid-write left in a local repository; old enough
    // that no writer still alive is writing them (a writer past the lease timeout was revoked).
    if let Some(root) = cairn_store::backend::local_path(repo.url()) {
        match cairn_store::direct::remove_stale_staging(std::path::Path::new(root), opts.lease_timeout) {
            Ok(n) => report.staging_removed = n,
            Err(e) => tracing::warn!("sweeping staging files under {root}: {e}"),
        }
    }
    phases.done("delete packs");

    // 7. Done: nothing is condemned any more.
    gc_state.condemned.clear();
    gc_state.finished = true;
    claim.renew(store.as_ref(), &mut gc_state).await?;
    // This host's chunk index is not refreshed here: after a compaction it is rebuilt by the
    // next command that needs it, as on every other host, and a gc host may never need it.
    report.requests = repo.requests().since(&before);
    report.phases = phases.list;
    Ok(report)
}

/// Packs the index names that the bucket does not have (deleted by hand or by a lifecycle
/// rule, lost). Left indexed, every push would keep deduplicating against them and commit
/// snapshots naming chunks that are gone; dropped from the index, the next push that has
/// those chunks stores them again. (`check` names the snapshots that already lost data.)
/// Each is asked for again: a pack missing from the listing may have been stored since.
async fn missing_packs(
    repo: &Repository,
    view: &IndexView,
    listed: &HashMap<PackId, u64>,
) -> Result<HashSet<PackId>> {
    let mut missing = HashSet::new();
    for p in view.packs.keys().filter(|p| !listed.contains_key(p)) {
        let name = pack::object_name(p);
        match repo.store().head(&ObjectPath::from(name.as_str())).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!("{name} is indexed but not in the bucket; dropping it from the index");
                missing.insert(*p);
            }
            Err(e) => return Err(Error::store(&name, e)),
        }
    }
    Ok(missing)
}

/// Where compacted segments go: each is stored still holding the claim (see `Claim`), and a
/// cancelled run stops between them (the old segments stay until every new one is stored,
/// and readers take the union, so a partial compaction only lists packs twice).
struct Compactor<'a> {
    claim: &'a mut Claim,
    state: &'a mut GcState,
    written: HashSet<Id>,
    cancel: &'a AtomicBool,
}

impl Compactor<'_> {
    async fn store(&mut self, repo: &Repository, seg: SegmentWriter) -> Result<()> {
        stop_if(self.cancel)?;
        let (id, parts) = seg.finish();
        self.claim.renew(repo.store().as_ref(), self.state).await?;
        repo.put(&index::object_name(&id), PutPayload::from_iter(parts)).await?;
        self.written.insert(id);
        Ok(())
    }
}

/// Write the index again without the `condemned` packs (and missing ones), then delete the
/// old segments.
async fn compact_index(
    repo: &Repository,
    view: &IndexView,
    condemned: &HashSet<PackId>,
    out: &mut Compactor<'_>,
    progress: &dyn GcProgress,
    report: &mut GcReport,
) -> Result<()> {
    let store = repo.store().clone();
    let segments: Vec<Id> = view.segments.iter().map(|(id, _)| *id).collect();
    let fresh = || SegmentWriter::new(segments.clone());
    let mut seg = fresh();
    let mut emitted: HashSet<PackId> = HashSet::new();
    for old in &segments {
        // Streamed. What an input gives is stored only once that input has been read to its
        // end and found to match its name, so outputs are cut between inputs: before an
        // input that could take one past a segment's worth, and once one is full. An output
        // passes `MAX_CHUNKS_PER_SEGMENT` only when one input alone does, and then holds
        // nothing else (so it does not grow from run to run).
        let incoming = view.segment_chunks.get(old).copied().unwrap_or(MAX_CHUNKS_PER_SEGMENT);
        if !seg.is_empty() && seg.chunk_count() + incoming > MAX_CHUNKS_PER_SEGMENT {
            out.store(repo, std::mem::replace(&mut seg, fresh())).await?;
        }
        repo.visit_segment(old, |reader| {
            while let Some(head) = reader.next_head()? {
                if condemned.contains(&head.id) || !emitted.insert(head.id) {
                    continue;
                }
                // Entries pass through one at a time: a pack of tiny chunks lists 100,000.
                seg.begin_pack(&head);
                while let Some(e) = reader.next_entry()? {
                    seg.entry(&e);
                }
            }
            reader.supersedes().map(drop)
        })
        .await?;
        if seg.chunk_count() >= MAX_CHUNKS_PER_SEGMENT {
            out.store(repo, std::mem::replace(&mut seg, fresh())).await?;
        }
        progress.advance(1);
    }
    if !seg.is_empty() || out.written.is_empty() {
        out.store(repo, seg).await?;
    }
    report.segments_written = out.written.len();
    stop_if(out.cancel)?;
    out.claim.renew(store.as_ref(), out.state).await?;
    for old in &segments {
        if !out.written.contains(old) {
            delete(store.as_ref(), &index::object_name(old)).await?;
            report.segments_deleted += 1;
        }
    }
    Ok(())
}

fn sorted(set: &HashSet<PackId>) -> Vec<PackId> {
    let mut v: Vec<_> = set.iter().copied().collect();
    v.sort();
    v
}

fn hex_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("gc-{t:x}-{}-{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed))
}
