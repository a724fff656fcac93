//! The library's one error type. Every variant names the object or path it is about, so the
//! CLI can print a message an operator can act on without a backtrace.

use std::path::PathBuf;

use crate::id::Id;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object store error on {object}: {source}")]
    Store { object: String, source: object_store::Error },

    #[error("{object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },

    #[error("{0} not found in the repository")]
    NotFound(String),

    #[error("chunk {0} is referenced but no pack in the index holds it")]
    MissingChunk(Id),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("local cache: {0}")]
    Cache(#[from] rocksdb::Error),

    #[error("a repository already exists at {0}")]
    AlreadyInitialized(String),

    #[error("no repository at {0} (run `cairn init` first)")]
    NotARepository(String),

    #[error("{0}")]
    Usage(String),

    #[error("refusing to restore {name:?} in {dir}: {reason}")]
    UnsafePath { dir: PathBuf, name: String, reason: &'static str },

    #[error("conflict: {0}")]
    Conflict(String),

    #[error("{failed} entries could not be restored:\n{report}")]
    Incomplete { failed: usize, report: String },

    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn corrupt(object: impl Into<String>, reason: impl std::fmt::Display) -> Error {
        Error::Corrupt { object: object.into(), reason: reason.to_string() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    pub fn store(object: impl Into<String>, source: object_store::Error) -> Error {
        match source {
            object_store::Error::NotFound { .. } => Error::NotFound(object.into()),
            source => Error::Store { object: object.into(), source },
        }
    }
}

/// Attach a path to an `io::Error`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, std::io::Error::from(e)))
    }
}
