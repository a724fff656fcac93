//! Turns new chunks into packs and packs into uploads, with memory bounded by the number of
//! packs allowed in flight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::format::index::IndexedPack;
use crate::format::pack::{self, FinishedPack, PackBuilder, PackKind};
use crate::id::{ChunkId, PackId};

/// Packs uploaded at once; together with the queue this bounds push memory to about
/// `(UPLOADS + QUEUE + 2) × pack_size`.
const UPLOADS: usize = 4;
const QUEUE: usize = 2;

pub struct Packer {
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

impl Packer {
    pub fn new(
        pack_size: usize,
        level: i32,
        condemned: HashSet<PackId>,
        tx: mpsc::Sender<FinishedPack>,
    ) -> Packer {
        Packer {
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
            .map_err(|_| Error::Usage("pack upload stopped".into()))
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

/// Upload packs as they come; return what the index segment must list.
pub async fn upload_all(
    store: Arc<dyn ObjectStore>,
    mut rx: mpsc::Receiver<FinishedPack>,
) -> Result<Vec<IndexedPack>> {
    let permits = Arc::new(Semaphore::new(UPLOADS));
    let mut tasks = JoinSet::new();
    let mut done = Vec::new();
    let mut first_error = None;
    while let Some(p) = rx.recv().await {
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let store = store.clone();
        tasks.spawn(async move {
            let name = pack::object_name(&p.id);
            let len = p.bytes.len() as u64;
            let payload = PutPayload::from(Bytes::clone(&p.bytes));
            store.put(&ObjectPath::from(name.as_str()), payload).await.map_err(|e| Error::store(&name, e))?;
            drop(permit);
            Ok::<_, Error>(IndexedPack { id: p.id, kind: p.kind, len, chunks: p.entries })
        });
        while let Some(r) = tasks.try_join_next() {
            collect(r, &mut done, &mut first_error);
        }
        if first_error.is_some() {
            // Stop taking packs: the producer sees a closed channel and stops too.
            break;
        }
    }
    drop(rx);
    while let Some(r) = tasks.join_next().await {
        collect(r, &mut done, &mut first_error);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

fn collect(
    r: std::result::Result<Result<IndexedPack>, tokio::task::JoinError>,
    done: &mut Vec<IndexedPack>,
    first_error: &mut Option<Error>,
) {
    match r {
        Ok(Ok(p)) => done.push(p),
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) => {
            first_error.get_or_insert(Error::Usage(format!("upload task failed: {e}")));
        }
    }
}
