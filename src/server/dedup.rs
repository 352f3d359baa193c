//! Duplicate detection by `_unique_id` (oslo's `_MsgIdCache`): the last N ids a service has
//! taken or handled, and the ids its workers are handling right now.
//!
//! oslo keeps 16 ids. Under load that is a few milliseconds of traffic, less than it takes a
//! client to reconnect and send again a message whose confirm a cut connection lost, or a
//! server to get back the deliveries whose acks it lost: the copy arrives after its original
//! left the window and is handled twice. warren's default window is
//! [`DEFAULT_WINDOW`] ids, kept as keyed 64-bit hashes so its memory does not depend on how
//! long the ids a peer sends are.
//!
//! A message acknowledged only once it is handled (`AckMode::AfterHandling`, notifications)
//! enters the window only then: one that fails goes back to its queue and must be taken again.
//! Until then it is *claimed* ([`claim`]): a copy taken meanwhile (a publisher's re-send whose
//! original outlived a broker crash, delivered to another worker at the same time) is a
//! duplicate too. oslo has no such state and handles both copies.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

use parking_lot::Mutex;

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
    /// Hashes of the claimed ids: messages a worker is handling and will acknowledge once
    /// handled. Not part of the window until they are.
    claimed: HashSet<u64>,
}

impl RecentIds {
    pub fn new(capacity: usize) -> RecentIds {
        RecentIds {
            order: VecDeque::new(),
            ids: HashSet::new(),
            capacity,
            key: RandomState::new(),
            claimed: HashSet::new(),
        }
    }

    /// `true` if `id` is in the window or claimed.
    #[cfg(test)]
    fn contains(&self, id: &str) -> bool {
        self.seen(self.key.hash_one(id))
    }

    /// `true` if the id hashed to `hash` is in the window or claimed.
    fn seen(&self, hash: u64) -> bool {
        self.ids.contains(&hash) || self.claimed.contains(&hash)
    }

    #[cfg(test)]
    fn insert(&mut self, id: &str) {
        let hash = self.key.hash_one(id);
        self.insert_hash(hash);
    }

    fn insert_hash(&mut self, hash: u64) {
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

/// Records `id` for a message acknowledged on receipt, under one lock: `false` if it is in the
/// window or claimed already (a duplicate).
pub(crate) fn record(recent: &Mutex<RecentIds>, id: &str) -> bool {
    let mut ids = recent.lock();
    let hash = ids.key.hash_one(id);
    if ids.seen(hash) {
        return false;
    }
    ids.insert_hash(hash);
    true
}

/// A worker's claim on the `_unique_id` of a message it handles before acknowledging it: while
/// the claim lives, the id counts as seen. [`Claim::handled`] moves it into the window;
/// dropping the claim (the message failed and goes back to its queue, or the worker panicked)
/// forgets it, so the message is taken again when it comes back. Drop it *before* sending the
/// message back, or the copy could reach another worker while the id is still claimed.
pub(crate) struct Claim<'a> {
    /// The window the claim is recorded in.
    recent: &'a Mutex<RecentIds>,
    /// The claimed id's hash (`None`: the window is off, nothing was claimed).
    hash: Option<u64>,
}

/// Claims `id` for a worker that acknowledges its message once handled; `None` if `id` is in
/// the window or claimed already (a duplicate). With a window of 0, nothing is claimed and
/// every id is new.
pub(crate) fn claim<'a>(recent: &'a Mutex<RecentIds>, id: &str) -> Option<Claim<'a>> {
    let mut ids = recent.lock();
    let hash = ids.key.hash_one(id);
    if ids.seen(hash) {
        return None;
    }
    let hash = (ids.capacity > 0).then(|| {
        ids.claimed.insert(hash);
        hash
    });
    Some(Claim { recent, hash })
}

impl Claim<'_> {
    /// The message was handled: its id moves from the claims into the window.
    pub fn handled(mut self) {
        if let Some(hash) = self.hash.take() {
            let mut ids = self.recent.lock();
            ids.claimed.remove(&hash);
            ids.insert_hash(hash);
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(hash) = self.hash.take() {
            self.recent.lock().claimed.remove(&hash);
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

    #[test]
    fn a_claimed_id_is_seen_until_handled_or_given_up() {
        let recent = Mutex::new(RecentIds::new(4));
        let first = claim(&recent, "a").expect("a new id");
        assert!(claim(&recent, "a").is_none(), "a claimed id is a duplicate");
        assert!(recent.lock().contains("a"));
        assert!(claim(&recent, "b").is_some(), "other ids are new");
        drop(first);
        assert!(!recent.lock().contains("a"), "given up: forgotten");
        let again = claim(&recent, "a").expect("taken again once given up");
        again.handled();
        let ids = recent.lock();
        assert!(ids.contains("a") && ids.claimed.is_empty() && ids.order.len() == 1);
        drop(ids);
        assert!(claim(&recent, "a").is_none(), "handled: in the window");
        assert!(!record(&recent, "a"), "in the window");
        let b = claim(&recent, "b").expect("b is new");
        assert!(!record(&recent, "b"), "claimed");
        drop(b);
        assert!(record(&recent, "b"), "given up, then recorded");
        assert!(recent.lock().contains("b") && claim(&recent, "b").is_none());
    }

    #[test]
    fn a_window_of_zero_claims_nothing() {
        let recent = Mutex::new(RecentIds::new(0));
        let first = claim(&recent, "a").expect("a new id");
        assert!(claim(&recent, "a").is_some(), "no window: every id is new");
        first.handled();
        assert!(!recent.lock().contains("a"));
    }
}
