//! [`Primer`]: after a directory is listed, push its small files into the kernel's page cache.
//!
//! On a fresh mount every first read of a file is a round trip through the daemon, and on a
//! virtual machine the two context switches of that round trip cost more than the copy. Most
//! readers list a directory and then open its files (tar, a restore, python importing a
//! package), so the listing is the moment to act: one worker thread pushes the content of the
//! listed files (`FUSE_NOTIFY_STORE`) while the reader is still busy with the first ones, and
//! later opens find the pages cached and send no read at all.
//!
//! Only chunks already on this host are used. Priming never fetches, so it cannot compete with
//! demand reads for bandwidth, and a cold mount behaves as without it. The bytes pushed are
//! verified chunks assembled exactly as a read would; the kernel may drop the pages whenever it
//! likes (they are clean page cache), after which reads simply reach the daemon again.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};

use fuser::{INodeNo, Notifier};

use crate::fs::Inner;
use crate::stats::MountStats;

/// Listings waiting to be primed (at most 16 KiB each); beyond this the oldest are dropped:
/// the reader has long moved on from them.
const QUEUE: usize = 1024;
/// Bytes pushed for one listing at most, so a huge directory does not flood the page cache.
const PER_LISTING: u64 = 64 << 20;

/// Files left to a reader found level with the worker (see `prime_listing`).
const LEAP: usize = 2;

/// Files `(inode, size)` of one directory's listing in listing order, and the bytes it may
/// still push.
struct Listing {
    dir: u64,
    files: Vec<(u64, u64)>,
    budget: u64,
}

pub(crate) struct Primer {
    /// Files up to this size are primed; 0 turns priming off.
    pub max_file: u64,
    notifier: OnceLock<Notifier>,
    /// Listings not yet primed, newest last. Newest first is the order a depth-first reader
    /// (tar, a copy, a recursive import) wants them: it is inside the directory it listed last.
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    stack: Vec<Listing>,
    started: bool,
    closed: bool,
}

impl Primer {
    pub fn new(max_file: u64) -> Primer {
        Primer { max_file, notifier: OnceLock::new(), pending: Mutex::default(), wake: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a file of `size` bytes is worth priming.
    pub fn wants(&self, size: u64) -> bool {
        size > 0 && size <= self.max_file && self.notifier.get().is_some()
    }

    /// Start the worker once the session exists (the notifier writes to its device).
    pub fn start(&self, inner: Weak<Inner>, notifier: Notifier) -> std::io::Result<()> {
        if self.max_file == 0 {
            return Ok(());
        }
        std::thread::Builder::new().name("cairn-prime".into()).spawn(move || work(inner))?;
        let _ = self.notifier.set(notifier);
        self.lock().started = true;
        Ok(())
    }

    /// Stop the worker (at unmount); listings still queued are dropped.
    pub fn stop(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Queue the files `(inode, size)` of directory `dir` that a listing reply just carried.
    pub fn listed(&self, dir: u64, files: Vec<(u64, u64)>) {
        if files.is_empty() {
            return;
        }
        let mut p = self.lock();
        if !p.started || p.closed {
            return;
        }
        // A directory arrives one page (a few dozen entries) per reply: its pages are one
        // listing, primed front to back.
        if let Some(top) = p.stack.last_mut().filter(|l| l.dir == dir) {
            top.files.extend(files);
            return;
        }
        if p.stack.len() == QUEUE {
            p.stack.remove(0);
        }
        p.stack.push(Listing { dir, files, budget: PER_LISTING });
        drop(p);
        self.wake.notify_one();
    }

    /// The newest listing; None once stopped.
    fn next(&self) -> Option<Listing> {
        let mut p = self.lock();
        loop {
            if p.closed {
                return None;
            }
            if let Some(l) = p.stack.pop() {
                return Some(l);
            }
            p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether a newer listing arrived; if so the rest of this one goes back under it.
    fn yield_to_newer(&self, rest: impl FnOnce() -> Listing) -> bool {
        let mut p = self.lock();
        if p.stack.is_empty() {
            return false;
        }
        let at = p.stack.len() - 1;
        p.stack.insert(at, rest());
        true
    }
}

fn work(inner: Weak<Inner>) {
    loop {
        // `next` holds the mount's state while it waits; `Primer::stop` at unmount ends it.
        let next = match inner.upgrade() {
            Some(i) => i.primer.next(),
            None => return,
        };
        let Some(listing) = next else { return };
        let Some(inner) = inner.upgrade() else { return };
        prime_listing(&inner, listing);
    }
}

fn prime_listing(inner: &Arc<Inner>, mut listing: Listing) {
    let Some(notifier) = inner.primer.notifier.get() else { return };
    let mut leap = 0;
    for i in 0..listing.files.len() {
        let (ino, size) = listing.files[i];
        if size > listing.budget {
            return;
        }
        if inner.read_or_gone(ino) {
            // The reader is here already. Priming the very next file would race it for that
            // file (and lose half the time, both doing the work): leave it the next few and
            // get ahead of it instead.
            leap = LEAP;
            continue;
        }
        if leap > 0 {
            leap -= 1;
            continue;
        }
        // None: a chunk is not local (or the kernel forgot the inode).
        if let Some(data) = inner.local_content(ino) {
            match notifier.store(INodeNo(ino), 0, &data) {
                Ok(()) => {
                    listing.budget -= size;
                    MountStats::bump(&inner.stats.primed_files, 1);
                    MountStats::bump(&inner.stats.primed_bytes, size);
                }
                // The kernel dropped the inode between the listing and now: nothing to prime.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    tracing::debug!("priming inode {ino}: {e}");
                    return;
                }
            }
        }
        let more = i + 1 < listing.files.len();
        let rest =
            || Listing { dir: listing.dir, files: listing.files.split_off(i + 1), budget: listing.budget };
        if more && inner.primer.yield_to_newer(rest) {
            return;
        }
    }
}
