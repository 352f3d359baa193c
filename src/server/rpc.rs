//! What an RPC server's workers do with a request.
//!
//! For each message: opens it (content type, envelope) and reads and checks its header — a
//! message that cannot be read is rejected without requeue and logged with its routing key (with
//! ack-before-dispatch the poll thread does this, through [`screen`], before acknowledging);
//! acknowledges it first (oslo's ack-before-dispatch: at most once) unless it is a cast under
//! [`AckMode::AfterHandling`]; refuses it if it is over `max_message_size`; drops duplicates by
//! `_unique_id`; dispatches it; and settles it: a call gets its reply in the request's codec
//! (retried off the worker while the reply queue is missing, see [`reply_retry`]), a cast under
//! `AfterHandling` is acknowledged after success, or re-queued / dead-lettered after a failure.
//!
//! [`reply_retry`]: crate::server::reply_retry

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use parking_lot::Mutex;

use crate::dispatcher::{Dispatcher, HandlerResult};
use crate::driver::{
    Acker, Incoming, Outgoing, RawMessage, Redelivery, Route, SendOptions, DIRECT_REPLY_TO,
};
use crate::error::{Error, Result};
use crate::observe::{Event, Outcome, RequestKind, ServerRequest};
use crate::server::call_monitor::{keep_alive_interval, CallMonitor, Caller};
use crate::server::dedup::{self, RecentIds};
use crate::server::delayed_requeue::DelayedRequeue;
use crate::server::reply_retry::{GoneQueues, PendingReply, ReplyRetry};
use crate::server::worker_pool::Handler;
use crate::server::AckMode;
use crate::transport::Transport;
use crate::wire::envelope::{OpenedRequest, Reply, RequestHeader};
use crate::wire::failure::Failure;
use crate::wire::limits::clip;
use crate::wire::{Codec, Document};

/// How long a worker waits before it returns a failed cast it could not re-send (with
/// `AckMode::AfterHandling`) to its queue.
pub(crate) const RESEND_FAILED_PAUSE: Duration = Duration::from_secs(1);
/// How long a worker tries to get one publish (reply, requeue) confirmed.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// What the workers of one server share.
pub(crate) struct WorkerContext {
    pub transport: Transport,
    pub dispatcher: Dispatcher,
    pub topic: String,
    pub ack_mode: AckMode,
    pub dead_letter_queue: Option<String>,
    /// Replies wait for the broker's confirm (and so can detect a missing reply queue).
    confirm_replies: bool,
    recent: Mutex<RecentIds>,
    /// Reply queues that stayed missing: replies to them are dropped for a while.
    pub gone: Arc<GoneQueues>,
    /// Set by `stop()`: missing reply queues are no longer waited for.
    stopping: AtomicBool,
}

impl WorkerContext {
    pub fn new(
        transport: Transport,
        dispatcher: Dispatcher,
        topic: String,
        ack_mode: AckMode,
        duplicate_window: usize,
        confirm_replies: bool,
    ) -> WorkerContext {
        let dead_letter_queue = match ack_mode {
            AckMode::AfterHandling { .. } => Some(dead_letter_queue(&topic)),
            AckMode::BeforeDispatch => None,
        };
        WorkerContext {
            transport,
            dispatcher,
            topic,
            ack_mode,
            dead_letter_queue,
            confirm_replies,
            recent: Mutex::new(RecentIds::new(duplicate_window)),
            gone: Arc::default(),
            stopping: AtomicBool::new(false),
        }
    }
}

impl WorkerContext {
    /// Marks the server as stopping (or running again).
    pub fn set_stopping(&self, stopping: bool) {
        self.stopping.store(stopping, Ordering::Release);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// How a request ended, for the transport's observer.
fn server_outcome(outcome: &HandlerResult) -> Outcome<'_> {
    match outcome {
        Ok(_) => Outcome::Ok,
        Err(failure) => Outcome::Failed {
            class: failure.class(),
            expected: failure.is_expected(),
        },
    }
}

/// The dead-letter queue of a topic's casts under `AckMode::AfterHandling`.
pub(crate) fn dead_letter_queue(topic: &str) -> String {
    format!("{topic}_dlq")
}

/// The listener's [`Screen`](crate::driver::Screen) for RPC requests: opens the body and
/// reads and checks the header in the poll thread, so an unreadable request is rejected
/// instead of acknowledged on hand-off.
///
/// A cast over `max_size` is refused here too (a call passes: the worker answers it with a
/// `MessageTooLarge` failure).
pub(crate) fn screen(
    message: &mut RawMessage,
    max_size: usize,
) -> std::result::Result<Box<OpenedRequest>, String> {
    let body = std::mem::take(&mut message.body);
    let opened = OpenedRequest::open(message.content_type.as_deref(), body)?;
    if opened.size > max_size && opened.header.msg_id.is_none() {
        return Err(format!(
            "the cast is {} bytes, over max_message_size ({max_size} bytes)",
            opened.size
        ));
    }
    Ok(Box::new(opened))
}

/// A running RPC server's [`Handler`]: the shared context and the threads beside the workers
/// (call monitor, reply retry, delayed requeue), which stop when the last worker has let go of
/// this.
pub(crate) struct RpcHandler {
    pub context: Arc<WorkerContext>,
    pub monitor: CallMonitor,
    pub retry: ReplyRetry,
    pub requeue: DelayedRequeue,
}

impl Handler for RpcHandler {
    fn handle(&self, incoming: Incoming) {
        self.context.handle(incoming, self);
    }
}

impl WorkerContext {
    fn handle(&self, incoming: Incoming, threads: &RpcHandler) {
        let Incoming {
            message,
            acker,
            opened,
        } = incoming;
        let routing_key = message.routing_key;
        let opened = match opened {
            Some(opened) => Ok(*opened),
            None => OpenedRequest::open(message.content_type.as_deref(), message.body),
        };
        let OpenedRequest {
            doc,
            mut header,
            size,
        } = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                warn!(
                    "rejecting an unreadable message on {routing_key:?} (topic {}): {}",
                    self.topic,
                    clip(&reason)
                );
                acker.reject(false);
                return;
            }
        };
        // A call sent with direct reply-to names the pseudo-queue in its body; the broker put
        // the caller's channel in the request's `reply_to`.
        if header.reply_q.as_deref() == Some(DIRECT_REPLY_TO) {
            if let Some(reply_to) = message.reply_to {
                header.reply_q = Some(reply_to);
            }
        }
        let is_call = header.msg_id.is_some();
        let ack_after = !is_call && matches!(self.ack_mode, AckMode::AfterHandling { .. });
        let mut acker = Some(acker);
        if !ack_after {
            if let Err(e) = acker.take().map_or(Ok(()), Acker::ack) {
                warn!(
                    "could not acknowledge {} on {routing_key:?}; skipping it: {e}",
                    header.method
                );
                return;
            }
        }
        let hook = self.transport.hook();
        let max_size = self.transport.options().max_message_size;
        if size > max_size {
            let started = hook.start();
            let request = started.map(|_| self.observed(&header));
            if let Some(request) = request {
                hook.emit(|| Event::RequestStarted { request });
            }
            let failure = Failure::new(
                "MessageTooLarge",
                "warren",
                format!("the request is {size} bytes, over the server's max_message_size ({max_size} bytes)"),
            );
            warn!("refusing {} on {routing_key:?}: {failure}", header.method);
            let outcome = Err(failure);
            match (&header.msg_id, &header.reply_q) {
                (Some(msg_id), Some(reply_q)) => {
                    self.reply(doc.codec, msg_id, reply_q, &outcome, &threads.retry)
                }
                _ => {
                    if let Some(acker) = acker {
                        acker.reject(false);
                    }
                }
            }
            if let (Some(started), Some(request)) = (started, request) {
                hook.emit(|| Event::RequestFinished {
                    request,
                    outcome: server_outcome(&outcome),
                    duration: started.elapsed(),
                });
            }
            return;
        }
        // The id counts as seen from here: recorded at once if the request is acknowledged
        // already, claimed until it is handled otherwise.
        let mut claim = None;
        if let Some(unique_id) = &header.unique_id {
            let new = if ack_after {
                claim = dedup::claim(&self.recent, unique_id);
                claim.is_some()
            } else {
                dedup::record(&self.recent, unique_id)
            };
            if !new {
                info!("ignoring duplicate message {unique_id} ({})", header.method);
                if let Some(acker) = acker {
                    let _ = acker.ack();
                }
                return;
            }
        }
        match (&header.msg_id, &header.reply_q) {
            (Some(msg_id), _) => debug!(
                "received call {} msg_id {msg_id} on {routing_key:?}",
                header.method
            ),
            _ => debug!("received cast {} on {routing_key:?}", header.method),
        }
        let mut context = header.context.clone();
        context.insert("client_timeout", header.timeout.clone());
        // A caller with a call-monitor timeout gets keep-alives while the handler runs.
        let interval = header.monitor_timeout().and_then(keep_alive_interval);
        let keep_alives = match (&header.msg_id, &header.reply_q, interval) {
            (Some(msg_id), Some(reply_q), Some(interval)) => {
                let caller = Caller {
                    codec: doc.codec,
                    msg_id: msg_id.clone(),
                    reply_q: reply_q.clone(),
                };
                Some(threads.monitor.watch(caller, interval))
            }
            _ => None,
        };
        let started = hook.start();
        let request = started.map(|_| self.observed(&header));
        if let Some(request) = request {
            hook.emit(|| Event::RequestStarted { request });
        }
        let outcome = self.dispatcher.dispatch(&header, &context, &doc);
        drop(keep_alives);
        if let Err(failure) = &outcome {
            if failure.is_expected() {
                debug!(
                    "expected exception during message handling ({}): {failure}",
                    header.method
                );
            } else {
                error!(
                    "exception during message handling ({}): {failure}",
                    header.method
                );
            }
        }
        if let (Some(msg_id), Some(reply_q)) = (&header.msg_id, &header.reply_q) {
            self.reply(doc.codec, msg_id, reply_q, &outcome, &threads.retry);
        } else if let Some(acker) = acker {
            // The claim ends before the cast is settled: a handled cast's id enters the window
            // before its ack; a failed one's is forgotten before the cast goes back to its
            // queue (the copy must not find the id still claimed).
            match claim {
                Some(claim) if outcome.is_ok() => claim.handled(),
                given_up => drop(given_up),
            }
            let requeue_later = self.settle_cast(
                acker,
                &doc,
                &header,
                outcome.as_ref().err(),
                &message.queue,
                message.attempts,
            );
            if let Some(acker) = requeue_later {
                threads.requeue.requeue_after(acker, RESEND_FAILED_PAUSE);
            }
        }
        if let (Some(started), Some(request)) = (started, request) {
            hook.emit(|| Event::RequestFinished {
                request,
                outcome: server_outcome(&outcome),
                duration: started.elapsed(),
            });
        }
    }

    /// What the transport's observer is told about a request (built only when there is one).
    fn observed<'a>(&'a self, header: &'a RequestHeader) -> ServerRequest<'a> {
        let namespace = header.namespace.as_deref();
        ServerRequest {
            topic: &self.topic,
            namespace,
            method: &header.method,
            kind: if header.msg_id.is_some() {
                RequestKind::Call
            } else {
                RequestKind::Cast
            },
            known: self.dispatcher.serves(namespace, &header.method),
        }
    }

    /// `AckMode::AfterHandling`: ack a handled cast; re-queue a failed one (to the back of its
    /// queue, counting attempts) or, past the limit, move it to the dead-letter queue. A cast
    /// that cannot be re-sent is returned, to go back to its queue unacknowledged after
    /// [`RESEND_FAILED_PAUSE`]: nothing is lost.
    fn settle_cast(
        &self,
        acker: Acker,
        doc: &Document,
        header: &RequestHeader,
        failure: Option<&Failure>,
        queue: &str,
        attempts: u32,
    ) -> Option<Acker> {
        let Some(failure) = failure else {
            if let Err(e) = acker.ack() {
                warn!("cast {} was handled but its ack failed ({e}); a redelivery will be dropped as a duplicate", header.method);
            }
            return None;
        };
        let AckMode::AfterHandling { requeue_limit } = self.ack_mode else {
            return None;
        };
        let redelivery = Redelivery {
            attempts: attempts.saturating_add(1),
            failure: Some(failure.to_string()),
        };
        let (target, what) = match &self.dead_letter_queue {
            Some(dlq) if redelivery.attempts > requeue_limit => {
                (dlq.as_str(), "moved to the dead-letter queue")
            }
            _ => (queue, "requeued"),
        };
        match self.resend(doc, target, &redelivery) {
            Ok(()) => {
                warn!(
                    "cast {} failed (attempt {}): {failure}; {what} {target}",
                    header.method, redelivery.attempts
                );
                if let Err(e) = acker.ack() {
                    warn!(
                        "could not ack cast {} after re-sending it: {e}",
                        header.method
                    );
                }
                None
            }
            // A copy that cannot be written would fail the same way on every redelivery:
            // reject it for good (a dead-letter policy sees it) instead of looping.
            Err(e @ Error::Encode { .. }) => {
                warn!(
                    "failed cast {} cannot be re-sent ({e}); rejecting it",
                    header.method
                );
                acker.reject(false);
                None
            }
            // Back to its queue, after a pause (on the requeue thread: this worker moves on):
            // it is delivered and handled again at once, and a cause that lasts (its
            // dead-letter queue deleted) would make that a hot loop.
            Err(e) => {
                warn!(
                    "could not re-send failed cast {} to {target} ({e}); returning it to its queue in {RESEND_FAILED_PAUSE:?}",
                    header.method
                );
                Some(acker)
            }
        }
    }

    /// Publishes a copy of `doc` to `queue` (through the default exchange) with `redelivery`.
    fn resend(&self, doc: &Document, queue: &str, redelivery: &Redelivery) -> Result<()> {
        let body = doc.reencode()?;
        let outgoing = Outgoing {
            route: Route::Direct { queue },
            body: &body,
            codec: doc.codec,
            expiration: None,
            mandatory: true,
            redelivery: Some(redelivery),
            declare_queue: None,
        };
        let options = SendOptions {
            deadline: Some(Instant::now() + SEND_TIMEOUT),
            retry: None,
            unconfirmed: false,
        };
        self.transport.send(&outgoing, &options)
    }

    fn reply(
        &self,
        codec: Codec,
        msg_id: &str,
        reply_q: &str,
        outcome: &HandlerResult,
        retry: &ReplyRetry,
    ) {
        if self.gone.contains(reply_q) {
            warn!("{reply_q} does not exist; dropping the reply to {msg_id}");
            return;
        }
        let unique_id = crate::id::new_id();
        let encode = |result: Option<&(dyn erased_serde::Serialize + Send)>,
                      failure: Option<&Failure>| {
            let failure = failure.map(Failure::to_wire);
            codec.encode(&Reply {
                result: result.map(|r| r as &dyn erased_serde::Serialize),
                failure: failure.as_deref(),
                ending: true,
                msg_id,
                unique_id: &unique_id,
            })
        };
        let body = match outcome {
            Ok(result) => encode(Some(result.as_ref()), None).or_else(|e| {
                let failure = Failure::new(
                    "TypeError",
                    "builtins",
                    format!("the result could not be encoded: {e}"),
                );
                error!("{failure}");
                encode(None, Some(&failure))
            }),
            Err(failure) => encode(None, Some(failure)),
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                error!("could not encode the reply to {msg_id}: {e}");
                return;
            }
        };
        let outgoing = Outgoing {
            route: Route::Direct { queue: reply_q },
            body: &body,
            codec,
            expiration: None,
            // Without confirms a return could not be seen: do not ask for one. RabbitMQ 3.10
            // returns every mandatory publish to a direct reply-to address as unroutable,
            // delivered or not: there, a gone caller cannot be detected.
            mandatory: self.confirm_replies && !reply_q.starts_with(DIRECT_REPLY_TO),
            redelivery: None,
            declare_queue: None,
        };
        let options = SendOptions {
            deadline: Some(Instant::now() + SEND_TIMEOUT),
            retry: None,
            unconfirmed: !self.confirm_replies,
        };
        match self.transport.send(&outgoing, &options) {
            Ok(()) => debug!("replied to {msg_id} on {reply_q}"),
            // The caller's reply queue is missing, perhaps while its consumer reconnects: the
            // retry thread keeps trying for a while, as oslo does, and this worker moves on.
            // A stopping server does not hold its shutdown for a caller that went away.
            // (A reply to a direct reply-to address is not mandatory, so never returned.)
            Err(Error::Undeliverable { .. }) if !self.is_stopping() => {
                debug!("reply queue {reply_q} of {msg_id} is missing; retrying off the worker");
                retry.retry(PendingReply {
                    codec,
                    msg_id: msg_id.to_string(),
                    reply_q: reply_q.to_string(),
                    body,
                    give_up: Instant::now()
                        + self.transport.options().missing_consumer_retry_timeout,
                });
            }
            Err(Error::Undeliverable { .. }) => {
                warn!("reply queue {reply_q} does not exist and the server is stopping; dropping the reply to {msg_id}");
            }
            Err(Error::Timeout { .. }) => warn!(
                "the broker did not confirm the reply to {msg_id} within {}s",
                SEND_TIMEOUT.as_secs()
            ),
            Err(e) => error!("could not send the reply to {msg_id}: {e}"),
        }
    }
}
