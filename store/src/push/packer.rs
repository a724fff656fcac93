//! Turns new chunks into packs and packs into uploads, with memory bounded by the number of
//! packs allowed in flight; and stored packs into index segments while the push runs, so
//! that neither the segments nor the claims grow with the size of the push.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::format::index::{self, IndexSegment, IndexedPack, MAX_CHUNKS_PER_SEGMENT};
use crate::format::pack::{self, FinishedPack, PackBuilder, PackKind};
use crate::id::{ChunkId, PackId};
use crate::lease::WriterLease;
use crate::repo::Repository;

/// Packs uploaded at once; together with the queue this bounds push memory to about
/// `(UPLOADS + QUEUE + 2) × pack_size`.
const UPLOADS: usize = 4;
const QUEUE: usize = 2;

/// Stored packs not yet indexed: filled by [`upload_all`], drained by [`index_packs`].
pub type Uploaded = Arc<Mutex<Vec<IndexedPack>>>;

/// What a push's index segments list so far.
#[derive(Default)]
pub struct Indexed {
    pub packs: usize,
    pub meta_packs: Vec<PackId>,
    pub stored_bytes: u64,
}

/// Indexing while the push runs: once a segment is written and in the chunk index, its
/// chunks are found there, so their claims can go.
struct Indexing<'a> {
    repo: &'a Repository,
    lease: &'a WriterLease,
    uploaded: Uploaded,
    handle: tokio::runtime::Handle,
    indexed: Mutex<Indexed>,
    /// Index once this many chunks wait: a full segment.
    every: usize,
}

pub struct Packer<'a> {
    indexing: Option<Indexing<'a>>,
    data: Mutex<PackBuilder>,
    meta: Mutex<PackBuilder>,
    pack_size: usize,
    level: i32,
    tx: mpsc::Sender<FinishedPack>,
    /// Chunks this push stores; also the claim that stops two threads storing one chunk twice.
    claimed: Mutex<HashSet<ChunkId>>,
    /// Packs GC has condemned: this push must not upload one of them again (see
    /// [`PackBuilder::finish_avoiding`]).
    condemned: HashSet<PackId>,
    pub stored_bytes: AtomicU64,
}

impl<'a> Packer<'a> {
    pub fn new(
        pack_size: usize,
        level: i32,
        condemned: HashSet<PackId>,
        tx: mpsc::Sender<FinishedPack>,
    ) -> Packer<'a> {
        Packer {
            indexing: None,
            data: Mutex::new(PackBuilder::new(PackKind::Data, pack_size)),
            meta: Mutex::new(PackBuilder::new(PackKind::Meta, pack_size / 4)),
            pack_size,
            level,
            tx,
            claimed: Mutex::new(HashSet::new()),
            condemned,
            stored_bytes: AtomicU64::new(0),
        }
    }

    /// Index what [`upload_all`] stored in `uploaded` as the push goes, a full segment at a
    /// time. Must be called on the runtime the uploads run on.
    pub fn indexing(
        mut self,
        repo: &'a Repository,
        lease: &'a WriterLease,
        uploaded: Uploaded,
    ) -> Packer<'a> {
        let handle = tokio::runtime::Handle::current();
        let every = MAX_CHUNKS_PER_SEGMENT;
        self.indexing = Some(Indexing { repo, lease, uploaded, handle, indexed: Mutex::default(), every });
        self
    }

    /// What was indexed during the push.
    pub fn into_indexed(self) -> Indexed {
        self.indexing.map(|i| i.indexed.into_inner().expect("indexed lock")).unwrap_or_default()
    }

    /// True if this call is the first to claim `id` in this push.
    pub fn claim(&self, id: ChunkId) -> bool {
        self.claimed.lock().expect("claim lock").insert(id)
    }

    /// Compress and add a claimed chunk. Blocks while the upload queue is full.
    pub fn add(&self, kind: PackKind, id: ChunkId, raw: &[u8]) -> Result<()> {
        let (codec, stored) = pack::seal_chunk(raw, self.level);
        self.stored_bytes.fetch_add(stored.len() as u64, Relaxed);
        let builder = match kind {
            PackKind::Data => &self.data,
            PackKind::Meta => &self.meta,
        };
        let full = {
            let mut b = builder.lock().expect("pack lock");
            b.add(id, raw.len() as u32, codec, &stored);
            let limit = if kind == PackKind::Meta { self.pack_size / 4 } else { self.pack_size };
            if b.len() >= limit {
                Some(std::mem::replace(&mut *b, PackBuilder::new(kind, limit)))
            } else {
                None
            }
        };
        match full {
            Some(b) => self.send(b),
            None => Ok(()),
        }
    }

    fn send(&self, builder: PackBuilder) -> Result<()> {
        self.tx
            .blocking_send(builder.finish_avoiding(&self.condemned))
            .map_err(|_| Error::Usage("pack upload stopped".into()))?;
        let Some(ix) = &self.indexing else { return Ok(()) };
        let packs = {
            let mut uploaded = ix.uploaded.lock().expect("uploaded lock");
            if uploaded.iter().map(|p| p.chunks.len()).sum::<usize>() < ix.every {
                return Ok(());
            }
            // One segment's packs; the rest wait for the next (no small leftover segments).
            let (mut n, mut chunks) = (0, 0);
            for p in uploaded.iter() {
                if n > 0 && chunks + p.chunks.len() > ix.every {
                    break;
                }
                chunks += p.chunks.len();
                n += 1;
            }
            uploaded.drain(..n).collect::<Vec<_>>()
        };
        let ids: Vec<ChunkId> = packs.iter().flat_map(|p| p.chunks.iter().map(|e| e.id)).collect();
        // Off the async workers: a rayon thread, or the walk inside block_in_place.
        let done = ix.handle.block_on(index_packs(ix.repo, ix.lease, packs))?;
        ix.indexed.lock().expect("indexed lock").add(done);
        let mut claimed = self.claimed.lock().expect("claim lock");
        for id in ids {
            claimed.remove(&id);
        }
        Ok(())
    }

    /// Close the open packs.
    pub fn flush(&self) -> Result<()> {
        for (kind, builder) in [(PackKind::Data, &self.data), (PackKind::Meta, &self.meta)] {
            let b = std::mem::replace(&mut *builder.lock().expect("pack lock"), PackBuilder::new(kind, 0));
            if !b.is_empty() {
                self.send(b)?;
            }
        }
        Ok(())
    }
}

pub fn channel() -> (mpsc::Sender<FinishedPack>, mpsc::Receiver<FinishedPack>) {
    mpsc::channel(QUEUE)
}

impl Indexed {
    pub fn add(&mut self, other: Indexed) {
        self.packs += other.packs;
        self.meta_packs.extend(other.meta_packs);
        self.stored_bytes += other.stored_bytes;
    }
}

/// Write index segments for stored `packs` (split before `MAX_CHUNKS_PER_SEGMENT`) and take
/// them into the local chunk index. Each segment is preceded by a heartbeat, a conditional
/// update of the lease: a writer that GC revoked (and whose packs it may have deleted since)
/// stops here instead of indexing deleted packs for other writers to deduplicate against.
pub async fn index_packs(repo: &Repository, lease: &WriterLease, packs: Vec<IndexedPack>) -> Result<Indexed> {
    let mut done = Indexed::default();
    let mut segment = IndexSegment::default();
    let mut rest = packs.into_iter().peekable();
    while let Some(p) = rest.next() {
        done.packs += 1;
        done.stored_bytes += p.len;
        if p.kind == PackKind::Meta {
            done.meta_packs.push(p.id);
        }
        segment.packs.push(p);
        if rest.peek().is_none_or(|n| segment.chunk_count() + n.chunks.len() > MAX_CHUNKS_PER_SEGMENT) {
            let seg = std::mem::take(&mut segment);
            let (id, bytes) = seg.encode();
            lease.heartbeat().await?;
            repo.put(&index::object_name(&id), bytes).await?;
            repo.cache()?.ingest(&id, seg.packs.iter().map(Ok))?;
        }
    }
    Ok(done)
}

/// Upload packs as they come; each stored one goes into `uploaded`, to be indexed.
pub async fn upload_all(
    store: Arc<dyn ObjectStore>,
    mut rx: mpsc::Receiver<FinishedPack>,
    uploaded: Uploaded,
) -> Result<()> {
    let permits = Arc::new(Semaphore::new(UPLOADS));
    let mut tasks = JoinSet::new();
    let mut first_error = None;
    while let Some(p) = rx.recv().await {
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let (store, uploaded) = (store.clone(), uploaded.clone());
        tasks.spawn(async move {
            let name = pack::object_name(&p.id);
            let len = p.bytes.len() as u64;
            let payload = PutPayload::from(Bytes::clone(&p.bytes));
            store.put(&ObjectPath::from(name.as_str()), payload).await.map_err(|e| Error::store(&name, e))?;
            drop(permit);
            let stored = IndexedPack { id: p.id, kind: p.kind, len, chunks: p.entries };
            uploaded.lock().expect("uploaded lock").push(stored);
            Ok::<_, Error>(())
        });
        while let Some(r) = tasks.try_join_next() {
            collect(r, &mut first_error);
        }
        if first_error.is_some() {
            // Stop taking packs: the producer sees a closed channel and stops too.
            break;
        }
    }
    drop(rx);
    while let Some(r) = tasks.join_next().await {
        collect(r, &mut first_error);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn collect(r: std::result::Result<Result<()>, tokio::task::JoinError>, first_error: &mut Option<Error>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) => {
            first_error.get_or_insert(Error::Usage(format!("upload task failed: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::config::Chunking;
    use crate::id::Id;

    async fn local_repo(dir: &std::path::Path) -> Repository {
        let url = dir.join("repo");
        Repository::init(url.to_str().unwrap(), Chunking::default(), None, &dir.join("c")).await.unwrap()
    }

    /// A push larger than a segment indexes as it goes: its early chunks are in the chunk
    /// index before it ends, and their claims are gone, so memory does not grow with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_push_indexes_as_it_goes_and_drops_its_claims() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = local_repo(tmp.path()).await;
        let uploaded = Uploaded::default();
        let (tx, rx) = channel();
        let uploads = tokio::spawn(upload_all(repo.store().clone(), rx, uploaded.clone()));
        let lease = WriterLease::acquire(repo.store().clone(), "test").await.unwrap();
        let mut packer =
            Packer::new(64 << 10, 1, HashSet::new(), tx).indexing(&repo, &lease, uploaded.clone());
        if let Some(ix) = packer.indexing.as_mut() {
            ix.every = 100;
        }
        let chunk = |i: u32| -> Vec<u8> {
            let mut raw = vec![0u8; 1024];
            blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut raw);
            raw
        };
        let first = Id::of(&chunk(0));
        let most_claims = tokio::task::block_in_place(|| {
            let mut most = 0;
            for i in 0..3000u32 {
                let raw = chunk(i);
                let id = Id::of(&raw);
                assert!(packer.claim(id));
                packer.add(PackKind::Data, id, &raw).unwrap();
                most = most.max(packer.claimed.lock().unwrap().len());
            }
            packer.flush().unwrap();
            most
        });
        assert!(repo.has_chunk(&first).unwrap(), "nothing was indexed during the push");
        assert!(most_claims < 1000, "claims grew with the push: {most_claims}");
        let mut indexed = packer.into_indexed();
        uploads.await.unwrap().unwrap();
        let rest = std::mem::take(&mut *uploaded.lock().unwrap());
        indexed.add(index_packs(&repo, &lease, rest).await.unwrap());
        for i in 0..3000u32 {
            assert!(repo.has_chunk(&Id::of(&chunk(i))).unwrap(), "chunk {i} not indexed");
        }
        assert!(indexed.packs > 10);
    }

    /// A writer GC revoked may have had its packs deleted since: it must not index them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_writer_indexes_nothing() {
        use crate::format::lease::{Lease, LeaseState};
        use object_store::ObjectStoreExt;
        let tmp = tempfile::tempdir().unwrap();
        let repo = local_repo(tmp.path()).await;
        let lease = WriterLease::acquire(repo.store().clone(), "test").await.unwrap();
        let path = object_store::path::Path::from(lease.name());
        let bytes = repo.store().get(&path).await.unwrap().bytes().await.unwrap();
        let mut revoked = Lease::decode(&bytes, lease.name()).unwrap();
        revoked.state = LeaseState::Revoked { by: "gc-test".into() };
        repo.store().put(&path, revoked.encode().into()).await.unwrap();
        let mut b = PackBuilder::new(PackKind::Data, 1 << 16);
        b.add(Id::of(b"c"), 1, pack::Codec::Raw, b"c");
        let p = b.finish();
        let pack = IndexedPack { id: p.id, kind: p.kind, len: p.bytes.len() as u64, chunks: p.entries };
        let err = index_packs(&repo, &lease, vec![pack]).await.err().expect("a revoked writer indexed");
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        let listed = repo.list("index").await.unwrap();
        assert!(listed.is_empty(), "{listed:?}");
    }
}
