//! Notifications, oslo.messaging's second messaging pattern: a [`Notifier`] publishes events
//! (`compute.instance.create.end`...) at a [`Priority`] to `<topic>.<priority>`; a
//! [`NotificationListener`] consumes them and runs the [`NotificationEndpoint`] handlers for
//! that priority. Wire-compatible with oslo's `messagingv2` (enveloped) and `messaging` (bare)
//! drivers.
//!
//! [`NotificationListener`] has an example of both.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::context::RequestContext;
use crate::error::{Error, Result};

mod filter;
mod listener;
mod notifier;

pub use filter::NotificationFilter;
pub use listener::{NotificationEndpoint, NotificationListener, NotificationListenerBuilder};
pub use notifier::{NotificationFormat, Notifier};

/// oslo's notification priorities.
///
/// ```
/// use warren::Priority;
///
/// let priority: Priority = "WARNING".parse()?; // any case; `warning` is `warn`
/// assert_eq!(priority, Priority::Warn);
/// assert_eq!(priority.as_str(), "warn"); // in routing keys: `notifications.warn`
/// assert_eq!(priority.wire_name(), "WARN"); // in the message
/// assert!("verbose".parse::<Priority>().is_err());
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Priority {
    /// `audit`
    Audit,
    /// `debug`
    Debug,
    /// `info`
    Info,
    /// `warn` (oslo's `warning` is the same priority)
    Warn,
    /// `error`
    Error,
    /// `critical`
    Critical,
    /// `sample`
    Sample,
}

impl Priority {
    /// Every priority, in oslo's order.
    pub const ALL: [Priority; 7] = [
        Priority::Audit,
        Priority::Debug,
        Priority::Info,
        Priority::Warn,
        Priority::Error,
        Priority::Critical,
        Priority::Sample,
    ];

    /// The lower-case name used in routing keys and queue names (`notifications.info`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Audit => "audit",
            Priority::Debug => "debug",
            Priority::Info => "info",
            Priority::Warn => "warn",
            Priority::Error => "error",
            Priority::Critical => "critical",
            Priority::Sample => "sample",
        }
    }

    /// The upper-case name sent in the message (`INFO`).
    pub fn wire_name(self) -> String {
        self.as_str().to_ascii_uppercase()
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;
    /// Any case; `warning` means `warn`.
    fn from_str(s: &str) -> Result<Priority> {
        match s.to_ascii_lowercase().as_str() {
            "audit" => Ok(Priority::Audit),
            "debug" => Ok(Priority::Debug),
            "info" => Ok(Priority::Info),
            "warn" | "warning" => Ok(Priority::Warn),
            "error" => Ok(Priority::Error),
            "critical" => Ok(Priority::Critical),
            "sample" => Ok(Priority::Sample),
            _ => Err(Error::decode(format!(
                "unknown notification priority {s:?}"
            ))),
        }
    }
}

/// A notification as a listener's handlers see it (oslo's
/// `(ctxt, publisher_id, event_type, payload, metadata)`).
///
/// ```
/// use std::sync::mpsc;
/// use std::time::Duration;
/// use serde::Deserialize;
/// use serde_json::json;
/// use warren::{
///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
///     Priority, RequestContext, Target, Transport,
/// };
///
/// #[derive(Deserialize)]
/// struct Created { instance_id: String }
///
/// let transport = Transport::new("memory://doc-notification/")?;
/// let (seen_tx, seen) = mpsc::channel();
/// let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
///     seen_tx.send(n.clone()).unwrap();
///     NotificationResult::Handled
/// });
/// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
///     .endpoint(endpoint)
///     .build()?;
/// listener.start()?;
///
/// let ctx = RequestContext::new().with("user_id", "alice");
/// Notifier::new(&transport, "compute.host-1")
///     .info(&ctx, "compute.instance.create.end", &json!({"instance_id": "vm-1"}))?;
///
/// let n = seen.recv_timeout(Duration::from_secs(5)).unwrap();
/// assert_eq!(n.priority, Priority::Info);
/// assert_eq!(n.publisher_id, "compute.host-1");
/// assert_eq!(n.event_type, "compute.instance.create.end");
/// assert_eq!(n.ctxt.get_str("user_id"), Some("alice"));
/// assert_eq!(n.payload["instance_id"], "vm-1");
/// assert_eq!(n.payload_as::<Created>()?.instance_id, "vm-1");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Notification {
    /// The priority it was sent at.
    pub priority: Priority,
    /// The sender's context (`_context_*`); empty when the sender sent none.
    pub ctxt: RequestContext,
    /// Who sent it, e.g. `compute.host-1`.
    pub publisher_id: String,
    /// What happened, e.g. `compute.instance.create.end`.
    pub event_type: String,
    /// The event's data.
    pub payload: Value,
    /// oslo's metadata: `message_id` (uuid4 with dashes) and `timestamp` (UTC).
    pub metadata: NotificationMetadata,
}

/// oslo's notification metadata.
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
/// let transport = Transport::new("memory://doc-notification-metadata/")?;
/// let (seen_tx, seen) = mpsc::channel();
/// let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
///     seen_tx.send(n.metadata.clone()).unwrap();
///     NotificationResult::Handled
/// });
/// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
///     .endpoint(endpoint)
///     .build()?;
/// listener.start()?;
/// let notifier = Notifier::new(&transport, "compute.host-1");
/// notifier.info(&RequestContext::new(), "compute.instance.exists", &json!({}))?;
///
/// let metadata = seen.recv_timeout(Duration::from_secs(5)).unwrap();
/// assert_eq!(metadata.message_id.len(), 36); // e.g. 6486382a-903e-4921-a07f-666e0f0f3687
/// assert_eq!(metadata.timestamp.len(), "2026-11-25 12:37:22.404495".len());
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotificationMetadata {
    /// uuid4 with dashes, set by the notifier.
    pub message_id: String,
    /// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC.
    pub timestamp: String,
}

impl Notification {
    /// The payload as `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.payload.clone())
            .map_err(|e| Error::decode(format!("notification payload: {e}")))
    }
}

/// What a handler tells the listener (oslo's `NotificationResult`).
///
/// A handler that cannot deal with a notification yet asks for it again:
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::mpsc;
/// use std::time::Duration;
/// use serde_json::json;
/// use warren::{
///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
///     Priority, RequestContext, Target, Transport,
/// };
///
/// let transport = Transport::new("memory://doc-notification-result/")?;
/// let (done_tx, done) = mpsc::channel();
/// let deliveries = AtomicUsize::new(0);
/// let endpoint = NotificationEndpoint::new().on(Priority::Error, move |_: &Notification| {
///     let delivery = deliveries.fetch_add(1, Ordering::SeqCst) + 1;
///     if delivery == 1 {
///         return NotificationResult::Requeue; // say, the database is not reachable yet
///     }
///     done_tx.send(delivery).unwrap();
///     NotificationResult::Handled
/// });
/// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
///     .endpoint(endpoint)
///     .allow_requeue(true)
///     .build()?;
/// listener.start()?;
///
/// let notifier = Notifier::new(&transport, "compute.host-1");
/// notifier.error(&RequestContext::new(), "compute.instance.delete.error", &json!({}))?;
/// // Handled on its second delivery:
/// assert_eq!(done.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotificationResult {
    /// Done: the notification is acknowledged.
    Handled,
    /// Put it back in its queue to be delivered again (only if the listener
    /// [allows requeue](NotificationListenerBuilder::allow_requeue); otherwise it is acked).
    Requeue,
}
