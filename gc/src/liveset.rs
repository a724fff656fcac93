//! [`LiveSet`]: the chunks marked live, in 8 to 12 bytes each.
//!
//! Chunk ids are kept as their first 64 bits in a vector that is sorted and deduplicated
//! when it has grown enough (duplicates come from snapshots sharing data) and before it is
//! asked. The set may only err one way: a dead chunk whose first 64 bits equal a live
//! chunk's is kept alive (and its pack with it) — about a 1-in-200,000 chance that any such
//! pair exists among 10^7 live and 10^7 dead chunks, and then one dead chunk is not freed.
//! A live chunk is never reported dead. Tree ids are few and kept whole, so shared subtrees
//! are walked once.

use std::collections::HashSet;

use cairn_store::Id;

#[derive(Default)]
pub struct LiveSet {
    ids: Vec<u64>,
    sorted: usize,
    trees: HashSet<Id>,
}

fn key(id: &Id) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

impl LiveSet {
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

    /// Mark a directory tree; false if it was marked before (its subtree is already done).
    pub fn insert_tree(&mut self, id: &Id) -> bool {
        self.insert(id);
        self.trees.insert(*id)
    }

    /// Sort and deduplicate; [`LiveSet::contains`] answers for what was inserted before this.
    pub fn seal(&mut self) {
        self.ids.sort_unstable();
        self.ids.dedup();
        self.sorted = self.ids.len();
    }

    pub fn contains(&self, id: &Id) -> bool {
        debug_assert_eq!(self.sorted, self.ids.len(), "seal() before contains()");
        self.ids[..self.sorted].binary_search(&key(id)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.sorted
    }

    pub fn is_empty(&self) -> bool {
        self.sorted == 0
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
        assert!(s.insert_tree(&ids[0]));
        assert!(!s.insert_tree(&ids[0]));
    }
}
