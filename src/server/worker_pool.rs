//! The worker pool: N threads taking deliveries from the bounded incoming queue.
//!
//! Each worker, for each message: opens it (content type, envelope) and reads its header —
//! a message that cannot be read is rejected without requeue and logged with its routing
//! key; acknowledges it (oslo's ack-before-dispatch for RPC: at most once) and skips it if
//! the ack could not be sent; drops duplicates by `_unique_id`; dispatches it; and, for a
//! call, replies in the request's codec.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info, warn};
use parking_lot::Mutex;
use serde_json::Value;

use crate::dispatcher::{Dispatcher, HandlerResult};
use crate::driver::{Incoming, Outgoing, Route, SendOptions};
use crate::error::{Error, Result};
use crate::transport::Transport;
use crate::wire::envelope::{Reply, RequestHeader};
use crate::wire::failure::Failure;
use crate::wire::{Codec, Document};

/// How many `_unique_id`s each server remembers (oslo's `DUP_MSG_CHECK_SIZE`).
const DUPLICATE_WINDOW: usize = 16;
/// How long a worker tries to deliver a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the workers of one server share.
pub(crate) struct WorkerContext {
    pub transport: Transport,
    pub dispatcher: Dispatcher,
    pub topic: String,
    recent: Mutex<VecDeque<String>>,
}

impl WorkerContext {
    pub fn new(transport: Transport, dispatcher: Dispatcher, topic: String) -> WorkerContext {
        WorkerContext {
            transport,
            dispatcher,
            topic,
            recent: Mutex::new(VecDeque::with_capacity(DUPLICATE_WINDOW)),
        }
    }
}

/// Starts `count` workers; they exit when the incoming queue is closed and drained.
pub(crate) fn spawn(
    context: Arc<WorkerContext>,
    incoming: Receiver<Incoming>,
    count: usize,
) -> Result<Vec<JoinHandle<()>>> {
    (0..count)
        .map(|i| {
            let context = context.clone();
            let incoming = incoming.clone();
            thread::Builder::new()
                .name(format!("warren-worker-{i}"))
                .spawn(move || {
                    for message in incoming {
                        // Handler panics are already failures; this keeps the worker alive
                        // through a panic anywhere else (a result's Serialize impl, say).
                        if catch_unwind(AssertUnwindSafe(|| context.handle(message))).is_err() {
                            error!("a message's processing panicked; the worker carries on");
                        }
                    }
                })
                .map_err(|e| Error::server_state(format!("cannot spawn worker thread: {e}")))
        })
        .collect()
}

impl WorkerContext {
    fn handle(&self, incoming: Incoming) {
        let Incoming { message, acker } = incoming;
        let routing_key = message.routing_key;
        let opened =
            Document::open(message.content_type.as_deref(), message.body).and_then(|doc| {
                doc.decode::<RequestHeader>()
                    .map(|h| (doc, h))
                    .map_err(|e| e.to_string())
            });
        let (doc, header) = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                warn!(
                    "rejecting an unreadable message on {routing_key:?} (topic {}): {reason}",
                    self.topic
                );
                acker.reject(false);
                return;
            }
        };
        if let Err(e) = acker.ack() {
            warn!(
                "could not acknowledge {} on {routing_key:?}; skipping it: {e}",
                header.method
            );
            return;
        }
        if let Some(unique_id) = &header.unique_id {
            if self.is_duplicate(unique_id) {
                info!("ignoring duplicate message {unique_id} ({})", header.method);
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
        context.insert(
            "client_timeout",
            header.monitor_timeout.map_or(Value::Null, Value::from),
        );
        let outcome = self.dispatcher.dispatch(&header, &context, &doc);
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
            self.reply(doc.codec, msg_id, reply_q, outcome);
        }
    }

    /// Records `unique_id`; `true` if it was seen recently.
    fn is_duplicate(&self, unique_id: &str) -> bool {
        let mut recent = self.recent.lock();
        if recent.iter().any(|seen| seen == unique_id) {
            return true;
        }
        if recent.len() == DUPLICATE_WINDOW {
            recent.pop_front();
        }
        recent.push_back(unique_id.to_string());
        false
    }

    fn reply(&self, codec: Codec, msg_id: &str, reply_q: &str, outcome: HandlerResult) {
        let unique_id = uuid::Uuid::new_v4().simple().to_string();
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
        let body = match &outcome {
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
            route: Route::Reply { queue: reply_q },
            body: &body,
            codec,
            expiration: None,
            mandatory: true,
        };
        let options = SendOptions {
            deadline: Some(Instant::now() + REPLY_TIMEOUT),
            retry: None,
        };
        match self.transport.driver().send(&outgoing, &options) {
            Ok(()) => debug!("replied to {msg_id} on {reply_q}"),
            Err(Error::Undeliverable { .. }) => {
                warn!("reply queue {reply_q} does not exist; dropping the reply to {msg_id}")
            }
            Err(Error::Timeout { .. }) => warn!(
                "the broker did not confirm the reply to {msg_id} within {}s",
                REPLY_TIMEOUT.as_secs()
            ),
            Err(e) => error!("could not send the reply to {msg_id}: {e}"),
        }
    }
}
