//! Expiry, retention and garbage collection of a Cairn repository.
//!
//! Map of the crate:
//! - [`retention`] — [`retention::Policy`] and [`retention::decide`]: which snapshots stay, and why.
//! - [`forget`] — [`forget::forget`]: delete the roots (and traces) of expired or unkept snapshots.
//! - [`sweep`] — [`sweep::gc`]: delete packs nothing committed needs, safely alongside writers
//!   on other hosts (the protocol is in `docs/gc.md`).
//! - [`mark`] — [`mark::mark`]: every chunk a snapshot references, read from the bucket
//!   with [`mark::MetaIndex`] (where the tree pages and chunk lists are) instead of a local index.
//! - [`liveset`] — [`liveset::LiveSet`]: the marked chunks, in 8 to 12 bytes each.

pub mod forget;
pub mod liveset;
pub mod mark;
pub mod retention;
pub mod sweep;

pub use forget::{forget, ForgetOptions, ForgetReport};
pub use retention::{Decision, Policy};
pub use sweep::{gc, GcOptions, GcProgress, GcReport};
