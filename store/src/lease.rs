//! [`WriterLease`]: how a push takes part in the GC protocol (docs/gc.md).
//!
//! 1. Create `leases/<id>` (conditional create), *then* read `gc/state`: any GC that condemned
//!    packs before the lease existed is seen here; any later one will see the lease.
//! 2. Never deduplicate against a chunk whose pack is condemned ([`WriterLease::condemned`]).
//! 3. Heartbeat while working; commit by a conditional update of the lease that embeds the
//!    snapshot root. A GC that revoked the lease made that update fail: nothing is committed.
//! 4. Copy the root to `snapshots/`, then delete the lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::format::lease::{self, GcState, Lease, LeaseState, GC_STATE};
use crate::id::{Id, PackId};

/// How often a writer refreshes its lease; GC revokes leases silent for much longer.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

pub struct WriterLease {
    store: Arc<dyn ObjectStore>,
    name: String,
    lease: tokio::sync::Mutex<(Lease, UpdateVersion)>,
    condemned: HashSet<PackId>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn version(r: &object_store::PutResult) -> UpdateVersion {
    UpdateVersion { e_tag: r.e_tag.clone(), version: r.version.clone() }
}

/// Read `gc/state`; absent means no GC has condemned anything.
pub async fn read_gc_state(store: &dyn ObjectStore) -> Result<Option<(GcState, UpdateVersion)>> {
    match store.get(&ObjectPath::from(GC_STATE)).await {
        Ok(r) => {
            let v = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
            let bytes = r.bytes().await.map_err(|e| Error::store(GC_STATE, e))?;
            Ok(Some((GcState::decode(&bytes)?, v)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::store(GC_STATE, e)),
    }
}

impl WriterLease {
    pub async fn acquire(store: Arc<dyn ObjectStore>, host: &str) -> Result<WriterLease> {
        let name = lease::object_name(&hex::encode(rand::random::<[u8; 16]>()));
        let l = Lease {
            format: 1,
            host: host.to_string(),
            pid: std::process::id(),
            heartbeat: now_rfc3339(),
            state: LeaseState::Active,
        };
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let put = store
            .put_opts(&ObjectPath::from(name.as_str()), PutPayload::from(l.encode()), opts)
            .await
            .map_err(|e| Error::store(&name, e))?;
        // Only now read the GC state: see the module docs for why the order matters.
        let condemned = read_gc_state(store.as_ref())
            .await?
            .map(|(s, _)| s.condemned.into_iter().collect())
            .unwrap_or_default();
        Ok(WriterLease { store, name, lease: tokio::sync::Mutex::new((l, version(&put))), condemned })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Packs this writer must not deduplicate against.
    pub fn condemned(&self) -> &HashSet<PackId> {
        &self.condemned
    }

    async fn update(&self, change: impl FnOnce(&mut Lease)) -> Result<()> {
        let mut guard = self.lease.lock().await;
        let mut next = guard.0.clone();
        change(&mut next);
        next.heartbeat = now_rfc3339();
        let opts = PutOptions { mode: PutMode::Update(guard.1.clone()), ..Default::default() };
        match self
            .store
            .put_opts(&ObjectPath::from(self.name.as_str()), PutPayload::from(next.encode()), opts)
            .await
        {
            Ok(r) => {
                *guard = (next, version(&r));
                Ok(())
            }
            Err(object_store::Error::Precondition { .. }) | Err(object_store::Error::NotFound { .. }) => {
                Err(Error::Conflict(format!(
                    "{} was revoked by a garbage collection (this push was silent for too long); \
                     nothing was committed, run it again",
                    self.name
                )))
            }
            Err(e) => Err(Error::store(&self.name, e)),
        }
    }

    pub async fn heartbeat(&self) -> Result<()> {
        self.update(|_| {}).await
    }

    /// The commit point: the root goes into the lease by a conditional update.
    pub async fn commit(&self, snapshot: Id, root: &[u8]) -> Result<()> {
        let root =
            String::from_utf8(root.to_vec()).map_err(|e| Error::Usage(format!("root is not UTF-8: {e}")))?;
        self.update(|l| l.state = LeaseState::Committed { snapshot, root }).await
    }

    /// Remove the lease (after the root was copied to `snapshots/`, or to give up).
    pub async fn release(&self) -> Result<()> {
        match self.store.delete(&ObjectPath::from(self.name.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(&self.name, e)),
        }
    }
}
