//! [`DirectLocal`]: durable, page-cache-bypassing writes of large objects (packs) to a
//! local-directory repository.
//!
//! A pack written through the page cache costs a kernel copy of every byte into freshly
//! allocated cache pages; on the benchmark VM that was 15% of a push's CPU, more than
//! BLAKE3 and chunking together, and it then had to be flushed anyway to be durable. Large
//! plain writes therefore go to a staging file opened with `O_DIRECT` (4 MiB aligned writes,
//! the last one padded and the file truncated back), which is synced, renamed into place and
//! its directory synced: the same publish as `LocalFileSystem` with fsync, minus the copy.
//! Everything else, and every write on a file system that refuses `O_DIRECT`, passes through
//! to the wrapped store.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult};

/// Objects at least this large are written directly; smaller ones are not worth a sync of
/// their own beyond what the wrapped store does.
pub const DIRECT_MIN: usize = 1 << 20;
/// Alignment of buffer, offsets and lengths that `O_DIRECT` accepts on any Linux block device.
const ALIGN: usize = 4096;
/// Bytes per direct write: large enough for the device, small enough to stay off the heap's
/// high-water mark with several uploads in flight.
const WRITE_UNIT: usize = 4 << 20;

#[derive(Debug)]
pub struct DirectLocal {
    inner: Arc<LocalFileSystem>,
    /// Cleared the first time the file system refuses `O_DIRECT`; then everything passes through.
    supported: AtomicBool,
}

impl DirectLocal {
    /// `inner` should have fsync enabled, so that what passes through is durable too.
    pub fn new(inner: Arc<LocalFileSystem>) -> DirectLocal {
        DirectLocal { inner, supported: AtomicBool::new(true) }
    }
}

impl fmt::Display for DirectLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirectLocal({})", self.inner)
    }
}

enum Outcome {
    Written,
    /// The file system does not take `O_DIRECT` (tmpfs, some FUSE and network file systems).
    Unsupported,
}

fn io_error(path: &FsPath, source: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "DirectLocal",
        source: format!("{}: {source}", path.display()).into(),
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL) || e.kind() == ErrorKind::Unsupported
}

/// Open `{dest}#{n}`, a name `LocalFileSystem` leaves out of listings, creating parents.
fn open_staging(dest: &FsPath) -> std::io::Result<(File, PathBuf)> {
    let (mut n, mut created_parent) = (1u32, false);
    loop {
        let mut name = dest.as_os_str().to_owned();
        name.push(format!("#{n}"));
        let staging = PathBuf::from(name);
        let open =
            OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(&staging);
        match open {
            Ok(f) => return Ok((f, staging)),
            // Another writer's staging file (ours or LocalFileSystem's) for the same object.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound && !created_parent => {
                created_parent = true;
                if let Some(parent) = dest.parent() {
                    create_dirs_durably(parent)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `create_dir_all`, then sync the directory holding each new one, top down, so that every
/// new entry on the way to the object survives a crash.
fn create_dirs_durably(dir: &FsPath) -> std::io::Result<()> {
    let missing: Vec<&FsPath> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        sync_dir(d.parent())?;
    }
    Ok(())
}

fn sync_dir(dir: Option<&FsPath>) -> std::io::Result<()> {
    match dir {
        Some(d) => File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Copy `payload` through one aligned buffer into `file` with direct writes.
fn write_aligned(file: &mut File, payload: &PutPayload) -> std::io::Result<u64> {
    // No bigger than the object: an index segment is a few MB, a pack up to WRITE_UNIT's worth.
    let unit = WRITE_UNIT.min(payload.content_length().next_multiple_of(ALIGN).max(ALIGN));
    let mut backing = vec![0u8; unit + ALIGN];
    let start = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[start..start + unit];
    let (mut filled, mut total, mut first) = (0usize, 0u64, true);
    // Only the first write's EINVAL means the file system refuses direct I/O; a later one is
    // an error like any other (it must not quietly turn direct writes off).
    let mut write = |bytes: &[u8]| -> std::io::Result<()> {
        let r = file.write_all(bytes).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) if first => std::io::Error::new(ErrorKind::Unsupported, e),
            _ => e,
        });
        first = false;
        r
    };
    for part in payload.iter() {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let n = part.len().min(unit - filled);
            buf[filled..filled + n].copy_from_slice(&part[..n]);
            (filled, part, total) = (filled + n, &part[n..], total + n as u64);
            if filled == unit {
                write(buf)?;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        let padded = filled.next_multiple_of(ALIGN);
        buf[filled..padded].fill(0);
        write(&buf[..padded])?;
        file.set_len(total)?;
    }
    Ok(total)
}

fn put_direct(dest: &FsPath, payload: &PutPayload) -> std::io::Result<Outcome> {
    let (mut file, staging) = match open_staging(dest) {
        Ok(opened) => opened,
        Err(e) if unsupported(&e) => return Ok(Outcome::Unsupported),
        Err(e) => return Err(e),
    };
    let published = write_aligned(&mut file, payload)
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::rename(&staging, dest))
        .and_then(|_| sync_dir(dest.parent()));
    match published {
        Ok(()) => Ok(Outcome::Written),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            if e.kind() == ErrorKind::Unsupported {
                Ok(Outcome::Unsupported)
            } else {
                Err(e)
            }
        }
    }
}

/// Delete staging files (`{name}#{digits}`, ours and `LocalFileSystem`'s) older than `age`
/// anywhere under a local repository: what writers killed mid-write left behind. Listings
/// never show them, so nothing else ever would. Returns how many went.
pub fn remove_stale_staging(root: &FsPath, age: std::time::Duration) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let staging = name.to_str().and_then(|n| n.rsplit_once('#')).is_some_and(|(object, n)| {
                !object.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
            });
            if !kind.is_file() || !staging {
                continue;
            }
            // A live writer may rename its staging file away meanwhile: then it is not stale.
            let old = match entry.metadata() {
                Ok(m) => m.modified()?.elapsed().is_ok_and(|a| a > age),
                Err(e) if e.kind() == ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if old {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}

object_store_changing_puts!(DirectLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let plain = matches!(opts.mode, PutMode::Overwrite) && opts.attributes.is_empty();
        if !plain || payload.content_length() < DIRECT_MIN || !self.supported.load(Relaxed) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        let dest = self.inner.path_to_filesystem(location)?;
        let (outcome, payload) = tokio::task::spawn_blocking(move || {
            let outcome = put_direct(&dest, &payload).map_err(|e| io_error(&dest, e));
            (outcome, payload)
        })
        .await
        .map_err(|e| object_store::Error::Generic { store: "DirectLocal", source: Box::new(e) })?;
        match outcome? {
            Outcome::Written => {
                // Packs are named by their content, so whatever replaced this one since the
                // rename has the same bytes; conditional writes (LocalCas) never come here.
                let meta = self.inner.head(location).await?;
                Ok(PutResult { e_tag: meta.e_tag, version: meta.version, extensions: Default::default() })
            }
            Outcome::Unsupported => {
                tracing::debug!("{location}: O_DIRECT refused; writing through the page cache from now on");
                self.supported.store(false, Relaxed);
                self.inner.put_opts(location, payload, opts).await
            }
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::TryStreamExt;
    use object_store::{ObjectMeta, ObjectStore};

    fn store(dir: &FsPath) -> DirectLocal {
        let local = LocalFileSystem::new_with_prefix(dir).unwrap().with_fsync(true);
        DirectLocal::new(Arc::new(local))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
    }

    #[tokio::test]
    async fn large_objects_read_back_exactly_and_leave_no_staging_files() {
        // Beside the sources (a disk file system), not /tmp (often tmpfs, which may refuse
        // O_DIRECT and so test only the fallback).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let s = store(dir.path());
        // Sizes around the unit and the alignment, whole and in odd parts.
        let sizes = [DIRECT_MIN, DIRECT_MIN + 1, WRITE_UNIT, WRITE_UNIT + ALIGN - 1, 2 * WRITE_UNIT + 12345];
        for (i, len) in sizes.into_iter().enumerate() {
            let data = pattern(len, i as u8);
            let path = Path::from(format!("packs/{i:02x}/p{i}"));
            let parts: Vec<Bytes> = data.chunks(777_777).map(Bytes::copy_from_slice).collect();
            let put = s.put(&path, PutPayload::from_iter(parts)).await.unwrap();
            let got = s.get(&path).await.unwrap();
            assert_eq!(got.meta.size, len as u64, "size of {path}");
            assert_eq!(got.meta.e_tag, put.e_tag, "e_tag of {path}");
            assert!(got.bytes().await.unwrap() == data, "bytes of {path}");
        }
        assert!(s.supported.load(Relaxed), "O_DIRECT was refused on the source tree's file system");
        // Overwriting an object replaces it whole (a longer one first, then a shorter one).
        let path = Path::from("packs/00/p0");
        let shorter = pattern(DIRECT_MIN + 5, 99);
        s.put(&path, PutPayload::from(shorter.clone())).await.unwrap();
        assert!(s.get(&path).await.unwrap().bytes().await.unwrap() == shorter);
        let listed: Vec<ObjectMeta> = s.list(None).try_collect().await.unwrap();
        assert_eq!(listed.len(), sizes.len());
        let stray = walk(dir.path()).into_iter().filter(|p| p.to_string_lossy().contains('#')).count();
        assert_eq!(stray, 0, "staging files left behind");
    }

    #[tokio::test]
    async fn objects_on_tmpfs_read_back_whichever_way_they_are_written() {
        // tmpfs refused O_DIRECT before Linux 6.6; either way the object must come back whole.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else { return };
        let s = store(dir.path());
        let data = pattern(DIRECT_MIN + 3, 7);
        s.put(&Path::from("packs/p"), PutPayload::from(data.clone())).await.unwrap();
        assert!(s.get(&Path::from("packs/p")).await.unwrap().bytes().await.unwrap() == data);
    }

    #[test]
    fn only_old_staging_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let packs = dir.path().join("packs/ab");
        std::fs::create_dir_all(&packs).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for name in ["p#1", "p#22", "p", "p#x1", "#1", "q#"] {
            let f = File::create(packs.join(name)).unwrap();
            f.set_modified(hour_ago).unwrap();
        }
        File::create(packs.join("fresh#1")).unwrap();
        let removed = remove_stale_staging(dir.path(), std::time::Duration::from_secs(900)).unwrap();
        assert_eq!(removed, 2);
        let mut left: Vec<_> = walk(dir.path()).iter().map(|p| p.file_name().unwrap().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["#1", "fresh#1", "p", "p#x1", "q#"]);
    }

    fn walk(dir: &FsPath) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
