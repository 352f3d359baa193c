//! The RPC server and the machinery it shares with the notification listener.
//!
//! Threads of one running server: the listener's poll thread (see
//! [`driver::poll`](crate::driver)), which owns the listen connection and hands deliveries to
//! a bounded incoming queue; N workers ([`worker_pool`]) running [`rpc`] handling (ack,
//! dispatch, reply); and the [`call_monitor`] thread sending keep-alives for long calls.
//! [`lifecycle`] is `start` / `stop` / `wait`.

use std::sync::Arc;

use crate::dispatcher::{AccessPolicy, Dispatcher, Endpoint};
use crate::driver::{queue_manager, FanoutQueue, IdleWorkers, ListenSpec, Screen};
use crate::error::{Error, Result};
use crate::target::Target;
use crate::transport::Transport;
use crate::url::Scheme;

mod call_monitor;
pub(crate) mod dedup;
mod delayed_requeue;
pub(crate) mod lifecycle;
mod reply_retry;
mod rpc;
pub(crate) mod worker_pool;

use call_monitor::CallMonitor;
use delayed_requeue::DelayedRequeue;
use lifecycle::Lifecycle;
use reply_retry::ReplyRetry;
use rpc::{RpcHandler, WorkerContext};

/// When a server acknowledges what it receives.
///
/// ```
/// use warren::AckMode;
///
/// // A failed cast is retried twice (three attempts in all), then dead-lettered.
/// let mode = AckMode::AfterHandling { requeue_limit: 2 };
/// # let _ = mode;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckMode {
    /// oslo's behaviour: every message is acknowledged on receipt, before its handler runs.
    /// At most once: a crash or an error after the ack loses the work.
    #[default]
    BeforeDispatch,
    /// For casts (calls keep oslo's ack-before-dispatch): a cast is acknowledged only once its
    /// handler returned `Ok`. A failed cast (error or panic) is re-published to the back of its
    /// queue up to `requeue_limit` times, its attempts counted in the `x-warren-attempts`
    /// header; after that it goes to the durable dead-letter queue `<topic>_dlq` with its last
    /// failure in `x-warren-failure`. A cast delivered again after a crash is recognised by
    /// its `_unique_id` (see [`RpcServerBuilder::duplicate_window`]) and not handled twice.
    AfterHandling {
        /// How many times a failed cast is retried before it is dead-lettered.
        requeue_limit: u32,
    },
}

/// Builds an [`RpcServer`]; get one with [`RpcServer::builder`].
///
/// ```
/// use warren::{AckMode, Endpoint, Error, Failure, NoArgs, RequestContext, RpcServer, Target, Transport};
///
/// let transport = Transport::new("memory://doc-rpc-server-builder/")?;
/// let endpoint = Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong"));
/// let server = RpcServer::builder(&transport, Target::new("jobs").with_server("worker-1"))
///     .endpoint(endpoint)
///     .workers(4)
///     .ack_mode(AckMode::AfterHandling { requeue_limit: 3 })
///     .duplicate_window(1024)
///     .build()?;
/// assert_eq!(server.queue_name(), "jobs.worker-1");
/// assert_eq!(server.dead_letter_queue(), Some("jobs_dlq"));
///
/// // A server's target names the server.
/// let nameless = RpcServer::builder(&transport, Target::new("jobs")).build();
/// assert!(matches!(nameless, Err(Error::InvalidTarget { .. })));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug)]
pub struct RpcServerBuilder {
    transport: Transport,
    target: Target,
    endpoints: Vec<Endpoint>,
    workers: Option<usize>,
    policy: AccessPolicy,
    retry: Option<u32>,
    ack_mode: AckMode,
    duplicate_window: usize,
    confirm_replies: bool,
}

impl RpcServerBuilder {
    /// Adds an endpoint; endpoints are tried in the order they were added.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Number of worker threads (default: the transport's `executor_thread_pool_size`).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// How hard `start()` tries to reach the broker: `retry` more passes over the URL's hosts
    /// after the first, then `start()` fails with [`Error::DeliveryFailure`]. By default
    /// (no limit) a server whose broker is down starts anyway and consumes once the broker is
    /// reachable. After start, a lost connection is always retried.
    pub fn retry(mut self, retry: u32) -> Self {
        self.retry = Some(retry);
        self
    }

    /// When messages are acknowledged (default: on receipt, as oslo does).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// How many recent `_unique_id`s the server remembers to drop duplicates (default 4,096;
    /// oslo keeps 16, a few milliseconds of traffic under load, so a copy sent again after a
    /// reconnect could arrive after its original was forgotten). Make it larger than what can
    /// be handled between a message and its copy (a publish timeout's worth of traffic, or
    /// what can be redelivered at once: prefetch × consumers) when relying on
    /// [`AckMode::AfterHandling`] across broker restarts. Each id costs 16 bytes.
    pub fn duplicate_window(mut self, window: usize) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Whether a reply waits for the broker's publisher confirm (default `true`, as oslo).
    ///
    /// Confirmed replies are published `mandatory`, so a reply whose queue is missing (its
    /// caller is reconnecting, say) is seen and retried for `kombu_missing_consumer_retry_timeout`,
    /// and one lost with its connection is sent again. With `false` such a reply is lost and its
    /// call times out; in exchange a worker does not wait for the broker after each call, which
    /// is worth about 20% more calls per second when the machine is saturated (`warren bench`).
    pub fn confirm_replies(mut self, confirm: bool) -> Self {
        self.confirm_replies = confirm;
        self
    }

    /// Which methods callers may reach (default: not those starting with `_`).
    pub fn access_policy(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Checks the target (it needs a topic and a server name) and builds the server. Nothing
    /// is declared or consumed before [`RpcServer::start`].
    pub fn build(self) -> Result<RpcServer> {
        let topic = self.target.require_topic()?.to_string();
        let server = match self.target.server.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                return Err(Error::invalid_target(
                    "a server's target must have topic and server names specified",
                ))
            }
        };
        if self.target.fanout {
            return Err(Error::invalid_target(
                "a server's target cannot be a fanout target",
            ));
        }
        let workers = self.workers.unwrap_or(self.transport.options().workers);
        if workers == 0 {
            return Err(Error::invalid_option(
                "workers",
                "a server needs at least one worker",
            ));
        }
        let exchange = self
            .target
            .exchange
            .clone()
            .unwrap_or_else(|| self.transport.options().control_exchange.clone());
        let context = WorkerContext::new(
            self.transport.clone(),
            Dispatcher::new(self.endpoints, self.policy),
            topic.clone(),
            self.ack_mode,
            self.duplicate_window,
            self.confirm_replies,
        );
        let mut spec = ListenSpec::rpc(
            &exchange,
            &topic,
            &server,
            context.dead_letter_queue.as_deref(),
            self.retry,
        );
        let options = self.transport.options();
        if self.transport.url().scheme() == Scheme::Rabbit {
            let fanout = if options.stream_fanout {
                FanoutQueue::Stream
            } else if options.queue_manager {
                FanoutQueue::Stable(format!(
                    "{topic}_fanout_{}",
                    queue_manager::next_name(&options.hostname, &options.processname)
                ))
            } else {
                FanoutQueue::Private
            };
            spec = spec.with_fanout(&topic, fanout);
        }
        spec.ack_on_handoff = (self.ack_mode == AckMode::BeforeDispatch).then(|| Screen {
            open: rpc::screen,
            max_size: options.max_message_size,
            idle: Arc::new(IdleWorkers::new()),
        });
        Ok(RpcServer {
            lifecycle: Lifecycle::new(format!("server {topic}.{server}")),
            spec,
            exchange,
            server,
            workers,
            context: Arc::new(context),
        })
    }
}

/// An RPC server (oslo's `RPCServer`): consumes `<topic>`, `<topic>.<server>` and the topic's
/// fanout, and runs requests on a pool of worker threads.
///
/// `start`, `stop` and `wait` may be called from different threads; `stop` then `wait` (or
/// dropping the server) finishes the messages already taken, then leaves no thread, consumer,
/// channel or connection of the server behind. A stopped server can be started again.
/// A handler may call `stop()`, but not `wait()` (which waits for the handler's own thread).
///
/// ```no_run
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcServer, Target, Transport};
///
/// let transport = Transport::new("rabbit://guest:guest@127.0.0.1:5672/")?;
/// let endpoint = Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong"));
/// let server = RpcServer::builder(&transport, Target::new("demo").with_server("host-1"))
///     .endpoint(endpoint)
///     .workers(4)
///     .build()?;
/// server.start()?;
/// // ... serve ...
/// server.stop();
/// server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
pub struct RpcServer {
    lifecycle: Lifecycle,
    spec: ListenSpec,
    exchange: String,
    server: String,
    workers: usize,
    context: Arc<WorkerContext>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("exchange", &self.exchange)
            .field("topic", &self.context.topic)
            .field("server", &self.server)
            .field("workers", &self.workers)
            .finish()
    }
}

impl RpcServer {
    /// A builder for a server of `target` (which needs `topic` and `server`).
    pub fn builder(transport: &Transport, target: Target) -> RpcServerBuilder {
        RpcServerBuilder {
            transport: transport.clone(),
            target,
            endpoints: Vec::new(),
            workers: None,
            policy: AccessPolicy::Default,
            retry: None,
            ack_mode: AckMode::BeforeDispatch,
            duplicate_window: crate::server::dedup::DEFAULT_WINDOW,
            confirm_replies: true,
        }
    }

    /// Declares the server's queues and starts consuming. Returns once messages can arrive;
    /// fails if the broker refuses the topology, or cannot be reached within the server's
    /// [`retry`](RpcServerBuilder::retry) (by default a server whose broker is down starts
    /// anyway and consumes once the broker is reachable). Starting a running server does
    /// nothing.
    ///
    /// ```
    /// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
    ///
    /// let transport = Transport::new("memory://doc-rpc-server-start/")?;
    /// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
    ///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong")))
    ///     .build()?;
    /// assert!(!server.is_consuming());
    /// server.start()?;
    /// assert!(server.is_running() && server.is_consuming());
    ///
    /// let client = RpcClient::new(&transport, Target::new("t"));
    /// let pong: String = client.call(&RequestContext::new(), "ping", &())?;
    /// assert_eq!(pong, "pong");
    /// # server.stop();
    /// # server.wait();
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn start(&self) -> Result<()> {
        self.context.set_stopping(false);
        let transport = &self.context.transport;
        self.lifecycle
            .start(transport, &self.spec, self.workers, || {
                let handler = RpcHandler {
                    context: self.context.clone(),
                    monitor: CallMonitor::start(transport.clone())?,
                    retry: ReplyRetry::start(transport.clone(), self.context.gone.clone())?,
                    requeue: DelayedRequeue::start()?,
                };
                Ok(Arc::new(handler))
            })
    }

    /// Stops consuming: returns once no new message will be taken. Messages already taken are
    /// still processed; [`wait`](Self::wait) waits for them. Stopping a server that is not
    /// running does nothing.
    ///
    /// ```
    /// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
    ///
    /// let transport = Transport::new("memory://doc-rpc-server-stop/")?;
    /// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
    ///     .endpoint(Endpoint::new().method("touch", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
    ///     .build()?;
    /// server.start()?;
    /// server.stop();
    /// assert!(!server.is_running());
    ///
    /// // What is sent now waits in the topic's queue for the next server.
    /// let tap = transport.memory_tap().expect("memory://");
    /// RpcClient::new(&transport, Target::new("t")).cast(&RequestContext::new(), "touch", &())?;
    /// assert_eq!(tap.queue_len("t"), Some(1));
    /// # server.wait();
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn stop(&self) {
        if self.lifecycle.is_running() {
            self.context.set_stopping(true);
        }
        self.lifecycle.stop();
    }

    /// Waits until the server is stopped (by [`stop`](Self::stop), possibly from another
    /// thread) and every message it took is done; then closes the listener. After it returns
    /// no thread, consumer, channel or connection of this server remains. Returns at once if
    /// the server is not started.
    ///
    /// `stop` may come from another thread:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcServer, Target, Transport};
    ///
    /// let transport = Transport::new("memory://doc-rpc-server-wait/")?;
    /// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
    ///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
    ///     .build()?;
    /// server.start()?;
    ///
    /// let server = Arc::new(server);
    /// let stopper = Arc::clone(&server);
    /// let stopping = std::thread::spawn(move || stopper.stop());
    /// server.wait(); // returns once stopped and every request taken is finished
    /// assert!(!server.is_consuming());
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

    /// `true` while the server is connected and consuming: `false` before `start()`, while
    /// it reconnects after losing its broker, and after `stop()`. A health check.
    pub fn is_consuming(&self) -> bool {
        self.lifecycle.is_consuming()
    }

    /// `<topic>.<server>`: the server's own queue, and its name in logs.
    pub fn queue_name(&self) -> String {
        format!("{}.{}", self.context.topic, self.server)
    }

    /// The dead-letter queue of failed casts under [`AckMode::AfterHandling`] (`<topic>_dlq`).
    pub fn dead_letter_queue(&self) -> Option<&str> {
        self.context.dead_letter_queue.as_deref()
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
        self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::QueueLifetime;

    use crate::test_support::eventually;

    /// A transport that never connects (building a server does not).
    fn transport(url: &str) -> Transport {
        Transport::new(url).expect("a valid URL")
    }

    fn server(url: &str, ack_mode: AckMode) -> RpcServer {
        RpcServer::builder(
            &transport(url),
            Target::new("compute").with_server("host-1"),
        )
        .ack_mode(ack_mode)
        .workers(3)
        .build()
        .expect("a valid server")
    }

    #[test]
    fn a_server_needs_a_topic_and_a_non_empty_server_name() {
        let t = transport("memory://server-unit/");
        for target in [
            Target::new("compute").with_server(""),
            Target::new("compute"),
            Target::new("").with_server("host-1"),
        ] {
            let built = RpcServer::builder(&t, target.clone()).build();
            assert!(
                matches!(built, Err(Error::InvalidTarget { .. })),
                "{target:?}: {built:?}"
            );
        }
    }

    #[test]
    fn only_ack_before_dispatch_screens_and_acks_on_hand_off() {
        let url = "rabbit://guest:guest@127.0.0.1:5672/";
        assert!(server(url, AckMode::BeforeDispatch)
            .spec
            .ack_on_handoff
            .is_some());
        assert!(server(url, AckMode::AfterHandling { requeue_limit: 1 })
            .spec
            .ack_on_handoff
            .is_none());
    }

    #[test]
    fn stream_fanout_is_a_rabbitmq_topology() {
        let query = "?rabbit_stream_fanout=true&rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true";
        let streams = |url: &str| {
            server(url, AckMode::BeforeDispatch)
                .spec
                .queues
                .iter()
                .filter(|plan| plan.lifetime == QueueLifetime::Stream)
                .count()
        };
        assert_eq!(
            streams(&format!("rabbit://guest:guest@127.0.0.1:5672/{query}")),
            1
        );
        assert_eq!(
            streams(&format!("memory://server-unit-stream/{query}")),
            0,
            "the in-process bus has no streams"
        );
    }

    #[test]
    fn a_server_describes_itself() {
        let shown = format!(
            "{:?}",
            server("memory://server-unit-debug/", AckMode::BeforeDispatch)
        );
        assert_eq!(
            shown,
            r#"RpcServer { exchange: "openstack", topic: "compute", server: "host-1", workers: 3 }"#
        );
    }

    #[test]
    fn a_server_reports_its_state_and_a_dropped_one_stops_consuming() {
        let url = "memory://server-unit-state/";
        let t = transport(url);
        let tap = t.memory_tap().expect("a memory tap");
        let server = server(url, AckMode::BeforeDispatch);
        assert_eq!(server.queue_name(), "compute.host-1");
        assert!(!server.is_running() && !server.is_consuming());
        server.start().expect("start");
        assert!(server.is_running());
        // The poll thread says so once its loop runs, just after start() returned.
        eventually("a memory server consumes once started", || {
            server.is_consuming()
        });
        server.stop();
        assert!(!server.is_running() && !server.is_consuming());
        server.wait();
        server.start().expect("a stopped server starts again");
        eventually("consuming again", || server.is_consuming());
        drop(server);
        let cast = |n: u32| {
            crate::RpcClient::new(&t, Target::new("compute").with_server("host-1"))
                .cast(
                    &crate::RequestContext::new(),
                    "ping",
                    &[("n", n)]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .expect("cast")
        };
        cast(1);
        assert_eq!(
            tap.queue_len("compute.host-1"),
            Some(1),
            "nobody consumes the queue of a dropped server"
        );
    }
}
