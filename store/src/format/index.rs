//! Index segments: `index/<id>`, immutable lists of which pack holds which chunk.
//!
//! A push writes one segment for the packs it uploaded, after they are all stored and before
//! its snapshot root. GC (later) writes compacted segments that name the ones they supersede.
//! Encoding: `"CRNI" 0x01` then a zstd frame of the postcard encoding of [`IndexSegment`];
//! the id is the BLAKE3 of the whole object.

use serde::{Deserialize, Serialize};

use super::pack::{PackEntry, PackKind};
use super::{check_header, unzstd, with_header};
use crate::error::{Error, Result};
use crate::id::{Id, PackId};

const MAGIC: &[u8; 4] = b"CRNI";
/// Decoded segments larger than this are refused instead of exhausting memory.
const MAX_DECODED: usize = 512 << 20;
/// Writers split segments so no one segment grows past this many chunks.
pub const MAX_CHUNKS_PER_SEGMENT: usize = 250_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSegment {
    pub packs: Vec<IndexedPack>,
    /// Segments whose content this one repeats; readers may ignore them once this one is read.
    pub supersedes: Vec<Id>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPack {
    pub id: PackId,
    pub kind: PackKind,
    pub len: u64,
    pub chunks: Vec<PackEntry>,
}

pub fn object_name(id: &Id) -> String {
    format!("index/{}", id.to_hex())
}

impl IndexSegment {
    pub fn encode(&self) -> (Id, Vec<u8>) {
        let body = postcard::to_stdvec(self).expect("index serializes");
        let z = zstd::bulk::compress(&body, 3).expect("zstd compresses");
        let bytes = with_header(MAGIC, &z);
        (Id::of(&bytes), bytes)
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<IndexSegment> {
        let body = unzstd(check_header(bytes, MAGIC, object)?, MAX_DECODED, object)?;
        let seg: IndexSegment =
            postcard::from_bytes(&body).map_err(|e| Error::corrupt(object, format!("postcard: {e}")))?;
        Ok(seg)
    }

    pub fn chunk_count(&self) -> usize {
        self.packs.iter().map(|p| p.chunks.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::Codec;

    #[test]
    fn round_trip() {
        let seg = IndexSegment {
            packs: vec![IndexedPack {
                id: Id::of(b"p"),
                kind: PackKind::Meta,
                len: 99,
                chunks: vec![PackEntry {
                    id: Id::of(b"c"),
                    offset: 8,
                    stored_len: 3,
                    raw_len: 5,
                    codec: Codec::Zstd,
                }],
            }],
            supersedes: vec![Id::of(b"old")],
        };
        let (id, bytes) = seg.encode();
        assert_eq!(id, Id::of(&bytes));
        assert_eq!(IndexSegment::decode(&bytes, "i").unwrap(), seg);
        assert!(IndexSegment::decode(&bytes[..bytes.len() - 1], "i").is_err());
        assert!(IndexSegment::decode(b"CRNI\x02abc", "i").is_err());
    }
}
