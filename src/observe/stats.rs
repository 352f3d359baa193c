//! [`Stats`]: an in-memory [`Observer`] keeping per-method counts, in-flight requests, latency
//! histograms and connection counts, readable at any time as plain data or a table.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::{error_type, ConnectionRole, ConnectionState, Event, Observer, Outcome};

/// Which side of a request a [`MethodStats`] counts.
///
/// A process that calls its own server counts each call twice, once per side:
///
/// ```
/// use std::sync::Arc;
/// use warren::observe::{Side, Stats};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://doc-side/").observer(stats.clone()).build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
///     .build()?;
/// server.start()?;
/// RpcClient::new(&transport, Target::new("t")).call::<_, ()>(&RequestContext::new(), "ping", &())?;
/// server.stop();
/// server.wait();
///
/// let snapshot = stats.snapshot();
/// let sides: Vec<Side> = snapshot.methods.iter().map(|m| m.side).collect();
/// assert_eq!(sides, [Side::Server, Side::Client]);
/// assert_eq!(snapshot.side(Side::Client).methods[0].calls, 1);
/// assert_eq!(Side::Client.to_string(), "client");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// Requests handled by this process's servers.
    Server,
    /// Calls and casts sent by this process's clients.
    Client,
}

impl Side {
    /// `"server"` or `"client"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An in-memory [`Observer`]: per method (and side, and service), counts of calls, casts,
/// successes, failures by class and timeouts, requests in flight, and a latency histogram;
/// per connection role, opens, losses and reconnects. [`snapshot`](Stats::snapshot) reads it
/// as plain data, whose `Display` is a table.
///
/// Recording takes a read lock and a few atomic additions (a write lock the first time a
/// method is seen); latencies go into fixed log-scale buckets (four per power of two, so a
/// percentile is within about 12% of the true value), from nanoseconds to centuries.
///
/// ```
/// use std::sync::Arc;
/// use warren::observe::{Side, Stats};
/// use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://stats-doc/").observer(stats.clone()).build()?;
/// let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
///     .endpoint(Endpoint::new().method("double", |_: &RequestContext, x: i64| Ok::<_, Failure>(2 * x)))
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("calc"));
/// for x in 0..3 {
///     let _: i64 = client.call(&RequestContext::new(), "double", &x)?;
/// }
/// server.stop();
/// server.wait();
///
/// let snapshot = stats.snapshot();
/// let served = snapshot.method(Side::Server, "double").expect("seen by the server");
/// assert_eq!((served.calls, served.ok, served.in_flight), (3, 3, 0));
/// let sent = snapshot.method(Side::Client, "double").expect("seen by the client");
/// assert_eq!(sent.latency.count, 3);
/// println!("{snapshot}");
/// # Ok::<(), warren::Error>(())
/// ```
pub struct Stats {
    /// Per side: service → method → counters.
    sides: [RwLock<Services>; 2],
    connections: [ConnectionCell; 3],
}

/// Service → method → counters.
type Services = HashMap<String, HashMap<String, Box<Cell>>>;

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Stats {
    /// An empty recorder.
    pub fn new() -> Stats {
        Stats {
            sides: Default::default(),
            connections: Default::default(),
        }
    }

    /// What was recorded so far, sorted by side (servers first), service and method.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut methods = Vec::new();
        for side in [Side::Server, Side::Client] {
            let map = self.sides[side as usize].read();
            for (service, by_method) in map.iter() {
                for (method, cell) in by_method {
                    methods.push(cell.snapshot(side, service, method));
                }
            }
        }
        methods
            .sort_by(|a, b| (a.side, &a.service, &a.method).cmp(&(b.side, &b.service, &b.method)));
        let connections = ConnectionRole::ALL
            .iter()
            .filter_map(|role| self.connections[role.index()].snapshot(*role))
            .collect();
        StatsSnapshot {
            methods,
            connections,
        }
    }

    /// Runs `record` on the counters of `method` of `service` on `side`, creating them the
    /// first time.
    fn with_cell(&self, side: Side, service: &str, method: &str, record: impl FnOnce(&Cell)) {
        let lock = &self.sides[side as usize];
        {
            let map = lock.read();
            if let Some(cell) = map.get(service).and_then(|m| m.get(method)) {
                return record(cell);
            }
        }
        let mut map = lock.write();
        let cell = map
            .entry(service.to_owned())
            .or_default()
            .entry(method.to_owned())
            .or_insert_with(|| Box::new(Cell::new()));
        record(cell);
    }
}

impl Observer for Stats {
    fn observe(&self, event: &Event<'_>) {
        match *event {
            Event::RequestStarted { request } => {
                self.with_cell(
                    Side::Server,
                    request.service(),
                    request.method_label(),
                    |cell| {
                        cell.in_flight.fetch_add(1, Ordering::Relaxed);
                    },
                );
            }
            Event::RequestFinished {
                request,
                outcome,
                duration,
            } => {
                self.with_cell(
                    Side::Server,
                    request.service(),
                    request.method_label(),
                    |cell| {
                        cell.in_flight.fetch_sub(1, Ordering::Relaxed);
                        let count = match request.kind {
                            super::RequestKind::Call => &cell.calls,
                            super::RequestKind::Cast => &cell.casts,
                        };
                        count.fetch_add(1, Ordering::Relaxed);
                        cell.record(&outcome, duration);
                    },
                );
            }
            Event::CallFinished {
                call,
                outcome,
                duration,
            } => {
                self.with_cell(Side::Client, call.service(), call.method, |cell| {
                    cell.calls.fetch_add(1, Ordering::Relaxed);
                    cell.record(&outcome, duration);
                });
            }
            Event::CastSent {
                cast,
                outcome,
                duration,
            } => {
                self.with_cell(Side::Client, cast.service(), cast.method, |cell| {
                    cell.casts.fetch_add(1, Ordering::Relaxed);
                    cell.record(&outcome, duration);
                });
            }
            Event::Connection {
                role,
                state,
                address,
            } => self.connections[role.index()].record(state, address),
        }
    }
}

/// The counters of one method on one side.
struct Cell {
    calls: AtomicU64,
    casts: AtomicU64,
    ok: AtomicU64,
    timeouts: AtomicU64,
    expected: AtomicU64,
    in_flight: AtomicI64,
    failed: Mutex<BTreeMap<String, u64>>,
    latency: Histogram,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            calls: AtomicU64::new(0),
            casts: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            failed: Mutex::new(BTreeMap::new()),
            latency: Histogram::new(),
        }
    }

    fn record(&self, outcome: &Outcome<'_>, duration: Duration) {
        self.latency.record(duration);
        let failed = |class: &str| {
            let mut failed = self.failed.lock();
            match failed.get_mut(class) {
                Some(count) => *count += 1,
                None => {
                    failed.insert(class.to_owned(), 1);
                }
            }
        };
        match *outcome {
            Outcome::Ok => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Timeout => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed { class, expected } => {
                if expected {
                    self.expected.fetch_add(1, Ordering::Relaxed);
                }
                failed(class);
            }
            Outcome::Remote { class } => failed(class),
            Outcome::Error(error) => failed(error_type(error)),
        }
    }

    fn snapshot(&self, side: Side, service: &str, method: &str) -> MethodStats {
        MethodStats {
            side,
            service: service.to_owned(),
            method: method.to_owned(),
            calls: self.calls.load(Ordering::Relaxed),
            casts: self.casts.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.lock().clone(),
            expected: self.expected.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: self.latency.summary(),
        }
    }
}

/// Four buckets per power of two: values 0..3 ns exactly, then `[4, 5), [5, 6), [6, 7),
/// [7, 8), [8, 10)`... up to `u64::MAX` ns.
const BUCKETS: usize = 4 * 63;

/// The bucket of a duration of `ns` nanoseconds.
fn bucket(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let exponent = 63 - ns.leading_zeros() as usize; // >= 2
    let sub = ((ns >> (exponent - 2)) & 3) as usize;
    4 * (exponent - 1) + sub
}

/// The lowest value of a bucket and its width, in nanoseconds.
fn bucket_range(index: usize) -> (u64, u64) {
    if index < 4 {
        return (index as u64, 1);
    }
    let exponent = index / 4 + 1;
    let sub = (index % 4) as u64;
    ((4 + sub) << (exponent - 2), 1 << (exponent - 2))
}

/// A latency histogram of atomic counters.
struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn summary(&self) -> Latency {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let max = self.max_ns.load(Ordering::Relaxed);
        let min = self.min_ns.load(Ordering::Relaxed).min(max);
        let quantile = |q: f64| -> Duration {
            if count == 0 {
                return Duration::ZERO;
            }
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (index, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    let (low, width) = bucket_range(index);
                    // The bucket's middle, within what was seen.
                    return Duration::from_nanos(low.saturating_add(width / 2).clamp(min, max));
                }
            }
            Duration::from_nanos(max)
        };
        Latency {
            count,
            mean: Duration::from_nanos(
                self.sum_ns
                    .load(Ordering::Relaxed)
                    .checked_div(count)
                    .unwrap_or(0),
            ),
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            min: Duration::from_nanos(min),
            max: Duration::from_nanos(max),
        }
    }
}

/// The counters of one connection role.
#[derive(Default)]
struct ConnectionCell {
    open: AtomicI64,
    connects: AtomicU64,
    losses: AtomicU64,
    reconnects: AtomicU64,
    closes: AtomicU64,
    last: Mutex<Option<(ConnectionState, String)>>,
}

impl ConnectionCell {
    fn record(&self, state: ConnectionState, address: &str) {
        let (counter, open) = match state {
            ConnectionState::Connected => (&self.connects, 1),
            ConnectionState::Reconnected => (&self.reconnects, 1),
            ConnectionState::Lost => (&self.losses, -1),
            ConnectionState::Closed => (&self.closes, -1),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(open, Ordering::Relaxed);
        *self.last.lock() = Some((state, address.to_owned()));
    }

    fn snapshot(&self, role: ConnectionRole) -> Option<ConnectionStats> {
        let last = self.last.lock().clone()?;
        Some(ConnectionStats {
            role,
            open: self.open.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            losses: self.losses.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            closes: self.closes.load(Ordering::Relaxed),
            state: last.0,
            address: last.1,
        })
    }
}

/// What a [`Stats`] recorded: see [`Stats::snapshot`]. Its `Display` is a table.
///
/// ```
/// use std::sync::{mpsc, Arc};
/// use std::time::Duration;
/// use warren::observe::{Side, Stats};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://doc-stats-snapshot/").observer(stats.clone()).build()?;
/// let (logged, log_ran) = mpsc::channel();
/// let endpoint = Endpoint::new()
///     .method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(()))
///     .method("log", move |_: &RequestContext, _: NoArgs| {
///         let _ = logged.send(());
///         Ok::<_, Failure>(())
///     });
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// client.call::<_, ()>(&RequestContext::new(), "ping", &())?;
/// client.cast(&RequestContext::new(), "log", &())?;
/// log_ran.recv_timeout(Duration::from_secs(5)).expect("the cast is handled");
/// server.stop();
/// server.wait(); // every request taken is finished, and counted
///
/// let snapshot = stats.snapshot();
/// assert_eq!(snapshot.methods.len(), 4); // two methods, each seen by both sides
/// assert_eq!(snapshot.method(Side::Server, "log").map(|m| m.casts), Some(1));
/// assert!(snapshot.connections.is_empty()); // `memory://` has no connections
/// assert_eq!(snapshot.reconnects(), 0);
/// let table = snapshot.side(Side::Server).to_string();
/// assert!(table.starts_with("side    service  method"), "{table}");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// One entry per side, service and method seen, servers first.
    pub methods: Vec<MethodStats>,
    /// One entry per connection role seen (RabbitMQ only).
    pub connections: Vec<ConnectionStats>,
}

impl StatsSnapshot {
    /// The first entry of `method` on `side` (whatever its service).
    pub fn method(&self, side: Side, method: &str) -> Option<&MethodStats> {
        self.methods
            .iter()
            .find(|m| m.side == side && m.method == method)
    }

    /// The counts of connections of `role`, if any was seen.
    pub fn connection(&self, role: ConnectionRole) -> Option<&ConnectionStats> {
        self.connections.iter().find(|c| c.role == role)
    }

    /// Reconnections of every role.
    pub fn reconnects(&self) -> u64 {
        self.connections.iter().map(|c| c.reconnects).sum()
    }

    /// Only the entries of `side` (to print one side's table).
    pub fn side(&self, side: Side) -> StatsSnapshot {
        StatsSnapshot {
            methods: self
                .methods
                .iter()
                .filter(|m| m.side == side)
                .cloned()
                .collect(),
            connections: self.connections.clone(),
        }
    }
}

/// The counts of one method on one side.
///
/// ```
/// use std::sync::Arc;
/// use serde::Deserialize;
/// use serde_json::json;
/// use warren::observe::{Side, Stats};
/// use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// #[derive(Deserialize)]
/// struct Divide { a: i64, b: i64 }
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://doc-method-stats/").observer(stats.clone()).build()?;
/// let endpoint = Endpoint::new().method("divide", |_: &RequestContext, x: Divide| match x.b {
///     0 => Err(Failure::new("ZeroDivisionError", "builtins", "division by zero").expected()),
///     b => Ok(x.a / b),
/// });
/// let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("calc"));
/// let ctx = RequestContext::new();
/// for b in [1, 2, 0] {
///     let _ = client.call::<_, i64>(&ctx, "divide", &json!({"a": 6, "b": b}));
/// }
/// server.stop();
/// server.wait();
///
/// let snapshot = stats.snapshot();
/// let served = snapshot.method(Side::Server, "divide").expect("served");
/// assert_eq!((served.service.as_str(), served.calls, served.ok), ("calc", 3, 2));
/// assert_eq!((served.failures(), served.failed("ZeroDivisionError"), served.expected), (1, 1, 1));
/// let sent = snapshot.method(Side::Client, "divide").expect("sent");
/// assert_eq!((sent.failed("ZeroDivisionError"), sent.timeouts), (1, 0));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MethodStats {
    /// Server or client.
    pub side: Side,
    /// OpenTelemetry's `rpc.service`: the namespace, or else the topic.
    pub service: String,
    /// The method (`_OTHER` for methods a server does not have).
    pub method: String,
    /// Calls finished (server: replied to; client: returned).
    pub calls: u64,
    /// Casts finished (server: handled; client: sent or failed to send).
    pub casts: u64,
    /// Calls and casts that succeeded.
    pub ok: u64,
    /// Failures by class (a remote or handler failure's class, or an error's kind such as
    /// `connection`; see [`error_type`](super::error_type)); timeouts are not included.
    pub failed: BTreeMap<String, u64>,
    /// Server side: how many of `failed` were expected failures.
    pub expected: u64,
    /// Client side: calls that timed out (and casts the broker did not confirm in time).
    pub timeouts: u64,
    /// Server side: requests of this method being handled now.
    pub in_flight: i64,
    /// How long they took (server: handling and reply; client: until the result).
    pub latency: Latency,
}

impl MethodStats {
    /// All failures, timeouts excluded.
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The failures of `class`.
    pub fn failed(&self, class: &str) -> u64 {
        self.failed.get(class).copied().unwrap_or(0)
    }
}

/// A latency summary, from a histogram with about 12% resolution.
///
/// ```
/// use std::sync::Arc;
/// use warren::observe::{Side, Stats};
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://doc-latency/").observer(stats.clone()).build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// for _ in 0..5 {
///     client.call::<_, ()>(&RequestContext::new(), "ping", &())?;
/// }
///
/// let latency = stats.snapshot().method(Side::Client, "ping").expect("called").latency;
/// assert_eq!(latency.count, 5);
/// assert!(latency.min <= latency.p50 && latency.p50 <= latency.p99 && latency.p99 <= latency.max);
/// assert!(latency.min <= latency.mean && latency.mean <= latency.max);
/// println!("p50 {:?}, p99 {:?}", latency.p50, latency.p99);
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Number of measurements.
    pub count: u64,
    /// Their mean (exact).
    pub mean: Duration,
    /// Median (approximate).
    pub p50: Duration,
    /// 90th percentile (approximate).
    pub p90: Duration,
    /// 99th percentile (approximate).
    pub p99: Duration,
    /// The smallest (exact).
    pub min: Duration,
    /// The largest (exact).
    pub max: Duration,
}

/// The connections of one role.
///
/// Counted from [`Event::Connection`], which only RabbitMQ transports report.
///
/// ```
/// use std::sync::Arc;
/// use warren::observe::{ConnectionRole, ConnectionState, Stats};
/// use warren::Transport;
///
/// /// For a health check: `false` while the last thing a server's connection did was to be lost.
/// fn listening(stats: &Stats) -> bool {
///     let snapshot = stats.snapshot();
///     match snapshot.connection(ConnectionRole::Listen) {
///         Some(listen) => {
///             println!("{} open, {} lost, {} reconnected", listen.open, listen.losses, listen.reconnects);
///             listen.state != ConnectionState::Lost
///         }
///         None => true, // no connection yet (or `memory://`)
///     }
/// }
///
/// let stats = Arc::new(Stats::new());
/// let transport = Transport::builder("memory://doc-connection-stats/").observer(stats.clone()).build()?;
/// # let _ = transport;
/// assert!(listening(&stats));
/// assert!(stats.snapshot().connections.is_empty());
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Which connections.
    pub role: ConnectionRole,
    /// Open now (a listen role counts each server's connection).
    pub open: i64,
    /// First connections.
    pub connects: u64,
    /// Connections lost.
    pub losses: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Connections closed by warren.
    pub closes: u64,
    /// The last state reported.
    pub state: ConnectionState,
    /// The broker of the last event (`host:port`).
    pub address: String,
}

/// `850ns`, `12µs`, `3.4ms`, `1.25s`: three significant digits at most.
fn short(duration: Duration) -> String {
    let ns = duration.as_nanos() as f64;
    let (value, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    if value >= 100.0 || unit == "ns" {
        format!("{value:.0}{unit}")
    } else if value >= 10.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.2}{unit}")
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.methods.is_empty() {
            writeln!(f, "no calls or casts observed")?;
        } else {
            let service_width = self
                .methods
                .iter()
                .map(|m| m.service.chars().count())
                .chain(Some(7))
                .max()
                .unwrap_or(7);
            let method_width = self
                .methods
                .iter()
                .map(|m| m.method.chars().count())
                .chain(Some(6))
                .max()
                .unwrap_or(6);
            writeln!(
                f,
                "{:<6}  {:<service_width$}  {:<method_width$}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  {:>9}  {:>7}  {:>7}  {:>7}",
                "side", "service", "method", "calls", "casts", "ok", "failed", "timeouts", "in-flight", "p50", "p99", "max"
            )?;
            for m in &self.methods {
                writeln!(
                    f,
                    "{:<6}  {:<service_width$}  {:<method_width$}  {:>8}  {:>8}  {:>8}  {:>6}  {:>8}  {:>9}  {:>7}  {:>7}  {:>7}",
                    m.side.as_str(),
                    m.service,
                    m.method,
                    m.calls,
                    m.casts,
                    m.ok,
                    m.failures(),
                    m.timeouts,
                    m.in_flight,
                    short(m.latency.p50),
                    short(m.latency.p99),
                    short(m.latency.max),
                )?;
                if !m.failed.is_empty() {
                    let classes: Vec<String> = m
                        .failed
                        .iter()
                        .map(|(class, n)| format!("{class} {n}"))
                        .collect();
                    write!(f, "        failed: {}", classes.join(", "))?;
                    if m.expected > 0 {
                        write!(f, " ({} expected)", m.expected)?;
                    }
                    writeln!(f)?;
                }
            }
        }
        for c in &self.connections {
            writeln!(
                f,
                "connection {:<6}  open {}  connects {}  losses {}  reconnects {}  closes {}  (last: {} {})",
                c.role.as_str(),
                c.open,
                c.connects,
                c.losses,
                c.reconnects,
                c.closes,
                c.state,
                c.address
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{ClientRequest, RequestKind, ServerRequest};

    fn request(method: &str, kind: RequestKind, known: bool) -> ServerRequest<'_> {
        ServerRequest {
            topic: "compute",
            namespace: None,
            method,
            kind,
            known,
        }
    }

    fn call(method: &str) -> ClientRequest<'_> {
        ClientRequest {
            topic: "compute",
            server: None,
            namespace: None,
            method,
            fanout: false,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_cover_u64_in_order() {
        let mut previous = 0;
        for ns in (0..4096).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let index = bucket(ns);
            assert!(index < BUCKETS, "{ns}");
            assert!(index >= previous, "{ns}");
            previous = index;
            let (low, width) = bucket_range(index);
            assert!(low <= ns && ns - low < width, "{ns} in [{low}, +{width})");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        // Four buckets per power of two: 12.5% wide at most.
        let (low, width) = bucket_range(bucket(1_000_000));
        assert!(width as f64 / low as f64 <= 0.25);
    }

    #[test]
    fn counts_server_requests_by_outcome() {
        let stats = Stats::new();
        for _ in 0..3 {
            let r = request("start", RequestKind::Call, true);
            stats.observe(&Event::RequestStarted { request: r });
            stats.observe(&Event::RequestFinished {
                request: r,
                outcome: Outcome::Ok,
                duration: ms(2),
            });
        }
        let r = request("start", RequestKind::Cast, true);
        stats.observe(&Event::RequestStarted { request: r });
        stats.observe(&Event::RequestStarted { request: r });
        stats.observe(&Event::RequestFinished {
            request: r,
            outcome: Outcome::Failed {
                class: "InstanceNotFound",
                expected: true,
            },
            duration: ms(1),
        });
        let unknown = request("no-such-thing", RequestKind::Call, false);
        stats.observe(&Event::RequestStarted { request: unknown });
        stats.observe(&Event::RequestFinished {
            request: unknown,
            outcome: Outcome::Failed {
                class: "NoSuchMethod",
                expected: false,
            },
            duration: ms(1),
        });

        let snapshot = stats.snapshot();
        assert_eq!(snapshot.methods.len(), 2, "{snapshot:?}");
        let start = snapshot.method(Side::Server, "start").unwrap();
        assert_eq!(start.service, "compute");
        assert_eq!((start.calls, start.casts, start.ok), (3, 1, 3));
        assert_eq!(start.failed("InstanceNotFound"), 1);
        assert_eq!(
            (start.failures(), start.expected, start.timeouts),
            (1, 1, 0)
        );
        assert_eq!(start.in_flight, 1, "one cast still running");
        assert_eq!(start.latency.count, 4);
        assert_eq!(start.latency.max, ms(2));
        assert_eq!(start.latency.mean, Duration::from_micros(1750));
        let other = snapshot.method(Side::Server, "_OTHER").unwrap();
        assert_eq!((other.calls, other.failed("NoSuchMethod")), (1, 1));
        assert_eq!(other.in_flight, 0);
        assert!(snapshot.method(Side::Client, "start").is_none());
    }

    #[test]
    fn counts_client_calls_casts_and_timeouts() {
        let stats = Stats::new();
        for _ in 0..5 {
            stats.observe(&Event::CallFinished {
                call: call("ping"),
                outcome: Outcome::Ok,
                duration: ms(1),
            });
        }
        stats.observe(&Event::CallFinished {
            call: call("ping"),
            outcome: Outcome::Timeout,
            duration: ms(100),
        });
        stats.observe(&Event::CallFinished {
            call: call("ping"),
            outcome: Outcome::Remote {
                class: "ValueError",
            },
            duration: ms(1),
        });
        let closed = crate::Error::Closed;
        stats.observe(&Event::CastSent {
            cast: call("ping"),
            outcome: Outcome::Error(&closed),
            duration: ms(0),
        });
        let ping = stats.snapshot();
        let ping = ping.method(Side::Client, "ping").unwrap();
        assert_eq!((ping.calls, ping.casts, ping.ok), (7, 1, 5));
        assert_eq!(ping.timeouts, 1);
        assert_eq!(ping.failed("ValueError"), 1);
        assert_eq!(ping.failed("closed"), 1);
        assert_eq!(ping.failures(), 2);
        assert_eq!(ping.latency.count, 8);
        assert_eq!(ping.latency.max, ms(100));
    }

    #[test]
    fn percentiles_are_within_a_bucket() {
        let stats = Stats::new();
        // 1..=100 ms, once each: p50 = 50 ms, p90 = 90 ms, p99 = 99 ms.
        for n in 1..=100 {
            stats.observe(&Event::CallFinished {
                call: call("m"),
                outcome: Outcome::Ok,
                duration: ms(n),
            });
        }
        let latency = stats.snapshot().methods[0].latency;
        let close = |got: Duration, want: u64| {
            let error = (got.as_secs_f64() * 1e3 - want as f64).abs() / want as f64;
            assert!(error < 0.125, "{got:?} vs {want} ms");
        };
        close(latency.p50, 50);
        close(latency.p90, 90);
        close(latency.p99, 99);
        assert_eq!(latency.max, ms(100));
        assert!(latency.p99 <= latency.max);
        assert_eq!(latency.mean, Duration::from_micros(50_500));
        assert_eq!(Stats::new().snapshot().methods.len(), 0);
    }

    #[test]
    fn counts_connections() {
        let stats = Stats::new();
        let event = |role, state| Event::Connection {
            role,
            state,
            address: "127.0.0.1:5672",
        };
        stats.observe(&event(ConnectionRole::Send, ConnectionState::Connected));
        stats.observe(&event(ConnectionRole::Listen, ConnectionState::Connected));
        stats.observe(&event(ConnectionRole::Listen, ConnectionState::Connected));
        stats.observe(&event(ConnectionRole::Listen, ConnectionState::Lost));
        stats.observe(&event(ConnectionRole::Listen, ConnectionState::Reconnected));
        stats.observe(&event(ConnectionRole::Send, ConnectionState::Closed));
        let snapshot = stats.snapshot();
        assert!(snapshot.connection(ConnectionRole::Reply).is_none());
        let send = snapshot.connection(ConnectionRole::Send).unwrap();
        assert_eq!((send.open, send.connects, send.closes), (0, 1, 1));
        assert_eq!(send.state, ConnectionState::Closed);
        let listen = snapshot.connection(ConnectionRole::Listen).unwrap();
        assert_eq!((listen.open, listen.losses, listen.reconnects), (2, 1, 1));
        assert_eq!(listen.address, "127.0.0.1:5672");
        assert_eq!(snapshot.reconnects(), 1);
    }

    #[test]
    fn prints_a_table() {
        let stats = Stats::new();
        assert_eq!(stats.to_string(), "no calls or casts observed\n");
        let r = request("start_instance", RequestKind::Call, true);
        stats.observe(&Event::RequestStarted { request: r });
        stats.observe(&Event::RequestFinished {
            request: r,
            outcome: Outcome::Failed {
                class: "InstanceNotFound",
                expected: true,
            },
            duration: Duration::from_micros(1500),
        });
        stats.observe(&Event::Connection {
            role: ConnectionRole::Listen,
            state: ConnectionState::Connected,
            address: "h:5672",
        });
        let table = stats.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("side    service  method"), "{table}");
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "server",
                "compute",
                "start_instance",
                "1",
                "0",
                "0",
                "1",
                "0",
                "0",
                "1.50ms",
                "1.50ms",
                "1.50ms"
            ]
        );
        assert_eq!(lines[2].trim(), "failed: InstanceNotFound 1 (1 expected)");
        assert!(
            lines[3].starts_with("connection listen  open 1  connects 1"),
            "{table}"
        );
    }

    #[test]
    fn short_durations() {
        assert_eq!(short(Duration::from_nanos(850)), "850ns");
        assert_eq!(short(Duration::from_micros(12)), "12.0µs");
        assert_eq!(short(Duration::from_micros(3400)), "3.40ms");
        assert_eq!(short(Duration::from_millis(1250)), "1.25s");
        assert_eq!(short(Duration::from_millis(250)), "250ms");
    }
}
