//! [`LiveSet`]: the chunks marked live, in 8 to 12 bytes each.
//!
//! Chunk ids are kept as their first 64 bits in a vector that is sorted and deduplicated
//! when it has grown enough (duplicates come from snapshots sharing data) and before it is
//! asked. The set may only err one way: a dead chunk whose first 64 bits equal a live
//! chunk's is kept alive (and its pack with it) — about a 1-in-200,000 chance that any such
//! pair exists among 10^7 live and 10^7 dead chunks, and then one dead chunk is not freed.
//! A live chunk is never reported dead. The ids of directory trees and chunk lists are few
//! and kept whole as well, so what snapshots share is walked once.

use std::collections::HashSet;

use cairn_store::Id;

#[derive(Default)]
pub struct LiveSet {
    ids: Vec<u64>,
    sorted: usize,
    walked: HashSet<Id>,
    directory: Option<Directory>,
}

fn key(id: &Id) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

impl LiveSet {
    /// A set with room for `chunks` marks: sized from the index, it need never grow (a live
    /// chunk is an indexed one), so it stays at 8 bytes per indexed chunk.
    pub fn with_capacity(chunks: usize) -> LiveSet {
        LiveSet { ids: Vec::with_capacity(chunks), ..Default::default() }
    }

    /// Room for `more` marks than there is now (chunks indexed since the set was made).
    pub fn reserve(&mut self, more: usize) {
        self.ids.reserve_exact(more);
    }

    /// Mark a chunk (data, chunk list or tree page).
    pub fn insert(&mut self, id: &Id) {
        if self.ids.len() == self.ids.capacity() {
            // Deduplicate before growing, and grow by half rather than double: the set stays
            // within about 12 bytes per distinct chunk at its peak.
            self.seal();
            let room = (self.ids.len() / 2).max(1 << 16);
            self.ids.reserve_exact(room);
        }
        self.ids.push(key(id));
    }

    /// Mark a directory tree or chunk list; false if it was marked this way before (what it
    /// names is already marked, or about to be).
    pub fn insert_walked(&mut self, id: &Id) -> bool {
        self.insert(id);
        self.walked.insert(*id)
    }

    /// Sort and deduplicate; [`LiveSet::contains`] answers for what was inserted before this.
    pub fn seal(&mut self) {
        self.ids.sort_unstable();
        self.ids.dedup();
        self.sorted = self.ids.len();
        self.directory = None;
    }

    /// Seal, and prepare for many [`LiveSet::contains`] calls.
    pub fn seal_for_lookups(&mut self) {
        self.seal();
        assert!(self.ids.len() < u32::MAX as usize, "more than 4G live chunks");
        self.directory = Some(Directory::build(&self.ids));
    }

    pub fn contains(&self, id: &Id) -> bool {
        debug_assert_eq!(self.sorted, self.ids.len(), "seal() before contains()");
        match &self.directory {
            Some(d) => d.contains(&self.ids[..self.sorted], key(id)),
            None => self.ids[..self.sorted].binary_search(&key(id)).is_ok(),
        }
    }

    pub fn len(&self) -> usize {
        self.sorted
    }

    pub fn is_empty(&self) -> bool {
        self.sorted == 0
    }
}

/// Where each run of keys sharing their top bits starts in the sorted keys: about 16 keys per
/// run, so a lookup reads its run's bounds and one or two cache lines, instead of a binary
/// search's 20-odd scattered reads over millions of keys (each a cache miss; that was most of
/// a 10M-chunk gc's time). Costs 4 bytes per 16 keys. Keys are hash prefixes, spread evenly;
/// uneven keys only make runs longer.
struct Directory {
    shift: u32,
    starts: Vec<u32>,
}

impl Directory {
    fn build(ids: &[u64]) -> Directory {
        let bits = (ids.len() / 16).max(2).ilog2();
        let shift = 64 - bits;
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        let mut at = 0;
        for run in 0..1u64 << bits {
            while at < ids.len() && ids[at] >> shift < run {
                at += 1;
            }
            starts.push(at as u32);
        }
        starts.push(ids.len() as u32);
        Directory { shift, starts }
    }

    fn contains(&self, ids: &[u64], key: u64) -> bool {
        let run = (key >> self.shift) as usize;
        let range = self.starts[run] as usize..self.starts[run + 1] as usize;
        ids[range].binary_search(&key).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_compaction_and_duplicates_collapse() {
        let mut s = LiveSet::default();
        let ids: Vec<Id> = (0..3000u32).map(|i| Id::of(&i.to_le_bytes())).collect();
        for _ in 0..3 {
            for id in &ids {
                s.insert(id);
            }
        }
        s.seal();
        assert_eq!(s.len(), 3000);
        assert!(ids.iter().all(|id| s.contains(id)));
        assert!(!s.contains(&Id::of(b"never")));
        assert!(s.insert_walked(&ids[0]));
        assert!(!s.insert_walked(&ids[0]));
    }

    #[test]
    fn small_sets_have_a_directory_too() {
        for n in 0..70u64 {
            let keys: Vec<u64> = (0..n).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            let dir = Directory::build(&sorted);
            assert!(keys.iter().all(|k| dir.contains(&sorted, *k)));
            assert!(!dir.contains(&sorted, 12345) || sorted.contains(&12345));
        }
    }

    proptest::proptest! {
        /// The directory answers as a binary search does, for even and uneven keys.
        #[test]
        fn the_search_agrees_with_a_binary_search(
            mut keys in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..2000),
            clustered in proptest::collection::vec(0u64..64, 0..100),
            probes in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..50),
        ) {
            keys.extend(clustered.iter().map(|k| u64::MAX - k));
            keys.extend(clustered);
            keys.sort_unstable();
            keys.dedup();
            let edge = [0, 1, u64::MAX, u64::MAX - 1, u64::MAX / 2];
            let dir = Directory::build(&keys);
            for k in keys.iter().chain(&probes).chain(&edge) {
                proptest::prop_assert_eq!(dir.contains(&keys, *k), keys.binary_search(k).is_ok(), "{}", k);
            }
        }
    }
}
