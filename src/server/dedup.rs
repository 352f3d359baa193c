//! Duplicate detection by `_unique_id` (oslo's `_MsgIdCache`): the last N ids a service has
//! taken or handled.
//!
//! oslo keeps 16 ids. Under load that is a few milliseconds of traffic, less than it takes a
//! client to reconnect and send again a message whose confirm a cut connection lost, or a
//! server to get back the deliveries whose acks it lost: the copy arrives after its original
//! left the window and is handled twice. warren's default window is
//! [`DEFAULT_WINDOW`] ids, kept as keyed 64-bit hashes so its memory does not depend on how
//! long the ids a peer sends are.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

/// How many recent `_unique_id`s servers and notification listeners remember by default
/// (about 4 s of traffic at 1,000 messages/s; 16 bytes each).
pub(crate) const DEFAULT_WINDOW: usize = 4096;

/// The last `capacity` `_unique_id`s, as hashes under a key chosen per window (a peer cannot
/// make two ids collide on purpose; by chance, one new id in about 4.5 × 10¹⁵ is taken for a
/// duplicate with a full default window).
pub(crate) struct RecentIds {
    /// Hashes in the order they were inserted, to forget the oldest.
    order: VecDeque<u64>,
    /// The same hashes, for lookups.
    ids: HashSet<u64>,
    /// The most ids remembered; 0 remembers none.
    capacity: usize,
    /// The key the ids are hashed with.
    key: RandomState,
}

impl RecentIds {
    pub fn new(capacity: usize) -> RecentIds {
        RecentIds {
            order: VecDeque::new(),
            ids: HashSet::new(),
            capacity,
            key: RandomState::new(),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(&self.key.hash_one(id))
    }

    pub fn insert(&mut self, id: &str) {
        let hash = self.key.hash_one(id);
        if self.capacity == 0 || !self.ids.insert(hash) {
            return;
        }
        self.order.push_back(hash);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest_beyond_the_window() {
        let mut recent = RecentIds::new(3);
        for id in ["a", "b", "c", "a"] {
            recent.insert(id);
        }
        assert!(recent.contains("a") && recent.contains("b") && recent.contains("c"));
        assert_eq!(recent.order.len(), 3, "an id inserted twice is kept once");
        recent.insert("d");
        assert!(!recent.contains("a"), "a was the oldest");
        assert!(recent.contains("d"));
        let mut none = RecentIds::new(0);
        none.insert("a");
        assert!(!none.contains("a"));
    }

    #[test]
    fn the_default_window_holds_its_ids_and_no_others() {
        let mut recent = RecentIds::new(DEFAULT_WINDOW);
        let ids: Vec<String> = (0..=DEFAULT_WINDOW).map(|i| format!("{i:032x}")).collect();
        for id in &ids {
            recent.insert(id);
        }
        assert!(!recent.contains(&ids[0]), "the oldest was forgotten");
        assert!(ids[1..].iter().all(|id| recent.contains(id)));
        assert!(!recent.contains("never-seen"));
        assert_eq!(recent.ids.len(), DEFAULT_WINDOW);
    }
}
