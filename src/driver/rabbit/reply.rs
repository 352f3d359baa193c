//! The transport's reply consumer: one thread and one connection consuming the transport's
//! single reply queue `reply_<uuid hex>` (non-durable, not exclusive, `x-expires`) without
//! acknowledgements (a reply matters only to this process; oslo acks each one, which costs a
//! frame per call).
//!
//! The consumer's deliveries are offered to waiting callers as a [`ReplyFeed`]: a caller
//! waiting for its reply reads them itself and routes what is not its own through the
//! [`ReplySink`], so the common case has no hop through this thread. The thread owns the
//! channel and the connection, reads the deliveries itself whenever no caller is reading them
//! (every [`IDLE_READ`]), and reconnects when a reader reports the consumer gone.
//!
//! When its connection is lost (or the broker cancels its consumer because the queue was
//! deleted) it reconnects through [`Connection::establish`] and re-declares the queue under
//! the same name, so calls in flight keep waiting and get the replies that reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions, QueueDeleteOptions};
use crossbeam_channel::{Receiver, Select, SelectedOperation, Sender, TryRecvError};
use log::{debug, error, info, warn};

use crate::driver::{spawn_when_ready, RawMessage, ReplyFeed, ReplySink};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;

use super::connection::{self, amqp_error, Backoff, Connection, HostCycle, RetryPolicy};
use super::link::Link;
use super::publisher::Publisher;
use super::topology;

/// How often the thread reads the deliveries itself while no caller is reading them (replies
/// to calls nobody waits for yet, and a consumer cancelled or a connection lost while idle).
const IDLE_READ: Duration = Duration::from_millis(100);

/// A running reply consumer.
pub(crate) struct ReplyConsumer {
    /// Tells the thread to stop, with the deadline of its teardown.
    stop: Sender<Instant>,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// How long a teardown may wait for the broker when dropped ([`connection::patience`]).
    patience: Duration,
}

impl ReplyConsumer {
    /// Declares the setup's queue, starts consuming it, and returns once replies can arrive,
    /// connecting within `policy`; `running` is true until the thread ends. From then on it
    /// reconnects by itself whenever its connection is lost, re-declaring the same queue,
    /// until [`close`](Self::close).
    pub fn start(
        setup: Setup,
        policy: RetryPolicy,
        running: Arc<AtomicBool>,
    ) -> Result<ReplyConsumer> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let patience = connection::patience(&setup.options);
        running.store(true, Ordering::Release);
        let flag = running.clone();
        let thread = spawn_when_ready("warren-replies".into(), move |ready| {
            run(&setup, policy, &stop_rx, ready);
            flag.store(false, Ordering::Release);
        })?;
        Ok(ReplyConsumer {
            stop: stop_tx,
            running,
            thread: Some(thread),
            patience,
        })
    }

    /// `false` once the thread ended (it could not start; the next call tries again).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Stops consuming, deletes the reply queue, closes the connection and joins the thread;
    /// a broker that has not answered by `deadline` gets the socket shut down instead.
    pub fn close(mut self, deadline: Instant) {
        self.shutdown(deadline);
    }

    fn shutdown(&mut self, deadline: Instant) {
        let _ = self.stop.try_send(deadline);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the reply thread panicked");
            }
        }
    }
}

impl Drop for ReplyConsumer {
    fn drop(&mut self) {
        self.shutdown(Instant::now() + self.patience);
    }
}

/// What the reply thread needs.
pub(crate) struct Setup {
    pub url: Arc<TransportUrl>,
    pub hosts: Arc<HostCycle>,
    pub options: TransportOptions,
    /// The reply queue's name, kept across reconnections.
    pub queue: String,
    /// Where replies go: the transport's reply waiter.
    pub sink: ReplySink,
    /// With `single_connection`: the publisher whose send connection the consumer shares.
    pub shared: Option<Arc<Publisher>>,
}

enum SessionEnd {
    /// Told to stop; the teardown's deadline.
    Stopped(Instant),
    Lost(String),
}

/// How a session on one connection went.
enum Session {
    /// It could not start (declare or consume failed).
    Failed(Error),
    /// It ran and ended; the consumer's receiver must outlive the connection (see the listener).
    Ended(SessionEnd, Receiver<ConsumerMessage>),
}

fn run(setup: &Setup, start: RetryPolicy, stop: &Receiver<Instant>, ready: Sender<Result<()>>) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(&setup.options);
    let mut pause = |d: Duration| stop.recv_timeout(d).is_err();
    loop {
        let policy = if ready.is_some() {
            start
        } else {
            RetryPolicy::default()
        };
        let connect = |policy, pause: &mut dyn FnMut(Duration) -> bool| {
            Connection::establish(
                &setup.hosts,
                &setup.url,
                &setup.options,
                "reply",
                policy,
                pause,
            )
        };
        let established = Link::establish(setup.shared.as_ref(), connect, policy, &mut pause);
        let mut connection = match established {
            Ok(connection) => connection,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                }
                return;
            }
        };
        let address = connection.address().to_string();
        match session(&mut connection, setup, stop, &mut ready) {
            Session::Failed(e) => {
                connection.close();
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                warn!("reply consumer could not resume on {address}: {e}");
                if !pause(backoff.next_pause()) {
                    return;
                }
            }
            Session::Ended(SessionEnd::Lost(why), keep_alive) => {
                warn!("reply consumer lost its connection to {address} ({why}); reconnecting");
                connection.abandon(&setup.hosts);
                drop(keep_alive);
                backoff = Backoff::new(&setup.options);
                if !pause(backoff.first_pause()) {
                    return;
                }
            }
            Session::Ended(SessionEnd::Stopped(deadline), keep_alive) => {
                connection.close_by(deadline);
                drop(keep_alive);
                return;
            }
        }
    }
}

/// Declares the reply queue on a new channel and consumes it until stopped or lost; once
/// stopped, deletes the queue (nobody else uses this uuid-named queue: do not leave it behind
/// for 30 minutes) and closes the channel, all by the stop's deadline.
fn session(
    connection: &mut Link,
    setup: &Setup,
    stop: &Receiver<Instant>,
    ready: &mut Option<Sender<Result<()>>>,
) -> Session {
    let queue = setup.queue.as_str();
    let address = connection.address().to_string();
    let channel = match open_and_declare(connection, &setup.options, queue) {
        Ok(channel) => channel,
        Err(e) => return Session::Failed(e),
    };
    // No acks: a reply is only of use to this process, and acking each one would cost a frame
    // and a wake-up of the connection's I/O thread per call.
    let consume_options = ConsumerOptions {
        no_ack: true,
        ..ConsumerOptions::default()
    };
    let consumer = match channel.basic_consume(queue, consume_options) {
        Ok(consumer) => consumer,
        Err(e) => return Session::Failed(amqp_error(e, &address)),
    };
    let keep_alive = consumer.receiver().clone();
    match ready.take() {
        Some(ready) => {
            info!("consuming replies on {queue} via {address}");
            let _ = ready.send(Ok(()));
        }
        None => info!("consuming replies on {queue} again via {address}"),
    }
    let end = consume(&consumer, stop, &setup.sink);
    let deadline = match end {
        SessionEnd::Stopped(deadline) => deadline,
        SessionEnd::Lost(_) => Instant::now() + connection::patience(&setup.options),
    };
    // Each step waits for the broker's answer: one that stopped answering (or, sharing the
    // send connection, blocked it for an alarm) gets the socket shut down at the deadline.
    let watchdog = connection.watchdog(deadline, "the reply consumer's teardown");
    let _ = consumer.cancel();
    drop(consumer);
    if matches!(end, SessionEnd::Stopped(_)) {
        if let Err(e) = channel.queue_delete(queue, QueueDeleteOptions::default()) {
            debug!("could not delete reply queue {queue}: {e}");
        }
        let _ = channel.close();
    } else {
        // Dropping it closes it too (failing at once if the connection is gone): in time.
        drop(channel);
    }
    drop(watchdog);
    Session::Ended(end, keep_alive)
}

fn open_and_declare(
    connection: &mut Link,
    options: &TransportOptions,
    queue: &str,
) -> Result<Channel> {
    let address = connection.address().to_string();
    let channel = connection.open_channel()?;
    topology::declare_transient_queue(&channel, queue, options, &address)?;
    Ok(channel)
}

/// Offers the consumer's deliveries to waiting callers and reads them itself while none is,
/// until stopped or lost.
fn consume(consumer: &Consumer<'_>, stop: &Receiver<Instant>, sink: &ReplySink) -> SessionEnd {
    let (lost_tx, lost_rx) = crossbeam_channel::bounded(1);
    let feed = Arc::new(Feed {
        deliveries: consumer.receiver().clone(),
        lost: lost_tx,
        live: AtomicBool::new(true),
    });
    sink.offer(Some(feed.clone()));
    let end = loop {
        let mut select = Select::new();
        let stop_index = select.recv(stop);
        select.recv(&lost_rx);
        match select.select_timeout(IDLE_READ) {
            Ok(operation) if operation.index() == stop_index => {
                // The sender outlives the thread (it is joined before the sender is dropped),
                // so a stop carries its deadline.
                let deadline = operation.recv(stop).unwrap_or_else(|_| Instant::now());
                break SessionEnd::Stopped(deadline);
            }
            Ok(operation) => {
                let why = operation.recv(&lost_rx);
                break SessionEnd::Lost(why.unwrap_or_else(|_| "the consumer is gone".into()));
            }
            Err(_) if sink.feed_has_readers() => {}
            Err(_) => {
                if let Some(why) = feed.drain(sink) {
                    break SessionEnd::Lost(why);
                }
            }
        }
    };
    sink.offer(None);
    end
}

/// A reply as received: what the reply waiter reads of it.
pub(super) fn reply_message(mut delivery: amiquip::Delivery) -> RawMessage {
    RawMessage {
        body: std::mem::take(&mut delivery.body),
        content_type: delivery.properties.content_type().clone(),
        routing_key: std::mem::take(&mut delivery.routing_key),
        queue: String::new(),
        attempts: 0,
        reply_to: None,
    }
}

/// The reply consumer's deliveries, offered to waiting callers.
struct Feed {
    /// A clone of the consumer's receiver.
    deliveries: Receiver<ConsumerMessage>,
    /// Tells the reply thread the consumer is gone (a reader saw it first).
    lost: Sender<String>,
    /// `false` once a reader saw the consumer gone.
    live: AtomicBool,
}

impl Feed {
    /// A delivery as a raw reply; anything else means the consumer is gone: the reason.
    fn reply(&self, received: Option<ConsumerMessage>) -> std::result::Result<RawMessage, String> {
        match received {
            Some(ConsumerMessage::Delivery(delivery)) => Ok(reply_message(delivery)),
            Some(ConsumerMessage::ServerCancelled) => {
                Err("the consumer was cancelled by the broker (reply queue deleted?)".into())
            }
            Some(other) => Err(format!("{other:?}")),
            None => Err("the connection is gone".into()),
        }
    }

    /// Reads what waits, for the reply thread; the reason if the consumer is gone.
    fn drain(&self, sink: &ReplySink) -> Option<String> {
        loop {
            let received = match self.deliveries.try_recv() {
                Ok(message) => Some(message),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => None,
            };
            match self.reply(received) {
                Ok(message) => sink.deliver(message),
                Err(why) => {
                    self.live.store(false, Ordering::Release);
                    return Some(why);
                }
            }
        }
    }
}

impl ReplyFeed for Feed {
    fn register<'a>(&'a self, select: &mut Select<'a>) -> usize {
        select.recv(&self.deliveries)
    }

    fn complete(&self, operation: SelectedOperation<'_>) -> Option<RawMessage> {
        match self.reply(operation.recv(&self.deliveries).ok()) {
            Ok(message) => Some(message),
            Err(why) => {
                self.live.store(false, Ordering::Release);
                // Full: the thread was told already.
                let _ = self.lost.try_send(why);
                None
            }
        }
    }

    fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}
