//! The in-process transport (`memory://`, also `fake://`), oslo's `fake` driver: the same
//! client, server and dispatcher code, with a small broker inside the process instead of
//! RabbitMQ. Meant for users' unit tests.
//!
//! Transports whose URLs name the same host and virtual host share one broker
//! (`memory://my-test/` talks to `memory://my-test/`); give each test its own name to keep
//! tests apart. The broker models what warren relies on: topic exchanges with exact routing
//! keys, fanout exchanges, shared queues consumed round-robin, acks and requeues, message
//! expiration, and `mandatory` replies (a reply to a queue nobody consumes is undeliverable).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use log::debug;
use parking_lot::Mutex;

use crate::driver::poll::{Accepted, Consumers, PollThread, SessionEnd};
use crate::driver::{
    fanout_exchange, AckKind, Binding, Driver, ExchangeKind, Incoming, ListenSpec, Listener,
    Outgoing, QueueLifetime, QueuePlan, RawMessage, ReplySink, Route, SendOptions,
};
use crate::error::{Error, Result};
use crate::url::TransportUrl;

/// Brokers of the process, by URL identity.
fn brokers() -> &'static Mutex<HashMap<String, Weak<Broker>>> {
    static BROKERS: OnceLock<Mutex<HashMap<String, Weak<Broker>>>> = OnceLock::new();
    BROKERS.get_or_init(|| Mutex::new(HashMap::new()))
}

#[derive(Clone)]
struct Message {
    body: Vec<u8>,
    content_type: String,
    routing_key: String,
    queue: String,
    expires: Option<Instant>,
    attempts: u32,
}

struct Queue {
    tx: Sender<Message>,
    rx: Receiver<Message>,
}

impl Queue {
    fn new() -> Arc<Queue> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Queue { tx, rx })
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
        for binding in &plan.bindings {
            let bound = match binding.kind {
                ExchangeKind::Topic => {
                    let mut topic = self.topic.lock();
                    let keys = topic.entry(binding.exchange.clone()).or_default();
                    let queues = keys.entry(binding.routing_key.clone()).or_default();
                    (!queues.contains(&plan.name)).then(|| queues.push(plan.name.clone()))
                }
                ExchangeKind::Fanout => {
                    let mut fanout = self.fanout.lock();
                    let queues = fanout.entry(binding.exchange.clone()).or_default();
                    (!queues.contains(&plan.name)).then(|| queues.push(plan.name.clone()))
                }
            };
            let _ = bound;
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

    fn push(&self, message: Message) {
        if let Some(queue) = self.queues.lock().get(&message.queue) {
            let _ = queue.tx.send(message);
        }
    }
}

pub(crate) struct MemoryDriver {
    broker: Arc<Broker>,
    reply_queue: String,
    sink: ReplySink,
    closed: AtomicBool,
}

impl MemoryDriver {
    pub fn new(url: &TransportUrl, sink: ReplySink) -> MemoryDriver {
        MemoryDriver {
            broker: Broker::for_url(url),
            reply_queue: format!("reply_{}", uuid::Uuid::new_v4().simple()),
            sink,
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
        let queues: Vec<String> = match message.route {
            Route::Topic {
                exchange,
                routing_key,
            } => self
                .broker
                .topic
                .lock()
                .get(exchange)
                .and_then(|keys| keys.get(routing_key))
                .cloned()
                .unwrap_or_default(),
            Route::Fanout { topic } => self
                .broker
                .fanout
                .lock()
                .get(&fanout_exchange(topic))
                .cloned()
                .unwrap_or_default(),
            Route::Direct { queue } => {
                let sink = self.broker.replies.lock().get(queue).cloned();
                if let Some(sink) = sink {
                    sink(RawMessage {
                        body: message.body.to_vec(),
                        content_type: Some(message.codec.content_type().to_string()),
                        routing_key: routing_key.clone(),
                        queue: routing_key,
                        attempts: 0,
                    });
                    return Ok(());
                }
                let exists = self.broker.queues.lock().contains_key(queue);
                if exists {
                    vec![queue.to_string()]
                } else {
                    Vec::new()
                }
            }
        };
        if queues.is_empty() {
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
        for queue in queues {
            self.broker.push(Message {
                body: message.body.to_vec(),
                content_type: message.codec.content_type().to_string(),
                routing_key: routing_key.clone(),
                queue,
                expires: message.expiration.map(|e| Instant::now() + e),
                attempts: message.redelivery.map_or(0, |r| r.attempts),
            });
        }
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
        let receivers = spec
            .consumed()
            .map(|plan| self.broker.queue(&plan.name).rx.clone())
            .collect();
        let broker = self.broker.clone();
        let delete_on_close = spec.delete_on_close.clone();
        let name = format!("warren-listen-{}", spec.label);
        let thread = PollThread::spawn(
            name,
            incoming,
            spec.ack_on_handoff,
            move |mut poll, control, ready| {
                let _ = ready.send(Ok(()));
                let mut consumers = MemoryConsumers {
                    broker: broker.clone(),
                    receivers,
                    unacked: HashMap::new(),
                    next_tag: 1,
                };
                // In-process queues are never lost: one session, until closed.
                let end = poll.run_session(&mut consumers, &control);
                // Like a closed channel: whatever was not acknowledged goes back to its queue.
                for (_, message) in consumers.unacked {
                    broker.push(message);
                }
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

/// A listener's view of its in-process queues.
struct MemoryConsumers {
    broker: Arc<Broker>,
    receivers: Vec<Receiver<Message>>,
    unacked: HashMap<u64, Message>,
    next_tag: u64,
}

impl Consumers for MemoryConsumers {
    type Item = Message;

    fn receivers(&self) -> &[Receiver<Message>] {
        &self.receivers
    }

    fn accept(&mut self, _source: usize, message: Message) -> Accepted {
        if message.expires.is_some_and(|at| at <= Instant::now()) {
            debug!("memory: dropping expired message on {}", message.queue);
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
        };
        self.unacked.insert(tag, message);
        Accepted::Deliver(tag, raw)
    }

    fn settle(&mut self, tag: u64, kind: AckKind) -> Result<()> {
        let message = self.unacked.remove(&tag).ok_or(Error::Closed)?;
        if kind == (AckKind::Reject { requeue: true }) {
            self.broker.push(message);
        }
        Ok(())
    }

    fn cancel(&mut self) -> Vec<(usize, Message)> {
        // Nothing is buffered outside the shared queues.
        Vec::new()
    }
}
