//! Helpers of the unit tests.

use std::time::{Duration, Instant};

/// Waits (at most 10 s, then fails naming `what`) until `condition` holds: for state another
/// thread sets just after a call returns (a poll thread that starts consuming, say).
pub(crate) fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
