//! The transport's reply consumer: one thread and one connection consuming the transport's
//! single reply queue `reply_<uuid hex>` (non-durable, not exclusive, `x-expires`) without
//! acknowledgements (a reply matters only to this process; oslo acks each one, which costs a
//! frame per call), handing each reply to the [`ReplySink`] that routes it to the waiting
//! caller.
//!
//! When its connection is lost (or the broker cancels its consumer because the queue was
//! deleted) it reconnects through [`Connection::establish`] and re-declares the queue under
//! the same name, so calls in flight keep waiting and get the replies that reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions, QueueDeleteOptions};
use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, error, info, warn};

use crate::driver::timer::DecayingTimer;
use crate::driver::{spawn_when_ready, RawMessage, ReplySink};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;

use super::connection::{amqp_error, Backoff, Connection, HostCycle, RetryPolicy};
use super::topology;

/// A running reply consumer.
pub(crate) struct ReplyConsumer {
    stop: Sender<()>,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyConsumer {
    /// Declares `queue`, starts consuming it, and returns once replies can arrive, connecting
    /// within `policy`. From then on it reconnects by itself whenever its connection is lost,
    /// re-declaring the same queue, until [`close`](Self::close).
    pub fn start(
        url: Arc<TransportUrl>,
        hosts: Arc<HostCycle>,
        options: TransportOptions,
        queue: String,
        sink: ReplySink,
        policy: RetryPolicy,
    ) -> Result<ReplyConsumer> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let setup = Setup {
            url,
            hosts,
            options,
            queue,
            sink,
        };
        let thread = spawn_when_ready("warren-replies".into(), move |ready| {
            run(&setup, policy, &stop_rx, ready);
            flag.store(false, Ordering::Release);
        })?;
        Ok(ReplyConsumer {
            stop: stop_tx,
            running,
            thread: Some(thread),
        })
    }

    /// `false` once the thread ended (it could not start; the next call tries again).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Stops consuming, deletes the reply queue, closes the connection and joins the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the reply thread panicked");
            }
        }
    }
}

impl Drop for ReplyConsumer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the reply thread needs.
struct Setup {
    url: Arc<TransportUrl>,
    hosts: Arc<HostCycle>,
    options: TransportOptions,
    queue: String,
    sink: ReplySink,
}

enum SessionEnd {
    Stopped,
    Lost(String),
}

/// How a session on one connection went.
enum Session {
    /// It could not start (declare or consume failed).
    Failed(Error),
    /// It ran and ended; the consumer's receiver must outlive the connection (see the listener).
    Ended(SessionEnd, Receiver<ConsumerMessage>),
}

fn run(setup: &Setup, start: RetryPolicy, stop: &Receiver<()>, ready: Sender<Result<()>>) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(&setup.options);
    let mut pause = |d: Duration| stop.recv_timeout(d).is_err();
    loop {
        let policy = if ready.is_some() {
            start
        } else {
            RetryPolicy::default()
        };
        let established = Connection::establish(
            &setup.hosts,
            &setup.url,
            &setup.options,
            "reply",
            policy,
            &mut pause,
        );
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
            Session::Ended(SessionEnd::Stopped, keep_alive) => {
                connection.close();
                drop(keep_alive);
                return;
            }
        }
    }
}

/// Declares the reply queue on a new channel and consumes it until stopped or lost; once
/// stopped, deletes the queue (nobody else uses this uuid-named queue: do not leave it behind
/// for 30 minutes) and closes the channel.
fn session(
    connection: &mut Connection,
    setup: &Setup,
    stop: &Receiver<()>,
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
    let _ = consumer.cancel();
    drop(consumer);
    if matches!(end, SessionEnd::Stopped) {
        if let Err(e) = channel.queue_delete(queue, QueueDeleteOptions::default()) {
            debug!("could not delete reply queue {queue}: {e}");
        }
        let _ = channel.close();
    }
    Session::Ended(end, keep_alive)
}

fn open_and_declare(
    connection: &mut Connection,
    options: &TransportOptions,
    queue: &str,
) -> Result<Channel> {
    let address = connection.address().to_string();
    let channel = connection.open_channel()?;
    topology::declare_transient_queue(&channel, queue, options, &address)?;
    Ok(channel)
}

/// Hands each reply to the sink, until stopped or lost.
fn consume(consumer: &Consumer<'_>, stop: &Receiver<()>, sink: &ReplySink) -> SessionEnd {
    let mut timer = DecayingTimer::until(None);
    loop {
        let mut select = Select::new();
        let stop_index = select.recv(stop);
        select.recv(consumer.receiver());
        let Ok(operation) =
            select.select_timeout(timer.next_timeout().unwrap_or(DecayingTimer::MAX))
        else {
            timer.idle();
            continue;
        };
        timer.activity();
        if operation.index() == stop_index {
            let _ = operation.recv(stop);
            return SessionEnd::Stopped;
        }
        match operation.recv(consumer.receiver()) {
            Ok(ConsumerMessage::Delivery(mut delivery)) => {
                let message = RawMessage {
                    body: std::mem::take(&mut delivery.body),
                    content_type: delivery.properties.content_type().clone(),
                    routing_key: std::mem::take(&mut delivery.routing_key),
                    queue: String::new(),
                    attempts: 0,
                };
                sink(message);
            }
            Ok(ConsumerMessage::ServerCancelled) => {
                return SessionEnd::Lost(
                    "the consumer was cancelled by the broker (reply queue deleted?)".into(),
                )
            }
            Ok(other) => return SessionEnd::Lost(format!("{other:?}")),
            Err(_) => return SessionEnd::Lost("the connection is gone".into()),
        }
    }
}
