//! Cairn's core: a content-addressed snapshot store on any `object_store` bucket.
//!
//! Map of the crate:
//! - [`id`] — [`Id`], the BLAKE3 name of every chunk, tree and pack.
//! - [`format`] — the on-bucket format: config, packs, index segments, trees, snapshot roots.
//! - [`backend`] — opening a store by URL; [`backend::CountingStore`] counts requests.
//! - [`repo`] — [`Repository`]: verified reads of chunks, trees and snapshots.
//! - [`cas`] — [`cas::LocalCas`]: compare-and-swap writes for local-directory repositories.
//! - [`direct`] — [`direct::DirectLocal`]: durable local writes; packs skip the page cache.
//! - [`cache`] — the local RocksDB cache (chunk index, file-change cache); rebuildable.
//! - [`lease`] — [`lease::WriterLease`]: a push's part in the GC protocol (docs/gc.md).
//! - [`push`] — directory or memory image → packs → index segment → snapshot root.
//! - [`restore`] — snapshot → directory, exact and confined to the target.
//! - [`volume`] — named, versioned heads over snapshots, moved by conditional writes.
//! - [`commands`] — the other user commands (ls, cat, diff, stats, check) as functions.
//! - [`error`] — [`Error`], one typed error naming the object or path at fault.

#[macro_use]
mod forward;

pub mod backend;
pub mod cache;
pub mod cas;
pub mod commands;
pub mod direct;
pub mod error;
pub mod format;
pub mod id;
pub mod lease;
pub mod push;
pub mod repo;
pub mod restore;
mod sys;
pub mod volume;

pub use error::{Error, Result};
pub use format::snapshot::{Kind, Snapshot};
pub use id::{ChunkId, Id, PackId};
pub use repo::Repository;
