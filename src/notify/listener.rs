//! The notification listener (oslo's `get_notification_listener`).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use log::{debug, error, info, warn};
use parking_lot::Mutex;

use crate::driver::{Binding, ExchangeKind, Incoming, ListenSpec, QueueLifetime, QueuePlan};
use crate::error::{Error, Result};
use crate::notify::{
    Notification, NotificationFilter, NotificationMetadata, NotificationResult, Priority,
};
use crate::server::dedup::{self, RecentIds};
use crate::server::lifecycle::Lifecycle;
use crate::server::worker_pool::Handler;
use crate::target::Target;
use crate::transport::Transport;
use crate::wire::notification::NotificationIn;
use crate::wire::{limits, Document};

type PriorityHandler = Arc<dyn Fn(&Notification) -> NotificationResult + Send + Sync>;

/// Handlers per priority, optionally behind a [`NotificationFilter`] (an oslo notification
/// endpoint object with `info`, `error`... methods and a `filter_rule`).
///
/// ```
/// use warren::{Notification, NotificationEndpoint, NotificationFilter, NotificationResult, Priority};
///
/// let endpoint = NotificationEndpoint::new()
///     .on(Priority::Info, |n: &Notification| {
///         println!("{} from {}", n.event_type, n.publisher_id);
///         NotificationResult::Handled
///     })
///     .filter(NotificationFilter::new().event_type(r"compute\.instance\.")?);
/// # let _ = endpoint;
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct NotificationEndpoint {
    handlers: HashMap<Priority, PriorityHandler>,
    filter: Option<NotificationFilter>,
}

impl fmt::Debug for NotificationEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let priorities: BTreeSet<&Priority> = self.handlers.keys().collect();
        f.debug_struct("NotificationEndpoint")
            .field("priorities", &priorities)
            .field("filter", &self.filter)
            .finish()
    }
}

impl NotificationEndpoint {
    /// An endpoint with no handler.
    pub fn new() -> NotificationEndpoint {
        NotificationEndpoint::default()
    }

    /// Runs `handler` for notifications of `priority` (replacing any previous one). A handler
    /// that panics counts as [`NotificationResult::Requeue`].
    pub fn on<F>(mut self, priority: Priority, handler: F) -> NotificationEndpoint
    where
        F: Fn(&Notification) -> NotificationResult + Send + Sync + 'static,
    {
        self.handlers.insert(priority, Arc::new(handler));
        self
    }

    /// Only notifications passing `filter` reach this endpoint's handlers.
    pub fn filter(mut self, filter: NotificationFilter) -> NotificationEndpoint {
        self.filter = Some(filter);
        self
    }
}

/// Builds a [`NotificationListener`].
///
/// ```
/// use warren::{
///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Priority, Target,
///     Transport,
/// };
///
/// let transport = Transport::new("memory://doc-notification-listener-builder/")?;
/// let handled = |_: &Notification| NotificationResult::Handled;
/// let endpoint = NotificationEndpoint::new()
///     .on(Priority::Info, handled)
///     .on(Priority::Error, handled);
///
/// // By default, oslo's shared `<topic>.<priority>` queues, one per priority handled.
/// let shared = NotificationListener::builder(&transport, vec![Target::new("notifications")])
///     .endpoint(endpoint.clone())
///     .build()?;
/// assert_eq!(shared.queues(), ["notifications.info", "notifications.error"]);
///
/// // A pool gets its own copy of every notification, in one queue.
/// let billing = NotificationListener::builder(&transport, vec![Target::new("notifications")])
///     .endpoint(endpoint)
///     .pool("billing")
///     .workers(2)
///     .build()?;
/// assert_eq!(billing.queues(), ["billing"]);
///
/// // A listener needs some handler.
/// let idle = NotificationListener::builder(&transport, vec![Target::new("notifications")]);
/// assert!(idle.build().is_err());
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug)]
pub struct NotificationListenerBuilder {
    transport: Transport,
    targets: Vec<Target>,
    endpoints: Vec<NotificationEndpoint>,
    pool: Option<String>,
    allow_requeue: bool,
    workers: Option<usize>,
    retry: Option<u32>,
    duplicate_window: usize,
}

impl NotificationListenerBuilder {
    /// Adds an endpoint; every endpoint with a handler for a notification's priority (and a
    /// filter it passes) runs, in the order added.
    pub fn endpoint(mut self, endpoint: NotificationEndpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Consumes a queue of this name bound to every `<topic>.<priority>` instead of the shared
    /// `<topic>.<priority>` queues: each pool gets its own copy of every notification, and
    /// the listeners of one pool share it.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Lets handlers return [`NotificationResult::Requeue`] (oslo's `allow_requeue`);
    /// otherwise every notification is acknowledged once handled, whatever the result.
    pub fn allow_requeue(mut self, allow: bool) -> Self {
        self.allow_requeue = allow;
        self
    }

    /// Worker threads (default: the transport's `executor_thread_pool_size`).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Passes over the broker's hosts at start-up (see [`RpcServerBuilder::retry`](crate::RpcServerBuilder::retry)).
    pub fn retry(mut self, retry: u32) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Recent `_unique_id`s remembered to drop duplicates (default 4,096; oslo keeps 16; see
    /// [`RpcServerBuilder::duplicate_window`](crate::RpcServerBuilder::duplicate_window)).
    pub fn duplicate_window(mut self, window: usize) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Checks the targets (each needs a topic) and that some endpoint handles a priority.
    pub fn build(self) -> Result<NotificationListener> {
        let priorities: BTreeSet<Priority> = self
            .endpoints
            .iter()
            .flat_map(|e| e.handlers.keys().copied())
            .collect();
        if priorities.is_empty() {
            return Err(Error::invalid_target(
                "no notification endpoint handles any priority",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid_target(
                "a notification listener needs at least one target",
            ));
        }
        let mut bindings = Vec::new();
        for target in &self.targets {
            let topic = target.require_topic()?;
            let exchange = target
                .exchange
                .clone()
                .unwrap_or_else(|| self.transport.options().control_exchange.clone());
            for priority in &priorities {
                bindings.push(Binding {
                    exchange: exchange.clone(),
                    kind: ExchangeKind::Topic,
                    routing_key: format!("{topic}.{priority}"),
                });
            }
        }
        let workers = self.workers.unwrap_or(self.transport.options().workers);
        if workers == 0 {
            return Err(Error::invalid_option(
                "workers",
                "a listener needs at least one worker",
            ));
        }
        let label = self.targets[0].topic.clone().unwrap_or_default();
        let queues = match &self.pool {
            // One queue for the pool, bound to every routing key.
            Some(pool) => vec![QueuePlan {
                name: pool.clone(),
                lifetime: QueueLifetime::Shared,
                bindings,
                consume: true,
            }],
            // oslo's `<topic>.<priority>` queues, each bound under its own name.
            None => bindings
                .into_iter()
                .map(|binding| QueuePlan {
                    name: binding.routing_key.clone(),
                    lifetime: QueueLifetime::Shared,
                    bindings: vec![binding],
                    consume: true,
                })
                .collect(),
        };
        let spec = ListenSpec {
            label: label.clone(),
            queues,
            delete_on_close: Vec::new(),
            retry: self.retry,
            ack_on_handoff: None,
        };
        Ok(NotificationListener {
            lifecycle: Lifecycle::new(format!("notification listener on {label}")),
            spec,
            transport: self.transport,
            workers,
            dispatch: Arc::new(Dispatch {
                endpoints: self.endpoints,
                allow_requeue: self.allow_requeue,
                recent: Mutex::new(RecentIds::new(self.duplicate_window)),
            }),
        })
    }
}

/// Consumes notifications and runs endpoint handlers on a worker pool (oslo's notification
/// listener). A notification is acknowledged after its handlers ran; with
/// [`allow_requeue`](NotificationListenerBuilder::allow_requeue), one a handler asked to requeue
/// (or that made it panic) goes back to its queue instead. `start`, `stop` and `wait` work as
/// on [`RpcServer`](crate::RpcServer).
///
/// Wire-compatible with oslo's `messagingv2` (enveloped) and `messaging` (bare) notifications.
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
/// let transport = Transport::new("memory://doc-notification-listener/")?;
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
/// let notifier = Notifier::new(&transport, "compute.host-1");
/// notifier.info(&RequestContext::new(), "compute.instance.create.end", &json!({"id": 1}))?;
/// assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), "compute.instance.create.end");
///
/// listener.stop();
/// listener.wait();
/// # Ok::<(), warren::Error>(())
/// ```
pub struct NotificationListener {
    lifecycle: Lifecycle,
    spec: ListenSpec,
    transport: Transport,
    workers: usize,
    dispatch: Arc<Dispatch>,
}

impl fmt::Debug for NotificationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queues: Vec<&str> = self.spec.queues.iter().map(|q| q.name.as_str()).collect();
        f.debug_struct("NotificationListener")
            .field("queues", &queues)
            .field("workers", &self.workers)
            .finish()
    }
}

impl NotificationListener {
    /// A builder listening to `targets` (each: a topic, optionally an exchange).
    pub fn builder(transport: &Transport, targets: Vec<Target>) -> NotificationListenerBuilder {
        NotificationListenerBuilder {
            transport: transport.clone(),
            targets,
            endpoints: Vec::new(),
            pool: None,
            allow_requeue: false,
            workers: None,
            retry: None,
            duplicate_window: crate::server::dedup::DEFAULT_WINDOW,
        }
    }

    /// Declares the queues and starts consuming (see [`RpcServer::start`](crate::RpcServer::start)).
    ///
    /// A notifier declares the queue it sends to, so notifications sent before the listener
    /// starts wait for it:
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
    /// let transport = Transport::new("memory://doc-notification-listener-start/")?;
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.info(&RequestContext::new(), "compute.instance.exists", &json!({"id": 1}))?;
    ///
    /// let (seen_tx, seen) = mpsc::channel();
    /// let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
    ///     seen_tx.send(n.event_type.clone()).unwrap();
    ///     NotificationResult::Handled
    /// });
    /// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// listener.start()?;
    /// assert!(listener.is_running());
    /// assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), "compute.instance.exists");
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn start(&self) -> Result<()> {
        let dispatch = self.dispatch.clone();
        self.lifecycle
            .start(&self.transport, &self.spec, self.workers, || {
                Ok(dispatch as Arc<dyn Handler>)
            })
    }

    /// Stops consuming; notifications already taken are still handled.
    ///
    /// ```
    /// use serde_json::json;
    /// use warren::{
    ///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
    ///     Priority, RequestContext, Target, Transport,
    /// };
    ///
    /// let transport = Transport::new("memory://doc-notification-listener-stop/")?;
    /// let handled = |_: &Notification| NotificationResult::Handled;
    /// let endpoint = NotificationEndpoint::new().on(Priority::Info, handled);
    /// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// listener.start()?;
    /// listener.stop();
    /// assert!(!listener.is_running());
    ///
    /// // What is sent now waits in the queue for the next listener.
    /// let tap = transport.memory_tap().unwrap();
    /// let notifier = Notifier::new(&transport, "compute.host-1");
    /// notifier.info(&RequestContext::new(), "compute.instance.exists", &json!({"id": 1}))?;
    /// assert_eq!(tap.queue_len("notifications.info"), Some(1));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn stop(&self) {
        self.lifecycle.stop();
    }

    /// Waits for `stop()` and the handlers, then closes the listener.
    ///
    /// `stop` may come from another thread:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use warren::{
    ///     Notification, NotificationEndpoint, NotificationListener, NotificationResult, Priority, Target,
    ///     Transport,
    /// };
    ///
    /// let transport = Transport::new("memory://doc-notification-listener-wait/")?;
    /// let handled = |_: &Notification| NotificationResult::Handled;
    /// let endpoint = NotificationEndpoint::new().on(Priority::Info, handled);
    /// let listener = NotificationListener::builder(&transport, vec![Target::new("notifications")])
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// listener.start()?;
    ///
    /// let listener = Arc::new(listener);
    /// let stopper = Arc::clone(&listener);
    /// let stopping = std::thread::spawn(move || stopper.stop());
    /// listener.wait(); // returns once stopped and every handler is done
    /// assert!(!listener.is_consuming());
    /// stopping.join().unwrap();
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn wait(&self) {
        self.lifecycle.wait();
    }

    /// `true` between `start()` and `stop()`.
    pub fn is_running(&self) -> bool {
        self.lifecycle.is_running()
    }

    /// `true` while connected and consuming.
    pub fn is_consuming(&self) -> bool {
        self.lifecycle.is_consuming()
    }

    /// The queues this listener consumes.
    pub fn queues(&self) -> Vec<&str> {
        self.spec.consumed().map(|q| q.name.as_str()).collect()
    }
}

impl Drop for NotificationListener {
    fn drop(&mut self) {
        self.stop();
        self.wait();
    }
}

/// What the workers share.
struct Dispatch {
    endpoints: Vec<NotificationEndpoint>,
    allow_requeue: bool,
    recent: Mutex<RecentIds>,
}

impl Handler for Dispatch {
    fn handle(&self, incoming: Incoming) {
        let Incoming { message, acker, .. } = incoming;
        let routing_key = message.routing_key;
        let decoded = Document::open(message.content_type.as_deref(), message.body)
            .and_then(|doc| doc.decode::<NotificationIn>().map_err(|e| e.to_string()))
            .and_then(|received| {
                let priority = received.priority.parse::<Priority>().map_err(|_| {
                    format!("unknown priority {}", limits::preview(&received.priority))
                })?;
                if let Some(unique_id) = &received.unique_id {
                    limits::check_id("_unique_id", unique_id)?;
                }
                Ok((received, priority))
            });
        let (received, priority) = match decoded {
            Ok(received) => received,
            Err(reason) => {
                warn!(
                    "rejecting an unreadable notification on {routing_key:?}: {}",
                    limits::clip(&reason)
                );
                acker.reject(false);
                return;
            }
        };
        // Claimed while the handlers run: a copy delivered meanwhile to another worker is a
        // duplicate too. Recorded once acknowledged, as oslo does: a requeued one is taken
        // again.
        let claim = match &received.unique_id {
            Some(unique_id) => match dedup::claim(&self.recent, unique_id) {
                Some(claim) => Some(claim),
                None => {
                    info!("ignoring duplicate notification {unique_id}");
                    let _ = acker.ack();
                    return;
                }
            },
            None => None,
        };
        let notification = Notification {
            priority,
            ctxt: received.context,
            publisher_id: received.publisher_id,
            event_type: received.event_type,
            payload: received.payload,
            metadata: NotificationMetadata {
                message_id: received.message_id,
                timestamp: received.timestamp,
            },
        };
        let requeue = self.dispatch(&notification);
        if requeue && self.allow_requeue {
            debug!(
                "requeueing notification {}",
                limits::preview(&notification.metadata.message_id)
            );
            // Given up first: the requeued notification must not find its id still claimed.
            drop(claim);
            acker.reject(true);
            return;
        }
        if let Some(claim) = claim {
            claim.handled();
        }
        if let Err(e) = acker.ack() {
            warn!(
                "could not acknowledge notification {}: {e}",
                limits::preview(&notification.metadata.message_id)
            );
        }
    }
}

impl Dispatch {
    /// Runs every handler for the notification's priority; `true` if one asked to requeue.
    fn dispatch(&self, notification: &Notification) -> bool {
        for endpoint in &self.endpoints {
            let Some(handler) = endpoint.handlers.get(&notification.priority) else {
                continue;
            };
            if !endpoint
                .filter
                .as_ref()
                .is_none_or(|f| f.matches(notification))
            {
                continue;
            }
            match catch_unwind(AssertUnwindSafe(|| handler(notification))) {
                Ok(NotificationResult::Handled) => {}
                Ok(NotificationResult::Requeue) => return true,
                Err(_) => {
                    error!(
                        "a notification handler panicked on {}",
                        limits::preview(&notification.event_type)
                    );
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{NotificationResult, Priority};

    use crate::test_support::eventually;

    #[test]
    fn a_listener_reports_its_state_and_a_dropped_one_stops_consuming() {
        let url = "memory://listener-unit-state/";
        let transport = Transport::new(url).unwrap();
        let tap = transport.memory_tap().expect("a memory tap");
        let endpoint = NotificationEndpoint::new().on(Priority::Info, |_: &Notification| {
            NotificationResult::Handled
        });
        assert_eq!(
            format!("{endpoint:?}"),
            "NotificationEndpoint { priorities: {Info}, filter: None }"
        );
        let listener = NotificationListener::builder(&transport, vec![Target::new("monitor")])
            .endpoint(endpoint)
            .workers(2)
            .build()
            .unwrap();
        assert_eq!(
            format!("{listener:?}"),
            r#"NotificationListener { queues: ["monitor.info"], workers: 2 }"#
        );
        assert!(!listener.is_running() && !listener.is_consuming());
        listener.start().unwrap();
        assert!(listener.is_running());
        eventually("consuming", || listener.is_consuming());
        listener.stop();
        assert!(!listener.is_running() && !listener.is_consuming());
        listener.wait();
        listener.start().expect("waited for: starts again");
        drop(listener);
        crate::Notifier::new(&transport, "test.host")
            .topics(["monitor"])
            .info(
                &crate::RequestContext::new(),
                "thing.happened",
                &serde_json::json!({}),
            )
            .unwrap();
        assert_eq!(
            tap.queue_len("monitor.info"),
            Some(1),
            "nobody consumes the queue of a dropped listener"
        );
    }
}
