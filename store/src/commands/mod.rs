//! One library function per user command; the CLI only parses arguments and prints.
//! `push` and `restore` live in their own modules at the crate root.

pub mod check;
pub mod diff;
pub mod inspect;

pub use check::{check, CheckReport, Damage};
pub use diff::{diff, Change, DiffEntry};
pub use inspect::{cat, ls, repo_stats, LsEntry, RepoStats};
