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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, Select, SelectedOperation, Sender, TryRecvError,
};

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
    /// The `reply_to` property: where a call sent with direct reply-to wants its reply.
    pub reply_to: Option<String>,
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
#[derive(Debug, Clone)]
pub(crate) struct Screen {
    /// Opens the message; the second argument is `max_size`.
    pub open: fn(&mut RawMessage, usize) -> std::result::Result<Box<OpenedRequest>, String>,
    /// The transport's `max_message_size`.
    pub max_size: usize,
    /// The server's workers waiting for a delivery: the poll thread acknowledges a delivery
    /// only when one of them is free to take it.
    pub idle: Arc<IdleWorkers>,
}

/// The workers of a server that acknowledges on hand-off, counted while they wait for a
/// delivery. The poll thread claims one (decrements the count) before it acknowledges a
/// delivery and hands it over, so "acknowledged" still means "a free worker takes it now"
/// (oslo's ack-before-dispatch); the worker has no ack outcome to wait for, and deliveries
/// that arrived together are acknowledged together. Deliveries for which no worker is free
/// wait in the poll thread, unacknowledged, until a worker going idle wakes it.
#[derive(Debug)]
pub(crate) struct IdleWorkers {
    /// Workers waiting, minus deliveries claimed for them and not yet taken; never negative
    /// (only the poll thread decrements, and only above zero).
    count: AtomicUsize,
    /// The poll thread holds deliveries for the next free worker: a worker going idle wakes it.
    wanted: AtomicBool,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl IdleWorkers {
    pub fn new() -> IdleWorkers {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        IdleWorkers {
            count: AtomicUsize::new(0),
            wanted: AtomicBool::new(false),
            wake_tx,
            wake_rx,
        }
    }

    /// Before a (re)start of the workers: none waits yet.
    pub fn reset(&self) {
        self.count.store(0, Ordering::SeqCst);
    }

    /// A worker is about to wait for its next delivery.
    pub fn worker_idle(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.wanted.load(Ordering::SeqCst) {
            let _ = self.wake_tx.try_send(());
        }
    }

    /// Claims a waiting worker for one delivery; `false` if none waits.
    pub fn claim(&self) -> bool {
        self.count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Gives back a claim whose delivery was not handed over.
    pub fn unclaim(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// The poll thread holds deliveries (`true`) or no longer does: whether a worker going
    /// idle must wake it.
    pub fn set_wanted(&self, wanted: bool) {
        self.wanted.store(wanted, Ordering::SeqCst);
    }

    /// Where a worker going idle wakes the poll thread.
    pub fn wakes(&self) -> &Receiver<()> {
        &self.wake_rx
    }
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
    /// Set when the listener acknowledged the delivery as it handed it over
    /// ([`ListenSpec::ack_on_handoff`]).
    acked: bool,
}

impl Acker {
    pub fn new(tag: u64, generation: u64, ops: Sender<AckOp>) -> Acker {
        Acker {
            tag,
            generation,
            ops,
            acked: false,
        }
    }

    /// A delivery the listener acknowledged as it handed it over.
    pub fn acked_on_handoff(tag: u64, generation: u64, ops: Sender<AckOp>) -> Acker {
        Acker {
            acked: true,
            ..Acker::new(tag, generation, ops)
        }
    }

    /// Acknowledges the delivery and waits until the listener has done it. An error means the
    /// ack could not be sent (the channel is gone): the broker will redeliver the message, so
    /// the caller must not process it.
    pub fn ack(self) -> Result<()> {
        if self.acked {
            return Ok(());
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
        if self.acked {
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

/// Receives from `receiver` until `deadline`, as `recv_deadline` does, but parks at once when
/// nothing is there instead of spinning and yielding first (crossbeam's `recv` on a list or
/// array channel yields up to ten times before it parks: on a busy machine with many threads,
/// each yield is a context switch). For the waits of the hot path: a confirm, a reply.
pub(crate) fn recv_parked<T>(
    receiver: &Receiver<T>,
    deadline: Instant,
) -> std::result::Result<T, RecvTimeoutError> {
    match receiver.try_recv() {
        Ok(message) => return Ok(message),
        Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
        Err(TryRecvError::Empty) => {}
    }
    let mut select = Select::new();
    select.recv(receiver);
    match select.select_deadline(deadline) {
        Ok(operation) => operation
            .recv(receiver)
            .map_err(|_| RecvTimeoutError::Disconnected),
        Err(_) => Err(RecvTimeoutError::Timeout),
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

/// Where a transport's reply consumer hands what arrives on the reply queue: the transport's
/// [`ReplyWaiter`](crate::client::reply_waiter::ReplyWaiter), which routes each reply to the
/// call waiting for it.
pub(crate) trait ReplyRouter: Send + Sync {
    /// Routes one reply to the call waiting for it (or drops it: nobody waits).
    fn deliver(&self, message: RawMessage);
    /// Offers waiting callers the consumer's own deliveries, so that a caller reads its reply
    /// itself instead of through the reply thread (one thread hop less per call); `None`
    /// withdraws the offer (the consumer is gone, or is being replaced).
    fn offer(&self, feed: Option<Arc<dyn ReplyFeed>>);
    /// Whether a caller is reading the offered feed right now; while none is, the reply
    /// thread reads it itself.
    fn feed_has_readers(&self) -> bool;
}

/// The transport's reply router, shared by the driver's reply consumer.
pub(crate) type ReplySink = Arc<dyn ReplyRouter>;

/// A reply consumer's deliveries as a waiting caller reads them: one more receiver in the
/// caller's `select`, beside its own reply channel. Whoever reads a reply routes it through
/// [`ReplyRouter::deliver`], so it reaches its caller whichever thread read it.
pub(crate) trait ReplyFeed: Send + Sync {
    /// Adds the consumer's receiver to `select`; returns its index.
    fn register<'a>(&'a self, select: &mut Select<'a>) -> usize;
    /// Completes an operation `select` chose on that receiver: the reply, or `None` when what
    /// came was not one (the consumer was cancelled, its connection lost: the feed then tells
    /// its consumer thread, which reconnects, and stops being [live](Self::is_live)).
    fn complete(&self, operation: SelectedOperation<'_>) -> Option<RawMessage>;
    /// `false` once the consumer behind it is gone.
    fn is_live(&self) -> bool;
}

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
    /// With a screen, the poll thread reads each delivery with it and acknowledges it as it
    /// hands it to a free worker ([`IdleWorkers`]), and the worker's [`Acker::ack`] has
    /// nothing left to do: oslo's ack-before-dispatch without a round trip from worker to poll
    /// thread per message. Unreadable deliveries are rejected instead.
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

    /// Publishes a call request asking for its reply through RabbitMQ's direct reply-to
    /// (`reply_to` [`DIRECT_REPLY_TO`]) on a channel the call keeps until it drops the
    /// returned replies. `Ok(None)`: the driver cannot (no such feature, or every channel is
    /// busy); nothing was sent, and the call uses the reply queue.
    fn send_direct_call(
        &self,
        message: &Outgoing<'_>,
        options: &SendOptions,
    ) -> Result<Option<Box<dyn DirectReplies>>> {
        let _ = (message, options);
        Ok(None)
    }

    /// Starts a listener thread; returns once its queues are declared and consumed.
    fn listen(&self, spec: &ListenSpec, incoming: Sender<Incoming>) -> Result<Box<dyn Listener>>;

    /// Stops the reply consumer and closes every connection.
    fn close(&self);
}

/// The `reply_to` of a call asking for its reply through RabbitMQ's direct reply-to; also its
/// `_reply_q`, which tells a warren server to answer to the request's `reply_to` property (the
/// broker rewrites it to the caller's channel).
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The replies reaching a call sent with [`Driver::send_direct_call`]: what arrives on its
/// channel (its own reply, or a late one to an earlier call on the same channel).
pub(crate) trait DirectReplies: Send {
    /// The next message on the channel, until `until` (`Ok(None)`); an error when the channel
    /// is gone, since no reply can reach the call any more.
    fn next(&mut self, until: Instant) -> Result<Option<RawMessage>>;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_claimed_only_while_it_waits() {
        let idle = IdleWorkers::new();
        assert!(!idle.claim(), "no worker waits yet");
        idle.worker_idle();
        idle.worker_idle();
        assert!(idle.claim());
        assert!(idle.claim());
        assert!(!idle.claim(), "both are claimed");
        idle.unclaim();
        assert!(idle.claim(), "a claim given back can be made again");
        idle.worker_idle();
        idle.reset();
        assert!(!idle.claim(), "a restart forgets the old workers");
    }

    #[test]
    fn a_worker_going_idle_wakes_the_poll_thread_only_when_it_waits_for_one() {
        let idle = IdleWorkers::new();
        idle.worker_idle();
        assert!(idle.wakes().try_recv().is_err());
        idle.set_wanted(true);
        idle.worker_idle();
        idle.worker_idle();
        assert!(idle.wakes().try_recv().is_ok());
        assert!(idle.wakes().try_recv().is_err(), "one wake-up is enough");
        idle.set_wanted(false);
        idle.worker_idle();
        assert!(idle.wakes().try_recv().is_err());
    }
}
