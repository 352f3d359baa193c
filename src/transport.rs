//! The transport: a URL, its options, and the driver that moves messages (oslo's
//! `Transport`). Clients and servers built on one transport share its connections and its
//! reply queue.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::client::reply_waiter::ReplyWaiter;
use crate::driver::memory::MemoryDriver;
use crate::driver::rabbit::RabbitDriver;
use crate::driver::{DirectReplies, Driver, Outgoing, ReplySink, SendOptions};
use crate::error::{Error, Result};
use crate::observe::{Hook, Observer};
use crate::options::{FailoverStrategy, TransportOptions, IGNORED_OPTION_NAMES};
use crate::url::{Scheme, TransportUrl};
use crate::wire::Codec;

/// A connection to a message bus: RabbitMQ (`rabbit://`) or in-process (`memory://`).
///
/// Cheap to clone; connections are opened lazily (the first call, cast or server start) and
/// closed when the last clone is dropped or on [`close`](Transport::close).
///
/// ```
/// use warren::Transport;
///
/// let transport = Transport::new("rabbit://guest:guest@127.0.0.1:5672/?rabbit_qos_prefetch_count=10")?;
/// assert_eq!(transport.options().prefetch_count, 10);
/// assert_eq!(transport.url().to_string(), "rabbit://guest:***@127.0.0.1:5672/?rabbit_qos_prefetch_count=10");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    url: TransportUrl,
    options: TransportOptions,
    driver: Box<dyn Driver>,
    replies: Arc<ReplyWaiter>,
    hook: Hook,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.driver.close();
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("url", &self.inner.url)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl Transport {
    /// A transport for `url` with default options (overridable by the URL's query).
    ///
    /// Fails with [`Error::InvalidUrl`] or [`Error::InvalidOption`]; opens no connection.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren::{Error, Scheme, Transport};
    ///
    /// let transport = Transport::new("memory://doc-transport-new/?rpc_response_timeout=5")?;
    /// assert_eq!(transport.url().scheme(), Scheme::Memory);
    /// assert_eq!(transport.options().rpc_response_timeout, Duration::from_secs(5));
    ///
    /// assert!(matches!(Transport::new("http://localhost/"), Err(Error::InvalidUrl { .. })));
    /// assert!(matches!(
    ///     Transport::new("memory://doc-transport-new/?rabbit_qos_prefetch_count=lots"),
    ///     Err(Error::InvalidOption { .. })
    /// ));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn new(url: &str) -> Result<Transport> {
        Transport::builder(url).build()
    }

    /// A builder to set options in code. Precedence: builder setters, then the URL's query,
    /// then the defaults given to [`TransportBuilder::options`], then warren's defaults.
    ///
    /// ```
    /// use warren::Transport;
    ///
    /// let transport = Transport::builder("memory://doc-transport-builder/?executor_thread_pool_size=8")
    ///     .control_exchange("nova")
    ///     .workers(4) // wins over the URL's query
    ///     .build()?;
    /// assert_eq!(transport.options().control_exchange, "nova");
    /// assert_eq!(transport.options().workers, 4);
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn builder(url: &str) -> TransportBuilder {
        TransportBuilder {
            url: url.to_string(),
            options: TransportOptions::default(),
            explicit: Vec::new(),
            hook: Hook::default(),
        }
    }

    /// The parsed URL (its `Display` hides passwords).
    pub fn url(&self) -> &TransportUrl {
        &self.inner.url
    }

    /// The effective options.
    pub fn options(&self) -> &TransportOptions {
        &self.inner.options
    }

    /// Closes the reply consumer and every connection of the transport now (also done when the
    /// last clone is dropped). Servers should be stopped first; later sends fail with
    /// [`Error::Closed`](crate::Error::Closed).
    ///
    /// ```
    /// use warren::{Error, RequestContext, RpcClient, Target, Transport};
    ///
    /// let transport = Transport::new("memory://doc-transport-close/")?;
    /// let client = RpcClient::new(&transport, Target::new("t"));
    /// client.cast(&RequestContext::new(), "ping", &())?;
    /// transport.close();
    /// assert!(matches!(client.cast(&RequestContext::new(), "ping", &()), Err(Error::Closed)));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn close(&self) {
        self.inner.driver.close();
    }

    /// The name of this transport's reply queue (`reply_<uuid hex>`), once its consumer runs
    /// (after the first call). For diagnostics: oslo logs it in timeouts too.
    pub fn reply_queue_name(&self) -> Option<String> {
        self.inner.driver.reply_queue_name()
    }

    /// Number of calls currently waiting for a reply on this transport.
    pub fn pending_calls(&self) -> usize {
        self.inner.replies.waiting()
    }

    pub(crate) fn driver(&self) -> &dyn Driver {
        self.inner.driver.as_ref()
    }

    /// Publishes through the driver once the message is known to be writable: its names fit
    /// AMQP frames ([`Error::InvalidTarget`]) and its body fits `max_message_size`
    /// ([`Error::Encode`]). Nothing is sent otherwise.
    pub(crate) fn send(&self, message: &Outgoing<'_>, options: &SendOptions) -> Result<()> {
        self.check_sendable(message)?;
        self.inner.driver.send(message, options)
    }

    /// [`send`](Self::send) for a call asking for its reply through direct reply-to:
    /// `Ok(None)` when the driver could not send it so (nothing was sent).
    pub(crate) fn send_direct_call(
        &self,
        message: &Outgoing<'_>,
        options: &SendOptions,
    ) -> Result<Option<Box<dyn DirectReplies>>> {
        self.check_sendable(message)?;
        self.inner.driver.send_direct_call(message, options)
    }

    fn check_sendable(&self, message: &Outgoing<'_>) -> Result<()> {
        message.check_names()?;
        let max = self.inner.options.max_message_size;
        if message.body.len() > max {
            return Err(Error::encode(format!(
                "the message is {} bytes, over max_message_size ({max} bytes)",
                message.body.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn reply_waiter(&self) -> &Arc<ReplyWaiter> {
        &self.inner.replies
    }

    /// The observer installed with [`TransportBuilder::observer`], if any.
    pub(crate) fn hook(&self) -> &Hook {
        &self.inner.hook
    }

    /// A [`MemoryTap`](crate::MemoryTap) on this `memory://` transport's in-process broker:
    /// every message published on it from now on (by any transport sharing the broker,
    /// replies included), and a way to publish raw messages into it. `None` for RabbitMQ.
    pub fn memory_tap(&self) -> Option<crate::MemoryTap> {
        crate::driver::memory::MemoryTap::attach(&self.inner.url)
    }
}

/// Builds a [`Transport`]; see [`TransportOptions`] for what each option does.
///
/// A setter called on the builder wins over the same option in the URL's query.
///
/// ```
/// use std::time::Duration;
/// use warren::{Codec, Transport};
///
/// let transport = Transport::builder("rabbit://guest:guest@127.0.0.1:5672/?codec=msgpack&amqp_durable_queues=true")
///     .codec(Codec::Json)
///     .rpc_response_timeout(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(transport.options().codec, Codec::Json);
/// assert!(transport.options().durable_queues);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Clone)]
pub struct TransportBuilder {
    /// The URL as given, parsed by `build()` (so that a bad URL is an error there, not here);
    /// it may hold passwords, so the `Debug` impl below prints it redacted.
    url: String,
    options: TransportOptions,
    /// Query keys of the options set through a setter.
    explicit: Vec<&'static str>,
    hook: Hook,
}

/// Passwords never appear: the URL is shown as [`TransportUrl`]'s `Display` shows it, or
/// masked the way an unparseable URL's error masks it.
impl fmt::Debug for TransportBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match TransportUrl::parse(&self.url) {
            Ok(url) => url.to_string(),
            Err(Error::InvalidUrl { url, .. }) => url,
            Err(_) => "<unparseable>".to_string(),
        };
        f.debug_struct("TransportBuilder")
            .field("url", &url)
            .field("options", &self.options)
            .field("explicit", &self.explicit)
            .field("hook", &self.hook)
            .finish()
    }
}

impl TransportBuilder {
    fn set(mut self, key: &'static str, change: impl FnOnce(&mut TransportOptions)) -> Self {
        change(&mut self.options);
        self.explicit.push(key);
        self
    }

    /// Replaces the base options; the URL's query and later setters still override them.
    pub fn options(mut self, options: TransportOptions) -> Self {
        self.options = options;
        self.explicit.clear();
        self
    }

    /// Exchange used when a target names none (`control_exchange`, default `openstack`).
    pub fn control_exchange(self, exchange: impl Into<String>) -> Self {
        self.set("control_exchange", |o| o.control_exchange = exchange.into())
    }

    /// AMQP heartbeat (`heartbeat_timeout_threshold`, default 60 s; zero disables).
    pub fn heartbeat(self, heartbeat: Duration) -> Self {
        self.set("heartbeat_timeout_threshold", |o| o.heartbeat = heartbeat)
    }

    /// Default call timeout (`rpc_response_timeout`, default 60 s).
    pub fn rpc_response_timeout(self, timeout: Duration) -> Self {
        self.set("rpc_response_timeout", |o| o.rpc_response_timeout = timeout)
    }

    /// Unacknowledged deliveries per consumer (`rabbit_qos_prefetch_count`, default 64).
    pub fn prefetch_count(self, prefetch: u16) -> Self {
        self.set("rabbit_qos_prefetch_count", |o| o.prefetch_count = prefetch)
    }

    /// Worker threads per server (`executor_thread_pool_size`, default 16).
    pub fn workers(self, workers: usize) -> Self {
        self.set("executor_thread_pool_size", |o| o.workers = workers)
    }

    /// Codec of what this transport sends (`codec`, default MessagePack).
    pub fn codec(self, codec: Codec) -> Self {
        self.set("codec", |o| o.codec = codec)
    }

    /// `x-expires` of reply and fanout queues (`rabbit_transient_queues_ttl`, default 30 min).
    pub fn transient_queues_ttl(self, ttl: Duration) -> Self {
        self.set("rabbit_transient_queues_ttl", |o| {
            o.transient_queues_ttl = ttl
        })
    }

    /// Durable topic exchange and server queues (`amqp_durable_queues`, default false).
    pub fn durable_queues(self, durable: bool) -> Self {
        self.set("amqp_durable_queues", |o| o.durable_queues = durable)
    }

    /// Auto-delete topic exchange and server queues (`amqp_auto_delete`, default false).
    pub fn auto_delete(self, auto_delete: bool) -> Self {
        self.set("amqp_auto_delete", |o| o.auto_delete = auto_delete)
    }

    /// Pause after the first failed pass over the hosts (`rabbit_retry_interval`, 1 s).
    pub fn retry_interval(self, pause: Duration) -> Self {
        self.set("rabbit_retry_interval", |o| o.retry_interval = pause)
    }

    /// Added to the pause after each further failed pass (`rabbit_retry_backoff`, 2 s).
    pub fn retry_backoff(self, step: Duration) -> Self {
        self.set("rabbit_retry_backoff", |o| o.retry_backoff = step)
    }

    /// Longest pause between passes (`rabbit_interval_max`, 30 s).
    pub fn interval_max(self, max: Duration) -> Self {
        self.set("rabbit_interval_max", |o| o.interval_max = max)
    }

    /// Random extra pause of up to this (`kombu_reconnect_splay`, 1 s).
    pub fn reconnect_splay(self, splay: Duration) -> Self {
        self.set("kombu_reconnect_splay", |o| o.reconnect_splay = splay)
    }

    /// Next host after a failure (`kombu_failover_strategy`, round-robin).
    pub fn failover_strategy(self, strategy: FailoverStrategy) -> Self {
        self.set("kombu_failover_strategy", |o| {
            o.failover_strategy = strategy
        })
    }

    /// How long a reply to a missing reply queue is retried
    /// (`kombu_missing_consumer_retry_timeout`, 60 s).
    pub fn missing_consumer_retry_timeout(self, timeout: Duration) -> Self {
        self.set("kombu_missing_consumer_retry_timeout", |o| {
            o.missing_consumer_retry_timeout = timeout
        })
    }

    /// Largest message body sent or accepted, in bytes (`max_message_size`, 16 MiB).
    ///
    /// ```
    /// let transport = warren::Transport::builder("memory://limits/")
    ///     .max_message_size(1 << 20)
    ///     .build()?;
    /// assert_eq!(transport.options().max_message_size, 1 << 20);
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn max_message_size(self, bytes: usize) -> Self {
        self.set("max_message_size", |o| o.max_message_size = bytes)
    }

    /// Reports what every client, server and connection of the transport does to `observer`
    /// (see [`observe`](crate::observe)): calls, casts and requests with their outcome and
    /// duration, requests in flight, connections lost and re-established. Without one, the
    /// cost is one `Option` check per call, cast or request.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use warren::observe::Stats;
    ///
    /// let stats = Arc::new(Stats::new());
    /// let transport = warren::Transport::builder("memory://observed/")
    ///     .observer(stats.clone())
    ///     .build()?;
    /// # let _ = transport;
    /// println!("{}", stats.snapshot());
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.hook = Hook::new(observer);
        self
    }

    /// Parses the URL, applies its query options (except those set on the builder, which win),
    /// validates everything. No connection is opened yet.
    pub fn build(self) -> Result<Transport> {
        let url = TransportUrl::parse(&self.url)?;
        let mut options = self.options;
        let mut scratch = options.clone();
        for (name, value) in url.query() {
            if self.explicit.contains(&name.as_str()) {
                scratch.apply(name, value)?; // still validated
            } else {
                options.apply(name, value)?;
            }
        }
        if url.is_tls() {
            options.tls.enabled = true;
        }
        for (name, _) in url.query() {
            if IGNORED_OPTION_NAMES.contains(&name.as_str()) {
                log::warn!("transport option {name} has no effect in warren; ignored");
            }
        }
        options.validate()?;
        let replies = Arc::new(ReplyWaiter::new());
        let sink: ReplySink = replies.clone();
        let driver: Box<dyn Driver> = match url.scheme() {
            Scheme::Rabbit => Box::new(RabbitDriver::new(
                url.clone(),
                options.clone(),
                sink,
                self.hook.clone(),
            )?),
            Scheme::Memory => Box::new(MemoryDriver::new(&url, &options, sink)),
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                url,
                options,
                driver,
                replies,
                hook: self.hook,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builders_debug_hides_the_password_of_a_good_or_a_bad_url() {
        for url in [
            "rabbit://nova:s3cret@rabbit1:5672,nova:s3cret@rabbit2/?ssl=true",
            // Unparseable (a port that is no number, an unencoded `@`): still masked.
            "rabbit://us@er:s3cret@rabbit1:notaport/",
        ] {
            let shown = format!("{:?}", Transport::builder(url).workers(3));
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("rabbit1"), "{shown}");
            assert!(shown.contains("workers: 3"), "{shown}");
        }
    }
}
