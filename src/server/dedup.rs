//! Duplicate detection by `_unique_id` (oslo's `_MsgIdCache`): the last N ids a service has
//! taken or handled.

use std::collections::{HashSet, VecDeque};

/// The last `capacity` `_unique_id`s (oslo keeps 16).
pub(crate) struct RecentIds {
    order: VecDeque<String>,
    ids: HashSet<String>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> RecentIds {
        RecentIds {
            order: VecDeque::new(),
            ids: HashSet::new(),
            capacity,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    pub fn insert(&mut self, id: &str) {
        if self.capacity == 0 || !self.ids.insert(id.to_string()) {
            return;
        }
        self.order.push_back(id.to_string());
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
        recent.insert("d");
        assert!(!recent.contains("a"), "a was the oldest");
        assert!(recent.contains("d"));
        let mut none = RecentIds::new(0);
        none.insert("a");
        assert!(!none.contains("a"));
    }
}
