//! [`ChunkCache`]: the host-wide, content-addressed chunk cache every mount reads through.
//!
//! Chunks are plain files named by their BLAKE3 under `data/xx/`, so any process can read
//! them; bookkeeping (charge and recency of each chunk) lives in RocksDB and in memory. One
//! process at a time owns the bookkeeping and fills and evicts; others on the host read the
//! files it wrote and keep asking to become the owner (RocksDB allows one writer). Ownership
//! is an advisory lock on `owner.lock`, held for as long as the process owns the cache; the
//! owner rebuilds bookkeeping it cannot open or read, since the cache holds only copies.
//!
//! The byte cap is a hard bound on what the files occupy: space is reserved (record first,
//! file second) before a file is written, and a chunk that cannot fit after evicting least
//! recently used ones is simply not cached. A crash leaves at worst a record without a file,
//! which the next read drops. Every hit is verified against its id before it is served. The
//! cap is also enforced when the bookkeeping is taken over, so lowering it takes effect even
//! on a mount that never inserts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_store::ChunkId;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rocksdb::DB;
use serde::Serialize;

/// Filesystems allocate whole blocks; charging by block keeps `du` within the cap.
const BLOCK: u64 = 4096;
/// How often a process that does not own the bookkeeping tries to take it over.
const OWNER_RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Hard cap on the bytes the cached chunks occupy.
    pub max_bytes: u64,
    /// Never let the cache's filesystem fall below this much free space.
    pub min_free_bytes: u64,
}

impl CacheConfig {
    pub const DEFAULT_MAX: u64 = 8 << 30;
    pub const DEFAULT_MIN_FREE: u64 = 1 << 30;

    pub fn new(dir: PathBuf) -> CacheConfig {
        CacheConfig { dir, max_bytes: Self::DEFAULT_MAX, min_free_bytes: Self::DEFAULT_MIN_FREE }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum CacheError {
    #[error("chunk cache {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("chunk cache {dir}: {source}")]
    Db { dir: PathBuf, source: rocksdb::Error },
    #[error("chunk cache {0} is in use by another cairn process (a running mount?)")]
    Busy(PathBuf),
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    /// Whether this process owns the bookkeeping (fills and evicts) or only reads.
    pub owner: bool,
    pub chunks: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    pub free_bytes: u64,
    pub evictions: u64,
}

struct Entry {
    charge: u64,
    seq: u64,
    /// Set once when the entry is created (from the same counter as `seq`, so unique): tells
    /// a reader's stale view of an entry from a newer insert of the same chunk.
    generation: u64,
    /// Space reserved, file being written: not servable, not evictable.
    pending: bool,
}

/// A stored record: chunk, charge, recency.
type Record = (ChunkId, u64, u64);

struct Owned {
    db: DB,
    entries: HashMap<ChunkId, Entry>,
    /// Recency order: the smallest sequence number is the least recently used chunk.
    order: BTreeMap<u64, ChunkId>,
    used: u64,
    /// Part of `used` reserved by files still being written, which cannot be evicted.
    pending_bytes: u64,
    next_seq: u64,
    evictions: u64,
    /// Ownership itself. Last, so dropped after `db`: whoever takes the lock next finds
    /// RocksDB closed.
    _lock: Flock<File>,
}

pub struct ChunkCache {
    cfg: CacheConfig,
    owned: Mutex<Option<Owned>>,
    last_owner_try: Mutex<Instant>,
    /// Whether the free-space floor was already reported as out of reach (warn once per episode).
    floor_warned: AtomicBool,
    /// Whether taking ownership trims to the cap: not for `cache stats`, whose (default) cap
    /// may be smaller than the one the mounts use.
    trim_on_open: bool,
}

impl ChunkCache {
    /// Open the cache, owning its bookkeeping if no other process does.
    pub fn open(cfg: CacheConfig) -> Result<ChunkCache, CacheError> {
        Self::open_with(cfg, true)
    }

    /// Open only to look: nothing is evicted to fit `cfg`'s cap until something is inserted.
    pub fn inspect(cfg: CacheConfig) -> Result<ChunkCache, CacheError> {
        Self::open_with(cfg, false)
    }

    fn open_with(cfg: CacheConfig, trim_on_open: bool) -> Result<ChunkCache, CacheError> {
        let io = |e| CacheError::Io { dir: cfg.dir.clone(), source: e };
        std::fs::create_dir_all(cfg.dir.join("data")).map_err(io)?;
        let cache = ChunkCache {
            owned: Mutex::new(None),
            last_owner_try: Mutex::new(Instant::now()),
            floor_warned: AtomicBool::new(false),
            trim_on_open,
            cfg,
        };
        match cache.take_ownership() {
            Ok(owned) => *cache.owned.lock().expect("cache lock") = Some(owned),
            Err(CacheError::Busy(_)) => {
                tracing::info!(
                    "chunk cache {} is owned by another process; reading it only",
                    cache.dir().display()
                )
            }
            Err(e) => return Err(e),
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Whether this process owns the bookkeeping, i.e. whether what it inserts is kept.
    pub fn is_owner(&self) -> bool {
        self.owned.lock().expect("cache lock").is_some()
    }

    fn take_ownership(&self) -> Result<Owned, CacheError> {
        let dir = self.cfg.dir.clone();
        let lock = self.lock_owner()?;
        let (db, mut records) = match self.open_db() {
            Ok(opened) => opened,
            // An older cairn that owns the cache by RocksDB's lock alone: not ours to rebuild.
            Err(_) if rocksdb_locked_elsewhere(&dir.join("db").join("LOCK")) => {
                return Err(CacheError::Busy(dir));
            }
            // Damaged bookkeeping: we own it and it holds only copies, so start afresh rather
            // than fail the mount.
            Err(e @ CacheError::Db { .. }) if is_damage(&e) => {
                tracing::warn!("{e}; rebuilding the chunk cache (its chunks are dropped)");
                self.wipe()?;
                self.open_db()?
            }
            // Not damage (no permission, no descriptors, a full disk): keep the chunks, and
            // use the cache without owning it, as when another process does.
            Err(e) => {
                tracing::warn!("{e}; using the chunk cache without keeping what this process fetches");
                return Err(CacheError::Busy(dir));
            }
        };
        // Half-written files of a crashed owner: never accounted, so never kept.
        let tmp = self.cfg.dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| CacheError::Io { dir: dir.clone(), source: e })?;
        let mut owned = Owned {
            db,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            used: 0,
            pending_bytes: 0,
            next_seq: 0,
            evictions: 0,
            _lock: lock,
        };
        records.sort_by_key(|r| r.2);
        for (id, charge, _) in records {
            // Renumber densely so sequence numbers stay small and unique.
            let seq = owned.next_seq;
            owned.next_seq += 1;
            owned.used += charge;
            owned.order.insert(seq, id);
            owned.entries.insert(id, Entry { charge, seq, generation: seq, pending: false });
        }
        // The cap or floor may have been lowered since the records were written; a warm mount
        // may never insert, so trimming cannot wait for the next insert.
        let (before, chunks) = (owned.used, owned.entries.len());
        if self.trim_on_open {
            self.make_room(&mut owned, 0);
        }
        if owned.used < before {
            tracing::info!(
                "chunk cache {}: evicted {} chunks ({} bytes) to fit the cap of {} bytes and the \
                 free-space floor of {} bytes",
                dir.display(),
                chunks - owned.entries.len(),
                before - owned.used,
                self.cfg.max_bytes,
                self.cfg.min_free_bytes
            );
        }
        Ok(owned)
    }

    /// The owner's lock, or `Busy` if another `ChunkCache` (in any process) holds it.
    fn lock_owner(&self) -> Result<Flock<File>, CacheError> {
        let io = |e| CacheError::Io { dir: self.cfg.dir.clone(), source: e };
        let path = self.cfg.dir.join("owner.lock");
        let file = match File::options().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => f,
            // Made by another user: flock needs no write access.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => File::open(&path).map_err(io)?,
            Err(e) => return Err(io(e)),
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(lock),
            Err((_, Errno::EWOULDBLOCK)) => Err(CacheError::Busy(self.cfg.dir.clone())),
            Err((_, errno)) => Err(io(errno.into())),
        }
    }

    /// Open the bookkeeping and read its records `(id, charge, seq)`.
    fn open_db(&self) -> Result<(DB, Vec<Record>), CacheError> {
        let db_err = |e| CacheError::Db { dir: self.cfg.dir.clone(), source: e };
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(2);
        opts.set_write_buffer_size(4 << 20);
        let db = DB::open(&opts, self.cfg.dir.join("db")).map_err(db_err)?;
        let mut records = Vec::new();
        for item in db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            if let (Ok(id), Some((charge, seq))) = (<[u8; 32]>::try_from(&k[..]), decode_record(&v)) {
                records.push((cairn_store::Id(id), charge, seq));
            }
        }
        Ok((db, records))
    }

    /// Remove the bookkeeping and the files together (files no record counts would escape
    /// the cap). Only while holding the owner's lock, with the DB closed.
    fn wipe(&self) -> Result<(), CacheError> {
        let io = |e| CacheError::Io { dir: self.cfg.dir.clone(), source: e };
        for sub in ["db", "data"] {
            match std::fs::remove_dir_all(self.cfg.dir.join(sub)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        std::fs::create_dir_all(self.cfg.dir.join("data")).map_err(io)
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.cfg.dir.join("data").join(&hex[..2]).join(hex)
    }

    /// A cached chunk, verified. A damaged or vanished file is dropped and reported as a miss;
    /// a file that cannot be read for another reason (EIO, EMFILE, ...) is only a miss.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        // The generation of the entry this read is about, if this process owns the bookkeeping.
        let known = {
            let mut guard = self.owned.lock().expect("cache lock");
            match guard.as_mut() {
                Some(o) => match o.entries.get_mut(id) {
                    Some(e) if e.pending => return None,
                    Some(e) => {
                        o.order.remove(&e.seq);
                        e.seq = o.next_seq;
                        o.next_seq += 1;
                        o.order.insert(e.seq, *id);
                        Some(e.generation)
                    }
                    None => return None,
                },
                None => None,
            }
        };
        let bytes = match std::fs::read(self.path_of(id)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(generation) = known {
                    self.forget(id, generation, false);
                }
                return None;
            }
            Err(e) => {
                // The file may be fine: keeping the record keeps it counted against the cap.
                tracing::warn!("chunk cache: reading {id}: {e}");
                return None;
            }
        };
        if ChunkId::of(&bytes) != *id {
            tracing::error!("chunk cache: {} is damaged on disk; dropping it", id);
            if let Some(generation) = known {
                self.forget(id, generation, true);
            }
            return None;
        }
        Some(bytes)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        match self.owned.lock().expect("cache lock").as_ref() {
            Some(o) => o.entries.get(id).is_some_and(|e| !e.pending),
            None => self.path_of(id).exists(),
        }
    }

    /// Cache a verified chunk if it fits under the cap and above the free-space floor.
    pub fn insert(&self, id: &ChunkId, bytes: &[u8]) {
        let charge = (bytes.len() as u64).div_ceil(BLOCK).max(1) * BLOCK;
        if charge > self.cfg.max_bytes {
            return;
        }
        let mut guard = self.owned.lock().expect("cache lock");
        if guard.is_none() {
            self.retry_ownership(&mut guard);
        }
        let Some(o) = guard.as_mut() else { return };
        if o.entries.contains_key(id) {
            return;
        }
        if !self.make_room(o, charge) {
            return;
        }
        // Record first: a crash after this leaves a record without a file, never a file
        // the cap does not count.
        let seq = o.next_seq;
        o.next_seq += 1;
        if o.db.put(id.0, encode_record(charge, seq)).is_err() {
            return;
        }
        o.used += charge;
        o.pending_bytes += charge;
        o.entries.insert(*id, Entry { charge, seq, generation: seq, pending: true });
        drop(guard);
        let written = self.write_file(id, bytes);
        let mut guard = self.owned.lock().expect("cache lock");
        let Some(o) = guard.as_mut() else { return };
        // Nothing else removes or replaces a pending entry, so it is still ours.
        o.pending_bytes = o.pending_bytes.saturating_sub(charge);
        match written {
            Ok(()) => {
                if let Some(e) = o.entries.get_mut(id) {
                    e.pending = false;
                    o.order.insert(e.seq, *id);
                }
            }
            Err(err) => {
                tracing::warn!("chunk cache: writing {id}: {err}");
                if let Some(e) = o.entries.remove(id) {
                    o.used -= e.charge;
                    let _ = o.db.delete(id.0);
                }
            }
        }
    }

    /// Evict least recently used chunks until `charge` more bytes fit under the cap and above
    /// the free-space floor; false if they cannot. Evicts nothing for the floor when emptying
    /// the cache would not restore it (something else filled the disk): that would throw away
    /// every warm chunk for nothing, one insert at a time, under the cache lock.
    fn make_room(&self, o: &mut Owned, charge: u64) -> bool {
        let max = self.cfg.max_bytes;
        // Files being written cannot be evicted: if they alone leave no room, evict nothing.
        if o.pending_bytes.saturating_add(charge) > max {
            return false;
        }
        while o.used + charge > max && self.evict_one(o).is_some() {}
        if o.used + charge > max {
            return false;
        }
        let floor = self.cfg.min_free_bytes.saturating_add(charge);
        let shortfall = floor.saturating_sub(self.free_bytes());
        if shortfall == 0 {
            self.floor_warned.store(false, Ordering::Relaxed);
            return true;
        }
        let evictable = o.used.saturating_sub(o.pending_bytes);
        if shortfall > evictable {
            let (free, cached) = (floor - shortfall, evictable);
            if !self.floor_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "chunk cache {}: {free} bytes free, below the floor of {} bytes, and the cache \
                     holds only {cached}: not caching until space is freed",
                    self.dir().display(),
                    self.cfg.min_free_bytes
                );
            } else {
                tracing::debug!("chunk cache: free space below the floor; not caching");
            }
            return false;
        }
        // Evict by charge, not until statvfs agrees: an unlinked file a reader still holds open
        // frees nothing yet, and waiting for that here would evict far more than needed.
        let mut freed = 0;
        while freed < shortfall {
            match self.evict_one(o) {
                Some(c) => freed += c,
                None => break,
            }
        }
        self.free_bytes() >= floor
    }

    fn write_file(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path_of(id);
        let parent = path.parent().expect("data/xx");
        std::fs::create_dir_all(parent)?;
        let tmp_dir = self.cfg.dir.join("tmp");
        let tmp = tmp_dir.join(format!("{}.{}", id.to_hex(), std::process::id()));
        let mut f = match std::fs::File::create(&tmp) {
            Ok(f) => f,
            // tmp/ removed under a running owner: recreate it rather than fail every insert.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&tmp_dir)?;
                std::fs::File::create(&tmp)?
            }
            Err(e) => return Err(e),
        };
        // A partial tmp file is counted nowhere, so it must not outlive a failure.
        let written = f.write_all(bytes);
        drop(f);
        written.and_then(|()| std::fs::rename(&tmp, &path)).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Evict the least recently used chunk; the bytes it was charged, or `None` if there is
    /// nothing left to evict.
    fn evict_one(&self, o: &mut Owned) -> Option<u64> {
        let (_, victim) = o.order.pop_first()?;
        let Some(e) = o.entries.remove(&victim) else { return Some(0) };
        let _ = std::fs::remove_file(self.path_of(&victim));
        let _ = o.db.delete(victim.0);
        o.used -= e.charge;
        o.evictions += 1;
        Some(e.charge)
    }

    /// Drop the record of a chunk whose file is missing or damaged (`unlink`: remove the file
    /// too, or it would occupy space nothing counts). Only if the record is still the one the
    /// caller read: after an eviction and a re-insert the file is a new, good one. Under the
    /// lock, so no insert can rename a new file in between.
    fn forget(&self, id: &ChunkId, generation: u64, unlink: bool) {
        let mut guard = self.owned.lock().expect("cache lock");
        let Some(o) = guard.as_mut() else { return };
        if !o.entries.get(id).is_some_and(|e| e.generation == generation && !e.pending) {
            return;
        }
        if let Some(e) = o.entries.remove(id) {
            o.order.remove(&e.seq);
            o.used -= e.charge;
            let _ = o.db.delete(id.0);
            if unlink {
                if let Err(err) = std::fs::remove_file(self.path_of(id)) {
                    if err.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("chunk cache: removing damaged {id}: {err}");
                    }
                }
            }
        }
    }

    fn retry_ownership(&self, guard: &mut Option<Owned>) {
        let mut last = self.last_owner_try.lock().expect("cache lock");
        if last.elapsed() < OWNER_RETRY {
            return;
        }
        *last = Instant::now();
        if let Ok(owned) = self.take_ownership() {
            tracing::info!("chunk cache {}: this process now owns it", self.dir().display());
            *guard = Some(owned);
        }
    }

    fn free_bytes(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.cfg.dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    }

    pub fn stats(&self) -> CacheStats {
        let guard = self.owned.lock().expect("cache lock");
        let (owner, chunks, used, evictions) = match guard.as_ref() {
            Some(o) => (true, o.entries.len() as u64, o.used, o.evictions),
            None => (false, 0, 0, 0),
        };
        CacheStats {
            dir: self.cfg.dir.clone(),
            owner,
            chunks,
            used_bytes: used,
            max_bytes: self.cfg.max_bytes,
            min_free_bytes: self.cfg.min_free_bytes,
            free_bytes: self.free_bytes(),
            evictions,
        }
    }

    /// Drop every cached chunk. Only the owner may; a mount elsewhere keeps it busy.
    pub fn clear(&self) -> Result<u64, CacheError> {
        let mut guard = self.owned.lock().expect("cache lock");
        let Some(o) = guard.as_mut() else { return Err(CacheError::Busy(self.cfg.dir.clone())) };
        let mut freed = 0;
        while let Some(charge) = self.evict_one(o) {
            freed += charge;
        }
        o.evictions = 0;
        Ok(freed)
    }
}

/// An error that says the bookkeeping itself is damaged, rather than unreachable right now.
fn is_damage(e: &CacheError) -> bool {
    use rocksdb::ErrorKind::*;
    matches!(e, CacheError::Db { source, .. } if matches!(source.kind(), Corruption | InvalidArgument | NotSupported))
}

/// Whether another process holds RocksDB's own lock (a POSIX record lock) on `lock`.
fn rocksdb_locked_elsewhere(lock: &Path) -> bool {
    let Ok(file) = File::open(lock) else { return false };
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as _,
        l_whence: libc::SEEK_SET as _,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETLK(&mut probe)).is_ok()
        && probe.l_type != libc::F_UNLCK as libc::c_short
}

fn encode_record(charge: u64, seq: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&charge.to_le_bytes());
    v[8..].copy_from_slice(&seq.to_le_bytes());
    v
}

fn decode_record(v: &[u8]) -> Option<(u64, u64)> {
    let v: &[u8; 16] = v.try_into().ok()?;
    let charge = u64::from_le_bytes(v[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(v[8..].try_into().ok()?);
    Some((charge, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB cache with no free-space floor.
    fn mib_cache(dir: &Path) -> CacheConfig {
        CacheConfig { dir: dir.into(), max_bytes: 1 << 20, min_free_bytes: 0 }
    }

    fn disk_usage(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in std::fs::read_dir(dir.join("data")).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                total += f.unwrap().metadata().unwrap().len().div_ceil(BLOCK) * BLOCK;
            }
        }
        total
    }

    fn chunk(i: u32, len: usize) -> (ChunkId, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
        (ChunkId::of(&bytes), bytes)
    }

    #[test]
    fn cap_is_never_overshot_and_lru_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig { dir: dir.path().join("c"), max_bytes: 256 << 10, min_free_bytes: 0 };
        let cache = std::sync::Arc::new(ChunkCache::open(cfg.clone()).unwrap());
        let (hot, hot_bytes) = chunk(9999, 10_000);
        cache.insert(&hot, &hot_bytes);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let cache = cache.clone();
                s.spawn(move || {
                    for i in 0..200u32 {
                        let (id, bytes) = chunk(t * 1000 + i, 1000 + (i as usize * 997) % 40_000);
                        cache.insert(&id, &bytes);
                        assert!(cache.stats().used_bytes <= 256 << 10);
                        // Touching the hot chunk keeps it the most recently used.
                        let _ = cache.get(&hot);
                    }
                });
            }
        });
        assert!(disk_usage(&cfg.dir) <= 256 << 10, "files occupy more than the cap");
        assert!(cache.stats().evictions > 0);
        assert_eq!(cache.get(&hot).as_deref(), Some(&hot_bytes[..]), "recently used chunk was evicted");
        // Bookkeeping survives a restart and still matches the files.
        drop(cache);
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        let s = cache.stats();
        assert!(s.used_bytes <= 256 << 10 && s.used_bytes == disk_usage(&cfg.dir), "{s:?}");
        assert!(cache.contains(&hot));
        cache.clear().unwrap();
        assert_eq!(disk_usage(&cfg.dir), 0);
    }

    #[test]
    fn damaged_file_is_a_miss_not_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(mib_cache(dir.path())).unwrap();
        let (id, bytes) = chunk(1, 5000);
        cache.insert(&id, &bytes);
        std::fs::write(cache.path_of(&id), b"not the chunk").unwrap();
        assert_eq!(cache.get(&id), None);
        assert!(!cache.contains(&id));
        assert_eq!(cache.stats().used_bytes, 0);
        assert!(!cache.path_of(&id).exists());
    }

    #[test]
    fn lowered_cap_is_enforced_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = mib_cache(dir.path());
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        let chunks: Vec<_> = (0..40).map(|i| chunk(i, 20_000)).collect();
        for (id, bytes) in &chunks {
            cache.insert(id, bytes);
        }
        let full = cache.stats().used_bytes;
        assert!(full > 256 << 10);
        drop(cache);
        cfg.max_bytes = 256 << 10;
        // Looking (cache stats, whose default cap may be below the mounts') trims nothing.
        let look = ChunkCache::inspect(cfg.clone()).unwrap();
        assert_eq!(look.stats().used_bytes, full);
        drop(look);
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        let s = cache.stats();
        assert!(s.used_bytes <= cfg.max_bytes, "{s:?}");
        assert_eq!(s.used_bytes, disk_usage(&cfg.dir), "files left on disk that nothing counts");
        // Oldest first: the first inserted are gone from disk, the last are kept.
        assert!(!cache.path_of(&chunks[0].0).exists());
        assert!(!cache.contains(&chunks[0].0));
        let (last, last_bytes) = chunks.last().unwrap();
        assert_eq!(cache.get(last).as_deref(), Some(&last_bytes[..]));
    }

    #[test]
    fn damaged_file_is_removed_but_a_newer_insert_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(mib_cache(dir.path())).unwrap();
        let (id, bytes) = chunk(1, 5000);
        cache.insert(&id, &bytes);
        std::fs::write(cache.path_of(&id), b"not the chunk").unwrap();
        assert_eq!(cache.get(&id), None);
        assert!(!cache.path_of(&id).exists(), "damaged file left on disk, uncounted");
        assert_eq!(disk_usage(dir.path()), 0);
        // A reader that saw an older entry must not remove the file of a re-insert.
        cache.insert(&id, &bytes);
        let generation = |c: &ChunkCache| c.owned.lock().unwrap().as_ref().unwrap().entries[&id].generation;
        let old = generation(&cache);
        cache.clear().unwrap();
        cache.insert(&id, &bytes);
        assert_ne!(generation(&cache), old);
        cache.forget(&id, old, true);
        assert_eq!(cache.get(&id).as_deref(), Some(&bytes[..]));
        assert_eq!(cache.stats().used_bytes, disk_usage(dir.path()));
    }

    #[test]
    fn unreadable_file_is_a_miss_but_stays_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(mib_cache(dir.path())).unwrap();
        let (id, bytes) = chunk(1, 5000);
        cache.insert(&id, &bytes);
        let used = cache.stats().used_bytes;
        // A directory in its place: reading fails with something other than "not found".
        std::fs::remove_file(cache.path_of(&id)).unwrap();
        std::fs::create_dir(cache.path_of(&id)).unwrap();
        assert_eq!(cache.get(&id), None);
        assert!(cache.contains(&id));
        assert_eq!(cache.stats().used_bytes, used);
        // Vanished: the record goes.
        std::fs::remove_dir(cache.path_of(&id)).unwrap();
        assert_eq!(cache.get(&id), None);
        assert!(!cache.contains(&id));
        assert_eq!(cache.stats().used_bytes, 0);
    }

    #[test]
    fn failed_write_leaves_nothing_and_missing_tmp_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(mib_cache(dir.path())).unwrap();
        let tmp_entries = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        // A non-empty directory where the file should go makes the rename fail.
        let (id, bytes) = chunk(1, 5000);
        std::fs::create_dir_all(cache.path_of(&id).join("x")).unwrap();
        cache.insert(&id, &bytes);
        assert!(!cache.contains(&id));
        assert_eq!(cache.stats().used_bytes, 0);
        assert_eq!(tmp_entries(), 0, "partial tmp file left behind");
        std::fs::remove_dir_all(cache.path_of(&id)).unwrap();
        std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();
        cache.insert(&id, &bytes);
        assert_eq!(cache.get(&id).as_deref(), Some(&bytes[..]));
        assert_eq!(tmp_entries(), 0);
    }

    #[test]
    fn unreachable_free_space_floor_evicts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = mib_cache(dir.path());
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        let chunks: Vec<_> = (0..10).map(|i| chunk(i, 20_000)).collect();
        for (id, bytes) in &chunks {
            cache.insert(id, bytes);
        }
        let used = cache.stats().used_bytes;
        drop(cache);
        // No filesystem has this much free: emptying the cache could not reach the floor.
        cfg.min_free_bytes = u64::MAX / 2;
        let cache = ChunkCache::open(cfg).unwrap();
        let (id, bytes) = chunk(100, 20_000);
        cache.insert(&id, &bytes);
        assert!(!cache.contains(&id));
        let s = cache.stats();
        assert_eq!((s.used_bytes, s.evictions), (used, 0), "{s:?}");
        assert!(chunks.iter().all(|(id, _)| cache.contains(id)));
        assert_eq!(disk_usage(dir.path()), used);
    }

    #[test]
    fn second_process_reads_but_does_not_fill() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mib_cache(dir.path());
        let owner = ChunkCache::open(cfg.clone()).unwrap();
        let (id, bytes) = chunk(1, 5000);
        owner.insert(&id, &bytes);
        let reader = ChunkCache::open(cfg).unwrap();
        assert!(!reader.stats().owner);
        assert_eq!(reader.get(&id).as_deref(), Some(&bytes[..]));
        let (id2, bytes2) = chunk(2, 5000);
        reader.insert(&id2, &bytes2);
        assert!(!owner.contains(&id2));
        assert!(matches!(reader.clear(), Err(CacheError::Busy(_))));
    }

    #[test]
    fn ownership_passes_on_when_the_owner_goes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mib_cache(dir.path());
        let owner = ChunkCache::open(cfg.clone()).unwrap();
        assert!(owner.is_owner());
        let (id, bytes) = chunk(1, 5000);
        owner.insert(&id, &bytes);
        let reader = ChunkCache::open(cfg.clone()).unwrap();
        assert!(!reader.is_owner());
        assert!(matches!(reader.take_ownership(), Err(CacheError::Busy(_))));
        drop(owner);
        // The next insert after the retry interval takes over, records and all.
        *reader.last_owner_try.lock().unwrap() = Instant::now().checked_sub(OWNER_RETRY).unwrap();
        let (id2, bytes2) = chunk(2, 5000);
        reader.insert(&id2, &bytes2);
        assert!(reader.is_owner());
        assert!(reader.contains(&id) && reader.contains(&id2));
        assert_eq!(reader.stats().used_bytes, disk_usage(dir.path()));
        // Dropping ownership releases the lock for the next process.
        drop(reader);
        assert!(ChunkCache::open(cfg).unwrap().is_owner());
    }

    #[test]
    fn unreadable_bookkeeping_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = mib_cache(dir.path());
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        let (id, bytes) = chunk(1, 5000);
        cache.insert(&id, &bytes);
        drop(cache);
        std::fs::write(dir.path().join("db").join("CURRENT"), b"\0\x01junk").unwrap();
        let cache = ChunkCache::open(cfg.clone()).unwrap();
        assert!(cache.is_owner());
        // The old files went with their records: nothing escapes the cap uncounted.
        assert!(!cache.contains(&id));
        assert_eq!(disk_usage(dir.path()), 0);
        cache.insert(&id, &bytes);
        assert_eq!(cache.get(&id).as_deref(), Some(&bytes[..]));
        drop(cache);
        let cache = ChunkCache::open(cfg).unwrap();
        assert_eq!(cache.get(&id).as_deref(), Some(&bytes[..]));
        assert_eq!(cache.stats().used_bytes, disk_usage(dir.path()));
    }
}
