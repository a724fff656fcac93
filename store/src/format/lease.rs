//! `leases/<lease id>` and `gc/state`: the objects of the GC protocol (docs/gc.md).
//!
//! Both are JSON and move only by conditional writes: a lease is created with `PutMode::Create`
//! and changed with `PutMode::Update` (If-Match its ETag) by its writer (heartbeat, commit)
//! or by GC (revoke); so a commit and a revocation cannot both succeed. `gc/state` names the
//! packs a GC run has condemned; a writer reads it after creating its lease and never
//! deduplicates against a chunk that lives only in a condemned pack.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{Id, PackId};

pub const GC_STATE: &str = "gc/state";

pub fn object_name(lease: &str) -> String {
    format!("leases/{lease}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub format: u32,
    pub host: String,
    pub pid: u32,
    /// RFC 3339; only used to decide *when* a silent writer is revoked, never for safety.
    pub heartbeat: String,
    pub state: LeaseState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum LeaseState {
    Active,
    /// The writer's commit point: the snapshot root, byte for byte (its BLAKE3 is the id).
    Committed {
        snapshot: Id,
        root: String,
    },
    Revoked {
        by: String,
    },
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("lease serializes")
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<Lease> {
        let lease: Lease = serde_json::from_slice(bytes).map_err(|e| Error::corrupt(object, e))?;
        if lease.format != 1 {
            return Err(Error::corrupt(object, format!("unsupported format {}", lease.format)));
        }
        if let LeaseState::Committed { snapshot, root } = &lease.state {
            if Id::of(root.as_bytes()) != *snapshot {
                return Err(Error::corrupt(object, "committed root does not match its id"));
            }
        }
        Ok(lease)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    pub format: u32,
    /// The GC run that wrote this state, and when it started (RFC 3339).
    pub run: String,
    pub started: String,
    /// Packs that run will delete unless a writer turns out to need them.
    pub condemned: Vec<PackId>,
    /// Renewed by the run while it works (RFC 3339); empty in states written before it
    /// existed, which count from `started`.
    #[serde(default)]
    pub heartbeat: String,
    /// Set by the run when it is done. An unfinished state younger than the lease timeout
    /// means a GC is running: others refuse to start (one GC at a time).
    #[serde(default)]
    pub finished: bool,
}

impl GcState {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("gc state serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<GcState> {
        let s: GcState = serde_json::from_slice(bytes).map_err(|e| Error::corrupt(GC_STATE, e))?;
        if s.format != 1 {
            return Err(Error::corrupt(GC_STATE, format!("unsupported format {}", s.format)));
        }
        Ok(s)
    }
}
