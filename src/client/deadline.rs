//! A call's deadlines, as plain arithmetic on instants: the caller passes "now", so the rules
//! are unit-tested exactly (an injected clock) while `PendingCall` feeds them the real time.
//!
//! Two deadlines bound a call: the overall one, its timeout counted from when it was sent
//! (never moved), and with oslo's call monitoring a second one, renewed by every message from
//! the server (a keep-alive or the reply) and never past the overall one.

use std::time::{Duration, Instant};

use crate::clock;

/// The deadlines of one call being waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallDeadlines {
    /// The timeout counted from the send: the call never waits past it.
    overall: Instant,
    /// The call-monitor timeout, when the caller asked for monitoring.
    monitor: Option<Duration>,
    /// When the server must next be heard from (monitoring only).
    next_sign_of_life: Option<Instant>,
}

/// Which of a call's deadlines passed, so the error names the right timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// The call's own timeout.
    Overall,
    /// The server went quiet for the call-monitor timeout (this long) before the overall one.
    Monitor(Duration),
}

impl CallDeadlines {
    /// The deadlines of a call sent with `overall` as its deadline, waited for from `now`.
    pub fn new(overall: Instant, monitor: Option<Duration>, now: Instant) -> CallDeadlines {
        CallDeadlines {
            overall,
            monitor,
            next_sign_of_life: monitor.map(|m| clock::after(now, m)),
        }
    }

    /// When waiting must stop if nothing arrives: the earlier of the two deadlines.
    pub fn wait_until(&self) -> Instant {
        match self.next_sign_of_life {
            Some(monitor) => monitor.min(self.overall),
            None => self.overall,
        }
    }

    /// A message from the server arrived at `now`: the monitor deadline starts again.
    pub fn heard_from_server(&mut self, now: Instant) {
        self.next_sign_of_life = self.monitor.map(|m| clock::after(now, m));
    }

    /// Nothing arrived until `now` (at or after [`wait_until`](Self::wait_until)): which
    /// deadline passed. The overall one wins a tie.
    pub fn expired(&self, now: Instant) -> Expired {
        match self.monitor {
            Some(monitor) if now < self.overall => Expired::Monitor(monitor),
            _ => Expired::Overall,
        }
    }
}

/// The deadline of a call or cast with `timeout`, sent at `now` (a century at most, so that
/// `Duration::MAX` means "no limit" instead of an overflow).
pub(crate) fn deadline_of(timeout: Duration, now: Instant) -> Instant {
    clock::after(now, timeout)
}

/// A request's AMQP `expiration`: the time left until its caller stops waiting, so it expires
/// in its queue exactly then.
pub(crate) fn expiration(deadline: Instant, now: Instant) -> Duration {
    deadline.saturating_duration_since(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn without_monitoring_the_call_waits_exactly_its_timeout_from_the_send() {
        let t0 = Instant::now();
        let overall = deadline_of(Duration::from_secs(5), t0);
        assert_eq!(overall, at(t0, 5000));
        // Waited for later (start_call, then wait): the deadline does not move.
        let mut deadlines = CallDeadlines::new(overall, None, at(t0, 1200));
        assert_eq!(deadlines.wait_until(), at(t0, 5000));
        deadlines.heard_from_server(at(t0, 4000));
        assert_eq!(
            deadlines.wait_until(),
            at(t0, 5000),
            "a message does not extend it"
        );
        assert_eq!(deadlines.expired(at(t0, 5000)), Expired::Overall);
    }

    #[test]
    fn monitoring_renews_on_each_message_but_never_past_the_timeout() {
        let t0 = Instant::now();
        let monitor = Duration::from_secs(2);
        let mut deadlines = CallDeadlines::new(at(t0, 5000), Some(monitor), t0);
        assert_eq!(deadlines.wait_until(), at(t0, 2000));
        deadlines.heard_from_server(at(t0, 1500));
        assert_eq!(deadlines.wait_until(), at(t0, 3500));
        deadlines.heard_from_server(at(t0, 3499));
        assert_eq!(
            deadlines.wait_until(),
            at(t0, 5000),
            "capped by the timeout"
        );
        // Quiet for the monitor timeout before the overall deadline: the monitor error.
        let quiet = CallDeadlines::new(at(t0, 5000), Some(monitor), t0);
        assert_eq!(quiet.expired(at(t0, 2000)), Expired::Monitor(monitor));
        assert_eq!(quiet.expired(at(t0, 4999)), Expired::Monitor(monitor));
        assert_eq!(
            quiet.expired(at(t0, 5000)),
            Expired::Overall,
            "a tie is the timeout"
        );
        assert_eq!(quiet.expired(at(t0, 5001)), Expired::Overall);
    }

    #[test]
    fn monitoring_starts_when_the_caller_starts_waiting() {
        let t0 = Instant::now();
        let deadlines =
            CallDeadlines::new(at(t0, 10_000), Some(Duration::from_secs(3)), at(t0, 250));
        assert_eq!(deadlines.wait_until(), at(t0, 3250));
    }

    #[test]
    fn a_request_expires_when_its_caller_stops_waiting() {
        let t0 = Instant::now();
        let deadline = deadline_of(Duration::from_millis(800), t0);
        assert_eq!(expiration(deadline, t0), Duration::from_millis(800));
        assert_eq!(
            expiration(deadline, t0 + 300 * MS),
            Duration::from_millis(500)
        );
        assert_eq!(expiration(deadline, t0 + 800 * MS), Duration::ZERO);
        assert_eq!(
            expiration(deadline, t0 + 900 * MS),
            Duration::ZERO,
            "late: zero, not a panic"
        );
    }
}
