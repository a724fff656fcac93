//! Packs: many compressed chunks in one object, followed by the pack's own chunk table, so the
//! index can always be rebuilt from packs alone and one chunk is one range read.
//!
//! ```text
//! "CRNP" 0x01 kind:u8 0 0          8-byte header
//! chunk bytes ...                  each zstd-compressed on its own (or raw, see `Codec`)
//! table: count × 46-byte entries   id[32] offset:u32 stored_len:u32 raw_len:u32 codec:u8 0
//! footer (32 bytes):               count:u32 table_digest[16] kind:u8 1 0 0 "CRNPEND!"
//! ```
//! All integers little-endian. `table_digest` is the first 16 bytes of BLAKE3(table), so a
//! truncated or damaged table is caught before any entry is trusted.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::id::{ChunkId, Id, PackId};

pub const HEADER_LEN: usize = 8;
pub const ENTRY_LEN: usize = 46;
pub const FOOTER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"CRNP";
const END_MAGIC: &[u8; 8] = b"CRNPEND!";
/// Packs stay far below this so every offset fits in a u32.
pub const MAX_PACK: usize = u32::MAX as usize / 2;

/// What a pack holds. Metadata is kept apart so a mount fetches directories without file data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PackKind {
    Data = 0,
    Meta = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// One chunk's place in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

impl PackEntry {
    /// Where the chunk's stored bytes lie in its pack; computed in u64, since a crafted
    /// entry's offset + length can pass u32 (decoding checks it lies inside the pack).
    pub fn stored_range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset as u64 + self.stored_len as u64) as usize
    }
}

pub fn object_name(id: &PackId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{}", &hex[..2], hex)
}

/// Assembles one pack in memory.
pub struct PackBuilder {
    kind: PackKind,
    buf: BytesMut,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to upload.
pub struct FinishedPack {
    pub id: PackId,
    pub kind: PackKind,
    pub bytes: Bytes,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(kind: PackKind, capacity: usize) -> PackBuilder {
        let mut buf = BytesMut::with_capacity(capacity + capacity / 8);
        buf.put_slice(MAGIC);
        buf.put_u8(1);
        buf.put_u8(kind as u8);
        buf.put_u16(0);
        PackBuilder { kind, buf, entries: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn add(&mut self, id: ChunkId, raw_len: u32, codec: Codec, stored: &[u8]) {
        let offset = self.buf.len() as u32;
        self.buf.put_slice(stored);
        self.entries.push(PackEntry { id, offset, stored_len: stored.len() as u32, raw_len, codec });
    }

    pub fn finish(self) -> FinishedPack {
        self.finish_avoiding(&HashSet::new())
    }

    /// Finish with an id outside `avoid`. A pack is named by its bytes, so a writer storing
    /// the same chunks in the same order as a pack GC has condemned would upload that very
    /// object again, and GC would then delete it under the writer's snapshot. The footer's
    /// salt makes the bytes, and so the id, differ.
    pub fn finish_avoiding(self, avoid: &HashSet<PackId>) -> FinishedPack {
        let PackBuilder { kind, mut buf, entries } = self;
        let table_start = buf.len();
        for e in &entries {
            buf.put_slice(&e.id.0);
            buf.put_u32_le(e.offset);
            buf.put_u32_le(e.stored_len);
            buf.put_u32_le(e.raw_len);
            buf.put_u8(e.codec as u8);
            buf.put_u8(0);
        }
        let digest = blake3::hash(&buf[table_start..]);
        buf.put_u32_le(entries.len() as u32);
        buf.put_slice(&digest.as_bytes()[..16]);
        buf.put_slice(&[kind as u8, 1, 0, 0]);
        buf.put_slice(END_MAGIC);
        let salt_at = buf.len() - END_MAGIC.len() - 2;
        let mut id = Id::of(&buf);
        let mut salt = 0u16;
        while avoid.contains(&id) && salt < u16::MAX {
            salt += 1;
            buf[salt_at..salt_at + 2].copy_from_slice(&salt.to_le_bytes());
            id = Id::of(&buf);
        }
        FinishedPack { id, kind, bytes: buf.freeze(), entries }
    }
}

/// The parsed footer: where the table is and how long.
#[derive(Clone, Copy, Debug)]
pub struct Footer {
    pub kind: PackKind,
    pub count: u32,
    digest: [u8; 16],
}

impl Footer {
    pub fn decode(footer: &[u8], object: &str) -> Result<Footer> {
        if footer.len() != FOOTER_LEN || &footer[24..32] != END_MAGIC {
            return Err(Error::corrupt(object, "pack footer missing (truncated pack?)"));
        }
        let count = u32::from_le_bytes(footer[0..4].try_into().expect("4 bytes"));
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&footer[4..20]);
        let kind = match footer[20] {
            0 => PackKind::Data,
            1 => PackKind::Meta,
            k => return Err(Error::corrupt(object, format!("unknown pack kind {k}"))),
        };
        if footer[21] != 1 {
            return Err(Error::corrupt(object, format!("unsupported pack version {}", footer[21])));
        }
        Ok(Footer { kind, count, digest })
    }

    /// Byte range of the table in a pack of `pack_len` bytes.
    pub fn table_range(&self, pack_len: u64, object: &str) -> Result<std::ops::Range<u64>> {
        let table_len = self.count as u64 * ENTRY_LEN as u64;
        let end = pack_len.checked_sub(FOOTER_LEN as u64);
        match end.and_then(|end| end.checked_sub(table_len).map(|start| start..end)) {
            Some(r) if r.start >= HEADER_LEN as u64 => Ok(r),
            _ => Err(Error::corrupt(object, "pack table does not fit in the pack")),
        }
    }

    /// Parse and check the table; every entry must lie between header and table.
    pub fn decode_table(&self, table: &[u8], table_start: u64, object: &str) -> Result<Vec<PackEntry>> {
        if table.len() as u64 != self.count as u64 * ENTRY_LEN as u64 {
            return Err(Error::corrupt(object, "pack table has the wrong length"));
        }
        if blake3::hash(table).as_bytes()[..16] != self.digest {
            return Err(Error::corrupt(object, "pack table digest mismatch"));
        }
        table
            .chunks_exact(ENTRY_LEN)
            .map(|raw| {
                let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
                let mut id = [0u8; 32];
                id.copy_from_slice(&raw[..32]);
                let e = PackEntry {
                    id: Id(id),
                    offset: u32_at(32),
                    stored_len: u32_at(36),
                    raw_len: u32_at(40),
                    codec: match raw[44] {
                        0 => Codec::Raw,
                        1 => Codec::Zstd,
                        c => return Err(Error::corrupt(object, format!("unknown codec {c}"))),
                    },
                };
                let end = e.offset as u64 + e.stored_len as u64;
                if (e.offset as usize) < HEADER_LEN || end > table_start {
                    return Err(Error::corrupt(object, format!("chunk {} lies outside the pack body", e.id)));
                }
                Ok(e)
            })
            .collect()
    }
}

/// Parse a whole pack held in memory: footer, then table.
pub fn decode_table_of(pack: &[u8], object: &str) -> Result<(PackKind, Vec<PackEntry>)> {
    if pack.len() < HEADER_LEN + FOOTER_LEN || &pack[..4] != MAGIC {
        return Err(Error::corrupt(object, "not a pack (bad header)"));
    }
    let footer = Footer::decode(&pack[pack.len() - FOOTER_LEN..], object)?;
    let range = footer.table_range(pack.len() as u64, object)?;
    let table = &pack[range.start as usize..range.end as usize];
    Ok((footer.kind, footer.decode_table(table, range.start, object)?))
}

/// Turn stored chunk bytes back into the chunk and prove they are the chunk `entry` names.
pub fn open_chunk(entry: &PackEntry, stored: &[u8], object: &str) -> Result<Vec<u8>> {
    if stored.len() != entry.stored_len as usize {
        return Err(Error::corrupt(object, format!("chunk {} is truncated", entry.id)));
    }
    let raw = match entry.codec {
        Codec::Raw => stored.to_vec(),
        Codec::Zstd => decompress(stored, entry.raw_len as usize)
            .map_err(|e| Error::corrupt(object, format!("chunk {}: zstd: {e}", entry.id)))?,
    };
    if raw.len() != entry.raw_len as usize || Id::of(&raw) != entry.id {
        return Err(Error::corrupt(object, format!("chunk {} fails its BLAKE3 check", entry.id)));
    }
    Ok(raw)
}

/// Decompress with one reused context per thread (a new one per chunk costs ~1% of a restore).
fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("set above").decompress(stored, capacity)
    })
}

/// Compress a chunk unless that does not pay.
pub fn seal_chunk(raw: &[u8], level: i32) -> (Codec, Vec<u8>) {
    // One compression context per thread and level: creating one per chunk costs ~5% of a push.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let compressed = COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut().and_then(|(_, c)| c.compress(raw).ok())
    });
    match compressed {
        Some(z) if z.len() < raw.len() - raw.len() / 32 => (Codec::Zstd, z),
        _ => (Codec::Raw, raw.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> PackBuilder {
        let mut b = PackBuilder::new(PackKind::Data, 1 << 16);
        for i in 0..5u8 {
            let raw = vec![i; 1000 + i as usize];
            let (codec, stored) = seal_chunk(&raw, 3);
            b.add(Id::of(&raw), raw.len() as u32, codec, &stored);
        }
        b
    }

    fn sample() -> FinishedPack {
        builder().finish()
    }

    #[test]
    fn a_pack_avoiding_a_condemned_twin_reads_the_same_under_a_new_id() {
        let twin = sample();
        let mut avoid = HashSet::from([twin.id]);
        let salted = builder().finish_avoiding(&avoid);
        assert_ne!(salted.id, twin.id);
        assert_eq!(salted.id, Id::of(&salted.bytes));
        assert_eq!(decode_table_of(&salted.bytes, "p").unwrap(), (PackKind::Data, twin.entries.clone()));
        avoid.insert(salted.id);
        let third = builder().finish_avoiding(&avoid);
        assert!(!avoid.contains(&third.id));
    }

    #[test]
    fn round_trip_and_verify() {
        let p = sample();
        let (kind, entries) = decode_table_of(&p.bytes, "p").unwrap();
        assert_eq!(kind, PackKind::Data);
        assert_eq!(entries, p.entries);
        for (i, e) in entries.iter().enumerate() {
            let stored = &p.bytes[e.stored_range()];
            assert_eq!(open_chunk(e, stored, "p").unwrap(), vec![i as u8; 1000 + i]);
        }
    }

    #[test]
    fn damage_is_caught() {
        let p = sample();
        for cut in [1, 10, FOOTER_LEN, FOOTER_LEN + 3, p.bytes.len() - 2] {
            assert!(decode_table_of(&p.bytes[..p.bytes.len() - cut], "p").is_err(), "cut {cut}");
        }
        let mut bad = p.bytes.to_vec();
        let t = bad.len() - FOOTER_LEN - 10;
        bad[t] ^= 1;
        assert!(decode_table_of(&bad, "p").is_err());
        let e = p.entries[2];
        let mut stored = p.bytes[e.stored_range()].to_vec();
        stored[5] ^= 0x40;
        assert!(open_chunk(&e, &stored, "p").is_err());
    }
}
