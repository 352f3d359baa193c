//! Replies whose reply queue is missing, retried off the workers.
//!
//! oslo retries such a reply every 0.25 s for `kombu_missing_consumer_retry_timeout` (the
//! caller's consumer may be re-declaring its queue after a reconnect), blocking the worker for
//! up to a minute: a few calls naming queues that do not exist stop a server answering
//! anyone. Here a worker tries a reply once; if its queue is missing, the reply is handed to
//! this server's retry thread and the worker moves on. The thread retries every pending reply
//! on oslo's schedule; one still undeliverable at its deadline is dropped and its queue
//! remembered as gone (for a minute, as oslo does), so later replies to it are dropped at once.
//!
//! What it holds is bounded: at most [`MAX_PENDING`] replies (more are dropped with a warning)
//! and [`GONE_MAX`] gone queues. Replies still pending when the server stops are dropped: a
//! stopping server does not wait for a caller that went away, nor for a round of tries (each
//! may wait up to [`SEND_TIMEOUT`] for an unreachable broker): a stop ends it after the try
//! in progress.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use log::{debug, error, warn};
use parking_lot::Mutex;

use crate::driver::{Outgoing, Route, SendOptions};
use crate::error::{Error, Result};
use crate::transport::Transport;
use crate::wire::Codec;

/// Pause between two tries of a reply whose reply queue is missing (oslo: 0.25 s).
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(250);
/// Replies waiting for their queue at once (handed over or held by the retry thread); beyond
/// this they are dropped.
pub(crate) const MAX_PENDING: usize = 1024;
/// Of those, how many may wait in the hand-off to the retry thread.
const HANDOFF: usize = 64;
/// How long, and how many, reply queues are remembered as gone (oslo: 60 s, 200).
const GONE_FOR: Duration = Duration::from_secs(60);
const GONE_MAX: usize = 200;
/// How long one try may wait for the broker's confirm.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// An encoded reply to send to `reply_q`, mandatory and confirmed.
pub(crate) struct PendingReply {
    pub codec: Codec,
    pub msg_id: String,
    pub reply_q: String,
    pub body: Vec<u8>,
    /// When to stop trying.
    pub give_up: Instant,
}

/// Reply queues found missing for longer than the retry timeout.
#[derive(Default)]
pub(crate) struct GoneQueues(Mutex<HashMap<String, Instant>>);

impl GoneQueues {
    /// `true` if replies to `reply_q` are being dropped.
    pub fn contains(&self, reply_q: &str) -> bool {
        self.contains_at(reply_q, Instant::now())
    }

    fn contains_at(&self, reply_q: &str, now: Instant) -> bool {
        let mut gone = self.0.lock();
        gone.retain(|_, since| now.saturating_duration_since(*since) < GONE_FOR);
        gone.contains_key(reply_q)
    }

    fn insert(&self, reply_q: &str) {
        self.insert_at(reply_q, Instant::now());
    }

    fn insert_at(&self, reply_q: &str, now: Instant) {
        let mut gone = self.0.lock();
        if gone.len() >= GONE_MAX {
            if let Some(oldest) = gone
                .iter()
                .min_by_key(|(_, since)| **since)
                .map(|(q, _)| q.clone())
            {
                gone.remove(&oldest);
            }
        }
        gone.insert(reply_q.to_string(), now);
    }
}

/// The retry thread of a running server; stops (dropping what is pending) when dropped.
pub(crate) struct ReplyRetry {
    pending: Option<Sender<PendingReply>>,
    /// Dropped to stop the thread while it holds as many replies as it may (it then takes
    /// none from `pending`, so it would not see that channel close).
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyRetry {
    pub fn start(transport: Transport, gone: Arc<GoneQueues>) -> Result<ReplyRetry> {
        let (tx, rx) = crossbeam_channel::bounded(HANDOFF);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let thread = thread::Builder::new()
            .name("warren-reply-retry".into())
            .spawn(move || run(&transport, &gone, &rx, &stop_rx))
            .map_err(|e| {
                Error::server_state(format!("cannot spawn the reply-retry thread: {e}"))
            })?;
        Ok(ReplyRetry {
            pending: Some(tx),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Hands over a reply whose queue was missing; drops it (with a warning) if too many wait.
    pub fn retry(&self, reply: PendingReply) {
        let Some(pending) = &self.pending else {
            return;
        };
        match pending.try_send(reply) {
            Ok(()) => {}
            Err(TrySendError::Full(reply)) => warn!(
                "{MAX_PENDING} replies already wait for their reply queue; dropping the reply to {} (queue {} does not exist)",
                reply.msg_id, reply.reply_q
            ),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn stop(&mut self) {
        self.pending = None;
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the reply-retry thread panicked");
            }
        }
    }
}

impl Drop for ReplyRetry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    transport: &Transport,
    gone: &GoneQueues,
    incoming: &Receiver<PendingReply>,
    stop: &Receiver<()>,
) {
    let mut waiting: Vec<PendingReply> = Vec::new();
    let mut next_round = Instant::now() + RETRY_EVERY;
    loop {
        let received = if waiting.is_empty() {
            incoming.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else if waiting.len() >= MAX_PENDING - HANDOFF {
            // Full: take no more, so the hand-off fills and further replies are dropped by
            // the workers; only a stop or the next round ends the wait.
            match stop.recv_deadline(next_round) {
                Err(RecvTimeoutError::Timeout) => Err(RecvTimeoutError::Timeout),
                _ => Err(RecvTimeoutError::Disconnected),
            }
        } else {
            incoming.recv_deadline(next_round)
        };
        match received {
            Ok(reply) => {
                if waiting.is_empty() {
                    next_round = Instant::now() + RETRY_EVERY;
                }
                waiting.push(reply);
            }
            Err(RecvTimeoutError::Timeout) => {
                if !round(&mut waiting, stop, |reply| settled(transport, gone, reply)) {
                    return drop_all(waiting);
                }
                next_round = Instant::now() + RETRY_EVERY;
            }
            Err(RecvTimeoutError::Disconnected) => return drop_all(waiting),
        }
    }
}

/// One round: tries each waiting reply once (`try_one` returns `true` when it needs no further
/// try) and keeps the others. Returns `false`, leaving the rest untried, as soon as the server
/// stops (`stop` disconnected).
fn round(
    waiting: &mut Vec<PendingReply>,
    stop: &Receiver<()>,
    mut try_one: impl FnMut(&PendingReply) -> bool,
) -> bool {
    let mut stopped = false;
    waiting.retain(|reply| {
        stopped = stopped || matches!(stop.try_recv(), Err(TryRecvError::Disconnected));
        stopped || !try_one(reply)
    });
    !stopped
}

/// The server stopped: drops what still waits, each with a warning.
fn drop_all(waiting: Vec<PendingReply>) {
    for reply in waiting {
        warn!(
            "the server stopped; dropping the reply to {} (reply queue {} does not exist)",
            reply.msg_id, reply.reply_q
        );
    }
}

/// What one try's result means for a pending reply.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The broker took it: done.
    Delivered,
    /// Its queue is missing or the broker could not be reached, before its deadline: the next
    /// round tries again.
    TryAgain,
    /// Its queue was still missing at its deadline: dropped, and the queue remembered as gone.
    QueueGone,
    /// Any other failure at its deadline: dropped.
    Failed,
}

/// The [`Verdict`] on a try's `result` at `now`, for a reply to give up at `give_up` (a try at
/// the deadline itself is the last).
fn verdict(result: &Result<()>, now: Instant, give_up: Instant) -> Verdict {
    let in_time = now < give_up;
    match result {
        Ok(()) => Verdict::Delivered,
        Err(_) if in_time => Verdict::TryAgain,
        Err(Error::Undeliverable { .. }) => Verdict::QueueGone,
        Err(_) => Verdict::Failed,
    }
}

/// Tries `reply` once; `true` when it needs no further try.
fn settled(transport: &Transport, gone: &GoneQueues, reply: &PendingReply) -> bool {
    let outgoing = Outgoing {
        route: Route::Direct {
            queue: &reply.reply_q,
        },
        body: &reply.body,
        codec: reply.codec,
        expiration: None,
        mandatory: true,
        redelivery: None,
        declare_queue: None,
    };
    let options = SendOptions {
        deadline: Some(Instant::now() + SEND_TIMEOUT),
        retry: Some(0),
        unconfirmed: false,
    };
    let result = transport.send(&outgoing, &options);
    match verdict(&result, Instant::now(), reply.give_up) {
        Verdict::Delivered => debug!(
            "replied to {} on {} after retrying",
            reply.msg_id, reply.reply_q
        ),
        Verdict::TryAgain => {
            if let Err(e) = result {
                debug!("retrying the reply to {} later: {e}", reply.msg_id);
            }
            return false;
        }
        Verdict::QueueGone => {
            gone.insert(&reply.reply_q);
            warn!(
                "the reply to {} could not be sent: reply queue {} still does not exist; dropping it, and replies to that queue for {}s",
                reply.msg_id,
                reply.reply_q,
                GONE_FOR.as_secs()
            );
        }
        Verdict::Failed => {
            if let Err(e) = result {
                error!("could not send the reply to {}: {e}", reply.msg_id);
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures the README states (oslo's, but for the bound): a try every 250 ms, a gone
    /// queue remembered for 60 s and at most 200 of them, at most 1,024 replies waiting.
    #[test]
    fn the_documented_figures_are_the_codes() {
        assert_eq!(RETRY_EVERY, Duration::from_millis(250));
        assert_eq!(GONE_FOR, Duration::from_secs(60));
        assert_eq!(GONE_MAX, 200);
        assert_eq!(MAX_PENDING, 1024);
    }

    /// A retry thread on its own in-process broker, and a tap on that broker.
    fn retrying(name: &str) -> (ReplyRetry, Arc<GoneQueues>, Transport, crate::MemoryTap) {
        let transport = Transport::new(&format!("memory://unit-reply-retry-{name}/")).unwrap();
        let tap = transport.memory_tap().unwrap();
        let gone = Arc::new(GoneQueues::default());
        let retry = ReplyRetry::start(transport.clone(), gone.clone()).unwrap();
        (retry, gone, transport, tap)
    }

    fn reply_to(reply_q: &str, give_up_in: Duration) -> PendingReply {
        PendingReply {
            codec: Codec::Json,
            msg_id: format!("call-to-{reply_q}"),
            reply_q: reply_q.into(),
            body: b"{}".to_vec(),
            give_up: Instant::now() + give_up_in,
        }
    }

    /// Declares queue `name` on the transport's broker (as a cast with `at_least_once` does).
    fn declare(transport: &Transport, name: &str) {
        let outgoing = Outgoing {
            route: Route::Topic {
                exchange: "unit",
                routing_key: name,
            },
            body: b"{}",
            codec: Codec::Json,
            expiration: None,
            mandatory: false,
            redelivery: None,
            declare_queue: Some(name),
        };
        transport.send(&outgoing, &SendOptions::default()).unwrap();
    }

    /// A try the tap saw: (routing key, reached a queue, when since `since`).
    type Try = (String, bool, Duration);

    /// The try `message` is, if it is one (retried replies go through the default exchange).
    fn try_of(message: crate::TappedMessage, since: Instant) -> Option<Try> {
        message.exchange.is_empty().then(|| {
            assert!(message.mandatory, "a retried reply is mandatory");
            (
                message.routing_key,
                !message.queues.is_empty(),
                since.elapsed(),
            )
        })
    }

    /// The tries the tap sees within `within`.
    fn tries(tap: &crate::MemoryTap, since: Instant, within: Duration) -> Vec<Try> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(m) = tap.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            seen.extend(try_of(m, since));
        }
        seen
    }

    /// The tries the tap sees until `enough` of them were seen; fails the test after 10 s,
    /// however slowly a loaded machine runs the thread.
    fn tries_until(
        tap: &crate::MemoryTap,
        since: Instant,
        mut enough: impl FnMut(&[Try]) -> bool,
    ) -> Vec<Try> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while !enough(&seen) {
            let Some(m) = tap.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                panic!("the tries stopped short within 10 s: {seen:?}");
            };
            seen.extend(try_of(m, since));
        }
        seen
    }

    /// `n` replies waiting for `reply_0`, `reply_1`...
    fn replies(n: usize) -> Vec<PendingReply> {
        (0..n)
            .map(|i| reply_to(&format!("reply_{i}"), Duration::from_secs(30)))
            .collect()
    }

    #[test]
    fn a_stop_ends_a_round_after_the_try_in_progress() {
        let mut waiting = replies(3);
        let (stopping, stop) = crossbeam_channel::bounded::<()>(0);
        let mut stopping = Some(stopping);
        let mut tried = Vec::new();
        let went_on = round(&mut waiting, &stop, |reply| {
            tried.push(reply.reply_q.clone());
            // The server stops while this try waits for the broker.
            stopping = None;
            false
        });
        assert!(!went_on);
        assert_eq!(tried, ["reply_0"], "no try after the stop");
        assert_eq!(waiting.len(), 3, "left for the caller to drop");
        assert!(stopping.is_none());
    }

    #[test]
    fn a_round_keeps_the_replies_that_need_another_try() {
        let mut waiting = replies(4);
        let (_running, stop) = crossbeam_channel::bounded::<()>(0);
        let mut tried = 0;
        let went_on = round(&mut waiting, &stop, |reply| {
            tried += 1;
            reply.reply_q.ends_with(['1', '3'])
        });
        assert!(went_on);
        assert_eq!(tried, 4);
        let left: Vec<_> = waiting.iter().map(|r| r.reply_q.as_str()).collect();
        assert_eq!(left, ["reply_0", "reply_2"]);
    }

    #[test]
    fn a_reply_is_tried_every_round_until_its_queue_appears_then_no_more() {
        let (retry, gone, transport, tap) = retrying("appears");
        let handed = Instant::now();
        retry.retry(reply_to("reply_later", Duration::from_secs(30)));
        let before = tries_until(&tap, handed, |seen| seen.len() == 2);
        assert!(before
            .iter()
            .all(|(q, reached, _)| q == "reply_later" && !reached));
        // Once a round: the k-th try at least k rounds after the hand-off (a loaded machine can
        // only make it later).
        for (k, (_, _, at)) in (1..).zip(&before) {
            assert!(
                *at >= k * RETRY_EVERY,
                "try {k} came early (more than one a round): {before:?}"
            );
        }
        declare(&transport, "reply_later");
        tap.drain();
        // A try routed just before the declaration may reach the tap after the drain (a
        // starved thread seen here: a third try at 747 ms, unrouted, after it); then one
        // delivery, and nothing more in the next two rounds.
        let after = tries_until(&tap, handed, |seen| {
            seen.iter().any(|(_, reached, _)| *reached)
        });
        let delivered = match &after[..] {
            [(_, false, _), rest @ ..] => rest,
            all => all,
        };
        assert!(
            matches!(delivered, [(q, true, _)] if q == "reply_later"),
            "delivered once its queue exists: {after:?}"
        );
        let again = tries(&tap, handed, 2 * RETRY_EVERY);
        assert_eq!(again, [], "sent again once delivered");
        assert!(!gone.contains("reply_later"));
    }

    #[test]
    fn a_reply_whose_queue_never_appears_is_dropped_at_its_deadline_and_the_queue_remembered() {
        let (retry, gone, _transport, tap) = retrying("never");
        let handed = Instant::now();
        retry.retry(reply_to("reply_never", 5 * RETRY_EVERY));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone.contains("reply_never") {
            assert!(Instant::now() < deadline, "never given up");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Given up at its deadline, not before (the queue is remembered once the last try
        // failed, after it).
        assert!(handed.elapsed() >= 5 * RETRY_EVERY);
        let seen: Vec<Try> = tap
            .drain()
            .into_iter()
            .filter_map(|m| try_of(m, handed))
            .collect();
        // At most a try at each round before its deadline and one at the first past it.
        assert!((1..=6).contains(&seen.len()), "{seen:?}");
        assert!(seen
            .iter()
            .all(|(q, reached, _)| q == "reply_never" && !reached));
        assert!(!gone.contains("reply_other"));
    }

    #[test]
    fn replies_handed_over_while_others_wait_are_taken_and_tried_too() {
        let (retry, _gone, _transport, tap) = retrying("many");
        let handed = Instant::now();
        // Fewer than the hand-off holds: none is dropped, however slowly the thread takes them.
        for i in 0..60 {
            retry.retry(reply_to(
                &format!("reply_missing_{i}"),
                Duration::from_secs(30),
            ));
            if i == 0 {
                // The others come while the thread holds this one.
                until_taken(&retry);
            }
        }
        // Every waiting reply is tried (one left out would stop the count short).
        let distinct = |seen: &[Try]| {
            seen.iter()
                .map(|(q, _, _)| q)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        tries_until(&tap, handed, |seen| distinct(seen) == 60);
    }

    /// Replies in the hand-off to the thread.
    fn handed_over(retry: &ReplyRetry) -> usize {
        retry.pending.as_ref().map_or(0, Sender::len)
    }

    fn until_taken(retry: &ReplyRetry) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while handed_over(retry) > 0 {
            assert!(
                Instant::now() < deadline,
                "the thread stopped taking replies"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn at_most_max_pending_replies_wait_and_a_full_thread_keeps_trying_them() {
        let (retry, _gone, _transport, tap) = retrying("full");
        let held = MAX_PENDING - HANDOFF;
        for i in 0..held {
            retry.retry(reply_to(
                &format!("reply_full_{i}"),
                Duration::from_secs(30),
            ));
            if i % 32 == 31 {
                until_taken(&retry);
            }
        }
        until_taken(&retry);
        // The thread holds all it may: the next ones stay in the hand-off, and once that is
        // full, one more is dropped.
        for i in held..=MAX_PENDING {
            retry.retry(reply_to(
                &format!("reply_full_{i}"),
                Duration::from_secs(30),
            ));
        }
        std::thread::sleep(RETRY_EVERY / 5);
        assert_eq!(handed_over(&retry), HANDOFF, "the full thread took more");
        // A full thread still tries what it holds every round: two rounds, however long a
        // round of ~1,000 tries takes on a loaded machine.
        let seen = tries_until(&tap, Instant::now(), |seen| {
            seen.iter().filter(|(q, _, _)| q == "reply_full_0").count() == 2
        });
        let late = seen
            .iter()
            .filter(|(q, _, _)| q[11..].parse::<usize>().is_ok_and(|i| i >= held))
            .count();
        assert_eq!(
            late, 0,
            "replies beyond what the thread holds are not tried yet"
        );
        assert_eq!(handed_over(&retry), HANDOFF);
    }

    #[test]
    fn stopping_drops_what_waits_and_joins_the_thread() {
        let (mut retry, _gone, _transport, tap) = retrying("stop");
        retry.retry(reply_to("reply_stop", Duration::from_secs(30)));
        assert!(!tries(&tap, Instant::now(), 2 * RETRY_EVERY).is_empty());
        retry.stop();
        assert!(retry.thread.is_none(), "joined");
        retry.retry(reply_to("reply_after_stop", Duration::from_secs(30)));
        tap.drain();
        assert_eq!(tries(&tap, Instant::now(), 2 * RETRY_EVERY), []);
    }

    #[test]
    fn a_try_is_judged_by_its_result_and_the_deadline() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let missing = || {
            Err(Error::Undeliverable {
                exchange: String::new(),
                routing_key: "reply_x".into(),
            })
        };
        assert_eq!(verdict(&Ok(()), later, now), Verdict::Delivered);
        assert_eq!(verdict(&missing(), now, later), Verdict::TryAgain);
        assert_eq!(verdict(&Err(Error::Closed), now, later), Verdict::TryAgain);
        // At the deadline itself, the try was the last.
        assert_eq!(verdict(&missing(), now, now), Verdict::QueueGone);
        assert_eq!(verdict(&missing(), later, now), Verdict::QueueGone);
        assert_eq!(verdict(&Err(Error::Closed), now, now), Verdict::Failed);
    }

    #[test]
    fn a_gone_queue_is_remembered_for_gone_for_then_forgotten() {
        let gone = GoneQueues::default();
        let since = Instant::now();
        gone.insert_at("reply_gone", since);
        assert!(gone.contains_at("reply_gone", since + GONE_FOR - Duration::from_millis(1)));
        assert!(!gone.contains_at("reply_gone", since + GONE_FOR));
    }

    #[test]
    fn gone_queues_are_remembered_up_to_their_limit_oldest_first_out() {
        let gone = GoneQueues::default();
        assert!(!gone.contains("q0"));
        let start = Instant::now();
        for i in 0..GONE_MAX {
            gone.insert_at(&format!("q{i}"), start + Duration::from_millis(i as u64));
        }
        assert!((0..GONE_MAX).all(|i| gone.contains(&format!("q{i}"))));
        gone.insert("one-more");
        assert!(gone.contains("one-more"));
        assert!(!gone.contains("q0"), "the oldest made room");
        assert!(gone.contains("q1"));
    }
}
