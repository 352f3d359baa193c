//! The transport's reply consumer: one thread and one connection consuming the transport's
//! single reply queue `reply_<uuid hex>` (non-durable, not exclusive, `x-expires`), acking each
//! reply on receipt and handing it to the [`ReplySink`] that routes it to the waiting caller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use amiquip::{ConsumerMessage, ConsumerOptions, QueueDeleteOptions};
use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, error, info};

use crate::driver::timer::DecayingTimer;
use crate::driver::{spawn_when_ready, RawMessage, ReplySink};
use crate::error::Result;
use crate::options::TransportOptions;
use crate::url::TransportUrl;

use super::connection::{amqp_error, Connection, HostCycle};
use super::topology;

/// A running reply consumer.
pub(crate) struct ReplyConsumer {
    stop: Sender<()>,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyConsumer {
    /// Declares `queue`, starts consuming it, and returns once replies can arrive.
    pub fn start(
        url: Arc<TransportUrl>,
        hosts: Arc<HostCycle>,
        options: TransportOptions,
        queue: String,
        sink: ReplySink,
        deadline: Option<Instant>,
    ) -> Result<ReplyConsumer> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let thread = spawn_when_ready("warren-replies".into(), move |ready| {
            run(
                &url, &hosts, &options, &queue, &sink, deadline, &stop_rx, &ready,
            );
            flag.store(false, Ordering::Release);
        })?;
        Ok(ReplyConsumer {
            stop: stop_tx,
            running,
            thread: Some(thread),
        })
    }

    /// `false` once the consumer lost its connection (the next call starts a new one).
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

#[allow(clippy::too_many_arguments)]
fn run(
    url: &TransportUrl,
    hosts: &HostCycle,
    options: &TransportOptions,
    queue: &str,
    sink: &ReplySink,
    deadline: Option<Instant>,
    stop: &Receiver<()>,
    ready: &Sender<Result<()>>,
) {
    let mut connection = match Connection::open(hosts, url, options, "reply", deadline) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let address = connection.address().to_string();
    let setup = connection.open_channel().and_then(|channel| {
        if options.prefetch_count > 0 {
            channel
                .qos(0, options.prefetch_count, false)
                .map_err(|e| amqp_error(e, &address))?;
        }
        topology::declare_transient_queue(&channel, queue, options, &address)?;
        Ok(channel)
    });
    let channel = match setup {
        Ok(channel) => channel,
        Err(e) => {
            let _ = ready.send(Err(e));
            connection.close();
            return;
        }
    };
    let consumer = match channel.basic_consume(queue, ConsumerOptions::default()) {
        Ok(consumer) => consumer,
        Err(e) => {
            // Dropping channel and connection closes them.
            let _ = ready.send(Err(amqp_error(e, &address)));
            return;
        }
    };
    // Kept until the connection is closed (see the listener for why).
    let keep_alive = consumer.receiver().clone();
    info!("consuming replies on {queue} via {address}");
    let _ = ready.send(Ok(()));

    let mut timer = DecayingTimer::until(None);
    let clean = loop {
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
            break true;
        }
        match operation.recv(consumer.receiver()) {
            Ok(ConsumerMessage::Delivery(mut delivery)) => {
                let message = RawMessage {
                    body: std::mem::take(&mut delivery.body),
                    content_type: delivery.properties.content_type().clone(),
                    routing_key: std::mem::take(&mut delivery.routing_key),
                };
                if let Err(e) = delivery.ack(&channel) {
                    debug!("could not ack a reply: {e}");
                }
                sink(message);
            }
            Ok(other) => {
                error!("reply consumer on {queue} lost its channel: {other:?}");
                break false;
            }
            Err(_) => {
                error!("reply consumer on {queue} lost its channel");
                break false;
            }
        }
    };
    let _ = consumer.cancel();
    drop(consumer);
    if clean {
        // Nobody else uses this uuid-named queue; do not leave it behind for 30 minutes.
        if let Err(e) = channel.queue_delete(queue, QueueDeleteOptions::default()) {
            debug!("could not delete reply queue {queue}: {e}");
        }
    }
    let _ = channel.close();
    connection.close();
    drop(keep_alive);
}
