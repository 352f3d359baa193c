//! The in-process transport (`memory://`, also `fake://`), oslo's `fake` driver: the same
//! client, server and dispatcher code, with a small broker inside the process instead of
//! RabbitMQ. Meant for users' unit tests.
//!
//! Transports whose URLs name the same host and virtual host share one broker
//! (`memory://my-test/` talks to `memory://my-test/`); give each test its own name to keep
//! tests apart. The broker models what warren relies on: topic exchanges with exact routing
//! keys, fanout exchanges, acks and requeues, message expiration, `mandatory` replies (a reply
//! to a queue nobody consumes is undeliverable), and RabbitMQ's dealing to competing
//! consumers: each message of a queue goes to the next consumer in turn that has room under
//! its prefetch (`rabbit_qos_prefetch_count`, 0 = unbounded), so which server gets a message
//! never depends on thread scheduling.
//!
//! A [`MemoryTap`] ([`Transport::memory_tap`](crate::Transport::memory_tap)) sees every message
//! published on a broker, replies included, as [`TappedMessage`]s, and can publish raw messages
//! (a duplicate, say) back into it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::debug;
use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::driver::poll::{Accepted, Consumers, PollThread, SessionEnd};
use crate::driver::{
    fanout_exchange, AckKind, Binding, Driver, ExchangeKind, Incoming, ListenSpec, Listener,
    Outgoing, QueueLifetime, QueuePlan, RawMessage, ReplySink, Route, SendOptions,
};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::{Scheme, TransportUrl};
use crate::wire::{Codec, Document};

/// The AMQP header in which warren counts the failed attempts of a re-sent cast (as the
/// RabbitMQ driver writes it).
const ATTEMPTS_HEADER: &str = "x-warren-attempts";
/// The AMQP header holding the last failure of a re-sent cast.
const FAILURE_HEADER: &str = "x-warren-failure";

/// Brokers of the process, by URL identity.
fn brokers() -> &'static Mutex<HashMap<String, Weak<Broker>>> {
    static BROKERS: OnceLock<Mutex<HashMap<String, Weak<Broker>>>> = OnceLock::new();
    BROKERS.get_or_init(|| Mutex::new(HashMap::new()))
}

#[derive(Debug, Clone)]
struct Message {
    body: Vec<u8>,
    content_type: String,
    routing_key: String,
    queue: String,
    expires: Option<Instant>,
    attempts: u32,
}

impl Message {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// One consumer of a queue, as the queue sees it.
struct Consumer {
    id: u64,
    /// Where the queue deals this consumer's messages (unbounded: dealing never blocks).
    deliveries: Sender<Message>,
    /// Unacknowledged deliveries allowed at once; 0 = unbounded.
    prefetch: usize,
    /// Dealt and not settled yet.
    unacked: usize,
}

impl Consumer {
    fn has_room(&self) -> bool {
        self.prefetch == 0 || self.unacked < self.prefetch
    }
}

#[derive(Default)]
struct QueueState {
    /// Messages waiting for a consumer, oldest first.
    ready: VecDeque<Message>,
    /// Consumers in subscription order.
    consumers: Vec<Consumer>,
    /// Index in `consumers` of the next one to be offered a message.
    next: usize,
}

impl QueueState {
    /// Deals ready messages to consumers in turn (RabbitMQ's round-robin), skipping those
    /// whose prefetch is full; drops expired messages as they reach the head of the queue.
    fn deal(&mut self) {
        while !self.ready.is_empty() && !self.consumers.is_empty() {
            if self
                .ready
                .front()
                .is_some_and(|m| m.is_expired(Instant::now()))
            {
                if let Some(expired) = self.ready.pop_front() {
                    debug!("memory: dropping expired message on {}", expired.queue);
                }
                continue;
            }
            let count = self.consumers.len();
            let Some(slot) = (0..count)
                .map(|i| (self.next + i) % count)
                .find(|&i| self.consumers[i].has_room())
            else {
                return;
            };
            let Some(message) = self.ready.pop_front() else {
                return;
            };
            let consumer = &mut self.consumers[slot];
            match consumer.deliveries.send(message) {
                Ok(()) => {
                    consumer.unacked += 1;
                    self.next = (slot + 1) % count;
                }
                // The consumer went away without cancelling: forget it, keep the message.
                Err(crossbeam_channel::SendError(message)) => {
                    self.ready.push_front(message);
                    self.remove(slot);
                }
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        self.consumers.remove(slot);
        if slot < self.next {
            self.next -= 1;
        }
        if self.next >= self.consumers.len() {
            self.next = 0;
        }
    }

    /// A delivery of consumer `id` was settled: it has room for one more.
    fn settled(&mut self, id: u64) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| c.id == id) {
            consumer.unacked = consumer.unacked.saturating_sub(1);
        }
    }
}

struct Queue {
    state: Mutex<QueueState>,
}

impl Queue {
    fn new() -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
        })
    }

    fn publish(&self, message: Message) {
        let mut state = self.state.lock();
        state.ready.push_back(message);
        state.deal();
    }

    /// Puts messages back at the head of the queue, in the order given (as RabbitMQ puts a
    /// requeued message back in its place), and deals them again.
    fn requeue(&self, messages: impl DoubleEndedIterator<Item = Message>) {
        let mut state = self.state.lock();
        for message in messages.rev() {
            state.ready.push_front(message);
        }
        state.deal();
    }

    /// Adds consumer `id`; its deliveries arrive on the receiver.
    fn subscribe(&self, id: u64, prefetch: usize) -> Receiver<Message> {
        let (deliveries, receiver) = crossbeam_channel::unbounded();
        let mut state = self.state.lock();
        state.consumers.push(Consumer {
            id,
            deliveries,
            prefetch,
            unacked: 0,
        });
        state.deal();
        receiver
    }

    /// Removes consumer `id`: nothing more is dealt to it.
    fn cancel(&self, id: u64) {
        let mut state = self.state.lock();
        if let Some(slot) = state.consumers.iter().position(|c| c.id == id) {
            state.remove(slot);
        }
    }

    /// A delivery of consumer `id` was settled; `requeue` goes back to the head of the queue.
    fn settle(&self, id: u64, requeue: Option<Message>) {
        let mut state = self.state.lock();
        state.settled(id);
        if let Some(message) = requeue {
            state.ready.push_front(message);
        }
        state.deal();
    }

    fn len(&self) -> usize {
        self.state.lock().ready.len()
    }
}

#[derive(Default)]
struct Broker {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// exchange → routing key → queue names (topic exchanges, exact keys as oslo uses them).
    topic: Mutex<HashMap<String, HashMap<String, Vec<String>>>>,
    /// fanout exchange → queue names.
    fanout: Mutex<HashMap<String, Vec<String>>>,
    /// reply queue → the consuming transport's sink.
    replies: Mutex<HashMap<String, ReplySink>>,
    /// Consumer ids and tap ids.
    next_id: AtomicU64,
    /// Number of taps: publishing copies nothing for taps while it is 0.
    tap_count: AtomicUsize,
    taps: Mutex<Vec<(u64, Sender<TappedMessage>)>>,
}

impl Broker {
    fn for_url(url: &TransportUrl) -> Arc<Broker> {
        let mut all = brokers().lock();
        all.retain(|_, weak| weak.strong_count() > 0);
        let key = url.memory_key();
        if let Some(broker) = all.get(&key).and_then(Weak::upgrade) {
            return broker;
        }
        let broker = Arc::new(Broker::default());
        all.insert(key, Arc::downgrade(&broker));
        broker
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        self.queues
            .lock()
            .entry(name.to_string())
            .or_insert_with(Queue::new)
            .clone()
    }

    /// Creates a queue (if new) and its bindings.
    fn declare(&self, plan: &QueuePlan) {
        self.queue(&plan.name);
        let bind = |queues: &mut Vec<String>| {
            if !queues.contains(&plan.name) {
                queues.push(plan.name.clone());
            }
        };
        for binding in &plan.bindings {
            match binding.kind {
                ExchangeKind::Topic => bind(
                    self.topic
                        .lock()
                        .entry(binding.exchange.clone())
                        .or_default()
                        .entry(binding.routing_key.clone())
                        .or_default(),
                ),
                ExchangeKind::Fanout => bind(
                    self.fanout
                        .lock()
                        .entry(binding.exchange.clone())
                        .or_default(),
                ),
            }
        }
    }

    /// Deletes a queue and every binding to it.
    fn delete(&self, queue: &str) {
        for keys in self.topic.lock().values_mut() {
            for queues in keys.values_mut() {
                queues.retain(|q| q != queue);
            }
        }
        for queues in self.fanout.lock().values_mut() {
            queues.retain(|q| q != queue);
        }
        self.queues.lock().remove(queue);
    }

    /// The queues a message published to `exchange` with `routing_key` reaches: the default
    /// exchange (`""`) routes to the queue named by the key, a fanout exchange to every bound
    /// queue, a topic exchange to the queues bound under the key.
    fn route(&self, exchange: &str, routing_key: &str) -> Vec<String> {
        if exchange.is_empty() {
            self.direct_queue(routing_key)
        } else if self.fanout.lock().contains_key(exchange) {
            self.fanout_queues(exchange)
        } else {
            self.topic_queues(exchange, routing_key)
        }
    }

    fn direct_queue(&self, queue: &str) -> Vec<String> {
        if self.queues.lock().contains_key(queue) {
            vec![queue.to_string()]
        } else {
            Vec::new()
        }
    }

    fn fanout_queues(&self, exchange: &str) -> Vec<String> {
        self.fanout
            .lock()
            .get(exchange)
            .cloned()
            .unwrap_or_default()
    }

    fn topic_queues(&self, exchange: &str, routing_key: &str) -> Vec<String> {
        self.topic
            .lock()
            .get(exchange)
            .and_then(|keys| keys.get(routing_key))
            .cloned()
            .unwrap_or_default()
    }

    /// The consumer of reply queue `queue`, if a transport consumes it.
    fn reply_sink(&self, queue: &str) -> Option<ReplySink> {
        self.replies.lock().get(queue).cloned()
    }

    fn push(&self, message: Message) {
        let queue = self.queues.lock().get(&message.queue).cloned();
        if let Some(queue) = queue {
            queue.publish(message);
        }
    }

    fn is_tapped(&self) -> bool {
        self.tap_count.load(Ordering::Acquire) > 0
    }

    /// Hands a copy of a published message to every tap (taps whose receiver is gone are
    /// forgotten).
    fn tap(&self, message: TappedMessage) {
        let mut taps = self.taps.lock();
        taps.retain(|(_, tap)| tap.send(message.clone()).is_ok());
        self.tap_count.store(taps.len(), Ordering::Release);
    }

    /// Delivers a message (already tapped) to `queues`, or to the reply sink consuming
    /// `queue` for the default exchange.
    fn deliver(&self, message: &Delivery<'_>, queues: Vec<String>, sink: Option<ReplySink>) {
        if let Some(sink) = sink {
            sink.deliver(RawMessage {
                body: message.body.to_vec(),
                content_type: Some(message.content_type.to_string()),
                routing_key: message.routing_key.to_string(),
                queue: message.routing_key.to_string(),
                attempts: 0,
                reply_to: None,
            });
            return;
        }
        for queue in queues {
            self.push(Message {
                body: message.body.to_vec(),
                content_type: message.content_type.to_string(),
                routing_key: message.routing_key.to_string(),
                queue,
                expires: message.expiration.map(|e| Instant::now() + e),
                attempts: message.attempts,
            });
        }
    }
}

/// What `deliver` needs of a message, borrowed from whoever publishes it.
struct Delivery<'a> {
    body: &'a [u8],
    content_type: &'a str,
    routing_key: &'a str,
    expiration: Option<Duration>,
    attempts: u32,
}

pub(crate) struct MemoryDriver {
    broker: Arc<Broker>,
    reply_queue: String,
    sink: ReplySink,
    /// Unacknowledged deliveries per consumer (`rabbit_qos_prefetch_count`); 0 = unbounded.
    prefetch: usize,
    closed: AtomicBool,
}

impl MemoryDriver {
    pub fn new(url: &TransportUrl, options: &TransportOptions, sink: ReplySink) -> MemoryDriver {
        MemoryDriver {
            broker: Broker::for_url(url),
            reply_queue: format!("reply_{}", uuid::Uuid::new_v4().simple()),
            sink,
            prefetch: usize::from(options.prefetch_count),
            closed: AtomicBool::new(false),
        }
    }
}

impl Driver for MemoryDriver {
    fn send(&self, message: &Outgoing<'_>, _options: &SendOptions) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (exchange, routing_key) = message.route.exchange_and_key();
        if let Some(queue) = message.declare_queue {
            self.broker.declare(&QueuePlan {
                name: queue.to_string(),
                lifetime: QueueLifetime::Shared,
                bindings: vec![Binding {
                    exchange: exchange.clone(),
                    kind: ExchangeKind::Topic,
                    routing_key: routing_key.clone(),
                }],
                consume: true,
            });
        }
        let sink = match message.route {
            Route::Direct { queue } => self.broker.reply_sink(queue),
            _ => None,
        };
        let queues = match (&sink, message.route) {
            (Some(_), _) => Vec::new(),
            (None, Route::Topic { .. }) => self.broker.topic_queues(&exchange, &routing_key),
            (None, Route::Fanout { topic }) => self.broker.fanout_queues(&fanout_exchange(topic)),
            (None, Route::Direct { queue }) => self.broker.direct_queue(queue),
        };
        let content_type = message.codec.content_type();
        if self.broker.is_tapped() {
            let mut headers = Map::new();
            if let Some(redelivery) = message.redelivery {
                headers.insert(ATTEMPTS_HEADER.into(), redelivery.attempts.into());
                if let Some(failure) = &redelivery.failure {
                    headers.insert(FAILURE_HEADER.into(), failure.clone().into());
                }
            }
            self.broker.tap(TappedMessage {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                content_type: content_type.to_string(),
                content_encoding: message.codec.content_encoding().to_string(),
                expiration: message.expiration,
                mandatory: message.mandatory,
                headers,
                body: message.body.to_vec(),
                queues: match sink {
                    Some(_) => vec![routing_key.clone()],
                    None => queues.clone(),
                },
            });
        }
        if sink.is_none() && queues.is_empty() {
            return if message.mandatory {
                Err(Error::Undeliverable {
                    exchange,
                    routing_key,
                })
            } else {
                debug!("memory: no queue bound to {exchange:?}/{routing_key:?}; message dropped");
                Ok(())
            };
        }
        let delivery = Delivery {
            body: message.body,
            content_type,
            routing_key: &routing_key,
            expiration: message.expiration,
            attempts: message.redelivery.map_or(0, |r| r.attempts),
        };
        self.broker.deliver(&delivery, queues, sink);
        Ok(())
    }

    fn reply_queue(&self, _options: &SendOptions) -> Result<String> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.broker
            .replies
            .lock()
            .entry(self.reply_queue.clone())
            .or_insert_with(|| self.sink.clone());
        Ok(self.reply_queue.clone())
    }

    fn reply_queue_name(&self) -> Option<String> {
        self.broker
            .replies
            .lock()
            .contains_key(&self.reply_queue)
            .then(|| self.reply_queue.clone())
    }

    fn listen(&self, spec: &ListenSpec, incoming: Sender<Incoming>) -> Result<Box<dyn Listener>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        for plan in &spec.queues {
            self.broker.declare(plan);
        }
        let broker = self.broker.clone();
        let queues: Vec<Arc<Queue>> = spec
            .consumed()
            .map(|plan| broker.queue(&plan.name))
            .collect();
        let prefetch = self.prefetch;
        let delete_on_close = spec.delete_on_close.clone();
        let name = format!("warren-listen-{}", spec.label);
        let thread = PollThread::spawn(
            name,
            incoming,
            spec.ack_on_handoff.clone(),
            move |mut poll, control, ready| {
                let mut consumers = MemoryConsumers::subscribe(&broker, queues, prefetch);
                let _ = ready.send(Ok(()));
                // In-process queues are never lost: one session, until closed.
                let end = poll.run_session(&mut consumers, &control);
                // Like a closed channel: whatever was not acknowledged goes back to its queue.
                drop(consumers);
                if end == SessionEnd::Closed {
                    for queue in &delete_on_close {
                        broker.delete(queue);
                    }
                }
            },
        )?;
        Ok(Box::new(thread))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.broker.replies.lock().remove(&self.reply_queue);
    }
}

/// A listener's consumers of its in-process queues (one consumer per queue, one id for all).
struct MemoryConsumers {
    id: u64,
    queues: Vec<Arc<Queue>>,
    receivers: Vec<Receiver<Message>>,
    /// Delivered and not settled: tag → (source, message).
    unacked: HashMap<u64, (usize, Message)>,
    next_tag: u64,
    cancelled: bool,
}

impl MemoryConsumers {
    fn subscribe(broker: &Broker, queues: Vec<Arc<Queue>>, prefetch: usize) -> MemoryConsumers {
        let id = broker.new_id();
        let receivers = queues.iter().map(|q| q.subscribe(id, prefetch)).collect();
        MemoryConsumers {
            id,
            queues,
            receivers,
            unacked: HashMap::new(),
            next_tag: 1,
            cancelled: false,
        }
    }

    /// Cancels every consumer; returns what had been dealt to them and not received yet.
    fn cancel_all(&mut self) -> Vec<(usize, Message)> {
        self.cancelled = true;
        for queue in &self.queues {
            queue.cancel(self.id);
        }
        // Nothing is dealt to a cancelled consumer: what is buffered now is all there is.
        self.receivers
            .iter()
            .enumerate()
            .flat_map(|(source, receiver)| receiver.try_iter().map(move |m| (source, m)))
            .collect()
    }
}

impl Consumers for MemoryConsumers {
    type Item = Message;

    fn receivers(&self) -> &[Receiver<Message>] {
        &self.receivers
    }

    fn accept(&mut self, source: usize, message: Message) -> Accepted {
        if message.is_expired(Instant::now()) {
            debug!("memory: dropping expired message on {}", message.queue);
            self.queues[source].settle(self.id, None);
            return Accepted::Skip;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let raw = RawMessage {
            body: message.body.clone(),
            content_type: Some(message.content_type.clone()),
            routing_key: message.routing_key.clone(),
            queue: message.queue.clone(),
            attempts: message.attempts,
            reply_to: None,
        };
        self.unacked.insert(tag, (source, message));
        Accepted::Deliver(tag, raw)
    }

    fn settle(&mut self, tag: u64, kind: AckKind) -> Result<()> {
        let (source, message) = self.unacked.remove(&tag).ok_or(Error::Closed)?;
        let requeue = (kind == AckKind::Reject { requeue: true }).then_some(message);
        self.queues[source].settle(self.id, requeue);
        Ok(())
    }

    fn cancel(&mut self) -> Vec<(usize, Message)> {
        self.cancel_all()
    }
}

impl Drop for MemoryConsumers {
    /// Like a closed channel: every delivery not acknowledged goes back to the head of its
    /// queue, in delivery order, then what was dealt but never received.
    fn drop(&mut self) {
        let buffered = if self.cancelled {
            Vec::new()
        } else {
            self.cancel_all()
        };
        let mut unacked: Vec<(u64, (usize, Message))> = self.unacked.drain().collect();
        unacked.sort_by_key(|(tag, _)| *tag);
        let mut back: Vec<Vec<Message>> = vec![Vec::new(); self.queues.len()];
        for (source, message) in unacked.into_iter().map(|(_, m)| m).chain(buffered) {
            back[source].push(message);
        }
        for (queue, messages) in self.queues.iter().zip(back) {
            if !messages.is_empty() {
                queue.requeue(messages.into_iter());
            }
        }
    }
}

/// A message published on an in-process (`memory://`) broker, as a [`MemoryTap`] saw it.
///
/// The properties are the ones the RabbitMQ driver would set on the same message.
///
/// A call and its reply, as they go on the wire:
///
/// ```
/// use std::time::Duration;
/// use warren::{Codec, Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let transport = Transport::builder("memory://doc-tapped-message/").codec(Codec::Json).build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong")))
///     .build()?;
/// server.start()?;
/// let tap = transport.memory_tap().expect("memory://");
/// let _: String = RpcClient::new(&transport, Target::new("t")).call(&RequestContext::new(), "ping", &())?;
///
/// let call = tap.recv_timeout(Duration::from_secs(5)).expect("the call");
/// assert_eq!((call.codec(), call.routing_key.as_str()), (Some(Codec::Json), "t"));
/// assert!(call.expiration.is_some(), "a call expires with its timeout");
/// let reply_queue = call.field("_reply_q").expect("a call names its reply queue");
///
/// let reply = tap.wait_for(Duration::from_secs(5), |m| m.exchange.is_empty()).expect("the reply");
/// assert_eq!(reply.queues, [reply_queue]);
/// let fields = reply.message()?;
/// assert_eq!(fields["result"], "pong");
/// assert_eq!(fields["_msg_id"].as_str(), call.field("_msg_id").as_deref());
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TappedMessage {
    /// The exchange it was published to: the control exchange (or the target's) for calls,
    /// casts and notifications, `<topic>_fanout` for fanout casts, `""` (the default exchange)
    /// for replies and for re-sent (requeued or dead-lettered) casts.
    pub exchange: String,
    /// Its routing key: `<topic>`, `<topic>.<server>`, `<topic>.<priority>`, the reply queue...
    pub routing_key: String,
    /// `application/json` or `application/msgpack`: the codec of the body.
    pub content_type: String,
    /// `utf-8` (JSON) or `binary` (MessagePack), as kombu sets it.
    pub content_encoding: String,
    /// The AMQP `expiration` (calls carry their timeout).
    pub expiration: Option<Duration>,
    /// Published `mandatory` (to be returned if no queue takes it).
    pub mandatory: bool,
    /// AMQP headers: `x-warren-attempts` and `x-warren-failure` on a re-sent cast.
    pub headers: Map<String, Value>,
    /// The body, as published.
    pub body: Vec<u8>,
    /// The queues it reached (a reply: its reply queue); empty if no queue took it.
    pub queues: Vec<String>,
}

impl TappedMessage {
    /// The codec of the body, from its `content_type`.
    pub fn codec(&self) -> Option<Codec> {
        Codec::from_content_type(&self.content_type)
    }

    /// The message's fields (oslo's envelope removed for JSON, the map decoded for
    /// MessagePack): `method`, `args`, `_msg_id`, `_unique_id`... for requests, `result`,
    /// `failure`, `ending`... for replies, `event_type`, `priority`... for notifications.
    pub fn message(&self) -> Result<Map<String, Value>> {
        let doc =
            Document::open(Some(&self.content_type), self.body.clone()).map_err(Error::decode)?;
        doc.decode().map_err(Error::decode)
    }

    /// A string field of the [message](Self::message) (`None` if absent, not a string or if
    /// the body cannot be read).
    pub fn field(&self, name: &str) -> Option<String> {
        self.message()
            .ok()?
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// Sees every message published on an in-process broker (calls, casts, fanout casts,
/// notifications, replies, re-sent casts), and publishes raw messages into it. Get one with
/// [`Transport::memory_tap`](crate::Transport::memory_tap); it sees what is published after
/// it was made, until it is dropped. When no tap exists, publishing copies nothing.
///
/// For tests that assert on what goes on the wire: codecs, properties, ids, routing.
///
/// ```
/// use std::time::Duration;
/// use warren::{RequestContext, RpcClient, Target, Transport};
///
/// let transport = Transport::new("memory://tap-doc/")?;
/// let tap = transport.memory_tap().expect("a memory:// transport");
/// RpcClient::new(&transport, Target::new("compute")).cast(&RequestContext::new(), "reboot", &())?;
/// let cast = tap.recv_timeout(Duration::from_secs(5)).expect("the cast");
/// assert_eq!((cast.exchange.as_str(), cast.routing_key.as_str()), ("openstack", "compute"));
/// assert_eq!(cast.content_type, "application/msgpack");
/// assert_eq!(cast.field("method").as_deref(), Some("reboot"));
/// assert!(cast.queues.is_empty(), "no server consumes compute yet");
/// # Ok::<(), warren::Error>(())
/// ```
pub struct MemoryTap {
    broker: Arc<Broker>,
    id: u64,
    messages: Receiver<TappedMessage>,
}

impl std::fmt::Debug for MemoryTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTap")
            .field("unread", &self.messages.len())
            .finish()
    }
}

impl MemoryTap {
    /// A tap on the broker of `url`, if it is a `memory://` URL.
    pub(crate) fn attach(url: &TransportUrl) -> Option<MemoryTap> {
        if url.scheme() != Scheme::Memory {
            return None;
        }
        let broker = Broker::for_url(url);
        let id = broker.new_id();
        let (tx, messages) = crossbeam_channel::unbounded();
        {
            let mut taps = broker.taps.lock();
            taps.push((id, tx));
            broker.tap_count.store(taps.len(), Ordering::Release);
        }
        Some(MemoryTap {
            broker,
            id,
            messages,
        })
    }

    /// The next message published, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<TappedMessage> {
        self.messages.recv_timeout(timeout).ok()
    }

    /// The next message published, if there is one already.
    pub fn try_recv(&self) -> Option<TappedMessage> {
        self.messages.try_recv().ok()
    }

    /// Every message published and not received yet.
    pub fn drain(&self) -> Vec<TappedMessage> {
        self.messages.try_iter().collect()
    }

    /// The first message (waiting up to `timeout` in all) for which `matches` is true; the
    /// messages before it are discarded.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&TappedMessage) -> bool,
    ) -> Option<TappedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.messages.recv_deadline(deadline).ok()?;
            if matches(&message) {
                return Some(message);
            }
        }
    }

    /// Publishes `message` again, as it is (body, content type, expiration, attempts header),
    /// to its exchange and routing key: the default exchange (`""`) reaches the queue (or
    /// reply queue) named by the routing key, a fanout exchange every queue bound to it, a
    /// topic exchange the queues bound under the routing key. Taps see it too. Returns the
    /// number of queues it reached.
    pub fn publish(&self, message: &TappedMessage) -> usize {
        let sink = if message.exchange.is_empty() {
            self.broker.reply_sink(&message.routing_key)
        } else {
            None
        };
        let queues = match sink {
            Some(_) => Vec::new(),
            None => self.broker.route(&message.exchange, &message.routing_key),
        };
        let reached = if sink.is_some() { 1 } else { queues.len() };
        let mut tapped = message.clone();
        tapped.queues = match sink {
            Some(_) => vec![message.routing_key.clone()],
            None => queues.clone(),
        };
        self.broker.tap(tapped);
        let attempts = message
            .headers
            .get(ATTEMPTS_HEADER)
            .and_then(Value::as_u64)
            .map_or(0, |a| u32::try_from(a).unwrap_or(u32::MAX));
        let delivery = Delivery {
            body: &message.body,
            content_type: &message.content_type,
            routing_key: &message.routing_key,
            expiration: message.expiration,
            attempts,
        };
        self.broker.deliver(&delivery, queues, sink);
        reached
    }

    /// Deletes queue `queue`, its messages and its bindings, as an operator's `rabbitmqctl
    /// delete_queue` would; `false` if there was no such queue. Unlike RabbitMQ, the broker
    /// does not cancel the queue's consumers (they just get nothing more): meant for queues
    /// nobody consumes, such as a server's dead-letter queue.
    pub fn delete_queue(&self, queue: &str) -> bool {
        let existed = self.broker.queues.lock().contains_key(queue);
        self.broker.delete(queue);
        existed
    }

    /// Messages waiting in queue `queue` for a consumer (not those dealt to one), or `None`
    /// if no such queue exists: what a dead-letter queue holds, say.
    pub fn queue_len(&self, queue: &str) -> Option<usize> {
        let queue = self.broker.queues.lock().get(queue).cloned()?;
        Some(queue.len())
    }
}

impl Drop for MemoryTap {
    fn drop(&mut self) {
        let mut taps = self.broker.taps.lock();
        taps.retain(|(id, _)| *id != self.id);
        self.broker.tap_count.store(taps.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Message {
        Message {
            body: vec![n],
            content_type: "application/msgpack".into(),
            routing_key: "t".into(),
            queue: "t".into(),
            expires: None,
            attempts: 0,
        }
    }

    fn bodies(receiver: &Receiver<Message>) -> Vec<u8> {
        receiver.try_iter().map(|m| m.body[0]).collect()
    }

    #[test]
    fn competing_consumers_are_dealt_messages_in_turn() {
        let queue = Queue::new();
        let (a, b, c) = (
            queue.subscribe(1, 0),
            queue.subscribe(2, 0),
            queue.subscribe(3, 0),
        );
        for n in 0..7 {
            queue.publish(message(n));
        }
        assert_eq!(bodies(&a), [0, 3, 6]);
        assert_eq!(bodies(&b), [1, 4]);
        assert_eq!(bodies(&c), [2, 5]);
    }

    #[test]
    fn prefetch_holds_messages_until_settled_and_skips_full_consumers() {
        let queue = Queue::new();
        let (a, b) = (queue.subscribe(1, 1), queue.subscribe(2, 2));
        for n in 0..5 {
            queue.publish(message(n));
        }
        assert_eq!(bodies(&a), [0]);
        assert_eq!(bodies(&b), [1, 2]);
        assert_eq!(queue.len(), 2, "the rest waits in the queue");
        queue.settle(2, None);
        assert_eq!(bodies(&b), [3], "b had room first");
        queue.settle(1, None);
        assert_eq!(bodies(&a), [4]);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn requeued_messages_go_back_to_the_head() {
        let queue = Queue::new();
        queue.publish(message(1));
        queue.publish(message(2));
        let a = queue.subscribe(1, 1);
        let first = a.try_recv().unwrap();
        assert_eq!(first.body, [1]);
        queue.settle(1, Some(first));
        assert_eq!(bodies(&a), [1], "redelivered before message 2");
    }

    #[test]
    fn cancelled_consumers_get_nothing_more_and_dead_ones_are_skipped() {
        let queue = Queue::new();
        let a = queue.subscribe(1, 0);
        let b = queue.subscribe(2, 0);
        queue.cancel(1);
        drop(b);
        let c = queue.subscribe(3, 0);
        for n in 0..3 {
            queue.publish(message(n));
        }
        assert_eq!(bodies(&a), Vec::<u8>::new());
        assert_eq!(bodies(&c), [0, 1, 2]);
    }

    #[test]
    fn expired_messages_are_dropped_at_the_head() {
        let queue = Queue::new();
        let mut stale = message(1);
        stale.expires = Some(Instant::now());
        queue.publish(stale);
        queue.publish(message(2));
        let a = queue.subscribe(1, 0);
        assert_eq!(bodies(&a), [2]);
    }

    #[test]
    fn dropped_consumers_give_back_what_they_did_not_acknowledge() {
        let broker = Broker::default();
        let queue = broker.queue("t");
        for n in 0..4 {
            queue.publish(message(n));
        }
        let mut consumers = MemoryConsumers::subscribe(&broker, vec![queue.clone()], 0);
        let first = consumers.receivers[0].try_recv().unwrap();
        let second = consumers.receivers[0].try_recv().unwrap();
        let Accepted::Deliver(tag, _) = consumers.accept(0, first) else {
            panic!("not delivered");
        };
        let Accepted::Deliver(_, _) = consumers.accept(0, second) else {
            panic!("not delivered");
        };
        consumers.settle(tag, AckKind::Ack).unwrap();
        drop(consumers);
        let again = queue.subscribe(9, 0);
        assert_eq!(
            bodies(&again),
            [1, 2, 3],
            "unacked first, then the buffered ones"
        );
    }

    #[test]
    fn cancel_returns_what_was_dealt_and_not_received() {
        let broker = Broker::default();
        let queue = broker.queue("t");
        let mut consumers = MemoryConsumers::subscribe(&broker, vec![queue.clone()], 0);
        for n in 0..3 {
            queue.publish(message(n));
        }
        let returned: Vec<u8> = consumers
            .cancel()
            .into_iter()
            .map(|(source, m)| {
                assert_eq!(source, 0);
                m.body[0]
            })
            .collect();
        assert_eq!(returned, [0, 1, 2]);
        queue.publish(message(3));
        assert_eq!(queue.len(), 1, "no consumer any more");
    }
}
