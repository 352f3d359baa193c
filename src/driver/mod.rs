//! Drivers move encoded messages; everything above them (client, server, dispatcher, codecs)
//! is shared between `rabbit://` and `memory://`.
//!
//! A driver does three things, as oslo's `BaseDriver` does:
//! * **send** an encoded message to a [`Route`] (topic exchange, fanout exchange, or a reply
//!   queue through the default exchange);
//! * run the transport's **reply consumer**, handing every reply to a [`ReplySink`];
//! * start a **listener** for a server: a poll thread that owns the consuming channel, pushes
//!   each delivery into the server's bounded incoming queue as an [`Incoming`], and executes
//!   the ack/reject operations workers hand back through the message's [`Acker`].

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};
use crate::wire::envelope::OpenedRequest;
use crate::wire::Codec;

pub(crate) mod memory;
mod names;
pub(crate) mod poll;
pub(crate) mod queue_manager;
pub(crate) mod rabbit;
pub(crate) mod timer;

/// Where a message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// The topic exchange `exchange` with `routing_key` (`<topic>` or `<topic>.<server>`).
    Topic {
        exchange: &'a str,
        routing_key: &'a str,
    },
    /// The fanout exchange `<topic>_fanout` (routing key `""`).
    Fanout { topic: &'a str },
    /// One queue, through the default exchange: replies, requeued and dead-lettered casts.
    Direct { queue: &'a str },
}

impl Route<'_> {
    /// The AMQP exchange and routing key.
    pub fn exchange_and_key(&self) -> (String, String) {
        match *self {
            Route::Topic {
                exchange,
                routing_key,
            } => (exchange.to_string(), routing_key.to_string()),
            Route::Fanout { topic } => (fanout_exchange(topic), String::new()),
            Route::Direct { queue } => (String::new(), queue.to_string()),
        }
    }
}

/// The name of a topic's fanout exchange.
pub(crate) fn fanout_exchange(topic: &str) -> String {
    format!("{topic}_fanout")
}

/// An encoded message to publish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub route: Route<'a>,
    pub body: &'a [u8],
    pub codec: Codec,
    /// AMQP `expiration` (calls carry their timeout).
    pub expiration: Option<Duration>,
    /// Return the message if no queue takes it ([`Error::Undeliverable`]).
    pub mandatory: bool,
    /// Set when warren re-sends a failed cast (requeue or dead letter).
    pub redelivery: Option<&'a Redelivery>,
    /// A shared queue to declare (once per channel) and bind to the route's exchange under the
    /// route's routing key before publishing, as oslo's notifier does so that notifications
    /// wait for a listener.
    pub declare_queue: Option<&'a str>,
}

/// What warren records on a cast it re-sends after its handler failed (AMQP headers
/// `x-warren-attempts` and `x-warren-failure`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Redelivery {
    /// Handling attempts so far.
    pub attempts: u32,
    /// The last failure, `module.Class: message`.
    pub failure: Option<String>,
}

/// Bounds on one send.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SendOptions {
    /// Give up (with [`Error::Timeout`]) after this instant.
    pub deadline: Option<Instant>,
    /// Connection attempts after a connection failure: `None` retries until the deadline,
    /// `Some(0)` fails at once, `Some(n)` tries `n` more times.
    pub retry: Option<u32>,
    /// Return once the message is handed to the connection, without waiting for the broker's
    /// publisher confirm (ignored for `mandatory` messages, whose returns need the confirm).
    pub unconfirmed: bool,
}

/// A message as received from the broker.
#[derive(Debug, Clone)]
pub(crate) struct RawMessage {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub routing_key: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// Failed handling attempts recorded by warren (`x-warren-attempts`), 0 for a new message.
    pub attempts: u32,
}

/// A delivery handed from a listener to a server's workers.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub message: RawMessage,
    pub acker: Acker,
    /// The request as the listener's [`Screen`] read it (its body was moved here), when the
    /// listener screens deliveries.
    pub opened: Option<Box<OpenedRequest>>,
}

/// Reads a delivery in the poll thread, before it is acknowledged on hand-off: a delivery it
/// cannot read (or refuses: a cast over `max_size`) is rejected without requeue, so a
/// dead-letter policy sees it, instead of acknowledged. It takes the body out of the message
/// on success.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Screen {
    /// Opens the message; the second argument is `max_size`.
    pub open: fn(&mut RawMessage, usize) -> std::result::Result<Box<OpenedRequest>, String>,
    /// The transport's `max_message_size`.
    pub max_size: usize,
}

impl Screen {
    /// Opens `message`, or says why it is rejected.
    pub fn read(
        &self,
        message: &mut RawMessage,
    ) -> std::result::Result<Box<OpenedRequest>, String> {
        (self.open)(message, self.max_size)
    }
}

/// What a worker asks the listener thread to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckKind {
    Ack,
    Reject { requeue: bool },
}

/// An ack/reject handed back to the listener thread (amiquip channels are not `Sync`: only
/// the thread owning the channel may use it; oslo's message-operations handler does the same).
#[derive(Debug)]
pub(crate) struct AckOp {
    pub tag: u64,
    /// The channel generation the delivery came from; operations for an older generation are
    /// dropped, never sent on a new channel.
    pub generation: u64,
    pub kind: AckKind,
    pub done: Option<Sender<Result<()>>>,
}

/// The way back from a worker to the listener that owns a delivery.
#[derive(Debug)]
pub(crate) struct Acker {
    tag: u64,
    generation: u64,
    ops: Sender<AckOp>,
    /// Set when the listener acknowledges on hand-off ([`ListenSpec::ack_on_handoff`]): the
    /// outcome of that ack.
    acked: Option<Receiver<Result<()>>>,
}

impl Acker {
    pub fn new(tag: u64, generation: u64, ops: Sender<AckOp>) -> Acker {
        Acker {
            tag,
            generation,
            ops,
            acked: None,
        }
    }

    /// A delivery the listener acknowledges as it hands it over; `acked` gets the outcome.
    pub fn acked_on_handoff(
        tag: u64,
        generation: u64,
        ops: Sender<AckOp>,
        acked: Receiver<Result<()>>,
    ) -> Acker {
        Acker {
            acked: Some(acked),
            ..Acker::new(tag, generation, ops)
        }
    }

    /// Acknowledges the delivery and waits until the listener has done it. An error means the
    /// ack could not be sent (the channel is gone): the broker will redeliver the message, so
    /// the caller must not process it.
    pub fn ack(self) -> Result<()> {
        if let Some(acked) = self.acked {
            return acked.recv().map_err(|_| Error::Closed)?;
        }
        let (done, wait) = crossbeam_channel::bounded(1);
        self.ops
            .send(AckOp {
                tag: self.tag,
                generation: self.generation,
                kind: AckKind::Ack,
                done: Some(done),
            })
            .map_err(|_| Error::Closed)?;
        wait.recv().map_err(|_| Error::Closed)?
    }

    /// Rejects the delivery (dead-lettered or dropped unless `requeue`). Does not wait. A
    /// delivery acknowledged on hand-off is already settled: nothing happens.
    pub fn reject(self, requeue: bool) {
        if self.acked.is_some() {
            log::debug!(
                "delivery {} was acknowledged on hand-off; not rejecting it",
                self.tag
            );
            return;
        }
        let _ = self.ops.send(AckOp {
            tag: self.tag,
            generation: self.generation,
            kind: AckKind::Reject { requeue },
            done: None,
        });
    }
}

/// Spawns thread `name` running `body`, which must report on its `ready` sender whether it
/// started (consuming, say); returns once it did, or joins it and returns the error it reported.
pub(crate) fn spawn_when_ready<F>(name: String, body: F) -> Result<JoinHandle<()>>
where
    F: FnOnce(Sender<Result<()>>) + Send + 'static,
{
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = thread::Builder::new()
        .name(name.clone())
        .spawn(move || body(ready_tx))
        .map_err(|e| Error::server_state(format!("cannot spawn thread {name}: {e}")))?;
    let outcome = ready_rx.recv().unwrap_or_else(|_| {
        Err(Error::server_state(format!(
            "thread {name} exited during start-up"
        )))
    });
    match outcome {
        Ok(()) => Ok(thread),
        Err(e) => {
            if thread.join().is_err() {
                log::error!("thread {name} panicked during start-up");
            }
            Err(e)
        }
    }
}

/// Receives every message arriving on the transport's reply queue.
pub(crate) type ReplySink = Arc<dyn Fn(RawMessage) + Send + Sync>;

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExchangeKind {
    /// oslo's control exchange: routing keys match exactly as oslo uses them.
    Topic,
    /// `<topic>_fanout`: every bound queue gets a copy.
    Fanout,
}

/// A queue bound to an exchange with a routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub exchange: String,
    pub kind: ExchangeKind,
    pub routing_key: String,
}

/// How long a queue lives, which decides its flags and arguments (see oslo's topology).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueLifetime {
    /// A server or notification queue: durable and auto-delete as the transport's options
    /// say, no arguments.
    Shared,
    /// A per-process fanout queue: never durable, `x-expires`.
    Transient,
    /// warren's dead-letter queue: always durable.
    DeadLetter,
    /// oslo's stream fanout queue `<topic>_fanout` (`rabbit_stream_fanout`), shared by every
    /// server of the topic, each reading it from its own offset.
    Stream,
}

/// Which queue a server's fanout casts arrive in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FanoutQueue {
    /// A queue of this server's own, with a random name, deleted when it stops (oslo's
    /// default).
    Private,
    /// A queue of this server's own with a stable queue-manager name, kept when it stops.
    Stable(String),
    /// The topic's stream.
    Stream,
}

/// A queue a listener declares (and consumes, unless `consume` is false).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuePlan {
    pub name: String,
    pub lifetime: QueueLifetime,
    pub bindings: Vec<Binding>,
    pub consume: bool,
}

/// Everything a listener declares and consumes; re-declared as is after a reconnection.
#[derive(Debug, Clone)]
pub(crate) struct ListenSpec {
    /// For thread names and logs: the topic.
    pub label: String,
    pub queues: Vec<QueuePlan>,
    /// Queues deleted when the listener closes cleanly (a server's fanout queue).
    pub delete_on_close: Vec<String>,
    /// Connection passes over the hosts at start-up (`None`: start anyway and keep trying).
    pub retry: Option<u32>,
    /// With a screen, the poll thread reads each delivery with it and acknowledges it as a
    /// worker takes it (the incoming queue is then a rendezvous), and the worker's
    /// [`Acker::ack`] only reads the outcome: oslo's ack-before-dispatch without a round trip
    /// from worker to poll thread per message. Unreadable deliveries are rejected instead.
    pub ack_on_handoff: Option<Screen>,
}

impl ListenSpec {
    /// oslo's RPC server topology: `<topic>` and `<topic>.<server>` on the topic exchange, a
    /// private `<topic>_fanout_<uuid>` queue on `<topic>_fanout`, and a dead-letter queue.
    pub fn rpc(
        exchange: &str,
        topic: &str,
        server: &str,
        dead_letter_queue: Option<&str>,
        retry: Option<u32>,
    ) -> ListenSpec {
        let shared = |name: String| QueuePlan {
            bindings: vec![Binding {
                exchange: exchange.to_string(),
                kind: ExchangeKind::Topic,
                routing_key: name.clone(),
            }],
            name,
            lifetime: QueueLifetime::Shared,
            consume: true,
        };
        let fanout_queue = format!("{topic}_fanout_{}", uuid::Uuid::new_v4().simple());
        let mut queues = vec![
            shared(topic.to_string()),
            shared(format!("{topic}.{server}")),
            QueuePlan {
                name: fanout_queue.clone(),
                lifetime: QueueLifetime::Transient,
                bindings: vec![Binding {
                    exchange: fanout_exchange(topic),
                    kind: ExchangeKind::Fanout,
                    routing_key: topic.to_string(),
                }],
                consume: true,
            },
        ];
        if let Some(dlq) = dead_letter_queue {
            queues.push(QueuePlan {
                name: dlq.to_string(),
                lifetime: QueueLifetime::DeadLetter,
                bindings: Vec::new(),
                consume: false,
            });
        }
        ListenSpec {
            label: topic.to_string(),
            queues,
            delete_on_close: vec![fanout_queue],
            retry,
            ack_on_handoff: None,
        }
    }

    /// Receives fanout casts through `fanout` instead of a private queue. The fanout queue is
    /// the third plan of [`rpc`](Self::rpc).
    pub fn with_fanout(mut self, topic: &str, fanout: FanoutQueue) -> ListenSpec {
        let (name, lifetime) = match fanout {
            FanoutQueue::Private => return self,
            FanoutQueue::Stable(name) => (name, QueueLifetime::Transient),
            FanoutQueue::Stream => (fanout_exchange(topic), QueueLifetime::Stream),
        };
        if let Some(plan) = self
            .queues
            .iter_mut()
            .find(|plan| plan.bindings.iter().any(|b| b.kind == ExchangeKind::Fanout))
        {
            plan.name = name;
            plan.lifetime = lifetime;
        }
        // Stable and stream queues outlive the server (oslo deletes neither).
        self.delete_on_close.clear();
        self
    }

    /// The queues consumed, in consumer order.
    pub fn consumed(&self) -> impl Iterator<Item = &QueuePlan> {
        self.queues.iter().filter(|q| q.consume)
    }
}

/// A transport driver. See the [module documentation](self).
pub(crate) trait Driver: Send + Sync {
    /// Publishes one message; returns once the broker has it (publisher confirm) or fails.
    fn send(&self, message: &Outgoing<'_>, options: &SendOptions) -> Result<()>;

    /// The transport's reply queue, starting its consumer on first use (connecting within
    /// the deadline and retry of `options`).
    fn reply_queue(&self, options: &SendOptions) -> Result<String>;

    /// The reply queue's name once its consumer runs.
    fn reply_queue_name(&self) -> Option<String>;

    /// Starts a listener thread; returns once its queues are declared and consumed.
    fn listen(&self, spec: &ListenSpec, incoming: Sender<Incoming>) -> Result<Box<dyn Listener>>;

    /// Stops the reply consumer and closes every connection.
    fn close(&self);
}

/// A running listener (poll thread) of one server.
pub(crate) trait Listener: Send {
    /// Stops consuming: no new delivery is taken after this returns. Deliveries already taken
    /// are still handed to the workers; then the incoming queue is closed.
    fn stop(&mut self);

    /// Once the workers are done: executes the remaining acks, deletes the fanout queue,
    /// closes channel and connection, and joins the thread.
    fn close(self: Box<Self>);

    /// `true` while the listener consumes (connected, not stopped).
    fn is_consuming(&self) -> bool;
}
