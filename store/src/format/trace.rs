//! `traces/<snapshot id>`: the order in which a mount of that snapshot first touched chunks.
//!
//! Recorded by `cairn mount --store-trace`; later mounts of the snapshot fetch it and prefetch
//! its chunks in the background. A trace is a hint: it is not content-addressed (a newer
//! recording replaces it), a reader verifies every chunk it names as it would any other, and
//! losing it costs only speed. Encoding: `"CRTR" 0x01` then a zstd frame of the postcard
//! encoding of [`Trace`].

use serde::{Deserialize, Serialize};

use super::{check_header, unzstd, with_header};
use crate::error::{Error, Result};
use crate::id::{ChunkId, Id};

const MAGIC: &[u8; 4] = b"CRTR";
/// 4M chunk ids; a longer trace is refused rather than decoded into memory.
const MAX_DECODED: usize = 4 << 20 << 5;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// Chunk ids (data and metadata) in first-touch order, each at most once.
    pub chunks: Vec<ChunkId>,
}

pub fn object_name(snapshot: &Id) -> String {
    format!("traces/{}", snapshot.to_hex())
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("trace serializes");
        with_header(MAGIC, &zstd::bulk::compress(&body, 3).expect("zstd compresses"))
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<Trace> {
        let body = unzstd(check_header(bytes, MAGIC, object)?, MAX_DECODED, object)?;
        postcard::from_bytes(&body).map_err(|e| Error::corrupt(object, format!("postcard: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_damage() {
        let t = Trace { chunks: vec![Id::of(b"a"), Id::of(b"b")] };
        let bytes = t.encode();
        assert_eq!(Trace::decode(&bytes, "t").unwrap(), t);
        assert!(Trace::decode(&bytes[..bytes.len() - 2], "t").is_err());
        assert!(Trace::decode(b"CRTR\x01garbage", "t").is_err());
    }
}
