//! Failed casts returned to their queue after a pause, off the workers.
//!
//! With `AckMode::AfterHandling`, a cast whose handling failed is re-sent with its attempts
//! counted. When even that re-send fails (its dead-letter queue was deleted, say), the cast is
//! rejected back to its queue, where it is delivered and handled again at once: a cause that
//! lasts would make that a hot loop. So it goes back only after [`RESEND_FAILED_PAUSE`]. A
//! worker that slept through the pause would serve nothing meanwhile (with one worker, the
//! whole server would stall); it hands the delivery to this server's requeue thread instead,
//! which rejects it when its pause is over.
//!
//! What it holds is bounded by the listener's prefetch (a delivery is held unacknowledged);
//! beyond [`HELD_MAX`] the worker waits out the pause itself. Deliveries still held when the
//! server stops go back to their queue at once.
//!
//! [`RESEND_FAILED_PAUSE`]: super::rpc::RESEND_FAILED_PAUSE

use std::collections::VecDeque;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use log::{debug, error};

use crate::driver::Acker;
use crate::error::{Error, Result};

/// Deliveries waiting at once for their pause to end; more make their worker wait.
pub(crate) const HELD_MAX: usize = 1024;

/// The requeue thread of a running server; requeues what it holds and stops when dropped.
pub(crate) struct DelayedRequeue {
    /// Dropped to stop the thread.
    held: Option<Sender<(Instant, Acker)>>,
    thread: Option<JoinHandle<()>>,
}

impl DelayedRequeue {
    /// Starts the thread.
    pub fn start() -> Result<DelayedRequeue> {
        let (tx, rx) = crossbeam_channel::bounded(HELD_MAX);
        let thread = thread::Builder::new()
            .name("warren-requeue".into())
            .spawn(move || run(&rx))
            .map_err(|e| Error::server_state(format!("cannot spawn the requeue thread: {e}")))?;
        Ok(DelayedRequeue {
            held: Some(tx),
            thread: Some(thread),
        })
    }

    /// Rejects the delivery of `acker` back to its queue once `pause` is over: on this
    /// server's requeue thread, or on the calling thread if that holds [`HELD_MAX`] already.
    pub fn requeue_after(&self, acker: Acker, pause: Duration) {
        let due = Instant::now() + pause;
        let acker = match &self.held {
            Some(held) => match held.try_send((due, acker)) {
                Ok(()) => return,
                Err(TrySendError::Full((_, acker))) => {
                    debug!("the requeue thread holds {HELD_MAX} deliveries; this worker waits out the pause");
                    acker
                }
                Err(TrySendError::Disconnected((_, acker))) => acker,
            },
            None => acker,
        };
        thread::sleep(due.saturating_duration_since(Instant::now()));
        acker.reject(true);
    }
}

impl Drop for DelayedRequeue {
    fn drop(&mut self) {
        drop(self.held.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the requeue thread panicked");
            }
        }
    }
}

/// Rejects each delivery when it is due (they come in due order: one pause for all); at the
/// end, all that are left at once.
fn run(held: &Receiver<(Instant, Acker)>) {
    let mut waiting: VecDeque<(Instant, Acker)> = VecDeque::new();
    loop {
        let now = Instant::now();
        while waiting.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, acker)) = waiting.pop_front() {
                acker.reject(true);
            }
        }
        let next = match waiting.front() {
            Some((due, _)) => held.recv_timeout(due.saturating_duration_since(now)),
            None => held.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(delivery) => waiting.push_back(delivery),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    for (_, acker) in waiting {
        acker.reject(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{AckKind, AckOp};

    fn acker(tag: u64, ops: &Sender<AckOp>) -> Acker {
        Acker::new(tag, 1, ops.clone())
    }

    fn rejected(op: &AckOp) -> Option<u64> {
        matches!(op.kind, AckKind::Reject { requeue: true }).then_some(op.tag)
    }

    #[test]
    fn deliveries_are_requeued_in_order_once_their_pause_is_over() {
        let (ops, done) = crossbeam_channel::unbounded();
        let requeue = DelayedRequeue::start().unwrap();
        let started = Instant::now();
        requeue.requeue_after(acker(1, &ops), Duration::from_secs(2));
        requeue.requeue_after(acker(2, &ops), Duration::from_millis(2500));
        // Far less than the pause, however starved this thread is.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the caller never waits"
        );
        let first = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(rejected(&first), Some(1));
        let second = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(2500));
        assert_eq!(rejected(&second), Some(2));
    }

    #[test]
    fn what_is_held_goes_back_at_once_when_the_server_stops() {
        let (ops, done) = crossbeam_channel::unbounded();
        let requeue = DelayedRequeue::start().unwrap();
        requeue.requeue_after(acker(7, &ops), Duration::from_secs(3600));
        let started = Instant::now();
        drop(requeue);
        assert!(started.elapsed() < Duration::from_secs(10));
        let op = done.try_recv().expect("rejected before the thread ended");
        assert_eq!(rejected(&op), Some(7));
    }
}
