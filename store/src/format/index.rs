//! Index segments: `index/<id>`, immutable lists of which pack holds which chunk.
//!
//! A push writes one segment for the packs it uploaded, after they are all stored and before
//! its snapshot root. GC (later) writes compacted segments that name the ones they supersede.
//! Encoding: `"CRNI" 0x01` then zstd frames (one or several, concatenated) of the postcard
//! encoding of [`IndexSegment`]; the id is the BLAKE3 of the whole object.
//!
//! A full segment is about 12 MB decoded. [`SegmentReader`] decompresses as it goes and hands
//! out one pack (or one chunk entry) at a time; [`SegmentWriter`] compresses each pack as it is
//! added. Neither ever holds the decoded segment, which keeps GC's memory to its live set.

use std::io::{BufRead, Cursor, Read, Write};

use bytes::Bytes;

use serde::{Deserialize, Serialize};

use super::check_header;
use super::pack::{PackEntry, PackKind};
use crate::error::{Error, Result};
use crate::id::{Id, PackId};

const MAGIC: &[u8; 4] = b"CRNI";
/// Decoded segments larger than this are refused instead of exhausting memory.
const MAX_DECODED: usize = 512 << 20;
/// Writers split segments so no one segment grows past this many chunks (about 3.4 MB
/// stored): a reader holds one stored segment at a time, and GC's peak memory is its live
/// set plus that.
pub const MAX_CHUNKS_PER_SEGMENT: usize = 100_000;

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
        let (id, parts) = w.finish();
        (id, parts.concat())
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<IndexSegment> {
        let mut r = SegmentReader::open(Bytes::copy_from_slice(bytes), object)?;
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

/// Builds one segment's encoding a pack (or a chunk entry) at a time, compressing as it goes.
/// The postcard layout of [`IndexSegment`] starts with the pack count, known only at the end,
/// so the count, the packs and `supersedes` are three zstd frames, concatenated when stored.
pub struct SegmentWriter {
    packs: zstd::stream::Encoder<'static, Pieces>,
    /// One record's encoding: written whole, since postcard's own writer flushes after each
    /// value, and every zstd flush ends a block.
    scratch: Vec<u8>,
    count: usize,
    chunks: usize,
    entries_left: usize,
    supersedes: Vec<Id>,
}

/// Compressed output in pieces of 256 KiB: no doubling `Vec` with up to half of it spare.
#[derive(Default)]
struct Pieces(Vec<Vec<u8>>);

impl Write for Pieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Large enough to be mmapped (and handed back whole when freed), small enough that the
        // last, partly filled piece wastes little.
        const PIECE: usize = 256 << 10;
        if self.0.last().is_none_or(|p| p.len() == PIECE) {
            self.0.push(Vec::with_capacity(PIECE));
        }
        let last = self.0.last_mut().expect("a piece");
        let n = buf.len().min(PIECE - last.len());
        last.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SegmentWriter {
    pub fn new(supersedes: Vec<Id>) -> SegmentWriter {
        let mut packs = zstd::stream::Encoder::new(Pieces::default(), 3).expect("zstd encoder");
        // Chunk ids are random: a 2 MiB window finds nothing a 128 KiB one misses, and readers
        // then need 128 KiB for it instead of 2 MiB.
        packs.window_log(17).expect("zstd window");
        SegmentWriter { packs, scratch: Vec::new(), count: 0, chunks: 0, entries_left: 0, supersedes }
    }

    pub fn push(&mut self, pack: &IndexedPack) {
        self.begin_pack(&PackHead { id: pack.id, kind: pack.kind, len: pack.len, chunks: pack.chunks.len() });
        pack.chunks.iter().for_each(|e| self.entry(e));
    }

    /// Start a pack; exactly `head.chunks` calls to [`SegmentWriter::entry`] must follow.
    pub fn begin_pack(&mut self, head: &PackHead) {
        assert_eq!(self.entries_left, 0, "the previous pack's entries are missing");
        self.write(&(head.id, head.kind, head.len, head.chunks));
        self.count += 1;
        self.chunks = self.chunks.saturating_add(head.chunks);
        self.entries_left = head.chunks;
    }

    pub fn entry(&mut self, e: &PackEntry) {
        assert!(self.entries_left > 0, "more entries than the pack's head announced");
        self.entries_left -= 1;
        self.write(e);
    }

    fn write(&mut self, value: &impl Serialize) {
        self.scratch.clear();
        self.scratch =
            postcard::to_extend(value, std::mem::take(&mut self.scratch)).expect("index serializes");
        self.packs.write_all(&self.scratch).expect("writing to memory");
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The segment's id and its bytes, in parts to be stored one after the other.
    pub fn finish(self) -> (Id, Vec<Bytes>) {
        assert_eq!(self.entries_left, 0, "the last pack's entries are missing");
        let mut head = MAGIC.to_vec();
        head.push(1);
        let count = postcard::to_stdvec(&self.count).expect("a count serializes");
        head.extend(zstd::bulk::compress(&count, 3).expect("zstd compresses"));
        let packs = self.packs.finish().expect("zstd finishes");
        let tail = postcard::to_stdvec(&self.supersedes).expect("ids serialize");
        let tail = zstd::bulk::compress(&tail, 3).expect("zstd compresses");
        let parts: Vec<Bytes> = std::iter::once(head).chain(packs.0).chain([tail]).map(Bytes::from).collect();
        let mut hash = blake3::Hasher::new();
        parts.iter().for_each(|p| {
            hash.update(p);
        });
        (Id(*hash.finalize().as_bytes()), parts)
    }
}

/// Plain bytes decompressed at a time; the window grows only for a pack larger than this.
const WINDOW: usize = 64 << 10;

/// The packs of an encoded segment, decoded one at a time as its frames are decompressed,
/// from the whole object in memory or from any other source of its bytes (a download as it
/// arrives: see `Repository::visit_segment`).
pub struct SegmentReader<R: BufRead = Cursor<Bytes>> {
    zstd: zstd::stream::read::Decoder<'static, R>,
    window: Vec<u8>,
    at: usize,
    decoded: usize,
    eof: bool,
    /// Packs still to come, and entries of the current pack still to come.
    left: usize,
    entries_left: usize,
    object: String,
}

/// A pack's record without its chunk table (see [`SegmentReader::next_head`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackHead {
    pub id: PackId,
    pub kind: PackKind,
    pub len: u64,
    pub chunks: usize,
}

impl SegmentReader {
    pub fn open(bytes: Bytes, object: &str) -> Result<SegmentReader> {
        SegmentReader::from_source(Cursor::new(bytes), object)
    }
}

impl<R: BufRead> SegmentReader<R> {
    /// A reader over the object's bytes from `source`, header first.
    pub fn from_source(mut source: R, object: &str) -> Result<SegmentReader<R>> {
        let mut head = [0u8; 5];
        source.read_exact(&mut head).map_err(|e| Error::corrupt(object, format!("header: {e}")))?;
        check_header(&head, MAGIC, object)?;
        let mut zstd = zstd::stream::read::Decoder::with_buffer(source)
            .map_err(|e| Error::corrupt(object, format!("zstd: {e}")))?;
        // Our writers use 2 MiB windows at most; refuse frames asking for more than 8 MiB.
        zstd.window_log_max(23).map_err(|e| Error::corrupt(object, format!("zstd: {e}")))?;
        let mut r = SegmentReader {
            zstd,
            window: Vec::new(),
            at: 0,
            decoded: 0,
            eof: false,
            left: 0,
            entries_left: 0,
            object: object.to_string(),
        };
        r.left = r.decode_next()?;
        Ok(r)
    }

    /// Decompress more: at least as much as the window already holds undecoded, so a large
    /// pack costs a few attempts, not one per window.
    fn fill(&mut self) -> Result<()> {
        self.window.drain(..self.at);
        self.at = 0;
        let start = self.window.len();
        self.window.resize(start + start.max(WINDOW), 0);
        let mut end = start;
        while end < self.window.len() {
            match self.zstd.read(&mut self.window[end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::corrupt(&self.object, format!("zstd: {e}"))),
            }
        }
        self.window.truncate(end);
        self.decoded += end - start;
        if self.decoded > MAX_DECODED {
            return Err(Error::corrupt(&self.object, "decodes to more than 512 MiB"));
        }
        Ok(())
    }

    fn decode_next<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        loop {
            match postcard::take_from_bytes(&self.window[self.at..]) {
                Ok((value, rest)) => {
                    self.at = self.window.len() - rest.len();
                    return Ok(value);
                }
                Err(postcard::Error::DeserializeUnexpectedEnd) if !self.eof => self.fill()?,
                Err(e) => return Err(Error::corrupt(&self.object, format!("postcard: {e}"))),
            }
        }
    }

    pub fn next_pack(&mut self) -> Result<Option<IndexedPack>> {
        let Some(head) = self.next_head()? else { return Ok(None) };
        let mut chunks = Vec::with_capacity(head.chunks.min(1 << 16));
        while let Some(e) = self.next_entry()? {
            chunks.push(e);
        }
        Ok(Some(IndexedPack { id: head.id, kind: head.kind, len: head.len, chunks }))
    }

    /// The next pack's record; its entries follow through [`SegmentReader::next_entry`]
    /// (a pack of tiny chunks can list 100,000). Entries not taken are skipped.
    pub fn next_head(&mut self) -> Result<Option<PackHead>> {
        while self.next_entry()?.is_some() {}
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        // Field by field, as postcard lays out an `IndexedPack`.
        let id = self.decode_next()?;
        let kind = self.decode_next()?;
        let len = self.decode_next()?;
        let chunks = self.decode_next()?;
        self.entries_left = chunks;
        Ok(Some(PackHead { id, kind, len, chunks }))
    }

    /// The current pack's next chunk entry.
    pub fn next_entry(&mut self) -> Result<Option<PackEntry>> {
        if self.entries_left == 0 {
            return Ok(None);
        }
        self.entries_left -= 1;
        self.decode_next().map(Some)
    }

    /// The source, positioned after the last frame read (what follows was not read).
    pub fn into_source(self) -> R {
        self.zstd.finish()
    }

    /// What the segment supersedes; only after every pack was taken.
    pub fn supersedes(&mut self) -> Result<Vec<Id>> {
        if self.left != 0 || self.entries_left != 0 {
            return Err(Error::corrupt(&self.object, "supersedes read before the packs"));
        }
        let ids = self.decode_next()?;
        while self.at == self.window.len() && !self.eof {
            self.fill()?;
        }
        if self.at != self.window.len() {
            return Err(Error::corrupt(&self.object, "trailing bytes after the segment"));
        }
        Ok(ids)
    }
}

impl<R: BufRead> Iterator for SegmentReader<R> {
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
            let body = zstd::stream::decode_all(check_header(&bytes, MAGIC, "i").unwrap()).unwrap();
            assert_eq!(body, postcard::to_stdvec(&seg).unwrap(), "{n} packs");
            let legacy = super::super::with_header(MAGIC, &zstd::bulk::compress(&body, 3).unwrap());
            assert_eq!(IndexSegment::decode(&legacy, "i").unwrap(), seg);
            // Hosts still running the one-frame reader (bulk decompression) read it too.
            let old_reader = super::super::unzstd(&bytes[5..], MAX_DECODED, "i").unwrap();
            assert_eq!(old_reader, body);
        }
    }

    /// Entry by entry or pack by pack, across window refills (a pack of 3000 entries is
    /// about 140 KB, twice the window), the reader sees the same packs.
    #[test]
    fn entries_one_at_a_time_match_whole_packs() {
        let seg = IndexSegment {
            packs: vec![pack(b"a", 3000), pack(b"b", 0), pack(b"c", 5), pack(b"d", 2000)],
            supersedes: vec![Id::of(b"s")],
        };
        let (_, bytes) = seg.encode();
        let mut r = SegmentReader::open(Bytes::from(bytes), "i").unwrap();
        let mut got = Vec::new();
        while let Some(head) = r.next_head().unwrap() {
            let mut chunks = Vec::new();
            while let Some(e) = r.next_entry().unwrap() {
                chunks.push(e);
            }
            assert_eq!(chunks.len(), head.chunks);
            got.push(IndexedPack { id: head.id, kind: head.kind, len: head.len, chunks });
        }
        assert_eq!(got, seg.packs);
        assert_eq!(r.supersedes().unwrap(), seg.supersedes);
        // Entries left untaken are skipped.
        let (_, bytes) = seg.encode();
        let mut r = SegmentReader::open(Bytes::from(bytes), "i").unwrap();
        let heads: Vec<PackId> = std::iter::from_fn(|| r.next_head().unwrap()).map(|h| h.id).collect();
        assert_eq!(heads, seg.packs.iter().map(|p| p.id).collect::<Vec<_>>());
        assert_eq!(r.supersedes().unwrap(), seg.supersedes);
    }

    /// Written a record at a time, a segment compresses as well as its whole encoding does
    /// (a flush per record once made every entry a zstd block of its own, 8% over raw).
    #[test]
    fn a_segment_written_record_by_record_compresses_like_a_whole_one() {
        let seg = IndexSegment { packs: vec![pack(b"a", 20_000)], supersedes: vec![] };
        let whole = zstd::bulk::compress(&postcard::to_stdvec(&seg).unwrap(), 3).unwrap().len();
        let (_, bytes) = seg.encode();
        assert!(bytes.len() < whole + whole / 50, "{} against {whole}", bytes.len());
    }

    #[test]
    fn a_truncated_segment_is_refused_wherever_it_is_cut() {
        let seg = IndexSegment { packs: vec![pack(b"a", 3000), pack(b"b", 40)], supersedes: vec![] };
        let (_, bytes) = seg.encode();
        for cut in [5, 6, 20, bytes.len() / 3, bytes.len() / 2, bytes.len() - 2, bytes.len() - 1] {
            assert!(IndexSegment::decode(&bytes[..cut], "i").is_err(), "cut at {cut} of {}", bytes.len());
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
        let mut r = SegmentReader::open(Bytes::from(good), "i").unwrap();
        assert_eq!(r.next_pack().unwrap(), Some(pack(b"a", 2)));
        assert!(r.supersedes().is_err());
    }
}
