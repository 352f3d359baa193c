//! The RabbitMQ driver (`rabbit://`, `amqp://`), on amiquip.
//!
//! Connections per transport, as in oslo: one *send* connection with a pool of confirm-mode
//! channels ([`publisher`]) watched by a [`heartbeat`] thread, one *reply* connection
//! consuming the reply queue ([`reply`]), and one *listen* connection per server, owned by
//! its poll thread ([`listener`]). [`connection`] opens them all and is the one recovery
//! path: failover between hosts, backoff with jitter, retry and deadline; each owner then
//! re-creates what lived on the lost connection (channels, topology, consumers).
//! [`topology`] declares what oslo declares; [`acks`] decides when one `multiple` ack may
//! stand for several deliveries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::warn;
use parking_lot::Mutex;

use crate::driver::{
    DirectReplies, Driver, Incoming, ListenSpec, Listener, Outgoing, ReplySink, SendOptions,
};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;

mod acks;
mod connection;
mod heartbeat;
mod link;
mod listener;
mod publisher;
mod reply;
mod tls;
mod topology;

use connection::{Backoff, HostCycle, RetryPolicy};
use heartbeat::Heartbeat;
use publisher::Publisher;
use reply::ReplyConsumer;

pub(crate) struct RabbitDriver {
    url: Arc<TransportUrl>,
    hosts: Arc<HostCycle>,
    options: TransportOptions,
    publisher: Arc<Publisher>,
    heartbeat: Mutex<Option<Heartbeat>>,
    /// `reply_<uuid>`, or with the queue manager `reply_<host>:<process>:<n>`; named when the
    /// first call needs it (oslo's `_get_reply_q`), then kept across reconnections.
    reply_queue: OnceLock<String>,
    reply: Mutex<Option<ReplyConsumer>>,
    /// The reply consumer's thread runs: calls then take the queue name without the lock.
    reply_running: Arc<AtomicBool>,
    sink: ReplySink,
    closed: AtomicBool,
}

impl RabbitDriver {
    /// The reply queue's name, chosen on first use.
    fn reply_queue_name_or_new(&self) -> String {
        self.reply_queue
            .get_or_init(|| {
                if self.options.queue_manager {
                    format!(
                        "reply_{}",
                        crate::driver::queue_manager::next_name(
                            &self.options.hostname,
                            &self.options.processname
                        )
                    )
                } else {
                    format!("reply_{}", uuid::Uuid::new_v4().simple())
                }
            })
            .clone()
    }

    pub fn new(
        url: TransportUrl,
        options: TransportOptions,
        sink: ReplySink,
        hook: crate::observe::Hook,
    ) -> Result<RabbitDriver> {
        let url = Arc::new(url);
        let hosts = Arc::new(
            HostCycle::new(&url, options.failover_strategy)
                .with_tls(tls::connector(&options.tls)?)
                .with_hook(hook),
        );
        let (watch_tx, watch_rx) = crossbeam_channel::unbounded();
        let publisher = Arc::new(Publisher::new(
            url.clone(),
            hosts.clone(),
            options.clone(),
            watch_tx,
        ));
        let heartbeat = Heartbeat::start(publisher.clone(), watch_rx, Backoff::new(&options))?;
        Ok(RabbitDriver {
            publisher,
            heartbeat: Mutex::new(Some(heartbeat)),
            reply_queue: OnceLock::new(),
            url,
            hosts,
            options,
            reply: Mutex::new(None),
            reply_running: Arc::new(AtomicBool::new(false)),
            sink,
            closed: AtomicBool::new(false),
        })
    }
}

impl RabbitDriver {
    /// With `single_connection`: the publisher whose send connection consumers share.
    fn shared(&self) -> Option<Arc<Publisher>> {
        self.options
            .single_connection
            .then(|| self.publisher.clone())
    }
}

impl Driver for RabbitDriver {
    fn send(&self, message: &Outgoing<'_>, options: &SendOptions) -> Result<()> {
        self.publisher.publish(message, options)
    }

    fn send_direct_call(
        &self,
        message: &Outgoing<'_>,
        options: &SendOptions,
    ) -> Result<Option<Box<dyn DirectReplies>>> {
        Ok(self
            .publisher
            .publish_direct(message, options)?
            .map(|call| Box::new(call) as Box<dyn DirectReplies>))
    }

    fn reply_queue(&self, options: &SendOptions) -> Result<String> {
        // The common case, without meeting the other callers on the lock.
        if self.reply_running.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire) {
            if let Some(name) = self.reply_queue.get() {
                return Ok(name.clone());
            }
        }
        // Another caller may be starting the consumer: wait for it within our own deadline.
        let mut reply = match options.deadline {
            Some(deadline) => {
                self.reply
                    .try_lock_until(deadline)
                    .ok_or_else(|| Error::Timeout {
                        msg_id: String::new(),
                        method: "waiting for the reply queue".into(),
                        timeout: Duration::ZERO,
                    })?
            }
            None => self.reply.lock(),
        };
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if !reply.as_ref().is_some_and(ReplyConsumer::is_running) {
            if let Some(dead) = reply.take() {
                // Its thread has ended: nothing waits for the broker.
                dead.close(Instant::now());
            }
            let policy = RetryPolicy {
                retry: options.retry,
                deadline: options.deadline,
            };
            let setup = reply::Setup {
                url: self.url.clone(),
                hosts: self.hosts.clone(),
                options: self.options.clone(),
                queue: self.reply_queue_name_or_new(),
                sink: self.sink.clone(),
                shared: self.shared(),
            };
            let started = ReplyConsumer::start(setup, policy, self.reply_running.clone())?;
            if self.closed.load(Ordering::Acquire) {
                // The transport closed while it started (its close gave up waiting for this
                // lock): nothing else would ever stop it.
                started.close(Instant::now() + connection::patience(&self.options));
                return Err(Error::Closed);
            }
            *reply = Some(started);
        }
        Ok(self.reply_queue_name_or_new())
    }

    fn reply_queue_name(&self) -> Option<String> {
        self.reply
            .lock()
            .as_ref()
            .filter(|r| r.is_running())
            .and_then(|_| self.reply_queue.get().cloned())
    }

    fn listen(&self, spec: &ListenSpec, incoming: Sender<Incoming>) -> Result<Box<dyn Listener>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let setup = listener::Setup {
            url: self.url.clone(),
            hosts: self.hosts.clone(),
            options: self.options.clone(),
            spec: spec.clone(),
            retry: spec.retry,
            next_stream_offset: std::sync::atomic::AtomicI64::new(-1),
            shared: self.shared(),
        };
        let listener = listener::spawn(setup, incoming)?;
        Ok(Box::new(listener))
    }

    /// Closes within one deadline, the connections' patience (twice the heartbeat, 2 to 10 s):
    /// a broker that has not answered by then gets the sockets shut down. The heartbeat thread
    /// is joined last, within one connection attempt more.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let deadline = Instant::now() + connection::patience(&self.options);
        // Told to stop first, so that it does not reconnect the send connection while it
        // closes (a reconnect under way sees the stop between hosts, or finds the publisher
        // closed); joined last: it may be waiting for the send connection, which the
        // publisher's close frees when the broker stopped answering.
        let heartbeat = self.heartbeat.lock().take();
        if let Some(heartbeat) = &heartbeat {
            heartbeat.tell_to_stop();
        }
        // Sharing a blocked send connection (`single_connection`), the reply consumer's
        // teardown would wait for its watchdog: the broker reads nothing from it until the
        // alarm clears.
        self.publisher.abort_if_blocked();
        // A call starting the reply consumer holds this lock until the consumer runs (or its
        // start fails); one still starting at the deadline closes itself once started
        // ([`Driver::reply_queue`] looks at `closed` again).
        match self.reply.try_lock_until(deadline) {
            Some(mut reply) => {
                if let Some(reply) = reply.take() {
                    reply.close(deadline);
                }
            }
            None => warn!("the reply consumer was still starting when the transport closed"),
        }
        self.publisher.close(deadline);
        if let Some(mut heartbeat) = heartbeat {
            heartbeat.stop();
        }
    }
}
