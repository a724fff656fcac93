//! Index segments: `index/<id>`, immutable lists of which pack holds which chunk.
//!
//! A push writes one segment for the packs it uploaded, after they are all stored and before
//! its snapshot root. GC (later) writes compacted segments that name the ones they supersede.
//! Encoding: `"CRNI" 0x01` then a zstd frame of the postcard encoding of [`IndexSegment`];
//! the id is the BLAKE3 of the whole object.
//!
//! A full segment is about 12 MB decoded, so readers that only pass packs through (GC,
//! the chunk-index cache) take them one at a time with [`SegmentReader`], and GC builds its
//! compacted segments with [`SegmentWriter`], which holds packs encoded rather than decoded.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::pack::{PackEntry, PackKind};
use super::{check_header, unzstd};
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
        let mut w = SegmentWriter::new(self.supersedes.clone());
        for p in &self.packs {
            w.push(p);
        }
        w.finish()
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<IndexSegment> {
        let mut r = SegmentReader::open(bytes, object)?;
        let mut packs = Vec::new();
        while let Some(p) = r.next_pack()? {
            packs.push(p);
        }
        Ok(IndexSegment { packs, supersedes: r.supersedes()? })
    }

    pub fn chunk_count(&self) -> usize {
        self.packs.iter().map(|p| p.chunks.len()).sum()
    }
}

/// Builds one segment's encoding a pack at a time (the postcard layout of [`IndexSegment`]:
/// the pack count, the packs, then `supersedes`).
pub struct SegmentWriter {
    packs: Vec<u8>,
    count: usize,
    chunks: usize,
    supersedes: Vec<Id>,
}

impl SegmentWriter {
    pub fn new(supersedes: Vec<Id>) -> SegmentWriter {
        SegmentWriter { packs: Vec::new(), count: 0, chunks: 0, supersedes }
    }

    pub fn push(&mut self, pack: &IndexedPack) {
        self.packs = postcard::to_extend(pack, std::mem::take(&mut self.packs)).expect("index serializes");
        self.count += 1;
        self.chunks += pack.chunks.len();
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(self) -> (Id, Vec<u8>) {
        let head = postcard::to_stdvec(&self.count).expect("a count serializes");
        let tail = postcard::to_stdvec(&self.supersedes).expect("ids serialize");
        let len = head.len() + self.packs.len() + tail.len();
        let mut bytes = Vec::with_capacity(len / 2 + 64);
        bytes.extend_from_slice(MAGIC);
        bytes.push(1);
        // Streamed, so the plain encoding is not copied whole once more; the pledged size
        // puts it in the frame header, which decoders use to size their buffer.
        let mut z = zstd::stream::Encoder::new(bytes, 3).expect("zstd encoder");
        z.set_pledged_src_size(Some(len as u64)).expect("zstd pledge");
        z.include_contentsize(true).expect("zstd content size");
        for part in [&head[..], &self.packs, &tail] {
            z.write_all(part).expect("writing to memory");
        }
        let bytes = z.finish().expect("zstd finishes");
        (Id::of(&bytes), bytes)
    }
}

/// The packs of an encoded segment, decoded one at a time.
pub struct SegmentReader {
    body: Vec<u8>,
    at: usize,
    left: usize,
    object: String,
}

impl SegmentReader {
    pub fn open(bytes: &[u8], object: &str) -> Result<SegmentReader> {
        let body = unzstd(check_header(bytes, MAGIC, object)?, MAX_DECODED, object)?;
        let mut r = SegmentReader { body, at: 0, left: 0, object: object.to_string() };
        r.left = r.decode_next()?;
        Ok(r)
    }

    fn decode_next<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let (value, rest) = postcard::take_from_bytes(&self.body[self.at..])
            .map_err(|e| Error::corrupt(&self.object, format!("postcard: {e}")))?;
        self.at = self.body.len() - rest.len();
        Ok(value)
    }

    pub fn next_pack(&mut self) -> Result<Option<IndexedPack>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.decode_next().map(Some)
    }

    /// What the segment supersedes; only after every pack was taken.
    pub fn supersedes(mut self) -> Result<Vec<Id>> {
        if self.left != 0 {
            return Err(Error::corrupt(&self.object, "supersedes read before the packs"));
        }
        let ids = self.decode_next()?;
        if self.at != self.body.len() {
            return Err(Error::corrupt(&self.object, "trailing bytes after the segment"));
        }
        Ok(ids)
    }
}

impl Iterator for SegmentReader {
    type Item = Result<IndexedPack>;

    fn next(&mut self) -> Option<Result<IndexedPack>> {
        self.next_pack().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::Codec;

    fn pack(name: &[u8], chunks: usize) -> IndexedPack {
        IndexedPack {
            id: Id::of(name),
            kind: PackKind::Meta,
            len: 99,
            chunks: (0..chunks)
                .map(|i| PackEntry {
                    id: Id::of(&[name, &i.to_le_bytes()].concat()),
                    offset: 8 + i as u32,
                    stored_len: 3,
                    raw_len: 5,
                    codec: Codec::Zstd,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let seg = IndexSegment { packs: vec![pack(b"p", 1)], supersedes: vec![Id::of(b"old")] };
        let (id, bytes) = seg.encode();
        assert_eq!(id, Id::of(&bytes));
        assert_eq!(IndexSegment::decode(&bytes, "i").unwrap(), seg);
        assert!(IndexSegment::decode(&bytes[..bytes.len() - 1], "i").is_err());
        assert!(IndexSegment::decode(b"CRNI\x02abc", "i").is_err());
    }

    /// The writer lays out exactly what postcard makes of the whole struct, so segments
    /// written before it existed (one `to_stdvec`) and after read the same.
    #[test]
    fn the_writer_encodes_what_the_struct_encodes() {
        for n in [0usize, 1, 3, 200] {
            let seg = IndexSegment {
                packs: (0..n).map(|i| pack(&i.to_le_bytes(), i % 7)).collect(),
                supersedes: (0..n % 3).map(|i| Id::of(&[i as u8])).collect(),
            };
            let (_, bytes) = seg.encode();
            let body = unzstd(check_header(&bytes, MAGIC, "i").unwrap(), MAX_DECODED, "i").unwrap();
            assert_eq!(body, postcard::to_stdvec(&seg).unwrap(), "{n} packs");
            let legacy = super::super::with_header(MAGIC, &zstd::bulk::compress(&body, 3).unwrap());
            assert_eq!(IndexSegment::decode(&legacy, "i").unwrap(), seg);
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&bytes[5..]).ok().flatten(),
                Some(body.len() as u64)
            );
        }
    }

    #[test]
    fn the_reader_refuses_trailing_bytes_and_an_early_supersedes() {
        let seg = IndexSegment { packs: vec![pack(b"a", 2), pack(b"b", 1)], supersedes: vec![] };
        let mut body = postcard::to_stdvec(&seg).unwrap();
        body.push(0);
        let bytes = super::super::with_header(MAGIC, &zstd::bulk::compress(&body, 3).unwrap());
        assert!(IndexSegment::decode(&bytes, "i").is_err());
        let (_, good) = seg.encode();
        let mut r = SegmentReader::open(&good, "i").unwrap();
        assert_eq!(r.next_pack().unwrap(), Some(pack(b"a", 2)));
        assert!(r.supersedes().is_err());
    }
}
