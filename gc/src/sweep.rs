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
//! A run killed at any step leaves a consistent repository; the next run finishes the job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_store::backend::RequestStats;
use cairn_store::format::index::{self, IndexSegment, MAX_CHUNKS_PER_SEGMENT};
use cairn_store::format::lease::{GcState, Lease, LeaseState, GC_STATE};
use cairn_store::format::pack;
use cairn_store::format::snapshot::{self, Snapshot};
use cairn_store::format::tree::{Content, NodeKind, Tree};
use cairn_store::lease::read_gc_state;
use cairn_store::{Error, Id, PackId, Repository, Result};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;

use crate::liveset::LiveSet;

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
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            lease_timeout: Duration::from_secs(15 * 60),
            poll: Duration::from_millis(500),
            max_wait: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub live_chunks: usize,
    pub packs: usize,
    pub packs_deleted: usize,
    pub packs_taken_back: usize,
    pub bytes_freed: u64,
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

/// The index segments, and for each indexed pack whether it holds a live chunk. Segments are
/// read one at a time, so memory holds one segment and a flag per pack, not every table.
struct IndexView {
    segments: Vec<Id>,
    live: HashMap<PackId, bool>,
}

async fn segment_ids(repo: &Repository) -> Result<Vec<Id>> {
    let mut segments: Vec<Id> = repo
        .list("index")
        .await?
        .into_iter()
        .filter_map(|(n, _)| n.strip_prefix("index/").and_then(|h| h.parse().ok()))
        .collect();
    segments.sort();
    Ok(segments)
}

async fn read_segment(repo: &Repository, id: &Id) -> Result<IndexSegment> {
    let name = index::object_name(id);
    let bytes = repo.get(&name).await?;
    if Id::of(&bytes) != *id {
        return Err(Error::corrupt(&name, "content does not match its id"));
    }
    IndexSegment::decode(&bytes, &name)
}

async fn read_index(repo: &Repository, live: &LiveSet) -> Result<IndexView> {
    let segments = segment_ids(repo).await?;
    let mut packs: HashMap<PackId, bool> = HashMap::new();
    for id in &segments {
        for p in read_segment(repo, id).await?.packs {
            let has_live = p.chunks.iter().any(|c| live.contains(&c.id));
            *packs.entry(p.id).or_default() |= has_live;
        }
    }
    Ok(IndexView { segments, live: packs })
}

async fn list_packs(repo: &Repository) -> Result<HashMap<PackId, u64>> {
    Ok(repo
        .list("packs")
        .await?
        .into_iter()
        .filter_map(|(n, size)| n.rsplit('/').next().and_then(|h| h.parse().ok()).map(|id| (id, size)))
        .collect())
}

/// Mark every chunk a snapshot references: trees, chunk lists and data. Subtrees already
/// marked (shared with an earlier snapshot) are not walked again.
async fn mark(repo: &Repository, snap: &Snapshot, live: &mut LiveSet) -> Result<()> {
    // Its trees in a few whole-pack reads rather than one read per directory.
    repo.preload_meta(&snap.meta_packs, 64 << 20).await?;
    let mut stack = vec![snap.root.clone()];
    while let Some(node) = stack.pop() {
        match &node.kind {
            NodeKind::Dir { tree } => {
                if !live.insert_tree(tree) {
                    continue;
                }
                match repo.read_tree(tree).await? {
                    Tree::Leaf(nodes) => stack.extend(nodes),
                    Tree::Pages(pages) => {
                        for p in pages {
                            live.insert(&p.id);
                            match repo.read_tree(&p.id).await? {
                                Tree::Leaf(nodes) => stack.extend(nodes),
                                Tree::Pages(_) => return Err(Error::corrupt(format!("tree {}", p.id), "nested pages")),
                            }
                        }
                    }
                }
            }
            NodeKind::File { content, .. } => {
                if let Content::Lists(pages) = content {
                    for p in pages {
                        live.insert(&p.id);
                    }
                }
                for e in repo.extents(content).await? {
                    if let Some(c) = e.chunk {
                        live.insert(&c);
                    }
                }
            }
            _ => {}
        }
    }
    repo.drop_preloaded();
    Ok(())
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

async fn put_state(store: &dyn ObjectStore, state: &GcState, prev: Option<&UpdateVersion>) -> Result<UpdateVersion> {
    let mode = match prev {
        Some(v) => PutMode::Update(v.clone()),
        None => PutMode::Create,
    };
    let r = store
        .put_opts(&ObjectPath::from(GC_STATE), PutPayload::from(state.encode()), PutOptions { mode, ..Default::default() })
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

pub async fn gc(repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    let before = repo.requests();
    let store: Arc<dyn ObjectStore> = repo.store().clone();
    let mut report = GcReport { dry_run: opts.dry_run, ..Default::default() };
    let mut phases = Phases { at: Instant::now(), list: Vec::new() };

    // 1. Read and mark. Nothing has changed yet; any error aborts here.
    let state = read_gc_state(store.as_ref()).await?;
    if let Some((s, _)) = &state {
        let started = humantime::parse_rfc3339(&s.started).unwrap_or(SystemTime::UNIX_EPOCH);
        let recent = SystemTime::now().duration_since(started).unwrap_or_default() < opts.lease_timeout;
        if !s.condemned.is_empty() && recent && !opts.dry_run {
            return Err(Error::Conflict(format!(
                "garbage collection {} started at {} has not finished; if it died, run gc again after {}",
                s.run,
                s.started,
                humantime::format_duration(opts.lease_timeout)
            )));
        }
    }
    let leases = read_leases(repo).await?;
    let listed = list_packs(repo).await?;
    repo.sync_index().await?;
    let roots = committed(repo, &leases).await?;
    let mut live = LiveSet::default();
    for (_, snap) in &roots {
        mark(repo, snap, &mut live).await?;
    }
    live.seal();
    let view = read_index(repo, &live).await?;
    report.snapshots = roots.len();
    report.packs = listed.len();
    phases.done("mark");

    // Packs holding nothing live: indexed ones by their tables, unindexed ones (a push that
    // died, or one in flight: the lease wait below protects those) whole. A previous run's
    // condemned packs are considered again the same way.
    let mut condemned: HashSet<PackId> = listed
        .keys()
        .filter(|p| !view.live.get(p).copied().unwrap_or(false))
        .copied()
        .collect();
    if opts.dry_run {
        report.packs_deleted = condemned.len();
        report.bytes_freed = condemned.iter().map(|p| listed[p]).sum();
        report.live_chunks = live.len();
        report.requests = delta(before, repo.requests());
        report.phases = phases.list;
        return Ok(report);
    }

    // 2. Condemn, in gc/state.
    let run = hex_id();
    let mut gc_state = GcState { format: 1, run: run.clone(), started: now(), condemned: sorted(&condemned) };
    let mut version = put_state(store.as_ref(), &gc_state, state.as_ref().map(|(_, v)| v)).await?;
    phases.done("condemn");

    // 3. Wait for every lease that may predate the condemnation.
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
                            Err(object_store::Error::Precondition { .. }) | Err(object_store::Error::NotFound { .. }) => {
                                pending += 1
                            }
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
        tokio::time::sleep(opts.poll).await;
    }
    // The last look may predate its own revocations.
    final_leases = read_leases(repo).await?;
    phases.done("wait for writers");

    // 4. Mark again: snapshots committed meanwhile may use chunks of condemned packs.
    repo.sync_index().await?;
    for (id, snap) in committed(repo, &final_leases).await? {
        if !roots.iter().any(|(r, _)| *r == id) {
            mark(repo, &snap, &mut live).await?;
            report.snapshots += 1;
        }
    }
    live.seal();
    let view = read_index(repo, &live).await?;
    let before_take_back = condemned.len();
    condemned.retain(|p| !view.live.get(p).copied().unwrap_or(false));
    report.packs_taken_back = before_take_back - condemned.len();
    if report.packs_taken_back > 0 {
        gc_state.condemned = sorted(&condemned);
        version = put_state(store.as_ref(), &gc_state, Some(&version)).await?;
    }
    report.live_chunks = live.len();
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
    // and written a segment at a time.
    let fresh = || IndexSegment { packs: Vec::new(), supersedes: view.segments.clone() };
    let mut seg = fresh();
    let mut emitted: HashSet<PackId> = HashSet::new();
    let mut written = HashSet::new();
    for old in &view.segments {
        for p in read_segment(repo, old).await?.packs {
            if condemned.contains(&p.id) || !emitted.insert(p.id) {
                continue;
            }
            if seg.chunk_count() + p.chunks.len() > MAX_CHUNKS_PER_SEGMENT && !seg.packs.is_empty() {
                let (id, bytes) = std::mem::replace(&mut seg, fresh()).encode();
                repo.put(&index::object_name(&id), bytes).await?;
                written.insert(id);
            }
            seg.packs.push(p);
        }
    }
    if !seg.packs.is_empty() || written.is_empty() {
        let (id, bytes) = seg.encode();
        repo.put(&index::object_name(&id), bytes).await?;
        written.insert(id);
    }
    report.segments_written = written.len();
    for old in &view.segments {
        if !written.contains(old) {
            delete(store.as_ref(), &index::object_name(old)).await?;
            report.segments_deleted += 1;
        }
    }
    phases.done("compact index");

    // 6. Delete the condemned packs.
    for p in &condemned {
        delete(store.as_ref(), &pack::object_name(p)).await?;
        report.packs_deleted += 1;
        report.bytes_freed += listed.get(p).copied().unwrap_or(0);
    }
    phases.done("delete packs");

    // 7. Done: nothing is condemned any more.
    gc_state.condemned.clear();
    put_state(store.as_ref(), &gc_state, Some(&version)).await?;
    repo.sync_index().await?;
    report.requests = delta(before, repo.requests());
    report.phases = phases.list;
    Ok(report)
}

fn sorted(set: &HashSet<PackId>) -> Vec<PackId> {
    let mut v: Vec<_> = set.iter().copied().collect();
    v.sort();
    v
}

fn hex_id() -> String {
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("gc-{t:x}-{}", std::process::id())
}

fn delta(a: RequestStats, b: RequestStats) -> RequestStats {
    RequestStats {
        gets: b.gets - a.gets,
        puts: b.puts - a.puts,
        lists: b.lists - a.lists,
        heads: b.heads - a.heads,
        deletes: b.deletes - a.deletes,
        bytes_down: b.bytes_down - a.bytes_down,
        bytes_up: b.bytes_up - a.bytes_up,
    }
}

