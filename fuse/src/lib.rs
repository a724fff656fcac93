//! Lazy FUSE mounts of Cairn snapshots (issue: "Lazy FUSE mount of snapshots").
//!
//! Not built yet: this crate only fixes its place in the workspace (it depends on
//! `cairn-store` alone). Nothing in the CLI calls it.
