//! Publishing: the one place where messages leave warren for RabbitMQ.
//!
//! One send connection per transport carries a pool of channels. A publishing thread checks a
//! channel out, publishes, waits for the broker's publisher confirm on that channel, checks
//! for a `basic.return` when the message was `mandatory`, and checks the channel back in; so
//! publishers never queue behind one lock, and a channel is used by one thread at a time
//! (amiquip channels are `Send` but not `Sync`). Publishes nobody waits a confirm for
//! (`confirm(false)`) use plain channels from a second pool, so the broker sends them no
//! confirms at all. Each channel declares the exchanges it publishes to once, as oslo does.
//!
//! Calls sent with direct reply-to (`direct_reply_to`) use channels of two more pools, each
//! consuming RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue for as long as it lives: the call
//! keeps its channel until its reply came ([`DirectCall`]), reading the reply straight from
//! the channel's consumer. When every channel is taken, such a call uses the reply queue.
//!
//! A connection-level failure drops the connection and every channel opened on it; the publish
//! is retried on a new connection (to the next host if the current one is down) as its
//! `retry` and deadline allow. The [heartbeat](super::heartbeat) thread also reconnects a send
//! connection that died while idle, before the next publish needs it.
//!
//! While the broker blocks the send connection (a memory or disk alarm: it then reads nothing
//! from it), a publish sends nothing and waits for the unblock within its deadline: a channel
//! open, a declaration or a confirm would only wait for the alarm to clear, however long. The
//! heartbeat thread tells the publisher of `connection.blocked` / `unblocked`; closing a
//! blocked connection shuts its socket down instead of waiting for the broker's answer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, ConnectionBlockedNotification, ConsumerMessage,
    ConsumerOptions, FieldTable, Publish, Return,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use parking_lot::{Condvar, Mutex};

use crate::driver::{
    recv_parked, DirectReplies, Outgoing, RawMessage, Redelivery, Route, SendOptions,
    DIRECT_REPLY_TO,
};
use crate::error::{Error, Result};
use crate::options::TransportOptions;
use crate::url::TransportUrl;
use crate::wire::Codec;

use super::connection::{amqp_error, AbortHandle, Connection, HostCycle, RetryPolicy};
use super::topology;

/// Publishing channels per send connection.
const MAX_CHANNELS: usize = 32;
/// Channels per send connection kept by calls waiting for a direct reply-to reply; counted
/// apart, so that waiting calls never hold the channels other publishes need.
const MAX_DIRECT_CHANNELS: usize = 32;
/// Longest wait for a channel or a confirm when the caller has no deadline.
const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// How a nack's [`Error::DeliveryFailure`] reason starts; such a publish is sent again.
const NACKED: &str = "the broker rejected (nack) the message";
/// First and longest pause before sending a nacked message again.
const NACK_PAUSE_FIRST: Duration = Duration::from_millis(50);
const NACK_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Under this much time left, a nacked message is not sent again: the nack is the answer.
const NACK_LAST_TRY: Duration = Duration::from_millis(20);

/// Header counting the failed handling attempts of a re-sent cast.
pub(crate) const ATTEMPTS_HEADER: &str = "x-warren-attempts";
/// Header holding the last failure of a dead-lettered cast.
pub(crate) const FAILURE_HEADER: &str = "x-warren-failure";

/// The largest per-message TTL RabbitMQ accepts (`expiration`, in ms: 2^32 - 1).
const MAX_EXPIRATION_MS: u32 = u32::MAX;

/// The AMQP properties oslo puts on every message: content type and encoding, empty headers,
/// persistent delivery, priority 0, and `expiration` (ms, at most [`MAX_EXPIRATION_MS`]) on
/// calls. A re-sent cast also carries warren's attempt count and last failure as headers.
pub(crate) fn properties(
    codec: Codec,
    expiration: Option<Duration>,
    redelivery: Option<&Redelivery>,
) -> AmqpProperties {
    let mut headers = FieldTable::new();
    if let Some(redelivery) = redelivery {
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AmqpValue::LongLongInt(i64::from(redelivery.attempts)),
        );
        if let Some(failure) = &redelivery.failure {
            headers.insert(
                FAILURE_HEADER.into(),
                AmqpValue::LongString(failure.clone()),
            );
        }
    }
    let properties = AmqpProperties::default()
        .with_content_type(codec.content_type().to_string())
        .with_content_encoding(codec.content_encoding().to_string())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(0);
    match expiration {
        // RabbitMQ refuses (closes the channel on) an expiration over 2^32 - 1 ms (49.7 days):
        // a longer timeout keeps the message at least that long.
        Some(e) => properties.with_expiration(
            e.as_millis()
                .clamp(1, u128::from(MAX_EXPIRATION_MS))
                .to_string(),
        ),
        None => properties,
    }
}

/// The live send connection and its generation (bumped whenever it is dropped).
struct SendConnection {
    connection: Connection,
    generation: u64,
}

/// A publishing channel: in confirm mode (with its confirm and return receivers) or plain, for
/// publishes nobody waits a confirm for (a channel in confirm mode would make the broker send,
/// and amiquip's I/O thread handle, a confirm per message all the same).
struct PubChannel {
    channel: Channel,
    /// `None` on a plain channel.
    confirms: Option<Receiver<Confirm>>,
    returns: Receiver<Return>,
    /// With direct reply-to: the channel's consumer of `amq.rabbitmq.reply-to` (its requests
    /// carry that `reply_to`).
    replies: Option<Receiver<ConsumerMessage>>,
    /// Delivery tag of the last publish on this channel.
    published: u64,
    declared: HashSet<String>,
    generation: u64,
    address: String,
}

/// A new send connection's liveness receiver, for the [heartbeat](super::heartbeat) thread.
pub(crate) type Watch = (u64, Receiver<ConnectionBlockedNotification>);

/// The broker's block of the send connection of `generation` (`connection.blocked`).
struct Block {
    generation: u64,
    /// The broker's words, e.g. "low on memory": for the error of a publish that waited.
    reason: String,
}

pub(crate) struct Publisher {
    url: Arc<TransportUrl>,
    hosts: Arc<HostCycle>,
    options: TransportOptions,
    connection: Mutex<Option<SendConnection>>,
    /// The send connection's generation and [`AbortHandle`], beside `connection`: its lock is
    /// held only for a moment, never across a wait for the broker (a channel's open holds
    /// `connection`'s), so closing can always shut down a socket that keeps `connection`
    /// locked. Cleared with `connection`.
    abort: Mutex<Option<(u64, AbortHandle)>>,
    generation: AtomicU64,
    /// Idle channels: confirm mode or plain, each with or without direct reply-to
    /// ([`pool_of`]).
    idle: [Idle; 4],
    /// Open publishing channels, at most [`MAX_CHANNELS`].
    channels: AtomicUsize,
    /// Open direct reply-to channels, at most [`MAX_DIRECT_CHANNELS`].
    direct_channels: AtomicUsize,
    closed: AtomicBool,
    watch: Sender<Watch>,
    /// Set while the broker blocks the send connection (told by the heartbeat thread).
    blocked: Mutex<Option<Block>>,
    /// `blocked` is `Some`: lets publishes skip its lock while nothing is blocked.
    any_block: AtomicBool,
    /// Signalled when `blocked` clears, the connection is dropped or the publisher closes.
    unblocked: Condvar,
}

/// A pool of idle channels of one kind.
struct Idle {
    tx: Sender<PubChannel>,
    rx: Receiver<PubChannel>,
}

impl Idle {
    fn new() -> Idle {
        let (tx, rx) = crossbeam_channel::bounded(MAX_CHANNELS);
        Idle { tx, rx }
    }
}

/// Index of the pool of channels with or without confirms, and with or without a direct
/// reply-to consumer.
fn pool_of(confirming: bool, direct: bool) -> usize {
    usize::from(!confirming) + 2 * usize::from(direct)
}

impl Publisher {
    /// A publisher; every new connection's liveness receiver is sent on `watch`.
    pub fn new(
        url: Arc<TransportUrl>,
        hosts: Arc<HostCycle>,
        options: TransportOptions,
        watch: Sender<Watch>,
    ) -> Publisher {
        Publisher {
            url,
            hosts,
            options,
            connection: Mutex::new(None),
            abort: Mutex::new(None),
            generation: AtomicU64::new(1),
            idle: [Idle::new(), Idle::new(), Idle::new(), Idle::new()],
            channels: AtomicUsize::new(0),
            direct_channels: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            watch,
            blocked: Mutex::new(None),
            any_block: AtomicBool::new(false),
            unblocked: Condvar::new(),
        }
    }

    /// The broker blocked (`Some(reason)`) or unblocked (`None`) the send connection of
    /// `generation`; called by the heartbeat thread.
    pub fn set_blocked(&self, generation: u64, reason: Option<String>) {
        let mut blocked = self.blocked.lock();
        self.any_block.store(reason.is_some(), Ordering::Release);
        *blocked = reason.map(|reason| Block { generation, reason });
        self.unblocked.notify_all();
    }

    /// Forgets the block of the connection of `generation`, which is being dropped or closed,
    /// and wakes the publishes waiting for it to look again; `true` if it was blocked.
    fn end_block(&self, generation: u64) -> bool {
        let mut blocked = self.blocked.lock();
        let was = blocked
            .as_ref()
            .is_some_and(|block| block.generation == generation);
        if was {
            *blocked = None;
            self.any_block.store(false, Ordering::Release);
        }
        self.unblocked.notify_all();
        was
    }

    /// Waits while the broker blocks the current send connection, until `deadline`
    /// ([`Error::Timeout`]); returns at once when the connection is dropped (the next one starts
    /// unblocked) or the publisher closes.
    ///
    /// A block announced just after this returned is not seen: the publish then waits for its
    /// confirm until its deadline, but a channel open or a declaration in that window waits
    /// for the alarm to clear (or the connection to die).
    fn wait_unblocked(&self, deadline: Instant) -> Result<()> {
        if !self.any_block.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut blocked = self.blocked.lock();
        loop {
            let reason = match &*blocked {
                Some(block)
                    if block.generation == self.generation.load(Ordering::Acquire)
                        && !self.closed.load(Ordering::Acquire) =>
                {
                    block.reason.clone()
                }
                _ => return Ok(()),
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    msg_id: String::new(),
                    method: format!("publish (the broker blocks the connection: {reason})"),
                    timeout: Duration::ZERO,
                });
            }
            self.unblocked.wait_until(&mut blocked, deadline);
        }
    }

    /// Publishes `message` and waits for the broker's confirm, kombu's `ensure()` around a
    /// publish: when the connection fails, the publish is retried on a new connection (see
    /// [`Connection::establish`] for failover and backoff), within `options.retry` and the
    /// deadline. Channel-level refusals are not retried.
    pub fn publish(&self, message: &Outgoing<'_>, options: &SendOptions) -> Result<()> {
        self.publish_with(message, options, false).map(|_| ())
    }

    /// Publishes a call request with direct reply-to on a channel the returned [`DirectCall`]
    /// keeps; `Ok(None)` when every channel is taken (nothing was sent). Retried as
    /// [`publish`](Self::publish).
    pub fn publish_direct(
        self: &Arc<Self>,
        message: &Outgoing<'_>,
        options: &SendOptions,
    ) -> Result<Option<DirectCall>> {
        Ok(self
            .publish_with(message, options, true)?
            .map(|channel| DirectCall {
                publisher: self.clone(),
                channel: Some(channel),
                lost: false,
            }))
    }

    /// [`publish`](Self::publish); with `direct`, on a direct reply-to channel, returned
    /// instead of checked in (`None` when no such channel is free).
    fn publish_with(
        &self,
        message: &Outgoing<'_>,
        options: &SendOptions,
        direct: bool,
    ) -> Result<Option<PubChannel>> {
        let deadline = options
            .deadline
            .unwrap_or_else(|| Instant::now() + DEFAULT_PUBLISH_TIMEOUT);
        let policy = RetryPolicy {
            retry: options.retry,
            deadline: Some(deadline),
        };
        let mut losses = 0_u32;
        let mut nack_pause = NACK_PAUSE_FIRST;
        let mut declared_again = false;
        loop {
            match self.publish_once(message, policy, options.unconfirmed, direct) {
                // The channel remembered declaring an exchange that is gone since (a fanout
                // exchange is auto-delete: it goes with the last server's fanout queue). The
                // broker refused the publish and closed the channel; the next channel
                // declares it again. Once: a second 404 is the answer.
                Err(Error::Refused { code: 404, text }) if !declared_again => {
                    debug!("publish refused ({text}); declaring again on a new channel");
                    declared_again = true;
                }
                // A nacked message was never queued (e.g. its queue's leader was moving to
                // another node): sending it again within the deadline keeps at-most-once.
                // The pause never runs past half the time left, so the last try comes close to
                // the deadline instead of up to a whole pause before it.
                Err(Error::DeliveryFailure { host, reason })
                    if reason.starts_with(NACKED)
                        && deadline.saturating_duration_since(Instant::now()) >= NACK_LAST_TRY =>
                {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let pause = nack_pause.min(left / 2);
                    warn!("{reason} (broker {host}); sending it again in {pause:?}");
                    std::thread::sleep(pause);
                    nack_pause = (nack_pause * 2).min(NACK_PAUSE_MAX);
                }
                Err(Error::Connection { host, source }) => {
                    losses += 1;
                    let exhausted =
                        options.retry.is_some_and(|r| losses > r) || Instant::now() >= deadline;
                    if exhausted {
                        return Err(Error::DeliveryFailure {
                            host,
                            reason: format!(
                                "connection lost while publishing ({losses} attempts): {source}"
                            ),
                        });
                    }
                    debug!(
                        "publish interrupted by a lost connection to {host} ({source}); retrying"
                    );
                }
                other => return other,
            }
        }
    }

    fn publish_once(
        &self,
        message: &Outgoing<'_>,
        policy: RetryPolicy,
        unconfirmed: bool,
        direct: bool,
    ) -> Result<Option<PubChannel>> {
        let deadline = policy.deadline.unwrap_or_else(Instant::now);
        self.wait_unblocked(deadline)?;
        // A mandatory message's return is only seen through its confirm.
        let confirming = !unconfirmed || message.mandatory;
        let mut channel = if direct {
            match self.checkout_direct(policy, confirming)? {
                Some(channel) => channel,
                None => return Ok(None),
            }
        } else {
            self.checkout(policy, confirming)?
        };
        let result = channel.publish(message, deadline, &self.options);
        match &result {
            Ok(()) if direct => return Ok(Some(channel)),
            Ok(()) | Err(Error::Undeliverable { .. }) | Err(Error::Timeout { .. }) => {
                self.checkin(channel)
            }
            // RabbitMQ 3.10 keeps nacking publishes on a channel opened while a quorum
            // queue's leader was down, after a new leader took over: the retry goes out on a
            // fresh channel.
            Err(Error::DeliveryFailure { .. }) => self.discard(channel),
            Err(Error::Refused { .. }) => self.discard(channel),
            Err(e) => {
                warn!(
                    "publish on {} failed, dropping the send connection: {e}",
                    channel.address
                );
                self.reset_connection(channel.generation);
                self.discard(channel);
            }
        }
        result.map(|()| None)
    }

    /// An idle direct reply-to channel, or a new one while there are fewer than
    /// [`MAX_DIRECT_CHANNELS`]; `None` otherwise (the call then uses the reply queue: a call never
    /// waits for a channel another call keeps until its reply).
    fn checkout_direct(&self, policy: RetryPolicy, confirming: bool) -> Result<Option<PubChannel>> {
        let generation = self.generation.load(Ordering::Acquire);
        while let Ok(channel) = self.idle[pool_of(confirming, true)].rx.try_recv() {
            if channel.generation == generation && !channel.closed_by_server() {
                return Ok(Some(channel));
            }
            self.discard(channel);
        }
        let count = &self.direct_channels;
        if count.fetch_add(1, Ordering::AcqRel) < MAX_DIRECT_CHANNELS {
            return self
                .open_channel(policy, confirming, true)
                .map(Some)
                .inspect_err(|_| {
                    count.fetch_sub(1, Ordering::AcqRel);
                });
        }
        count.fetch_sub(1, Ordering::AcqRel);
        Ok(None)
    }

    /// An idle channel of the kind asked for, or a new one while there are fewer than
    /// [`MAX_CHANNELS`]; at the limit, an idle channel of the other kind makes room, or the
    /// caller waits (within its deadline) for a channel to come back.
    fn checkout(&self, policy: RetryPolicy, confirming: bool) -> Result<PubChannel> {
        let deadline = policy.deadline.unwrap_or_else(Instant::now);
        let (ours, other) = (
            &self.idle[pool_of(confirming, false)],
            &self.idle[pool_of(!confirming, false)],
        );
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            let channel = match ours.rx.try_recv() {
                Ok(channel) => channel,
                Err(_) if self.channels.fetch_add(1, Ordering::AcqRel) < MAX_CHANNELS => {
                    return self
                        .open_channel(policy, confirming, false)
                        .inspect_err(|_| {
                            self.channels.fetch_sub(1, Ordering::AcqRel);
                        });
                }
                Err(_) => {
                    self.channels.fetch_sub(1, Ordering::AcqRel);
                    if let Ok(unwanted) = other.rx.try_recv() {
                        self.discard(unwanted);
                        continue;
                    }
                    let timed_out = || Error::Timeout {
                        msg_id: String::new(),
                        method: "publish (waiting for a free channel)".into(),
                        timeout: Duration::ZERO,
                    };
                    crossbeam_channel::select! {
                        recv(ours.rx) -> channel => channel.map_err(|_| timed_out())?,
                        recv(other.rx) -> unwanted => {
                            if let Ok(unwanted) = unwanted {
                                self.discard(unwanted);
                            }
                            continue;
                        }
                        default(deadline.saturating_duration_since(Instant::now())) => {
                            return Err(timed_out())
                        }
                    }
                }
            };
            if channel.generation == self.generation.load(Ordering::Acquire)
                && !channel.closed_by_server()
            {
                return Ok(channel);
            }
            self.discard(channel);
        }
    }

    fn checkin(&self, channel: PubChannel) {
        if self.closed.load(Ordering::Acquire)
            || channel.generation != self.generation.load(Ordering::Acquire)
        {
            self.discard(channel);
        } else if let Err(full) = self.idle
            [pool_of(channel.confirms.is_some(), channel.replies.is_some())]
        .tx
        .try_send(channel)
        {
            self.discard(full.into_inner());
        }
    }

    fn discard(&self, channel: PubChannel) {
        match channel.replies {
            Some(_) => self.direct_channels.fetch_sub(1, Ordering::AcqRel),
            None => self.channels.fetch_sub(1, Ordering::AcqRel),
        };
        // Closing a channel of a dead connection fails at once; nothing to report.
        let _ = channel.channel.close();
    }

    /// Locks the connection slot, but not past the deadline.
    fn lock_until(
        &self,
        deadline: Instant,
    ) -> Result<parking_lot::MutexGuard<'_, Option<SendConnection>>> {
        self.connection
            .try_lock_until(deadline)
            .ok_or_else(|| Error::Timeout {
                msg_id: String::new(),
                method: "publish (waiting for the send connection)".into(),
                timeout: Duration::ZERO,
            })
    }

    /// Makes sure there is a send connection, connecting (outside the lock, so no caller
    /// waits on another's backoff) if there is none.
    pub fn connect(
        &self,
        policy: RetryPolicy,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let deadline = policy
            .deadline
            .unwrap_or_else(|| Instant::now() + DEFAULT_PUBLISH_TIMEOUT);
        {
            let guard = self.lock_until(deadline)?;
            // Closed while it waited for the lock: no new connection just to close it.
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if guard.is_some() {
                return Ok(());
            }
        }
        let mut connection =
            Connection::establish(&self.hosts, &self.url, &self.options, "send", policy, pause)?;
        let mut guard = self.lock_until(deadline)?;
        if self.closed.load(Ordering::Acquire) || guard.is_some() {
            // Closed meanwhile, or another thread connected first.
            drop(guard);
            connection.close();
            return if self.closed.load(Ordering::Acquire) {
                Err(Error::Closed)
            } else {
                Ok(())
            };
        }
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(liveness) = connection.take_liveness() {
            let _ = self.watch.send((generation, liveness));
        }
        *self.abort.lock() = Some((generation, connection.abort_handle().clone()));
        *guard = Some(SendConnection {
            connection,
            generation,
        });
        Ok(())
    }

    fn open_channel(
        &self,
        policy: RetryPolicy,
        confirming: bool,
        direct: bool,
    ) -> Result<PubChannel> {
        let deadline = policy.deadline.unwrap_or_else(Instant::now);
        self.connect(policy, &mut |pause| {
            thread::sleep(pause);
            !self.closed.load(Ordering::Acquire)
        })?;
        let mut guard = self.lock_until(deadline)?;
        let Some(send) = guard.as_mut() else {
            // Dropped again right after it was made: report it as a lost connection.
            return Err(Error::Connection {
                host: String::new(),
                source: "the send connection was lost".into(),
            });
        };
        let address = send.connection.address().to_string();
        let generation = send.generation;
        let opened = send.connection.open_channel().and_then(|channel| {
            let confirms = if confirming {
                channel
                    .enable_publisher_confirms()
                    .map_err(|e| amqp_error(e, &address))?;
                Some(
                    channel
                        .listen_for_publisher_confirms()
                        .map_err(|e| amqp_error(e, &address))?,
                )
            } else {
                None
            };
            let returns = channel
                .listen_for_returns()
                .map_err(|e| amqp_error(e, &address))?;
            let replies = if direct {
                let no_ack = ConsumerOptions {
                    no_ack: true,
                    ..ConsumerOptions::default()
                };
                let consumer = channel
                    .basic_consume(DIRECT_REPLY_TO, no_ack)
                    .map_err(|e| amqp_error(e, &address))?;
                Some(consumer.detach())
            } else {
                None
            };
            Ok(PubChannel {
                channel,
                confirms,
                replies,
                returns,
                published: 0,
                declared: HashSet::new(),
                generation,
                address: address.clone(),
            })
        });
        if let Err(Error::Connection { .. }) = &opened {
            drop(guard);
            self.reset_connection(generation);
        }
        opened
    }

    /// `host:port` of the send connection, if there is one.
    pub fn address(&self) -> Option<String> {
        self.connection
            .lock()
            .as_ref()
            .map(|send| send.connection.address().to_string())
    }

    /// A channel on the send connection for a consumer sharing it (`single_connection`), with
    /// the connection's generation and address; on the connection of `generation` only, when
    /// given (a session keeps to one connection). A lost connection is a
    /// [`Error::Connection`]: the consumer then drops it ([`reset_connection`]) and
    /// reconnects.
    ///
    /// [`reset_connection`]: Self::reset_connection
    pub fn open_consumer_channel(&self, generation: Option<u64>) -> Result<(Channel, u64, String)> {
        let lost = |host: String| Error::Connection {
            host,
            source: "the shared connection was lost".into(),
        };
        let mut guard = self.connection.lock();
        let Some(send) = guard.as_mut() else {
            return Err(lost(String::new()));
        };
        let address = send.connection.address().to_string();
        if generation.is_some_and(|g| g != send.generation) {
            return Err(lost(address));
        }
        let opened_on = send.generation;
        match send.connection.open_channel() {
            Ok(channel) => Ok((channel, opened_on, address)),
            Err(e) => {
                drop(guard);
                self.reset_connection(opened_on);
                Err(e)
            }
        }
    }

    /// Drops the send connection if it is still the one of `generation`; `true` if it was.
    pub fn reset_connection(&self, generation: u64) -> bool {
        let old = {
            let mut guard = self.connection.lock();
            match guard.as_ref() {
                Some(send) if send.generation == generation => {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    *self.abort.lock() = None;
                    guard.take()
                }
                _ => None,
            }
        };
        match old {
            Some(send) => {
                if self.end_block(send.generation) {
                    send.connection.abort();
                }
                send.connection.abandon(&self.hosts);
                true
            }
            None => false,
        }
    }

    /// Shuts down the socket of the send connection if the broker blocked it (it reads nothing
    /// from it until the alarm clears): closing then ends at once, and with
    /// `single_connection` so does the teardown of the consumers sharing it, instead of
    /// waiting for their watchdog.
    pub fn abort_if_blocked(&self) {
        if !self.any_block.load(Ordering::Acquire) {
            return;
        }
        let blocked = self.blocked.lock().as_ref().map(|block| block.generation);
        if let Some((generation, abort)) = &*self.abort.lock() {
            if blocked == Some(*generation) {
                abort.abort();
            }
        }
    }

    /// The [`AbortHandle`] of the send connection of `generation` (for a consumer sharing it,
    /// to bound its teardown); `None` if that connection is gone already (waits on it fail at
    /// once).
    pub fn abort_handle(&self, generation: u64) -> Option<AbortHandle> {
        match &*self.abort.lock() {
            Some((current, abort)) if *current == generation => Some(abort.clone()),
            _ => None,
        }
    }

    /// Closes every channel and the connection, shutting its socket down if the broker has
    /// not answered by `deadline`. Later publishes fail with [`Error::Closed`].
    pub fn close(&self, deadline: Instant) {
        self.closed.store(true, Ordering::Release);
        // A thread opening a channel on a blocked connection would hold the lock until the
        // deadline.
        self.abort_if_blocked();
        // Taken out first, and the lock released: closing may take a while. A thread opening
        // a channel holds the lock while it waits for the broker: a broker that does not
        // answer by the deadline gets the socket shut down, which ends that wait.
        let send = match self.connection.try_lock_until(deadline) {
            Some(mut slot) => slot.take(),
            None => {
                if let Some((_, abort)) = &*self.abort.lock() {
                    warn!("the send connection stayed busy until the close's deadline; shutting its socket down");
                    abort.abort();
                }
                self.connection.lock().take()
            }
        };
        *self.abort.lock() = None;
        // Wakes the publishes waiting for an unblock: they find the publisher closed. The
        // broker reads nothing from a blocked connection: neither a channel's close nor the
        // connection's would be answered before the alarm clears.
        let generation = send.as_ref().map_or(u64::MAX, |send| send.generation);
        if self.end_block(generation) {
            if let Some(send) = &send {
                send.connection.abort();
            }
        }
        // The connection's close ends its channels too; closed before it, one at a time, each
        // would wait for the broker's answer, and nothing bounds that wait (the connection's
        // close is bounded: see `Connection::close_by`). After it they fail at once.
        let idle: Vec<PubChannel> = self
            .idle
            .iter()
            .flat_map(|idle| idle.rx.try_iter())
            .collect();
        if let Some(send) = send {
            send.connection.close_by(deadline);
        }
        for channel in idle {
            self.discard(channel);
        }
    }
}

impl PubChannel {
    /// Whether the broker closed this idle channel (it refused an unconfirmed publish, which
    /// nobody waited for): such a channel is discarded instead of used.
    fn closed_by_server(&self) -> bool {
        match self.channel.closed_by_server() {
            Some(closed) => {
                debug!(
                    "pooled channel to {} was closed by the broker: {closed}",
                    self.address
                );
                true
            }
            None => false,
        }
    }

    fn publish(
        &mut self,
        message: &Outgoing<'_>,
        deadline: Instant,
        options: &TransportOptions,
    ) -> Result<()> {
        let (exchange, routing_key) = message.route.exchange_and_key();
        match message.route {
            Route::Topic { exchange: name, .. } if !self.declared.contains(name) => {
                topology::declare_topic_exchange(&self.channel, name, options, &self.address)?;
                self.declared.insert(name.to_string());
            }
            Route::Fanout { .. } if !self.declared.contains(&exchange) => {
                topology::declare_fanout_exchange(
                    &self.channel,
                    &exchange,
                    options,
                    &self.address,
                )?;
                self.declared.insert(exchange.clone());
            }
            _ => {}
        }
        if let Some(queue) = message.declare_queue {
            if !self.declared.contains(queue) {
                topology::declare_shared_queue(&self.channel, queue, options, &self.address)?;
                topology::bind(&self.channel, queue, &exchange, &routing_key, &self.address)?;
                self.declared.insert(queue.to_string());
            }
        }
        self.channel
            .basic_publish(
                exchange.as_str(),
                Publish {
                    body: message.body,
                    routing_key: routing_key.clone(),
                    mandatory: message.mandatory,
                    immediate: false,
                    properties: match self.replies {
                        Some(_) => {
                            properties(message.codec, message.expiration, message.redelivery)
                                .with_reply_to(DIRECT_REPLY_TO.to_string())
                        }
                        None => properties(message.codec, message.expiration, message.redelivery),
                    },
                },
            )
            .map_err(|e| amqp_error(e, &self.address))?;
        self.published += 1;
        let tag = self.published;
        let Some(confirms) = &self.confirms else {
            return Ok(());
        };
        loop {
            let confirm = match recv_parked(confirms, deadline) {
                Ok(confirm) => confirm,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        msg_id: String::new(),
                        method: "publish (waiting for the broker's confirm)".into(),
                        timeout: Duration::ZERO,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // The confirm listener ends with the channel: the broker closed it (it
                    // refused this publish) or the connection died. Only the latter is a
                    // reason to drop the connection.
                    if let Some(closed) = self.channel.closed_by_server() {
                        return Err(amqp_error(closed, &self.address));
                    }
                    return Err(Error::Connection {
                        host: self.address.clone(),
                        source: "connection lost while waiting for a publisher confirm".into(),
                    });
                }
            };
            match confirm {
                Confirm::Ack(p) if p.delivery_tag >= tag => break,
                Confirm::Nack(p) if p.delivery_tag >= tag => {
                    return Err(Error::DeliveryFailure {
                        host: self.address.clone(),
                        reason: format!("{NACKED} to {exchange:?}/{routing_key:?}"),
                    })
                }
                stale => debug!("ignoring confirm of an earlier publish: {stale:?}"),
            }
        }
        if message.mandatory {
            while let Ok(returned) = self.returns.try_recv() {
                if is_return_of(&returned, &exchange, &routing_key, message.body) {
                    return Err(Error::Undeliverable {
                        exchange,
                        routing_key,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A call sent with direct reply-to: keeps the channel it was published on, whose consumer
/// its reply reaches, and gives it back to the pool when dropped.
pub(crate) struct DirectCall {
    publisher: Arc<Publisher>,
    /// `Some` until dropped.
    channel: Option<PubChannel>,
    /// The channel was found closed: it is discarded, not given back.
    lost: bool,
}

impl DirectReplies for DirectCall {
    fn next(&mut self, until: Instant) -> Result<Option<RawMessage>> {
        let Some(channel) = &self.channel else {
            return Ok(None);
        };
        let Some(replies) = &channel.replies else {
            return Ok(None);
        };
        let why = match recv_parked(replies, until) {
            Ok(ConsumerMessage::Delivery(delivery)) => {
                return Ok(Some(super::reply::reply_message(delivery)))
            }
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Ok(other) => format!("{other:?}"),
            Err(RecvTimeoutError::Disconnected) => "the connection is gone".to_string(),
        };
        self.lost = true;
        Err(Error::Connection {
            host: channel.address.clone(),
            source: format!(
                "the channel waiting for the call's direct reply-to reply was closed ({why}); no reply can reach it"
            )
            .into(),
        })
    }
}

impl Drop for DirectCall {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if self.lost {
            self.publisher.discard(channel);
            return;
        }
        // Replies to calls that gave up before them: nobody reads them later.
        if let Some(replies) = &channel.replies {
            while replies.try_recv().is_ok() {}
        }
        self.publisher.checkin(channel);
    }
}

/// Whether `returned` is the message just published to `exchange` with `routing_key`.
///
/// A mandatory publish that gave up waiting for its confirm leaves its channel in the pool,
/// and the broker's `basic.return` for it may reach the channel's next user: one published to
/// the same address is not that message unless its body is the same (a request's, reply's or
/// keep-alive's body carries its own `_unique_id` or `_msg_id` and position; equal bodies are
/// the same message sent again). Older returns read on the way are dropped.
fn is_return_of(returned: &Return, exchange: &str, routing_key: &str, body: &[u8]) -> bool {
    let ours = returned.exchange == exchange
        && returned.routing_key == routing_key
        && returned.content == body;
    if !ours {
        debug!(
            "dropping the late return of an earlier publish to {:?}/{:?}",
            returned.exchange, returned.routing_key
        );
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_return_of_an_earlier_publish_is_not_taken_for_the_next_ones() {
        let returned = |body: &[u8]| Return {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "openstack".into(),
            routing_key: "reply_1".into(),
            content: body.to_vec(),
            properties: AmqpProperties::default(),
        };
        let earlier = br#"{"_msg_id": "1", "result": 1}"#;
        let next = br#"{"_msg_id": "1", "ending": true}"#;
        assert!(is_return_of(&returned(next), "openstack", "reply_1", next));
        assert!(!is_return_of(
            &returned(earlier),
            "openstack",
            "reply_1",
            next
        ));
        assert!(!is_return_of(&returned(next), "openstack", "reply_2", next));
        assert!(!is_return_of(&returned(next), "nova", "reply_1", next));
    }

    #[test]
    fn properties_match_every_oslo_capture() {
        for c in crate::wire::fixture_tests::captured_messages() {
            let expiration = c.properties["expiration"]
                .as_str()
                .map(|ms| Duration::from_millis(ms.parse().expect("ms")));
            assert_eq!(
                expiration.is_some(),
                c.role == "rpc_call_request",
                "{}",
                c.file
            );
            let p = properties(Codec::Json, expiration, None);
            let text =
                |v: &Option<String>| v.clone().map(serde_json::Value::from).unwrap_or_default();
            assert_eq!(
                text(p.content_type()),
                c.properties["content_type"],
                "{}",
                c.file
            );
            assert_eq!(text(p.content_encoding()), c.properties["content_encoding"]);
            assert_eq!(text(p.expiration()), c.properties["expiration"]);
            assert_eq!(p.headers().as_ref(), Some(&FieldTable::new()));
            assert_eq!(
                p.delivery_mode()
                    .map(serde_json::Value::from)
                    .unwrap_or_default(),
                c.properties["delivery_mode"]
            );
            assert_eq!(
                p.priority()
                    .map(serde_json::Value::from)
                    .unwrap_or_default(),
                c.properties["priority"]
            );
            for absent in [
                "correlation_id",
                "reply_to",
                "message_id",
                "type",
                "user_id",
                "app_id",
            ] {
                assert!(c.properties[absent].is_null(), "{absent}");
            }
            assert_eq!(
                (p.reply_to(), p.correlation_id(), p.message_id()),
                (&None, &None, &None)
            );
        }
    }

    #[test]
    fn an_expiration_stays_within_what_rabbitmq_accepts() {
        let ms = |e: Duration| properties(Codec::Json, Some(e), None).expiration().clone();
        assert_eq!(ms(Duration::from_secs(60)).as_deref(), Some("60000"));
        assert_eq!(ms(Duration::ZERO).as_deref(), Some("1"));
        assert_eq!(
            ms(Duration::from_millis(u64::from(u32::MAX))).as_deref(),
            Some("4294967295")
        );
        assert_eq!(ms(Duration::MAX).as_deref(), Some("4294967295"));
    }

    #[test]
    fn msgpack_properties() {
        let p = properties(Codec::MsgPack, None, None);
        assert_eq!(p.content_type().as_deref(), Some("application/msgpack"));
        assert_eq!(p.content_encoding().as_deref(), Some("binary"));
    }
}
