//! Instants a caller-given duration away, without overflow.
//!
//! `Instant + Duration` panics when the sum does not fit, and the durations of the public API
//! are the caller's (`RpcClient::timeout(Duration::MAX)` is a natural way to say "wait as long
//! as it takes"). Every deadline built from such a duration goes through [`after`].

use std::time::{Duration, Instant};

/// How far ahead a deadline may lie: a longer duration means the same as this one (no caller
/// waits a century), and `now + FOREVER` fits in every platform's `Instant`.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + duration`, with durations over [`FOREVER`] counted as [`FOREVER`].
pub(crate) fn after(now: Instant, duration: Duration) -> Instant {
    let duration = duration.min(FOREVER);
    // `min` above keeps the sum within a century of now; should a platform's `Instant` still
    // not hold it, "now" is the only instant at hand that is certain to exist.
    now.checked_add(duration).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_too_long_for_an_instant_is_a_century() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FOREVER);
        assert_eq!(after(now, FOREVER + Duration::from_nanos(1)), now + FOREVER);
    }

    #[test]
    fn a_usual_duration_is_added_exactly() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_millis(1500)),
            now + Duration::from_millis(1500)
        );
        assert_eq!(after(now, FOREVER), now + FOREVER);
        assert_eq!(after(now, Duration::ZERO), now);
    }
}
