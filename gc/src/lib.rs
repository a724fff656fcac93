//! Expiry, retention and (coming) garbage collection of a Cairn repository.
//!
//! Map of the crate:
//! - [`retention`] — [`retention::Policy`] and [`retention::decide`]: which snapshots stay, and why.
//! - [`forget`] — [`forget::forget`]: delete the roots (and traces) of expired or unkept snapshots.
//!
//! Not built yet: `gc` itself (marking, condemning and deleting packs under writer leases);
//! see the issue "Expiry and garbage collection". Forgetting only deletes roots, so it is safe
//! with concurrent writers on its own.

pub mod forget;
pub mod retention;

pub use forget::{forget, ForgetOptions, ForgetReport};
pub use retention::{Decision, Policy};
