//! The consume loops' timer, after oslo's `DecayingTimer` and
//! `ACK_REQUEUE_EVERY_SECONDS_MIN/MAX`.

use std::time::{Duration, Instant};

/// Bounds each poll of a consume loop.
///
/// Like oslo's listener, the poll timeout is short right after activity (1 ms) and doubles on
/// every idle poll up to 5 s, so an idle loop wakes at most every 5 s for its housekeeping.
/// Like oslo's `DecayingTimer`, an optional overall deadline caps every poll by the time left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecayingTimer {
    deadline: Option<Instant>,
    interval: Duration,
}

impl DecayingTimer {
    /// oslo's `ACK_REQUEUE_EVERY_SECONDS_MIN`.
    pub const MIN: Duration = Duration::from_millis(1);
    /// oslo's `ACK_REQUEUE_EVERY_SECONDS_MAX`.
    pub const MAX: Duration = Duration::from_secs(5);

    /// A timer running until `deadline` (`None`: forever).
    pub fn until(deadline: Option<Instant>) -> DecayingTimer {
        DecayingTimer {
            deadline,
            interval: Self::MIN,
        }
    }

    /// How long the next poll may wait; `None` once the deadline has passed.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.next_timeout_at(Instant::now())
    }

    /// [`next_timeout`](Self::next_timeout) as of `now`.
    fn next_timeout_at(&self, now: Instant) -> Option<Duration> {
        match self.deadline {
            None => Some(self.interval),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(now);
                (!left.is_zero()).then(|| left.min(self.interval))
            }
        }
    }

    /// A poll timed out: wait longer next time.
    pub fn idle(&mut self) {
        self.interval = (self.interval * 2).min(Self::MAX);
    }

    /// Something happened: poll eagerly again.
    pub fn activity(&mut self) {
        self.interval = Self::MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeout_doubles_up_to_max_and_resets() {
        let mut t = DecayingTimer::until(None);
        assert_eq!(t.next_timeout(), Some(Duration::from_millis(1)));
        t.idle();
        assert_eq!(t.next_timeout(), Some(Duration::from_millis(2)));
        for _ in 0..20 {
            t.idle();
        }
        assert_eq!(t.next_timeout(), Some(Duration::from_secs(5)));
        t.activity();
        assert_eq!(t.next_timeout(), Some(Duration::from_millis(1)));
    }

    #[test]
    fn deadline_caps_and_expires() {
        let now = Instant::now();
        let deadline = now + Duration::from_millis(200);
        let mut t = DecayingTimer::until(Some(deadline));
        assert_eq!(t.next_timeout_at(now), Some(Duration::from_millis(1)));
        for _ in 0..20 {
            t.idle();
        }
        // The interval grew to 5 s: the time left caps it, to the millisecond.
        assert_eq!(t.next_timeout_at(now), Some(Duration::from_millis(200)));
        assert_eq!(
            t.next_timeout_at(now + Duration::from_millis(150)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            t.next_timeout_at(deadline - Duration::from_millis(1)),
            Some(Duration::from_millis(1))
        );
        assert_eq!(t.next_timeout_at(deadline), None);
        assert_eq!(DecayingTimer::until(Some(now)).next_timeout(), None);
    }
}
