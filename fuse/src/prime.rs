//! [`Primer`]: once a listed directory is read from, push its small files into the kernel's
//! page cache.
//!
//! On a fresh mount every first read of a file is a round trip through the daemon, and on a
//! virtual machine the two context switches of that round trip cost more than the copy. Most
//! readers list a directory and then open its files (tar, a restore, python importing a
//! package). So the files of each listing are noted, and when the first of them is read —
//! the sign that the reader wants data, not just names (`find`, `du` and `ls -R` on an idle
//! mount prime nothing) — one worker thread pushes the others (`FUSE_NOTIFY_STORE`) while the
//! reader is busy with the first, and later opens find the pages cached and send no read at
//! all. While files are being read (a first read in the last second), a new listing is primed
//! at once: a tree walk that reads files wants the next directory's files too. (A push the
//! kernel gets before it has linked the listed inode is dropped; fuser reports it as sent.)
//!
//! Only chunks already on this host are used. Priming never fetches, so it cannot compete with
//! demand reads for bandwidth, and a cold mount behaves as without it. The bytes pushed are
//! verified chunks assembled exactly as a read would; the kernel may drop the pages whenever it
//! likes (they are clean page cache), after which reads simply reach the daemon again.

use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};

use crate::fs::Inner;
use crate::stats::MountStats;

/// Directories whose listing is remembered until a read in them; the least recently listed go
/// first.
const DIRS: usize = 1024;
/// Bytes of small files remembered and pushed per directory at most, so a huge directory
/// neither floods the page cache nor grows the daemon.
const PER_DIR: u64 = 64 << 20;
/// Files remembered per directory at most: tiny files would leave `PER_DIR` far off.
const PER_DIR_FILES: usize = 4096;
/// Listings queued at most; the oldest go first (a walk has moved on from them).
const QUEUED: usize = 64;
/// A listing within this long of a file's first read is primed at once.
const READING_NOW: Duration = Duration::from_secs(1);
/// Files left to a reader found level with the worker (see `prime_listing`).
const LEAP: usize = 2;

/// Files `(inode, size)` of one directory in listing order, and the bytes it may still push.
struct Listing {
    dir: u64,
    files: Vec<(u64, u64)>,
    budget: u64,
}

enum DirState {
    /// Listed, nothing read yet: the files wait (their total size stays within `PER_DIR`).
    Listed(Vec<(u64, u64)>, u64),
    /// A file was read: later pages of the listing go to the worker at once.
    Reading,
}

pub(crate) struct Primer {
    /// Files up to this size are primed; 0 turns priming off.
    pub max_file: u64,
    notifier: OnceLock<Notifier>,
    state: Mutex<State>,
    wake: Condvar,
    /// Joined at stop: a thread that used RocksDB must not outlive `main` (its thread-local
    /// cleanup then locks a mutex that static destruction already took: "pthread lock").
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct State {
    dirs: lru::LruCache<u64, DirState>,
    /// Listings to prime, newest last. Newest first is the order a depth-first reader (tar, a
    /// copy, a recursive import) wants them: it is inside the directory it entered last.
    stack: Vec<Listing>,
    /// Listings ever queued, so the worker can tell that a newer one arrived.
    queued: u64,
    /// When a file was last read for the first time: a reader reading files now will read
    /// the next directory it lists too, so that one is primed without waiting for its read.
    last_first_read: Option<Instant>,
    started: bool,
    closed: bool,
}

impl Primer {
    pub fn new(max_file: u64) -> Primer {
        Primer {
            max_file,
            notifier: OnceLock::new(),
            state: Mutex::new(State {
                dirs: lru::LruCache::new(NonZeroUsize::new(DIRS).expect("nonzero")),
                stack: Vec::new(),
                queued: 0,
                last_first_read: None,
                started: false,
                closed: false,
            }),
            wake: Condvar::new(),
            worker: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a file of `size` bytes is worth priming.
    pub fn wants(&self, size: u64) -> bool {
        size > 0 && size <= self.max_file && self.notifier.get().is_some()
    }

    /// Start the worker (after the session's thread: the notifier writes to its device).
    pub fn start(&self, inner: Weak<Inner>, notifier: Notifier) -> std::io::Result<()> {
        if self.max_file == 0 {
            return Ok(());
        }
        let handle = std::thread::Builder::new().name("cairn-prime".into()).spawn(move || work(inner))?;
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let _ = self.notifier.set(notifier);
        self.lock().started = true;
        Ok(())
    }

    /// Stop the worker (at unmount); what is queued is dropped, a listing being primed stops
    /// after its current file.
    pub fn stop(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = worker {
            if w.thread().id() != std::thread::current().id() {
                let _ = w.join();
            }
        }
    }

    /// Note the files `(inode, size)` of directory `dir` that a listing reply just carried.
    pub fn listed(&self, dir: u64, mut files: Vec<(u64, u64)>) {
        if files.is_empty() {
            return;
        }
        let mut s = self.lock();
        if !s.started || s.closed {
            return;
        }
        if s.last_first_read.is_some_and(|t| t.elapsed() < READING_NOW) {
            s.dirs.put(dir, DirState::Reading);
        }
        match s.dirs.get_or_insert_mut(dir, || DirState::Listed(Vec::new(), 0)) {
            DirState::Reading => {
                files.truncate(PER_DIR_FILES);
                s.queue(Listing { dir, files, budget: PER_DIR });
                drop(s);
                self.wake.notify_one();
            }
            DirState::Listed(waiting, bytes) => {
                for (ino, size) in files {
                    if waiting.len() >= PER_DIR_FILES {
                        break;
                    }
                    if bytes.saturating_add(size) <= PER_DIR {
                        *bytes += size;
                        waiting.push((ino, size));
                    }
                }
            }
        }
    }

    /// A file of directory `dir` is being read for the first time: prime the rest.
    pub fn reading_in(&self, dir: u64) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.last_first_read = Some(Instant::now());
        let Some(state) = s.dirs.get_mut(&dir) else { return };
        if let DirState::Listed(files, _) = std::mem::replace(state, DirState::Reading) {
            s.queue(Listing { dir, files, budget: PER_DIR });
            drop(s);
            self.wake.notify_one();
        }
    }

    /// The newest listing and the queue count at the time; None once stopped.
    fn next(&self) -> Option<(Listing, u64)> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(l) = s.stack.pop() {
                return Some((l, s.queued));
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether to leave this listing: stopped, or a newer one was queued since `seen` (the
    /// rest of this one then goes back under it).
    fn leave(&self, seen: u64, rest: impl FnOnce() -> Listing) -> bool {
        let mut s = self.lock();
        if s.closed {
            return true;
        }
        if s.queued == seen || s.stack.is_empty() {
            return false;
        }
        let at = s.stack.len() - 1;
        s.stack.insert(at, rest());
        s.trim();
        true
    }
}

impl State {
    fn queue(&mut self, listing: Listing) {
        self.stack.push(listing);
        self.queued += 1;
        self.trim();
    }

    /// Drop the oldest listings beyond `QUEUED`.
    fn trim(&mut self) {
        let excess = self.stack.len().saturating_sub(QUEUED);
        self.stack.drain(..excess);
    }
}

fn work(inner: Weak<Inner>) {
    loop {
        // `next` holds the mount's state while it waits; `Primer::stop` at unmount ends it.
        let next = match inner.upgrade() {
            Some(i) => i.primer.next(),
            None => return,
        };
        let Some((listing, seen)) = next else { return };
        let Some(inner) = inner.upgrade() else { return };
        prime_listing(&inner, listing, seen);
    }
}

fn prime_listing(inner: &Arc<Inner>, mut listing: Listing, seen: u64) {
    let Some(notifier) = inner.primer.notifier.get() else { return };
    let (mut leap, mut pushed) = (0, false);
    for i in 0..listing.files.len() {
        let (ino, size) = listing.files[i];
        if inner.read_or_gone(ino) {
            // Met the reader after pushing some: priming the very next file would race it for
            // that file (and lose half the time, both doing the work); leave it the next few
            // and get ahead of it instead. Files read before we started are just skipped.
            if pushed {
                leap = LEAP;
            }
        } else if leap > 0 {
            leap -= 1;
        } else if size <= listing.budget {
            // None: a chunk is not local (or the kernel forgot the inode).
            if let Some(data) = inner.local_content(ino) {
                // fuser reports an inode the kernel no longer knows as success: "pushed", not
                // "cached" (the kernel drops such a push).
                match notifier.store(INodeNo(ino), 0, &data) {
                    Ok(()) => {
                        pushed = true;
                        listing.budget -= size;
                        MountStats::bump(&inner.stats.primed_files, 1);
                        MountStats::bump(&inner.stats.primed_bytes, size);
                    }
                    Err(e) => {
                        tracing::debug!("priming inode {ino}: {e}");
                        return;
                    }
                }
            }
        }
        let more = i + 1 < listing.files.len();
        let rest =
            || Listing { dir: listing.dir, files: listing.files.split_off(i + 1), budget: listing.budget };
        if more && inner.primer.leave(seen, rest) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Primer {
        let p = Primer::new(1 << 20);
        p.lock().started = true;
        p
    }

    #[test]
    fn a_directory_of_tiny_files_is_capped_by_count() {
        let p = started();
        p.listed(1, (0..3 * PER_DIR_FILES as u64).map(|i| (i + 10, 1)).collect());
        p.listed(1, vec![(1 << 40, 1)]);
        match p.lock().dirs.peek(&1) {
            Some(DirState::Listed(files, _)) => assert_eq!(files.len(), PER_DIR_FILES),
            _ => panic!("directory not listed"),
        }
        p.reading_in(1);
        let s = p.lock();
        assert_eq!(s.stack.len(), 1);
        assert_eq!(s.stack[0].files.len(), PER_DIR_FILES);
        // Listing order is kept: the first files are the ones remembered.
        assert_eq!(s.stack[0].files[0].0, 10);
    }

    #[test]
    fn the_queue_keeps_only_the_newest_listings() {
        let p = started();
        p.listed(1, vec![(2, 1)]);
        p.reading_in(1);
        // Reading now: every listing is queued at once, each reply capped by count too.
        for dir in 100..100 + 3 * QUEUED as u64 {
            p.listed(dir, (0..2 * PER_DIR_FILES as u64).map(|i| (dir * 1_000_000 + i, 1)).collect());
        }
        let seen = {
            let s = p.lock();
            assert_eq!(s.stack.len(), QUEUED);
            assert!(s.stack.iter().all(|l| l.files.len() <= PER_DIR_FILES));
            assert_eq!(s.stack.first().map(|l| l.dir), Some(100 + 2 * QUEUED as u64));
            assert_eq!(s.stack.last().map(|l| l.dir), Some(99 + 3 * QUEUED as u64));
            s.queued
        };
        // A worker leaving a listing for a newer one puts the rest back within the cap.
        assert!(p.leave(seen - 1, || Listing { dir: 7, files: vec![(8, 1)], budget: PER_DIR }));
        let s = p.lock();
        assert_eq!(s.stack.len(), QUEUED);
        assert_eq!(s.stack[QUEUED - 2].dir, 7);
        assert_eq!(s.stack.last().map(|l| l.dir), Some(99 + 3 * QUEUED as u64));
    }
}
