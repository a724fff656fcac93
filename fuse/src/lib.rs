//! Lazy, read-only FUSE mounts of Cairn snapshots, over a host-wide chunk cache.
//!
//! Map of the crate:
//! - [`mount`] — [`mount::mount`]: a snapshot on a mountpoint; background prefetch; unmount.
//! - [`rw`] — [`rw::mount_rw`]: writable volume mounts (overlayfs over a lazy mount); commit.
//! - [`fs`] — [`fs::SnapshotFs`], the `fuser` filesystem: inodes on demand, answers from tasks.
//! - [`fetch`] — [`fetch::Fetcher`]: memory → host cache → joined fetch → coalesced range reads.
//! - [`prime`] — [`prime::Primer`]: listed small files pushed into the page cache when local.
//! - [`cache`] — [`cache::ChunkCache`]: content-addressed files, hard byte cap, LRU in RocksDB.
//! - [`stats`] — [`stats::MountStats`]: counters and read latency of one mount, as JSON.
//!
//! The mount depends on `cairn-store` only: it reads the format through
//! [`cairn_store::Repository`] and verifies every chunk against its BLAKE3.

pub mod cache;
pub mod fetch;
pub mod fs;
pub mod mount;
mod mountinfo;
pub mod prime;
pub mod rw;
pub mod stats;

pub use cache::{CacheConfig, ChunkCache};
pub use mount::{mount, unmount, MountError, MountOptions, MountedSnapshot, PrefetchTrace};
pub use stats::StatsReport;
