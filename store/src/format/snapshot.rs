//! `snapshots/<id>`: the snapshot root, the one object whose write commits a push.
//!
//! JSON, so operators can read it with `cairn show` or any S3 browser. The id is the BLAKE3
//! of the object's bytes; readers check it, so a root cannot be swapped or damaged unnoticed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tree::Node;
use crate::error::{Error, Result};
use crate::id::{Id, PackId};

/// What a snapshot holds; decides the chunker and how a restore writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory tree, content-defined chunks.
    Fs,
    /// One memory image file, fixed page-aligned chunks, zero chunks as holes.
    Memory,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    /// The path that was pushed, as the pushing host saw it.
    pub source: String,
    pub kind: Kind,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub parent: Option<Id>,
    /// After this time the snapshot may be forgotten by expiry.
    pub expires: Option<String>,
    /// The pushed directory (fs) or file (memory), named as its source.
    pub root: Node,
    /// Metadata packs holding this snapshot's trees and chunk lists; a mount can fetch the
    /// directory structure from these without loading the repository index.
    pub meta_packs: Vec<PackId>,
    pub stats: SnapshotStats,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Logical bytes of all files (holes included).
    pub bytes: u64,
    /// Bytes read from the source (unchanged files skipped by the change cache not counted).
    pub bytes_read: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Plain bytes of chunks this push stored for the first time.
    pub new_bytes: u64,
    /// Compressed bytes uploaded in packs by this push.
    pub stored_bytes: u64,
}

pub fn object_name(id: &Id) -> String {
    format!("snapshots/{}", id.to_hex())
}

impl Snapshot {
    pub fn encode(&self) -> (Id, Vec<u8>) {
        let bytes = serde_json::to_vec_pretty(self).expect("snapshot serializes");
        (Id::of(&bytes), bytes)
    }

    pub fn decode(bytes: &[u8], id: &Id) -> Result<Snapshot> {
        let object = object_name(id);
        if Id::of(bytes) != *id {
            return Err(Error::corrupt(object, "content does not match its id"));
        }
        Self::decode_unchecked(bytes, &object)
    }

    pub fn decode_unchecked(bytes: &[u8], object: &str) -> Result<Snapshot> {
        let snap: Snapshot = serde_json::from_slice(bytes).map_err(|e| Error::corrupt(object, e))?;
        if snap.format != 1 {
            return Err(Error::corrupt(object, format!("unsupported format {}", snap.format)));
        }
        humantime::parse_rfc3339(&snap.time).map_err(|e| Error::corrupt(object, format!("time: {e}")))?;
        snap.root.validate(object)?;
        Ok(snap)
    }

    pub fn time(&self) -> std::time::SystemTime {
        humantime::parse_rfc3339(&self.time).unwrap_or(std::time::UNIX_EPOCH)
    }
}
