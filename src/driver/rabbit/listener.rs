//! A server's listen connection: connects, declares oslo's server topology, consumes the
//! three queues (`<topic>`, `<topic>.<server>`, `<topic>_fanout_<uuid>`), and runs the shared
//! [`PollLoop`] on them. When the channel or connection is lost (I/O error, `CONNECTION_FORCED`,
//! missed heartbeats, or a consumer cancelled by the broker, e.g. its queue was deleted) it
//! reconnects through [`Connection::establish`], re-declares the exact topology (same fanout
//! queue name) and consumes again: oslo's `consume()` under `ensure()`. On close it deletes
//! the fanout queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpValue, Channel, Consumer, ConsumerMessage, ConsumerOptions, Delivery, QueueDeleteOptions,
};
use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};

use crate::driver::poll::{Accepted, Consumers, Control, PollLoop, PollThread, SessionEnd};
use crate::driver::{AckKind, Incoming, ListenSpec, QueueLifetime, RawMessage};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;

use super::acks::{self, ReadTags};
use super::connection::{
    self, amqp_error, AbortHandle, Backoff, Connection, HostCycle, RetryPolicy,
};
use super::link::Link;
use super::publisher::{Publisher, ATTEMPTS_HEADER};
use super::topology;

/// Everything the poll thread needs.
pub(crate) struct Setup {
    pub url: Arc<TransportUrl>,
    pub hosts: Arc<HostCycle>,
    pub options: TransportOptions,
    pub spec: ListenSpec,
    /// Passes over the hosts at start-up. `None`: if the broker is down, `start()` returns and
    /// the listener keeps trying in the background.
    pub retry: Option<u32>,
    /// Where the stream fanout consumer starts after a reconnection: the offset after the
    /// last delivery seen, or `-1` for oslo's `"last"` (at start, and after the broker
    /// cancelled the consumer).
    pub next_stream_offset: AtomicI64,
    /// With `single_connection`: the publisher whose send connection the listener shares.
    pub shared: Option<Arc<Publisher>>,
}

/// Starts the poll thread; returns once the topology is declared and the consumers run (or,
/// with `retry: None` and no broker reachable, once the first pass over the hosts failed).
pub(crate) fn spawn(setup: Setup, incoming: Sender<Incoming>) -> Result<PollThread> {
    let name = format!("warren-listen-{}", setup.spec.label);
    let ack_on_handoff = setup.spec.ack_on_handoff.clone();
    PollThread::spawn(
        name,
        incoming,
        ack_on_handoff,
        move |mut poll, control, ready| run(&setup, &mut poll, &control, ready),
    )
}

fn run(setup: &Setup, poll: &mut PollLoop, control: &Receiver<Control>, ready: Sender<Result<()>>) {
    let topic = &setup.spec.label;
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(&setup.options);
    loop {
        if poll.is_stopped() {
            // Stopped while disconnected: never consume again, wait for close.
            while poll.wait_offline(control, backoff.next_pause()).is_none() {}
            return;
        }
        let Some(mut connection) = connect(setup, poll, control, &mut ready) else {
            return;
        };
        let address = connection.address().to_string();
        match session(&mut connection, setup, poll, control, &mut ready) {
            Session::Failed(e) => {
                connection.close();
                if let Some(ready) = ready.take() {
                    // A refusal at start-up (406, 403...) is the caller's to see.
                    let _ = ready.send(Err(e));
                    return;
                }
                warn!("listener on {topic} could not resume on {address}: {e}");
                if poll.wait_offline(control, backoff.next_pause()).is_some() {
                    return;
                }
            }
            Session::Ended(SessionEnd::Lost(why), receivers) => {
                warn!("listener on {topic} lost its connection to {address} ({why}); reconnecting");
                connection.abandon(&setup.hosts);
                drop(receivers);
                backoff = Backoff::new(&setup.options);
                if poll.wait_offline(control, backoff.first_pause()).is_some() {
                    return;
                }
            }
            Session::Ended(_, receivers) => {
                connection.close();
                drop(receivers);
                debug!("listener on {topic} finished");
                return;
            }
        }
    }
}

/// How a session on one connection went.
enum Session {
    /// It could not start (declare or consume failed).
    Failed(Error),
    /// It ran and ended; the consumers' receivers must outlive the connection (amiquip kills the
    /// whole connection if it notifies a consumer whose receiver was dropped).
    Ended(SessionEnd, Vec<Receiver<ConsumerMessage>>),
}

/// Declares the topology on a new channel, consumes, runs the poll loop until the session ends;
/// on a clean close deletes the fanout queue and closes the channel, within the connection's
/// patience ([`connection::patience`]).
fn session(
    connection: &mut Link,
    setup: &Setup,
    poll: &mut PollLoop,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
) -> Session {
    let topic = &setup.spec.label;
    let address = connection.address().to_string();
    let channel = match open_and_declare(connection, setup) {
        Ok(channel) => channel,
        Err(e) => return Session::Failed(e),
    };
    let consumers = match consume(&channel, setup) {
        Ok(consumers) => consumers,
        Err(e) => return Session::Failed(e),
    };
    let receivers: Vec<Receiver<ConsumerMessage>> =
        consumers.iter().map(|c| c.receiver().clone()).collect();
    match ready.take() {
        Some(ready) => {
            let queues: Vec<&str> = setup.spec.consumed().map(|q| q.name.as_str()).collect();
            info!("listening on {} via {address}", queues.join(", "));
            let _ = ready.send(Ok(()));
        }
        None => info!("listener on {topic} consumes again via {address}"),
    }
    let mut rabbit = RabbitConsumers {
        channel: &channel,
        consumers: &consumers,
        receivers: receivers.clone(),
        queues: setup.spec.consumed().map(|q| q.name.clone()).collect(),
        unacked: HashMap::new(),
        read: ReadTags::default(),
        address: &address,
        next_stream_offset: &setup.next_stream_offset,
        abort: connection.abort_handle(),
        shared: setup.shared.as_ref(),
        patience: connection::patience(&setup.options),
    };
    let end = poll.run_session(&mut rabbit, control);
    // A deadline of its own, not the cancel's: a server's `wait()` (which closes the session)
    // may come long after its `stop()` (which cancelled), and a broker that answered the cancel
    // deserves its patience again; one that did not has its socket shut down already, and every
    // step below fails at once.
    let deadline = Instant::now() + rabbit.patience;
    drop(rabbit);
    // Each step waits for the broker's answer: one that stopped answering (or, sharing the
    // send connection, blocked it for an alarm) gets the socket shut down in time.
    let watchdog = connection.watchdog(deadline, "the listener's teardown");
    for consumer in &consumers {
        let _ = consumer.cancel();
    }
    drop(consumers);
    if end == SessionEnd::Closed {
        for queue in &setup.spec.delete_on_close {
            if let Err(e) = channel.queue_delete(queue.as_str(), QueueDeleteOptions::default()) {
                debug!("could not delete queue {queue}: {e}");
            }
        }
    }
    if matches!(end, SessionEnd::Lost(_)) {
        // Dropping it closes it too (failing at once if the connection is gone): in time.
        drop(channel);
    } else {
        let _ = channel.close();
    }
    drop(watchdog);
    Session::Ended(end, receivers)
}

/// Connects for a session. At start-up (`ready` still unanswered) it honours the server's
/// `retry`, and with `retry: None` it lets `start()` return after the first failed pass and
/// goes on in the background. `None` when closed meanwhile or when start-up failed.
fn connect(
    setup: &Setup,
    poll: &mut PollLoop,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
) -> Option<Link> {
    // Closed while waiting: establish() then fails with Error::Closed.
    let mut pause = |pause: std::time::Duration| poll.wait_offline(control, pause).is_none();
    let starting = ready.is_some();
    let policy = RetryPolicy {
        retry: if starting {
            setup.retry.or(Some(0))
        } else {
            None
        },
        deadline: None,
    };
    let mut establish = |policy| {
        let connect = |policy, pause: &mut dyn FnMut(std::time::Duration) -> bool| {
            Connection::establish(
                &setup.hosts,
                &setup.url,
                &setup.options,
                "listen",
                policy,
                pause,
            )
        };
        Link::establish(setup.shared.as_ref(), connect, policy, &mut pause)
    };
    let result = match establish(policy) {
        Err(Error::DeliveryFailure { .. }) if starting && setup.retry.is_none() => {
            warn!(
                "server on {} starts without a broker; it will consume once one is reachable",
                setup.spec.label
            );
            if let Some(ready) = ready.take() {
                let _ = ready.send(Ok(()));
            }
            establish(RetryPolicy::default())
        }
        other => other,
    };
    match result {
        Ok(connection) => Some(connection),
        Err(e) => {
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(e));
            }
            None
        }
    }
}

fn open_and_declare(connection: &mut Link, setup: &Setup) -> Result<Channel> {
    let address = connection.address().to_string();
    let channel = connection.open_channel()?;
    let options = &setup.options;
    if options.prefetch_count > 0 {
        channel
            .qos(0, options.prefetch_count, false)
            .map_err(|e| amqp_error(e, &address))?;
    }
    for plan in &setup.spec.queues {
        topology::declare_planned_queue(&channel, plan, options, &address)?;
    }
    Ok(channel)
}

fn consume<'c>(channel: &'c Channel, setup: &Setup) -> Result<Vec<Consumer<'c>>> {
    setup
        .spec
        .consumed()
        .map(|plan| {
            let mut options = ConsumerOptions::default();
            if plan.lifetime == QueueLifetime::Stream {
                // oslo's consumer argument: "last" at first, then the offset after the last
                // delivery seen, so a reconnected server misses nothing and repeats nothing.
                let offset = match setup.next_stream_offset.load(Ordering::Acquire) {
                    -1 => AmqpValue::LongString("last".into()),
                    next => topology::integer(next),
                };
                options.arguments.insert("x-stream-offset".into(), offset);
            }
            channel
                .basic_consume(plan.name.as_str(), options)
                .map_err(|e| Error::Refused {
                    code: 0,
                    text: format!("cannot consume {}: {e}", plan.name),
                })
        })
        .collect()
}

/// amiquip consumers on one channel; deliveries wait here (without their bodies) for their ack.
struct RabbitConsumers<'a> {
    channel: &'a Channel,
    consumers: &'a [Consumer<'a>],
    receivers: Vec<Receiver<ConsumerMessage>>,
    /// The queue of each receiver.
    queues: Vec<String>,
    unacked: HashMap<u64, Delivery>,
    /// Which of the channel's deliveries the loop has read: one `multiple` ack must not
    /// cover a delivery still waiting in a receiver ([`acks`]).
    read: ReadTags,
    address: &'a str,
    next_stream_offset: &'a AtomicI64,
    /// Shuts the connection's socket down if the broker does not answer a cancel in time
    /// (`None`: the shared connection is gone, a cancel fails at once).
    abort: Option<AbortHandle>,
    /// With `single_connection`: the publisher owning the connection, which shuts it down
    /// at once if the broker blocked it (it would answer no cancel before the alarm clears).
    shared: Option<&'a Arc<Publisher>>,
    /// How long cancelling may wait for the broker ([`connection::patience`]).
    patience: Duration,
}

impl Consumers for RabbitConsumers<'_> {
    type Item = ConsumerMessage;

    fn receivers(&self) -> &[Receiver<ConsumerMessage>] {
        &self.receivers
    }

    fn accept(&mut self, source: usize, item: ConsumerMessage) -> Accepted {
        match item {
            ConsumerMessage::Delivery(mut delivery) => {
                let tag = delivery.delivery_tag();
                self.read.read(tag);
                if let Some(offset) = stream_offset(&delivery.properties) {
                    self.next_stream_offset
                        .store(offset.saturating_add(1), Ordering::Release);
                }
                let message = RawMessage {
                    body: std::mem::take(&mut delivery.body),
                    content_type: delivery.properties.content_type().clone(),
                    routing_key: std::mem::take(&mut delivery.routing_key),
                    queue: self.queues.get(source).cloned().unwrap_or_default(),
                    attempts: attempts(&delivery.properties),
                    reply_to: delivery.properties.reply_to().clone(),
                };
                self.unacked.insert(tag, delivery);
                Accepted::Deliver(tag, message)
            }
            ConsumerMessage::ClientCancelled
            | ConsumerMessage::ClientClosedChannel
            | ConsumerMessage::ClientClosedConnection => Accepted::Skip,
            ConsumerMessage::ServerCancelled => {
                self.unacked.clear();
                // As oslo: a cancelled stream consumer starts again from "last".
                self.next_stream_offset.store(-1, Ordering::Release);
                Accepted::Lost("a consumer was cancelled by the broker (queue deleted?)".into())
            }
            lost => {
                self.unacked.clear();
                Accepted::Lost(format!("{lost:?}"))
            }
        }
    }

    fn settle(&mut self, tag: u64, kind: AckKind) -> Result<()> {
        let delivery = self.unacked.remove(&tag).ok_or_else(|| Error::Connection {
            host: self.address.to_string(),
            source: format!("unknown delivery tag {tag}").into(),
        })?;
        match kind {
            AckKind::Ack => delivery.ack(self.channel),
            AckKind::Reject { requeue } => delivery.reject(self.channel, requeue),
        }
        .map_err(|e| amqp_error(e, self.address))
    }

    fn ack_all(&mut self, tags: &[u64]) -> Vec<Result<()>> {
        let Some(last) = acks::one_ack_for(tags, self.unacked.keys().copied(), &self.read) else {
            return tags
                .iter()
                .map(|tag| self.settle(*tag, AckKind::Ack))
                .collect();
        };
        // The batch is exactly what the broker holds unacknowledged up to `last`: one frame.
        let mut newest = None;
        for tag in tags {
            if let Some(delivery) = self.unacked.remove(tag) {
                if *tag == last {
                    newest = Some(delivery);
                }
            }
        }
        let outcome = match newest {
            Some(delivery) => delivery
                .ack_multiple(self.channel)
                .map_err(|e| amqp_error(e, self.address)),
            None => Err(Error::Connection {
                host: self.address.to_string(),
                source: format!("unknown delivery tag {last}").into(),
            }),
        };
        // One frame: the same outcome for each.
        tags.iter()
            .map(|_| match &outcome {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::Connection {
                    host: self.address.to_string(),
                    source: e.to_string().into(),
                }),
            })
            .collect()
    }

    fn cancel(&mut self) -> Vec<(usize, ConsumerMessage)> {
        // A server's stop waits for this: a broker that stopped answering gets the socket shut
        // down (the session is then lost; a stopped listener does not consume again).
        if let Some(publisher) = self.shared {
            publisher.abort_if_blocked();
        }
        let deadline = Instant::now() + self.patience;
        let _watchdog = self
            .abort
            .as_ref()
            .map(|abort| abort.watchdog(deadline, "cancelling the consumers"));
        for consumer in self.consumers {
            if let Err(e) = consumer.cancel() {
                debug!("cancelling consumer {}: {e}", consumer.consumer_tag());
            }
        }
        let mut buffered = Vec::new();
        for (source, receiver) in self.receivers.iter().enumerate() {
            buffered.extend(receiver.try_iter().map(|item| (source, item)));
        }
        buffered
    }
}

/// The `x-stream-offset` header of a delivery from a stream.
fn stream_offset(properties: &amiquip::AmqpProperties) -> Option<i64> {
    match properties.headers().as_ref()?.get("x-stream-offset")? {
        AmqpValue::LongLongInt(n) => Some(*n),
        AmqpValue::LongInt(n) => Some(i64::from(*n)),
        AmqpValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// The `x-warren-attempts` header of a delivery (0 when absent).
fn attempts(properties: &amiquip::AmqpProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.get(ATTEMPTS_HEADER));
    match value {
        Some(AmqpValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AmqpValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AmqpValue::LongUInt(n)) => *n,
        _ => 0,
    }
}
