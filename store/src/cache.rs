//! The local cache: RocksDB under `$XDG_CACHE_HOME/cairn/<repository id>`.
//!
//! It holds only what can be rebuilt from the bucket — the chunk index (from index segments),
//! copies of snapshot roots, and the file-change cache (a miss just means a file is read
//! again) — so deleting the directory loses nothing.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::index::IndexedPack;
use crate::format::pack::{Codec, PackEntry};
use crate::format::tree::Content;
use crate::id::{ChunkId, Id, PackId};

const CF_CHUNKS: &str = "chunks";
const CF_SEGMENTS: &str = "segments";
const CF_FILES: &str = "files";
/// Snapshot roots are immutable and named by their hash: kept forever, checked on every use.
const CF_SNAPSHOTS: &str = "snapshots";
/// Decompressed SST blocks kept by RocksDB, shared by all column families.
const BLOCK_CACHE: usize = 8 << 20;

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: PackEntry,
}

/// What the change cache remembers of a source file: if all the stat fields still match,
/// the file is unchanged and its content is reused without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub content: Content,
    /// The data chunks of chunk-list content, which `content` names only through its list
    /// pages: a list page can outlive its data (it sits in a metadata pack that stays for
    /// other trees), so a hit must find every data chunk indexed too.
    pub list_chunks: Vec<Id>,
}

pub struct LocalCache {
    db: DB,
    /// Set when the shared cache was busy and this process works in a throwaway one.
    scratch: Option<PathBuf>,
}

/// The default cache root: `$XDG_CACHE_HOME/cairn`, else `~/.cache/cairn`.
pub fn default_cache_root() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("cairn");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/cairn"),
        None => std::env::temp_dir().join("cairn-cache"),
    }
}

impl LocalCache {
    /// Open the cache of one repository. If another cairn process holds it, work in a
    /// private scratch cache instead of waiting: correctness never depends on the cache.
    pub fn open(root: &Path, repo_id: &str) -> Result<LocalCache> {
        let dir = root.join(repo_id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        match Self::open_db(&dir) {
            Ok(db) => Ok(LocalCache { db, scratch: None }),
            Err(e) if e.to_string().contains("lock") => {
                let scratch = std::env::temp_dir().join(format!(
                    "cairn-scratch-{}-{}",
                    std::process::id(),
                    hex::encode(rand::random::<[u8; 4]>())
                ));
                tracing::info!(
                    "cache {} is busy ({e}); using scratch cache {}",
                    dir.display(),
                    scratch.display()
                );
                Ok(LocalCache { db: Self::open_db(&scratch)?, scratch: Some(scratch) })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn open_db(dir: &Path) -> std::result::Result<DB, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_total_wal_size(64 << 20);
        opts.set_max_open_files(256);
        // Small memtables and block cache: the cache must not be what pushes a backup job or a
        // gc past its memory budget. Blocks come from the OS page cache when not cached here
        // (RocksDB's default block cache of 32 MiB was a quarter of a 1M-chunk gc's heap).
        let block_cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
        let cf_opts = || {
            let mut o = Options::default();
            o.set_write_buffer_size(8 << 20);
            o.set_max_write_buffer_number(2);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&block_cache);
            o.set_block_based_table_factory(&table);
            o
        };
        let cfs = [CF_CHUNKS, CF_SEGMENTS, CF_FILES, CF_SNAPSHOTS]
            .map(|n| ColumnFamilyDescriptor::new(n, cf_opts()));
        DB::open_cf_descriptors(&opts, dir, cfs)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    pub fn chunk(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.0)?.and_then(|v| decode_location(id, &v)))
    }

    pub fn segments(&self) -> Result<HashSet<Id>> {
        let mut out = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_SEGMENTS), rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(raw) = <[u8; 32]>::try_from(&k[..]) {
                out.insert(Id(raw));
            }
        }
        Ok(out)
    }

    /// Record a segment's chunks, then the segment itself: a crash in between leaves extra
    /// (correct) chunk entries and a segment that is read again. Written in bounded batches,
    /// so a full segment does not need a batch of its size in memory.
    pub fn ingest<P: Borrow<IndexedPack>>(
        &self,
        segment: &Id,
        packs: impl IntoIterator<Item = Result<P>>,
    ) -> Result<()> {
        const BATCH: usize = 16_384;
        let mut batch = WriteBatch::default();
        for pack in packs {
            let pack = pack?;
            let pack = pack.borrow();
            for e in &pack.chunks {
                batch.put_cf(self.cf(CF_CHUNKS), e.id.0, encode_location(&pack.id, e));
                if batch.len() >= BATCH {
                    self.db.write(std::mem::take(&mut batch))?;
                }
            }
        }
        batch.put_cf(self.cf(CF_SEGMENTS), segment.0, []);
        self.db.write(batch)?;
        Ok(())
    }

    /// Forget the whole chunk index (segments vanished: GC compacted them).
    pub fn reset_index(&self) -> Result<()> {
        for cf in [CF_CHUNKS, CF_SEGMENTS] {
            self.db.delete_range_cf(self.cf(cf), &[0u8; 0][..], &[0xffu8; 33][..])?;
        }
        Ok(())
    }

    pub fn snapshot_root(&self, id: &Id) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_SNAPSHOTS), id.0)?)
    }

    pub fn put_snapshot_root(&self, id: &Id, bytes: &[u8]) -> Result<()> {
        self.db.put_cf(self.cf(CF_SNAPSHOTS), id.0, bytes)?;
        Ok(())
    }

    pub fn file(&self, path: &[u8]) -> Result<Option<FileEntry>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_FILES), path)?.and_then(|v| postcard::from_bytes(&v).ok()))
    }

    pub fn put_file(&self, path: &[u8], entry: &FileEntry) -> Result<()> {
        let bytes = postcard::to_stdvec(entry).expect("file entry serializes");
        self.db.put_cf(self.cf(CF_FILES), path, bytes)?;
        Ok(())
    }
}

impl Drop for LocalCache {
    fn drop(&mut self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn encode_location(pack: &PackId, e: &PackEntry) -> [u8; 45] {
    let mut v = [0u8; 45];
    v[..32].copy_from_slice(&pack.0);
    v[32..36].copy_from_slice(&e.offset.to_le_bytes());
    v[36..40].copy_from_slice(&e.stored_len.to_le_bytes());
    v[40..44].copy_from_slice(&e.raw_len.to_le_bytes());
    v[44] = e.codec as u8;
    v
}

fn decode_location(id: &ChunkId, v: &[u8]) -> Option<Location> {
    if v.len() != 45 {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().expect("4 bytes"));
    Some(Location {
        pack: Id(v[..32].try_into().expect("32 bytes")),
        entry: PackEntry {
            id: *id,
            offset: u32_at(32),
            stored_len: u32_at(36),
            raw_len: u32_at(40),
            codec: if v[44] == 1 { Codec::Zstd } else { Codec::Raw },
        },
    })
}
