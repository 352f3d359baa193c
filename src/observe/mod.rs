//! Observability: a hook through which an application sees what warren's clients, servers and
//! connections do, to count it, time it and export it (Prometheus, StatsD, logs, its own).
//!
//! Install one [`Observer`] on a transport with
//! [`TransportBuilder::observer`](crate::TransportBuilder::observer); every client and server
//! built on that transport reports to it through [`Observer::observe`], called with an
//! [`Event`]:
//!
//! | event | when | from |
//! | --- | --- | --- |
//! | [`Event::RequestStarted`] | a server's worker starts a request (acknowledged, not a duplicate), before its method runs | server |
//! | [`Event::RequestFinished`] | the method returned and the call was replied to (or the cast settled) | server |
//! | [`Event::CallFinished`] | [`RpcClient::call`](crate::RpcClient::call) or [`PendingCall::wait`](crate::PendingCall::wait) returned (or [`start_call`](crate::RpcClient::start_call) failed) | client |
//! | [`Event::CastSent`] | [`RpcClient::cast`](crate::RpcClient::cast) returned | client |
//! | [`Event::Connection`] | a RabbitMQ connection was opened, lost, re-established after a loss, or closed | any |
//!
//! Two observers come with warren: [`Stats`], an in-memory recorder (per-method counts,
//! in-flight requests, latency percentiles, connection counts; printable as a table), and,
//! with the cargo feature `metrics`, `MetricsObserver`, which records through the
//! [`metrics`](https://docs.rs/metrics) facade under OpenTelemetry's names (the names are
//! listed in its module, `warren::observe::metrics`).
//!
//! # Cost
//!
//! Without an observer, each call, cast and request pays one `Option` check: no clock read,
//! no allocation. With one, a call reads the clock twice and the observer runs on the
//! thread that did the work (the caller's, a server worker, a connection's own thread), so
//! it must be quick and must not block: count, record, hand off. An observer that panics is
//! logged (once) and otherwise ignored; warren carries on.
//!
//! # Labels and cardinality
//!
//! A server's method and namespace names come from its callers. [`ServerRequest::known`] tells
//! whether the server has such a method; [`ServerRequest::method_label`] and
//! [`ServerRequest::service`] fold unknown ones into `_OTHER` and the topic, so that a caller
//! sending random method names cannot grow an observer's label set. Use those two to label.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod stats;

#[cfg(feature = "metrics")]
pub use self::metrics::MetricsObserver;
pub use stats::{ConnectionStats, Latency, MethodStats, Side, Stats, StatsSnapshot};

/// The method label of a request for a method the server does not have (OpenTelemetry's
/// placeholder for a value outside the known set).
pub const OTHER_METHOD: &str = "_OTHER";

/// Sees what clients, servers and connections do; installed with
/// [`TransportBuilder::observer`](crate::TransportBuilder::observer).
///
/// Called on the thread that did the work, often a hot one: keep it quick and non-blocking.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use warren::observe::{Event, Observer, Outcome};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// /// Counts the calls that failed on the server, as seen by the caller.
/// #[derive(Default)]
/// struct RemoteFailures(AtomicU64);
///
/// impl Observer for RemoteFailures {
///     fn observe(&self, event: &Event<'_>) {
///         if let Event::CallFinished { outcome: Outcome::Remote { class }, .. } = event {
///             eprintln!("remote failure: {class}");
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
///
/// let failures = Arc::new(RemoteFailures::default());
/// let transport = Transport::builder("memory://observer-doc/")
///     .observer(failures.clone())
///     .build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("boom", |_: &RequestContext, _: NoArgs| {
///         Err::<(), _>(Failure::new("ValueError", "builtins", "no"))
///     }))
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// assert!(client.call::<_, ()>(&RequestContext::new(), "boom", &()).is_err());
/// assert_eq!(failures.0.load(Ordering::Relaxed), 1);
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
pub trait Observer: Send + Sync + 'static {
    /// Called for each event, on the thread where it happened.
    fn observe(&self, event: &Event<'_>);
}

impl<F> Observer for F
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn observe(&self, event: &Event<'_>) {
        self(event)
    }
}

/// What happened; see the [module documentation](self) for when each is reported.
///
/// New events and fields may be added: match with `..` and keep a `_` arm.
///
/// One call to a server on the same transport gives three events: two from the server, one
/// from the client (the server may report `RequestFinished` after the caller has its result):
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::Event;
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let (tx, events) = mpsc::channel();
/// let observer = move |event: &Event<'_>| {
///     let name = match event {
///         Event::RequestStarted { .. } => "request started",
///         Event::RequestFinished { .. } => "request finished",
///         Event::CallFinished { .. } => "call finished",
///         Event::CastSent { .. } => "cast sent",
///         Event::Connection { .. } => "connection",
///         _ => "other",
///     };
///     let _ = tx.send(name);
/// };
/// let transport = Transport::builder("memory://doc-event/")
///     .observer(Arc::new(observer))
///     .build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong")))
///     .build()?;
/// server.start()?;
/// let _: String = RpcClient::new(&transport, Target::new("t")).call(&RequestContext::new(), "ping", &())?;
///
/// let mut seen: Vec<&str> = (0..3)
///     .map(|_| events.recv_timeout(Duration::from_secs(5)).expect("an event"))
///     .collect();
/// seen.sort();
/// assert_eq!(seen, ["call finished", "request finished", "request started"]);
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A server's worker starts handling a request: it was acknowledged (or will be after
    /// handling) and is not a duplicate; its method is about to run. Every `RequestStarted` is
    /// followed by one [`RequestFinished`](Event::RequestFinished) of the same request, so
    /// started minus finished is the number of requests in flight.
    #[non_exhaustive]
    RequestStarted {
        /// The request.
        request: ServerRequest<'a>,
    },
    /// A server finished a request: its method returned and the call's reply was sent (or the
    /// cast acknowledged, re-queued or dead-lettered).
    #[non_exhaustive]
    RequestFinished {
        /// The request.
        request: ServerRequest<'a>,
        /// [`Outcome::Ok`] or [`Outcome::Failed`] (the failure the caller gets back).
        outcome: Outcome<'a>,
        /// From `RequestStarted` to now: the method's run and the reply.
        duration: Duration,
    },
    /// A call returned to its caller, with its result or its error (a call that could not be
    /// sent too).
    #[non_exhaustive]
    CallFinished {
        /// The call.
        call: ClientRequest<'a>,
        /// [`Outcome::Ok`], [`Outcome::Remote`], [`Outcome::Timeout`] or [`Outcome::Error`].
        outcome: Outcome<'a>,
        /// From [`start_call`](crate::RpcClient::start_call) (or `call`) to the result.
        duration: Duration,
    },
    /// A cast returned to its caller: sent (and confirmed, unless `confirm(false)`), or not.
    #[non_exhaustive]
    CastSent {
        /// The cast.
        cast: ClientRequest<'a>,
        /// [`Outcome::Ok`], [`Outcome::Timeout`] or [`Outcome::Error`].
        outcome: Outcome<'a>,
        /// How long sending took.
        duration: Duration,
    },
    /// A RabbitMQ connection changed state (`memory://` has no connections).
    #[non_exhaustive]
    Connection {
        /// Which of the transport's connections.
        role: ConnectionRole,
        /// What happened to it.
        state: ConnectionState,
        /// The broker's `host:port`.
        address: &'a str,
    },
}

/// A request as a server sees it.
///
/// Its method and namespace come from the caller; label with [`service`](Self::service) and
/// [`method_label`](Self::method_label), which fold methods the server does not have into one
/// label:
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::{Event, RequestKind};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let (tx, started) = mpsc::channel();
/// let observer = move |event: &Event<'_>| {
///     if let Event::RequestStarted { request, .. } = event {
///         let labels = (request.service().to_owned(), request.method_label().to_owned());
///         let _ = tx.send((request.kind, request.method.to_owned(), request.known, labels));
///     }
/// };
/// let transport = Transport::builder("memory://doc-server-request/")
///     .observer(Arc::new(observer))
///     .build()?;
/// let endpoint = Endpoint::new()
///     .namespace("compute-api")
///     .method("reboot", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(()));
/// let server = RpcServer::builder(&transport, Target::new("compute").with_server("host-1"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("compute").with_namespace("compute-api"));
/// let ctx = RequestContext::new();
/// client.call::<_, ()>(&ctx, "reboot", &())?;
/// assert!(client.call::<_, ()>(&ctx, "x-7f3a", &()).is_err()); // NoSuchMethod
///
/// let next = || started.recv_timeout(Duration::from_secs(5)).expect("a request");
/// let labels = |service: &str, method: &str| (service.to_owned(), method.to_owned());
/// let (kind, method, known, reboot) = next();
/// assert_eq!((kind, method.as_str(), known), (RequestKind::Call, "reboot", true));
/// assert_eq!(reboot, labels("compute-api", "reboot"));
/// // A method the server does not have: labelled by topic and `_OTHER`.
/// let (_, method, known, unknown) = next();
/// assert_eq!((method.as_str(), known), ("x-7f3a", false));
/// assert_eq!(unknown, labels("compute", "_OTHER"));
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ServerRequest<'a> {
    /// The server's topic.
    pub topic: &'a str,
    /// The request's namespace, as sent.
    pub namespace: Option<&'a str>,
    /// The method name, as sent (chosen by the caller: see [`method_label`](Self::method_label)).
    pub method: &'a str,
    /// Call or cast.
    pub kind: RequestKind,
    /// Whether one of the server's endpoints has this method in this namespace (its version
    /// may still be unsupported).
    pub known: bool,
}

impl<'a> ServerRequest<'a> {
    /// OpenTelemetry's `rpc.service`: the namespace if the server knows the method, else the
    /// server's topic.
    pub fn service(&self) -> &'a str {
        match self.namespace {
            Some(namespace) if self.known => namespace,
            _ => self.topic,
        }
    }

    /// OpenTelemetry's `rpc.method`: the method if the server knows it, else
    /// [`OTHER_METHOD`] (`_OTHER`), so that callers cannot create labels at will.
    pub fn method_label(&self) -> &'a str {
        if self.known {
            self.method
        } else {
            OTHER_METHOD
        }
    }
}

/// A call or cast as its client sends it.
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::Event;
/// use warren::{RequestContext, RpcClient, Target, Transport};
///
/// let (tx, casts) = mpsc::channel();
/// let observer = move |event: &Event<'_>| {
///     if let Event::CastSent { cast, .. } = event {
///         let _ = tx.send(format!(
///             "{} to {} (server {:?}, fanout {})",
///             cast.method,
///             cast.service(),
///             cast.server,
///             cast.fanout
///         ));
///     }
/// };
/// let transport = Transport::builder("memory://doc-client-request/")
///     .observer(Arc::new(observer))
///     .build()?;
/// let client = RpcClient::new(&transport, Target::new("compute"));
/// let ctx = RequestContext::new();
/// client.prepare().server("host-1").cast(&ctx, "reboot", &())?;
/// client.prepare().fanout(true).namespace("cache").cast(&ctx, "refresh", &())?;
///
/// let next = || casts.recv_timeout(Duration::from_secs(5)).expect("a cast");
/// assert_eq!(next(), r#"reboot to compute (server Some("host-1"), fanout false)"#);
/// assert_eq!(next(), "refresh to cache (server None, fanout true)");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClientRequest<'a> {
    /// The target's topic (empty if it has none: the call failed before sending).
    pub topic: &'a str,
    /// The target's server, if it names one.
    pub server: Option<&'a str>,
    /// The target's namespace.
    pub namespace: Option<&'a str>,
    /// The method.
    pub method: &'a str,
    /// A fanout cast.
    pub fanout: bool,
}

impl<'a> ClientRequest<'a> {
    /// OpenTelemetry's `rpc.service`: the namespace, or else the topic.
    pub fn service(&self) -> &'a str {
        self.namespace.unwrap_or(self.topic)
    }
}

/// Whether a request expects a reply.
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::{Event, RequestKind};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let (tx, finished) = mpsc::channel();
/// let observer = move |event: &Event<'_>| {
///     if let Event::RequestFinished { request, .. } = event {
///         let _ = tx.send(request.kind);
///     }
/// };
/// let transport = Transport::builder("memory://doc-request-kind/")
///     .observer(Arc::new(observer))
///     .build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("touch", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// client.call::<_, ()>(&RequestContext::new(), "touch", &())?;
/// client.cast(&RequestContext::new(), "touch", &())?;
///
/// let mut kinds: Vec<RequestKind> = (0..2)
///     .map(|_| finished.recv_timeout(Duration::from_secs(5)).expect("a request"))
///     .collect();
/// kinds.sort();
/// assert_eq!(kinds, [RequestKind::Call, RequestKind::Cast]);
/// assert_eq!(RequestKind::Cast.to_string(), "cast");
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    /// A call: the caller waits for a reply.
    Call,
    /// A cast: no reply.
    Cast,
}

impl RequestKind {
    /// `"call"` or `"cast"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Call => "call",
            RequestKind::Cast => "cast",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a request ended.
///
/// What a client sees, by outcome and [`error_type`](Self::error_type):
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::{Event, Outcome};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let (tx, outcomes) = mpsc::channel();
/// let observer = move |event: &Event<'_>| {
///     if let Event::CallFinished { outcome, .. } = event {
///         let kind = match outcome {
///             Outcome::Ok => "ok",
///             Outcome::Remote { .. } => "remote",
///             Outcome::Timeout => "timeout",
///             Outcome::Error(_) => "error",
///             _ => "other",
///         };
///         let _ = tx.send((kind, outcome.error_type().map(str::to_owned)));
///     }
/// };
/// let transport = Transport::builder("memory://doc-outcome/")
///     .observer(Arc::new(observer))
///     .build()?;
/// let endpoint = Endpoint::new()
///     .method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(()))
///     .method("boom", |_: &RequestContext, _: NoArgs| {
///         Err::<(), _>(Failure::new("ValueError", "builtins", "no"))
///     });
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// let ctx = RequestContext::new();
/// let _ = client.call::<_, ()>(&ctx, "ping", &());
/// let _ = client.call::<_, ()>(&ctx, "boom", &());
/// let nobody = client.prepare().topic("nobody").timeout(Duration::from_millis(50));
/// let _ = nobody.call::<_, ()>(&ctx, "ping", &());
/// let _ = client.prepare().fanout(true).call::<_, ()>(&ctx, "ping", &()); // not a call target
///
/// let mut next = || outcomes.recv_timeout(Duration::from_secs(5)).expect("a call");
/// assert_eq!(next(), ("ok", None));
/// assert_eq!(next(), ("remote", Some("ValueError".to_owned())));
/// assert_eq!(next(), ("timeout", Some("timeout".to_owned())));
/// assert_eq!(next(), ("error", Some("invalid_target".to_owned())));
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// It succeeded.
    Ok,
    /// Server side: the method failed (or was refused: `NoSuchMethod`, `UnsupportedVersion`,
    /// a `TypeError` for bad arguments, `HandlerPanic`...), with the failure's class.
    Failed {
        /// The failure's exception class, e.g. `ValueError`.
        class: &'a str,
        /// The method declared it expected ([`Failure::expected`](crate::Failure::expected)).
        expected: bool,
    },
    /// Client side: the server sent back a failure ([`Error::Remote`]).
    Remote {
        /// The failure's exception class.
        class: &'a str,
    },
    /// Client side: no reply in time, or the broker did not take the message in time.
    Timeout,
    /// Client side: any other error (connection, delivery, encoding, invalid target...).
    Error(&'a Error),
}

impl<'a> Outcome<'a> {
    /// `true` for [`Outcome::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// OpenTelemetry's `error.type`: `None` on success, else the failure's class, `"timeout"`,
    /// or the error's kind ([`error_type`]).
    pub fn error_type(&self) -> Option<&'a str> {
        match *self {
            Outcome::Ok => None,
            Outcome::Failed { class, .. } | Outcome::Remote { class } => Some(class),
            Outcome::Timeout => Some("timeout"),
            Outcome::Error(error) => Some(error_type(error)),
        }
    }

    /// The outcome of a client's call or cast.
    pub(crate) fn of_client<T>(result: &'a Result<T, Error>) -> Outcome<'a> {
        match result {
            Ok(_) => Outcome::Ok,
            Err(error) => Outcome::of_error(error),
        }
    }

    /// The outcome of a client's call or cast that failed with `error`.
    pub(crate) fn of_error(error: &'a Error) -> Outcome<'a> {
        match error {
            Error::Remote { class, .. } => Outcome::Remote { class },
            Error::Timeout { .. } => Outcome::Timeout,
            error => Outcome::Error(error),
        }
    }
}

/// A short, stable name for the kind of an [`Error`], for labels (`"connection"`,
/// `"delivery_failure"`, `"timeout"`...); a remote failure gives its class.
pub fn error_type(error: &Error) -> &str {
    #[allow(unreachable_patterns)]
    match error {
        Error::InvalidUrl { .. } => "invalid_url",
        Error::InvalidOption { .. } => "invalid_option",
        Error::InvalidTarget { .. } => "invalid_target",
        Error::InvalidVersion { .. } => "invalid_version",
        Error::VersionCap { .. } => "version_cap",
        Error::Timeout { .. } => "timeout",
        Error::Remote { class, .. } => class,
        Error::Connection { .. } => "connection",
        Error::Authentication { .. } => "authentication",
        Error::Tls { .. } => "tls",
        Error::Refused { .. } => "refused",
        Error::DeliveryFailure { .. } => "delivery_failure",
        Error::Undeliverable { .. } => "undeliverable",
        Error::Encode { .. } => "encode",
        Error::Decode { .. } => "decode",
        Error::ServerState { .. } => "server_state",
        Error::Closed => "closed",
        _ => "other",
    }
}

/// Which of a transport's RabbitMQ connections.
///
/// ```
/// use std::sync::Arc;
/// use warren::observe::{ConnectionRole, Event};
/// use warren::Transport;
///
/// // Logs every connection change, by role (RabbitMQ only: `memory://` has no connections).
/// let log = |event: &Event<'_>| {
///     if let Event::Connection { role, state, address, .. } = event {
///         eprintln!("{role} connection to {address}: {state}");
///     }
/// };
/// let transport = Transport::builder("memory://doc-connection-role/")
///     .observer(Arc::new(log))
///     .build()?;
/// # let _ = transport;
/// let roles: Vec<&str> = ConnectionRole::ALL.iter().map(|role| role.as_str()).collect();
/// assert_eq!(roles, ["send", "reply", "listen"]);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionRole {
    /// The connection calls, casts and replies are published on (one per transport).
    Send,
    /// The connection consuming the transport's reply queue (one per transport, from its
    /// first call).
    Reply,
    /// A server's or notification listener's consuming connection (one each).
    Listen,
}

impl ConnectionRole {
    /// `"send"`, `"reply"` or `"listen"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionRole::Send => "send",
            ConnectionRole::Reply => "reply",
            ConnectionRole::Listen => "listen",
        }
    }

    /// Every role, in order.
    pub const ALL: [ConnectionRole; 3] = [
        ConnectionRole::Send,
        ConnectionRole::Reply,
        ConnectionRole::Listen,
    ];

    pub(crate) fn from_name(role: &str) -> ConnectionRole {
        match role {
            "send" => ConnectionRole::Send,
            "reply" => ConnectionRole::Reply,
            _ => ConnectionRole::Listen,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ConnectionRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a connection.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use warren::observe::{ConnectionState, Event};
/// use warren::Transport;
///
/// // Counts lost connections, for an alert (`memory://` has no connections to lose).
/// let lost = Arc::new(AtomicU64::new(0));
/// let counter = Arc::clone(&lost);
/// let observer = move |event: &Event<'_>| {
///     if let Event::Connection { state: ConnectionState::Lost, .. } = event {
///         counter.fetch_add(1, Ordering::Relaxed);
///     }
/// };
/// let transport = Transport::builder("memory://doc-connection-state/")
///     .observer(Arc::new(observer))
///     .build()?;
/// # let _ = transport;
/// assert_eq!(lost.load(Ordering::Relaxed), 0);
/// assert!(ConnectionState::Reconnected.is_open());
/// assert!(!ConnectionState::Lost.is_open());
/// assert_eq!(ConnectionState::Lost.to_string(), "lost");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Opened, the first time for its role (or with no loss of that role outstanding).
    Connected,
    /// Lost (I/O error, missed heartbeats, closed by the broker); it is being re-established.
    Lost,
    /// Opened again after a connection of its role was lost: a reconnect.
    Reconnected,
    /// Closed by warren (transport closed, server stopped, a spare connection dropped).
    Closed,
}

impl ConnectionState {
    /// `"connected"`, `"lost"`, `"reconnected"` or `"closed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Lost => "lost",
            ConnectionState::Reconnected => "reconnected",
            ConnectionState::Closed => "closed",
        }
    }

    /// `true` for the states in which the connection is open.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            ConnectionState::Connected | ConnectionState::Reconnected
        )
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport's observer, if any: what the hot paths check.
#[derive(Clone, Default)]
pub(crate) struct Hook(Option<Arc<dyn Observer>>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// Set once an observer has panicked, so that the error is logged once.
static PANIC_LOGGED: AtomicBool = AtomicBool::new(false);

impl Hook {
    pub fn new(observer: Arc<dyn Observer>) -> Hook {
        Hook(Some(observer))
    }

    /// `true` when an observer is installed.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The current instant if an observer is installed (the start of something to time).
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        self.0.as_ref().map(|_| Instant::now())
    }

    /// Reports the event `make` builds, if an observer is installed.
    #[inline]
    pub fn emit<'a>(&self, make: impl FnOnce() -> Event<'a>) {
        if let Some(observer) = &self.0 {
            notify(observer.as_ref(), &make());
        }
    }
}

fn notify(observer: &dyn Observer, event: &Event<'_>) {
    if catch_unwind(AssertUnwindSafe(|| observer.observe(event))).is_err()
        && !PANIC_LOGGED.swap(true, Ordering::Relaxed)
    {
        log::error!(
            "the transport's observer panicked (on {event:?}); further panics are not logged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_folded_into_one_label() {
        let mut request = ServerRequest {
            topic: "compute",
            namespace: Some("ns"),
            method: "start",
            kind: RequestKind::Call,
            known: true,
        };
        assert_eq!((request.service(), request.method_label()), ("ns", "start"));
        request.known = false;
        request.method = "random-123";
        assert_eq!(
            (request.service(), request.method_label()),
            ("compute", OTHER_METHOD)
        );
        let call = ClientRequest {
            topic: "compute",
            server: None,
            namespace: None,
            method: "m",
            fanout: false,
        };
        assert_eq!(call.service(), "compute");
    }

    #[test]
    fn error_types_are_short_names() {
        let timeout: Result<(), Error> = Err(Error::Timeout {
            msg_id: "x".into(),
            method: "m".into(),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(Outcome::of_client(&timeout).error_type(), Some("timeout"));
        assert!(matches!(Outcome::of_client(&timeout), Outcome::Timeout));
        let remote: Result<(), Error> =
            Err(crate::Failure::new("ValueError", "builtins", "bad").into_error());
        assert!(matches!(
            Outcome::of_client(&remote),
            Outcome::Remote {
                class: "ValueError"
            }
        ));
        let closed: Result<(), Error> = Err(Error::Closed);
        assert_eq!(Outcome::of_client(&closed).error_type(), Some("closed"));
        assert_eq!(Outcome::of_client(&Ok::<_, Error>(())).error_type(), None);
        assert_eq!(
            Outcome::Failed {
                class: "NoSuchMethod",
                expected: false
            }
            .error_type(),
            Some("NoSuchMethod")
        );
    }

    #[test]
    fn a_panicking_observer_is_contained() {
        let hook = Hook::new(Arc::new(|_: &Event<'_>| panic!("observer bug")));
        let mut built = 0;
        hook.emit(|| {
            built += 1;
            Event::Connection {
                role: ConnectionRole::Send,
                state: ConnectionState::Connected,
                address: "h:1",
            }
        });
        assert_eq!(built, 1);
        let off = Hook::default();
        off.emit(|| unreachable!("no observer: the event is never built"));
        assert!(off.start().is_none() && !off.is_on());
        assert!(hook.start().is_some() && hook.is_on());
    }
}
