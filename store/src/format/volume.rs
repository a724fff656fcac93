//! `volumes/<name>`: a volume's head, the one mutable object of a volume.
//!
//! JSON, moved only by conditional writes: created with `PutMode::Create`, advanced with
//! `PutMode::Update` (If-Match the ETag the writer read). Two hosts committing on the same
//! head race on that update; exactly one wins. The head lists the newest [`HISTORY_KEPT`]
//! versions, so `volume history` and `volume rollback` need one GET; older versions stay
//! ordinary snapshots, found by their tags.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;

pub const PREFIX: &str = "volumes/";

/// The snapshot tag that names a snapshot's volume; retention groups volume snapshots by it.
pub const TAG: &str = "volume";
/// The snapshot tag holding the version number a snapshot became.
pub const VERSION_TAG: &str = "volume.version";
/// The snapshot tag holding the volume's [`Head::id`]: a name deleted and created again is
/// another volume.
pub const ID_TAG: &str = "volume.id";

/// How many versions a head lists. The head is read and written on every commit, so it must
/// not grow with a volume's age: a sandbox committing every minute makes 43,200 versions a
/// month. Older versions remain snapshots tagged with the volume's id and version.
pub const HISTORY_KEPT: usize = 1000;

pub fn object_name(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// A volume name: 1–128 of `[A-Za-z0-9._-]`, not starting with `.` or `-`, so it is a
/// safe object name, a safe file name and never mistaken for a flag.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 128 {
        return Err(format!("volume name {name:?} must be 1 to 128 characters"));
    }
    if name.starts_with(['.', '-']) || !name.chars().all(ok_char) {
        return Err(format!(
            "volume name {name:?} may only hold letters, digits, '.', '_' and '-', and may not start with '.' or '-'"
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub format: u32,
    pub name: String,
    /// Random, chosen at create: tells this volume from an earlier one of the same name.
    pub id: String,
    /// The newest version; equal to the last entry of `history`.
    pub version: u64,
    pub snapshot: Id,
    /// The newest versions (at most [`HISTORY_KEPT`]), oldest first.
    pub history: Vec<Version>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: u64,
    pub snapshot: Id,
    /// RFC 3339, when the head moved to this version.
    pub time: String,
    pub host: String,
    /// How the version was made: "create", "push", "commit", "rollback to N".
    pub how: String,
    /// For a commit of a writable mount: the snapshot its lower layer shows. Forget keeps the
    /// base of the head's version, so the mount that made it keeps reading and committing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Id>,
    /// For a commit of a writable mount: the id of the state directory that made it, so a
    /// commit whose reply was lost can be recognised as its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl Head {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("volume head serializes")
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<Head> {
        let head: Head = serde_json::from_slice(bytes).map_err(|e| Error::corrupt(object, e))?;
        if head.format != 1 {
            return Err(Error::corrupt(object, format!("unsupported format {}", head.format)));
        }
        check_name(&head.name).map_err(|e| Error::corrupt(object, e))?;
        if head.id.is_empty() || head.id.len() > 64 || !head.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::corrupt(object, "volume id must be 1 to 64 letters or digits"));
        }
        if object.strip_prefix(PREFIX).is_some_and(|n| n != head.name) {
            return Err(Error::corrupt(object, format!("holds the head of volume {:?}", head.name)));
        }
        let Some(last) = head.history.last() else {
            return Err(Error::corrupt(object, "empty history"));
        };
        if last.version != head.version || last.snapshot != head.snapshot {
            return Err(Error::corrupt(object, "head does not match the last history entry"));
        }
        if head.history.windows(2).any(|w| w[1].version <= w[0].version) {
            return Err(Error::corrupt(object, "history versions do not increase"));
        }
        for v in &head.history {
            humantime::parse_rfc3339(&v.time)
                .map_err(|e| Error::corrupt(object, format!("version {}: time: {e}", v.version)))?;
        }
        Ok(head)
    }

    pub fn find(&self, version: u64) -> Option<&Version> {
        self.history.iter().find(|v| v.version == version)
    }

    /// Make `v` the newest version, dropping the oldest entries beyond [`HISTORY_KEPT`].
    pub fn record(&mut self, v: Version) {
        self.version = v.version;
        self.snapshot = v.snapshot;
        self.history.push(v);
        let over = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..over);
    }

    /// The oldest version the head still lists.
    pub fn first_listed(&self) -> u64 {
        self.history.first().map_or(self.version, |v| v.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        let v = |n: u64, b: u8| Version {
            version: n,
            snapshot: Id::of(&[b]),
            time: "2026-11-29T00:00:00Z".into(),
            host: "h".into(),
            how: "push".into(),
            base: None,
            writer: None,
        };
        Head {
            format: 1,
            name: "data".into(),
            id: "abc123".into(),
            version: 2,
            snapshot: Id::of(&[2]),
            history: vec![v(1, 1), v(2, 2)],
        }
    }

    #[test]
    fn round_trip() {
        let h = head();
        assert_eq!(Head::decode(&h.encode(), "volumes/data").unwrap(), h);
    }

    #[test]
    fn refuses_inconsistent_heads() {
        let mut h = head();
        h.version = 3;
        assert!(Head::decode(&h.encode(), "volumes/data").is_err());
        let mut h = head();
        h.history.swap(0, 1);
        h.version = 1;
        h.snapshot = Id::of(&[1]);
        assert!(Head::decode(&h.encode(), "volumes/data").is_err());
        assert!(Head::decode(&head().encode(), "volumes/other").is_err());
        let mut h = head();
        h.history.clear();
        assert!(Head::decode(&h.encode(), "volumes/data").is_err());
    }

    #[test]
    fn history_keeps_the_newest_versions() {
        let mut h = head();
        let first = h.history[0].clone();
        for n in 3..=(HISTORY_KEPT as u64 + 10) {
            h.record(Version { version: n, snapshot: Id::of(&n.to_le_bytes()), ..first.clone() });
        }
        assert_eq!(h.history.len(), HISTORY_KEPT);
        assert_eq!(h.version, HISTORY_KEPT as u64 + 10);
        assert_eq!(h.snapshot, Id::of(&h.version.to_le_bytes()));
        assert_eq!(h.first_listed(), 11);
        assert!(h.find(10).is_none() && h.find(11).is_some());
        assert_eq!(Head::decode(&h.encode(), "volumes/data").unwrap(), h);
    }

    #[test]
    fn names() {
        for ok in ["data", "a.b_c-1", "X"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
