//! A server's listen connection: opens it, declares oslo's server topology, consumes the
//! three queues (`<topic>`, `<topic>.<server>`, `<topic>_fanout_<uuid>`), and runs the shared
//! [`PollLoop`](crate::driver::poll::PollLoop) on them; on close, deletes the fanout queue.

use std::collections::HashMap;
use std::sync::Arc;

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions, Delivery, QueueDeleteOptions};
use crossbeam_channel::{Receiver, Sender};
use log::{debug, info};

use crate::driver::poll::{Accepted, Consumers, Control, Outcome, PollLoop, PollThread};
use crate::driver::{AckKind, Incoming, ListenSpec, RawMessage};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;

use super::connection::{amqp_error, Connection, HostCycle};
use super::topology;

/// Everything the poll thread needs.
pub(crate) struct Setup {
    pub url: Arc<TransportUrl>,
    pub hosts: Arc<HostCycle>,
    pub options: TransportOptions,
    pub spec: ListenSpec,
}

/// Starts the poll thread; returns once the topology is declared and the consumers run.
pub(crate) fn spawn(setup: Setup, incoming: Sender<Incoming>) -> Result<PollThread> {
    PollThread::spawn(
        format!("warren-listen-{}", setup.spec.topic),
        move |control, ready| run(&setup, incoming, &control, &ready),
    )
}

fn run(
    setup: &Setup,
    incoming: Sender<Incoming>,
    control: &Receiver<Control>,
    ready: &Sender<Result<()>>,
) {
    let mut connection =
        match Connection::open(&setup.hosts, &setup.url, &setup.options, "listen", None) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
    let address = connection.address().to_string();
    let fanout_queue = format!(
        "{}_fanout_{}",
        setup.spec.topic,
        uuid::Uuid::new_v4().simple()
    );
    let channel = match open_and_declare(&mut connection, setup, &fanout_queue) {
        Ok(channel) => channel,
        Err(e) => {
            let _ = ready.send(Err(e));
            connection.close();
            return;
        }
    };
    let mut queues: Vec<String> = setup.spec.topic_queues().to_vec();
    queues.push(fanout_queue.clone());
    let mut consumers = Vec::with_capacity(queues.len());
    // amiquip kills the whole connection if it notifies a consumer whose receiver was dropped
    // (after a cancel or a channel close): the clones live until the connection is closed.
    let mut receivers: Vec<Receiver<ConsumerMessage>> = Vec::new();
    for queue in &queues {
        match channel.basic_consume(queue.as_str(), ConsumerOptions::default()) {
            Ok(consumer) => {
                receivers.push(consumer.receiver().clone());
                consumers.push(consumer);
            }
            Err(e) => {
                // Dropping consumers, channel and connection (in that order) closes them.
                let _ = ready.send(Err(amqp_error(e, &address)));
                return;
            }
        }
    }
    info!(
        "listening on {} (exchange {:?}) via {address}",
        queues.join(", "),
        setup.spec.exchange
    );
    let _ = ready.send(Ok(()));

    let rabbit = RabbitConsumers {
        channel: &channel,
        consumers: &consumers,
        receivers,
        unacked: HashMap::new(),
        address: &address,
    };
    let (outcome, rabbit) = PollLoop::new(rabbit, incoming).run(control);
    let receivers = rabbit.receivers;
    drop(consumers);
    if outcome == Outcome::Closed {
        if let Err(e) = channel.queue_delete(fanout_queue.as_str(), QueueDeleteOptions::default()) {
            debug!("could not delete fanout queue {fanout_queue}: {e}");
        }
    }
    let _ = channel.close();
    connection.close();
    drop(receivers);
    debug!("listener on {} finished", setup.spec.topic);
}

fn open_and_declare(
    connection: &mut Connection,
    setup: &Setup,
    fanout_queue: &str,
) -> Result<Channel> {
    let address = connection.address().to_string();
    let channel = connection.open_channel()?;
    let spec = &setup.spec;
    let options = &setup.options;
    if options.prefetch_count > 0 {
        channel
            .qos(0, options.prefetch_count, false)
            .map_err(|e| amqp_error(e, &address))?;
    }
    topology::declare_topic_exchange(&channel, &spec.exchange, options, &address)?;
    for queue in spec.topic_queues() {
        topology::declare_server_queue(&channel, &spec.exchange, &queue, options, &address)?;
    }
    topology::declare_fanout_exchange(&channel, &spec.topic, &address)?;
    topology::declare_fanout_queue(&channel, &spec.topic, fanout_queue, options, &address)?;
    Ok(channel)
}

/// amiquip consumers on one channel; deliveries wait here (without their bodies) for their ack.
struct RabbitConsumers<'a> {
    channel: &'a Channel,
    consumers: &'a [Consumer<'a>],
    receivers: Vec<Receiver<ConsumerMessage>>,
    unacked: HashMap<u64, Delivery>,
    address: &'a str,
}

impl Consumers for RabbitConsumers<'_> {
    type Item = ConsumerMessage;

    fn receivers(&self) -> &[Receiver<ConsumerMessage>] {
        &self.receivers
    }

    fn accept(&mut self, item: ConsumerMessage) -> Accepted {
        match item {
            ConsumerMessage::Delivery(mut delivery) => {
                let tag = delivery.delivery_tag();
                let message = RawMessage {
                    body: std::mem::take(&mut delivery.body),
                    content_type: delivery.properties.content_type().clone(),
                    routing_key: std::mem::take(&mut delivery.routing_key),
                };
                self.unacked.insert(tag, delivery);
                Accepted::Deliver(tag, message)
            }
            ConsumerMessage::ClientCancelled
            | ConsumerMessage::ClientClosedChannel
            | ConsumerMessage::ClientClosedConnection => Accepted::Skip,
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

    fn cancel(&mut self) -> Vec<ConsumerMessage> {
        for consumer in self.consumers {
            if let Err(e) = consumer.cancel() {
                debug!("cancelling consumer {}: {e}", consumer.consumer_tag());
            }
        }
        self.receivers
            .iter()
            .flat_map(|r| r.try_iter().collect::<Vec<_>>())
            .collect()
    }

    fn location(&self) -> &str {
        self.address
    }
}
