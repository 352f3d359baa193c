//! Which deliveries one `basic.ack` with `multiple` may acknowledge.
//!
//! RabbitMQ numbers the deliveries of a channel 1, 2, 3… with one counter for all the
//! channel's consumers, and a `multiple` ack of tag `n` acknowledges every delivery up to `n`
//! not acknowledged yet. That includes deliveries amiquip has already received for another
//! consumer but the poll loop has not read: each consumer has a receiver of its own, and the
//! loop reads them in its own order (under a flood on two queues it reads one ahead of the
//! other). Acknowledged that way, such a delivery's own ack later names a tag the broker no
//! longer knows, and the broker closes the channel (`PRECONDITION_FAILED`).
//!
//! So one frame stands for a batch only when the loop has read every delivery up to the
//! batch's newest and the batch is exactly the outstanding ones up to it; otherwise each
//! delivery gets its own ack.

use std::collections::BTreeSet;

/// How many tags read past a gap are remembered. A gap closes as soon as the loop reads the
/// other receiver; one that outlives this many deliveries never will (a delivery the loop will
/// not read), and the channel then acknowledges one by one: slower, never wrong.
const PAST_GAP_MAX: usize = 4096;

/// The delivery tags of one channel that the poll loop has read.
#[derive(Debug)]
pub(super) struct ReadTags {
    /// Every tag below this one has been read (a channel's tags start at 1). `None`: a gap
    /// outlived [`PAST_GAP_MAX`] deliveries; nothing is known any more.
    below: Option<u64>,
    /// Tags read past the first gap (deliveries still waiting in another receiver).
    past_gap: BTreeSet<u64>,
}

impl Default for ReadTags {
    fn default() -> Self {
        ReadTags {
            below: Some(1),
            past_gap: BTreeSet::new(),
        }
    }
}

impl ReadTags {
    /// The loop read delivery `tag`.
    pub fn read(&mut self, tag: u64) {
        let Some(below) = self.below.as_mut() else {
            return;
        };
        if tag != *below {
            if tag > *below {
                self.past_gap.insert(tag);
            }
            if self.past_gap.len() > PAST_GAP_MAX {
                self.below = None;
                self.past_gap.clear();
            }
            return;
        }
        *below += 1;
        while self.past_gap.remove(&*below) {
            *below += 1;
        }
    }

    /// Every delivery up to `last` has been read.
    fn read_up_to(&self, last: u64) -> bool {
        self.below.is_some_and(|below| last < below)
    }
}

/// The tag of the one `multiple` ack that acknowledges exactly `batch`, if there is one:
/// the batch holds two deliveries or more, the loop has read every delivery up to its
/// newest, and `outstanding` (the deliveries read and not yet settled) holds each of the batch
/// and no other up to the newest.
pub(super) fn one_ack_for(
    batch: &[u64],
    outstanding: impl IntoIterator<Item = u64>,
    read: &ReadTags,
) -> Option<u64> {
    let last = *batch.iter().max()?;
    if batch.len() < 2 || !read.read_up_to(last) {
        return None;
    }
    let mut covered = 0;
    for tag in outstanding {
        if tag <= last {
            if !batch.contains(&tag) {
                return None;
            }
            covered += 1;
        }
    }
    // Tags are distinct: every delivery of the batch is outstanding (one settled already
    // would make the frame name a tag the broker no longer knows).
    (covered == batch.len()).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tags: impl IntoIterator<Item = u64>) -> ReadTags {
        let mut read = ReadTags::default();
        for tag in tags {
            read.read(tag);
        }
        read
    }

    #[test]
    fn a_batch_of_every_outstanding_delivery_up_to_its_newest_takes_one_ack() {
        let read = read(1..=5);
        assert_eq!(one_ack_for(&[1, 2, 3], [1, 2, 3, 4, 5], &read), Some(3));
        assert_eq!(one_ack_for(&[3, 1, 2], [5, 3, 4, 1, 2], &read), Some(3));
        // Those settled earlier are no longer outstanding.
        assert_eq!(one_ack_for(&[4, 5], [4, 5], &read), Some(5));
    }

    #[test]
    fn a_delivery_not_read_yet_below_the_newest_forbids_one_ack() {
        // Tag 2 waits in another consumer's receiver.
        let mut tags = read([1, 3]);
        assert_eq!(one_ack_for(&[1, 3], [1, 3], &tags), None);
        tags.read(2);
        assert_eq!(one_ack_for(&[1, 3], [1, 2, 3], &tags), None);
        assert_eq!(one_ack_for(&[1, 2, 3], [1, 2, 3], &tags), Some(3));
    }

    #[test]
    fn a_gap_closes_when_its_delivery_is_read() {
        let mut tags = read([2, 3, 5]);
        assert!(!tags.read_up_to(1));
        tags.read(1);
        assert!(tags.read_up_to(3));
        assert!(!tags.read_up_to(4));
        tags.read(4);
        assert!(tags.read_up_to(5));
        assert!(!tags.read_up_to(6));
        assert!(tags.past_gap.is_empty());
    }

    #[test]
    fn an_outstanding_delivery_left_out_forbids_one_ack() {
        let read = read(1..=4);
        assert_eq!(one_ack_for(&[1, 3], [1, 2, 3], &read), None);
        // One above the newest does not matter.
        assert_eq!(one_ack_for(&[1, 2], [1, 2, 4], &read), Some(2));
    }

    #[test]
    fn a_single_delivery_or_one_settled_already_takes_its_own_ack() {
        let read = read(1..=4);
        assert_eq!(one_ack_for(&[], [1], &read), None);
        assert_eq!(one_ack_for(&[2], [1, 2], &read), None);
        assert_eq!(one_ack_for(&[2], [2], &read), None);
        assert_eq!(one_ack_for(&[1, 2], [2], &read), None);
        assert_eq!(one_ack_for(&[1, 2], [1], &read), None);
    }

    #[test]
    fn a_gap_that_never_closes_is_forgotten_and_acks_go_one_by_one() {
        // Tag 1 is never read.
        let mut tags = read(2..=(PAST_GAP_MAX as u64 + 1));
        assert_eq!(tags.past_gap.len(), PAST_GAP_MAX);
        tags.read(PAST_GAP_MAX as u64 + 2);
        assert!(tags.past_gap.is_empty(), "memory stays bounded");
        tags.read(1);
        let next = PAST_GAP_MAX as u64 + 3;
        tags.read(next);
        tags.read(next + 1);
        assert_eq!(
            one_ack_for(&[next, next + 1], [next, next + 1], &tags),
            None
        );
    }
}
