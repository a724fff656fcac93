//! The on-bucket format: every object a repository holds, its name and its encoding.
//! `docs/format.md` is the prose version of this module; the two must agree.
//!
//! Objects and their names:
//! - `config` — [`config::Config`], JSON, written once by `init` with a conditional create.
//! - `packs/<xx>/<pack id>` — [`pack`]: compressed chunks followed by their own chunk table.
//! - `index/<segment id>` — [`index::IndexSegment`]: which pack holds which chunk; immutable.
//! - `snapshots/<snapshot id>` — [`snapshot::Snapshot`], JSON: the only commit point of a push.
//! - `volumes/<name>` — [`volume::Head`], JSON: a volume's head and history, moved by conditional writes.
//! - `traces/<snapshot id>` — [`trace::Trace`]: chunks a mount touched, in order; a prefetch hint.
//!
//! Metadata (directory pages, chunk lists) are chunks too, encoded by [`tree`] and kept in
//! metadata packs apart from file data.

pub mod config;
pub mod index;
pub mod lease;
pub mod pack;
pub mod snapshot;
pub mod trace;
pub mod tree;
pub mod volume;

use crate::error::{Error, Result};

/// Every hand-laid or postcard object starts with a 4-byte magic and a version byte, so a
/// reader can say what it was handed before it parses a byte of it.
pub(crate) fn check_header<'a>(bytes: &'a [u8], magic: &[u8; 4], object: &str) -> Result<&'a [u8]> {
    if bytes.len() < 5 || &bytes[..4] != magic {
        return Err(Error::corrupt(
            object,
            format!("bad magic (expected {:?})", String::from_utf8_lossy(magic)),
        ));
    }
    if bytes[4] != 1 {
        return Err(Error::corrupt(object, format!("unsupported version {}", bytes[4])));
    }
    Ok(&bytes[5..])
}

pub(crate) fn with_header(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend_from_slice(magic);
    out.push(1);
    out.extend_from_slice(body);
    out
}

/// Decompress a zstd frame without trusting its size claims beyond `limit`.
pub(crate) fn unzstd(bytes: &[u8], limit: usize, object: &str) -> Result<Vec<u8>> {
    zstd::bulk::decompress(bytes, limit).map_err(|e| Error::corrupt(object, format!("zstd: {e}")))
}
