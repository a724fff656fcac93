//! Expiry and garbage collection (issue: "Expiry and garbage collection").
//!
//! Not built yet: this crate only fixes its place in the workspace (it depends on
//! `cairn-store` alone). Nothing in the CLI calls it.
