//! The notifier (oslo's `Notifier` with the `messagingv2` or `messaging` driver).

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::clock;
use crate::context::RequestContext;
use crate::driver::{Outgoing, Route, SendOptions};
use crate::error::{Error, Result};
use crate::notify::Priority;
use crate::transport::Transport;
use crate::wire::notification::{utc_timestamp, NotificationOut};
use crate::wire::{oslo_json, Codec};

/// oslo's notification drivers.
///
/// A [`NotificationListener`](crate::NotificationListener) reads both.
///
/// ```
/// use std::time::Duration;
/// use serde_json::{json, Value};
/// use warren::{NotificationFormat, Notifier, RequestContext, Transport};
///
/// let transport = Transport::new("memory://doc-notification-format/")?;
/// let tap = transport.memory_tap().unwrap(); // sees what is published
/// let notifier = Notifier::new(&transport, "compute.host-1");
/// let body = |notifier: &Notifier| -> warren::Result<Value> {
///     notifier.info(&RequestContext::new(), "compute.instance.exists", &json!({}))?;
///     let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
///     Ok(serde_json::from_slice(&sent.body).unwrap())
/// };
///
/// // messagingv2 (the default): the message is a JSON string inside oslo's envelope.
/// assert_eq!(body(&notifier)?["oslo.version"], "2.0");
/// // messaging: the bare message.
/// let bare = notifier.prepare().format(NotificationFormat::V1);
/// assert_eq!(body(&bare)?["event_type"], "compute.instance.exists");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotificationFormat {
    /// `messagingv2`: the message in oslo's 2.0 envelope.
    #[default]
    V2,
    /// `messaging`: the bare message (format 1.0).
    V1,
}

/// Sends notifications (oslo's `Notifier`): each goes to the control exchange with routing key
/// `<topic>.<priority>` for every topic (default `notifications`), after the queue of that name
/// is declared so notifications wait for a listener. Messages are oslo's JSON.
///
/// The context is sent as `_context_*` keys, with `auth_token` blanked as oslo's redacted copy
/// does; keep other secrets out of it. Unlike oslo, failures are returned, not only logged.
///
/// ```
/// use serde_json::json;
/// use warren::{Notifier, Priority, RequestContext, Transport};
///
/// let transport = Transport::new("memory://notifier-doc/")?;
/// let notifier = Notifier::new(&transport, "compute.host-1").topics(["notifications", "audit_log"]);
/// notifier.info(&RequestContext::new(), "compute.instance.create.end", &json!({"instance_id": "vm-1"}))?;
/// notifier.notify(&RequestContext::new(), Priority::Error, "compute.instance.create.error", &json!({}))?;
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Notifier {
    transport: Transport,
    publisher_id: String,
    topics: Vec<String>,
    exchange: Option<String>,
    format: NotificationFormat,
    retry: Option<u32>,
    timeout: Option<Duration>,
}

impl Notifier {
    /// A notifier for `publisher_id` (e.g. `compute.host-1`) on topic `notifications`.
    pub fn new(transport: &Transport, publisher_id: impl Into<String>) -> Notifier {
        Notifier {
            transport: transport.clone(),
            publisher_id: publisher_id.into(),
            topics: vec!["notifications".into()],
            exchange: None,
            format: NotificationFormat::V2,
            retry: None,
            timeout: None,
        }
    }

    /// A copy to override options on (oslo's `prepare()`).
    pub fn prepare(&self) -> Notifier {
        self.clone()
    }

    /// Overrides the publisher id.
    pub fn publisher_id(mut self, publisher_id: impl Into<String>) -> Notifier {
        self.publisher_id = publisher_id.into();
        self
    }

    /// The topics each notification is sent to.
    pub fn topics<I, S>(mut self, topics: I) -> Notifier
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// The exchange (default: the transport's control exchange).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Notifier {
        self.exchange = Some(exchange.into());
        self
    }

    /// `messagingv2` (default) or `messaging`.
    pub fn format(mut self, format: NotificationFormat) -> Notifier {
        self.format = format;
        self
    }

    /// Passes over the broker's hosts after the first before giving up (default: until the
    /// timeout).
    pub fn retry(mut self, retry: u32) -> Notifier {
        self.retry = Some(retry);
        self
    }

    /// How long a notification may take to be confirmed (default: the transport's
    /// `rpc_response_timeout`; `Duration::MAX`: as long as it takes).
    pub fn timeout(mut self, timeout: Duration) -> Notifier {
        self.timeout = Some(timeout);
        self
    }

    /// Sends `event_type` with `payload` at `priority` to every topic.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{
    ///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
    ///     Priority, RequestContext, Target, Transport,
    /// };
    ///
    /// let transport = Transport::new("memory://doc-notifier-notify/")?;
    /// let (seen_tx, seen) = mpsc::channel();
    /// let endpoint = NotificationEndpoint::new().on(Priority::Critical, move |n: &Notification| {
    ///     seen_tx.send(n.payload.clone()).unwrap();
    ///     NotificationResult::Handled
    /// });
    /// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// listener.start()?;
    ///
    /// let priority: Priority = "critical".parse()?; // say, from a configuration file
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "volume.host-1");
    /// notifier.notify(&ctx, priority, "volume.disk.failed", &json!({"disk": "sdb"}))?;
    /// assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), json!({"disk": "sdb"}));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn notify<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        priority: Priority,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        if self.topics.is_empty() {
            return Err(Error::invalid_target("a notifier needs at least one topic"));
        }
        let mut context = ctx.clone();
        if context.get("auth_token").is_some() {
            context.insert("auth_token", Value::Null);
        }
        let message_id = uuid::Uuid::new_v4().hyphenated().to_string();
        let timestamp = utc_timestamp(SystemTime::now());
        let exchange = self
            .exchange
            .clone()
            .unwrap_or_else(|| self.transport.options().control_exchange.clone());
        let timeout = self
            .timeout
            .unwrap_or(self.transport.options().rpc_response_timeout);
        let options = SendOptions {
            deadline: Some(clock::after(Instant::now(), timeout)),
            retry: self.retry,
            unconfirmed: false,
        };
        for topic in &self.topics {
            // A fresh `_unique_id` per topic, as oslo's driver adds one per send: a listener
            // of two of the topics (or a pool bound to both) must not take the second copy
            // for a duplicate of the first.
            let unique_id = crate::id::new_id();
            let message = NotificationOut {
                message_id: &message_id,
                publisher_id: &self.publisher_id,
                event_type,
                priority: &priority.wire_name(),
                payload,
                timestamp: &timestamp,
                unique_id: &unique_id,
                context: &context,
            };
            let body = match self.format {
                NotificationFormat::V2 => Codec::Json.encode(&message)?,
                NotificationFormat::V1 => oslo_json::to_python_json(&message)
                    .map_err(Error::encode)?
                    .into_bytes(),
            };
            let routing_key = format!("{topic}.{}", priority.as_str());
            let outgoing = Outgoing {
                route: Route::Topic {
                    exchange: &exchange,
                    routing_key: &routing_key,
                },
                body: &body,
                codec: Codec::Json,
                expiration: None,
                mandatory: false,
                redelivery: None,
                declare_queue: Some(&routing_key),
            };
            match self.transport.send(&outgoing, &options) {
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        msg_id: message_id,
                        method: format!("notify {event_type}"),
                        timeout,
                    })
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// `audit` priority.
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-audit/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.audit(&ctx, "identity.authenticate.success", &json!({"user_id": "alice"}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.audit");
    /// assert_eq!(sent.field("priority").as_deref(), Some("AUDIT"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn audit<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Audit, event_type, payload)
    }

    /// `debug` priority.
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-debug/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.debug(&ctx, "compute.instance.poll", &json!({"instance_id": "vm-1"}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.debug");
    /// assert_eq!(sent.field("priority").as_deref(), Some("DEBUG"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn debug<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Debug, event_type, payload)
    }

    /// `info` priority.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{
    ///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
    ///     Priority, RequestContext, Target, Transport,
    /// };
    ///
    /// let transport = Transport::new("memory://doc-notifier-info/")?;
    /// let (seen_tx, seen) = mpsc::channel();
    /// let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
    ///     seen_tx.send(n.event_type.clone()).unwrap();
    ///     NotificationResult::Handled
    /// });
    /// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// listener.start()?;
    ///
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.info(&ctx, "compute.instance.create.end", &json!({"instance_id": "vm-1"}))?;
    /// let event_type = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(event_type, "compute.instance.create.end");
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn info<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Info, event_type, payload)
    }

    /// `warn` priority (oslo's `warn` and `warning`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-warn/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.warn(&ctx, "compute.instance.slow_boot", &json!({"seconds": 120}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.warn");
    /// assert_eq!(sent.field("priority").as_deref(), Some("WARN"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn warn<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Warn, event_type, payload)
    }

    /// `error` priority.
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-error/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.error(&ctx, "compute.instance.create.error", &json!({"instance_id": "vm-1"}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.error");
    /// assert_eq!(sent.field("priority").as_deref(), Some("ERROR"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn error<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Error, event_type, payload)
    }

    /// `critical` priority.
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-critical/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.critical(&ctx, "compute.host.disk_failed", &json!({"disk": "sdb"}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.critical");
    /// assert_eq!(sent.field("priority").as_deref(), Some("CRITICAL"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn critical<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Critical, event_type, payload)
    }

    /// `sample` priority.
    ///
    /// ```
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use warren::{Notifier, RequestContext, Transport};
    ///
    /// let transport = Transport::new("memory://doc-notifier-sample/")?;
    /// let tap = transport.memory_tap().unwrap(); // sees what is published
    /// let ctx = RequestContext::new();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.sample(&ctx, "compute.instance.cpu", &json!({"cpu_util": 12.5}))?;
    ///
    /// let sent = tap.recv_timeout(Duration::from_secs(5)).unwrap();
    /// assert_eq!(sent.routing_key, "notifications.sample");
    /// assert_eq!(sent.field("priority").as_deref(), Some("SAMPLE"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn sample<P: Serialize + ?Sized>(
        &self,
        ctx: &RequestContext,
        event_type: &str,
        payload: &P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Sample, event_type, payload)
    }
}
