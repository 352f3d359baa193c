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
//! stopping server does not wait for a caller that went away.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
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
        let mut gone = self.0.lock();
        gone.retain(|_, since| since.elapsed() < GONE_FOR);
        gone.contains_key(reply_q)
    }

    fn insert(&self, reply_q: &str) {
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
        gone.insert(reply_q.to_string(), Instant::now());
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
                waiting.retain(|reply| !settled(transport, gone, reply));
                next_round = Instant::now() + RETRY_EVERY;
            }
            Err(RecvTimeoutError::Disconnected) => {
                for reply in waiting {
                    warn!(
                        "the server stopped; dropping the reply to {} (reply queue {} does not exist)",
                        reply.msg_id, reply.reply_q
                    );
                }
                return;
            }
        }
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
    match transport.send(&outgoing, &options) {
        Ok(()) => {
            debug!(
                "replied to {} on {} after retrying",
                reply.msg_id, reply.reply_q
            );
            true
        }
        Err(Error::Undeliverable { .. }) if Instant::now() < reply.give_up => false,
        Err(Error::Undeliverable { .. }) => {
            gone.insert(&reply.reply_q);
            warn!(
                "the reply to {} could not be sent: reply queue {} still does not exist; dropping it, and replies to that queue for {}s",
                reply.msg_id,
                reply.reply_q,
                GONE_FOR.as_secs()
            );
            true
        }
        Err(e) if Instant::now() < reply.give_up => {
            debug!("retrying the reply to {} later: {e}", reply.msg_id);
            false
        }
        Err(e) => {
            error!("could not send the reply to {}: {e}", reply.msg_id);
            true
        }
    }
}
