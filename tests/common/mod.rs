//! Test support: a per-test "bus" (unique topic and control exchange, a standard endpoint,
//! servers, an event channel the handlers report to) that removes everything it created on
//! the broker when dropped; and `rabbitmqctl` helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod dispatch;
pub mod gate;
pub mod logs;
pub mod node;
pub mod proxy;
pub mod python;
pub mod scenarios;
pub mod tls;

use std::fmt::Debug;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;
use serde_json::{json, Value};
use warren::observe::{ConnectionRole, ConnectionState, Event as Observed, Observer};
use warren::{
    Codec, Endpoint, Error, Failure, NoArgs, RemoteDetails, RequestContext, RpcClient, RpcServer,
    RpcServerBuilder, Target, Transport, Version,
};

/// The broker the tests use (never stopped by them).
pub fn broker_url() -> String {
    std::env::var("WARREN_TEST_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into())
}

/// The test broker's URL in virtual host `vhost` (`""`: the default one), without its query.
pub fn broker_in_vhost(vhost: &str) -> String {
    let url = broker_url();
    let base = url.split('?').next().unwrap_or(&url).trim_end_matches('/');
    format!("{base}/{vhost}")
}

/// `url` with `query` (`key=value&...`) added to its query.
pub fn with_query(url: &str, query: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// A fresh in-process bus per call.
pub fn memory_url() -> String {
    format!("memory://{}/", unique("mem"))
}

/// A name no other test (or run) uses.
pub fn unique(label: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("wt_{label}_{}", &id[..12])
}

/// The context the tests call with: a plain user.
pub fn ctx() -> RequestContext {
    RequestContext::new().with("user_id", "alice")
}

/// A context as an OpenStack service sends it (user, project, roles, admin flag): for tests
/// that check how a whole context travels, to warren's handlers and to oslo's.
pub fn oslo_ctx() -> RequestContext {
    ctx()
        .with("project_id", "demo")
        .with("roles", json!(["member", "reader"]))
        .with("is_admin", false)
}

/// The fields of a remote failure ([`Error::Remote`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    pub class: String,
    pub module: String,
    pub message: String,
    pub traceback: Vec<String>,
    pub details: RemoteDetails,
}

/// The remote failure `result` must be; fails the test with what it was instead.
#[track_caller]
pub fn remote<T: Debug>(result: Result<T, Error>) -> Remote {
    match result {
        Err(Error::Remote {
            class,
            module,
            message,
            traceback,
            details,
        }) => Remote {
            class,
            module,
            message,
            traceback,
            details: *details,
        },
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// Calls `whoami` (700 ms per attempt) until it answers; returns how long that took. Fails
/// the test, with the last error, if it is not answered `within`.
#[track_caller]
pub fn until_served(client: &RpcClient, within: Duration) -> Duration {
    let started = Instant::now();
    let probe = client.prepare().timeout(Duration::from_millis(700));
    loop {
        let error = match probe.call::<_, String>(&ctx(), "whoami", &()) {
            Ok(_) => return started.elapsed(),
            Err(error) => error,
        };
        assert!(
            started.elapsed() < within,
            "not served again within {within:?}: the last call failed with {error:?}"
        );
    }
}

/// The thread count of this process once it stopped changing for half a second (a
/// baseline); fails the test if it does not settle within 30 s.
///
/// Every amiquip connection has a detached timer thread (mio-extras) that exits shortly after
/// the connection is closed; nothing can join it, so counts are waited for, not read once.
/// Such a thread carries the name of the thread that opened the connection.
#[track_caller]
pub fn settled_thread_count() -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = thread_count();
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(20));
        let now = thread_count();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(500) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the thread count never settled within 30 s: {now} threads {:?}",
            thread_names()
        );
    }
}

/// Waits until no more than `baseline` threads are left (the stragglers of closed connections
/// exit); fails the test after 30 s with `what`, the count and the threads' names.
#[track_caller]
pub fn threads_back_to(baseline: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while thread_count() > baseline {
        assert!(
            Instant::now() < deadline,
            "{what}: {} threads after 30 s, {baseline} expected: {:?}",
            thread_count(),
            thread_names()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a handler reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub server: String,
    pub method: String,
    pub value: Value,
    /// When the handler reported it: what ran when, however late the test thread reads it.
    pub at: Instant,
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

#[derive(Deserialize)]
struct Fail {
    class: String,
    module: String,
    message: String,
    #[serde(default)]
    expected: bool,
}

/// The endpoints every test server has:
/// * version 1.3, null namespace: `echo`, `whoami`, `add`, `sleep` (reports when done),
///   `slow` (reports when it starts), `fail` and `panic` (report each attempt), `context`,
///   `record` (reports an event), `_private`;
/// * namespace `admin` (legacy `old_admin`), version 2.1: `reset`.
pub fn endpoints(server: &str, events: Sender<Event>) -> Vec<Endpoint> {
    let name = server.to_string();
    let report = move |method: &str, value: Value| {
        let _ = events.send(Event {
            server: name.clone(),
            method: method.to_string(),
            value,
            at: Instant::now(),
        });
    };
    let (who, record, slept) = (server.to_string(), report.clone(), report.clone());
    let (failed, exploded, started) = (report.clone(), report.clone(), report);
    let main = Endpoint::new()
        .version(Version::new(1, 3))
        .method("echo", |_: &RequestContext, args: Value| {
            Ok::<_, Failure>(args)
        })
        .method("whoami", move |_: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>(who.clone())
        })
        .method("add", |_: &RequestContext, x: Add| {
            Ok::<_, Failure>(x.a + x.b)
        })
        .method("sleep", move |_: &RequestContext, s: Sleep| {
            thread::sleep(Duration::from_millis(s.ms));
            slept("sleep", json!(s.ms));
            Ok::<_, Failure>(s.ms)
        })
        .method(
            "fail",
            move |_: &RequestContext, f: Fail| -> Result<(), Failure> {
                failed("fail", json!(f.message));
                let failure = Failure::new(f.class, f.module, f.message);
                Err(if f.expected {
                    failure.expected()
                } else {
                    failure
                })
            },
        )
        .method(
            "panic",
            move |_: &RequestContext, _: NoArgs| -> Result<(), Failure> {
                exploded("panic", Value::Null);
                panic!("handler exploded")
            },
        )
        .method("slow", move |_: &RequestContext, s: Sleep| {
            started("slow", json!(s.ms));
            thread::sleep(Duration::from_millis(s.ms));
            Ok::<_, Failure>(s.ms)
        })
        .method("context", |ctx: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>(ctx.clone())
        })
        .method("record", move |_: &RequestContext, args: Value| {
            record("record", args);
            Ok::<_, Failure>(())
        })
        .method("_private", |_: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>(1)
        });
    let admin_server = server.to_string();
    let admin = Endpoint::new()
        .namespace("admin")
        .legacy_namespace("old_admin")
        .version(Version::new(2, 1))
        .method("reset", move |_: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>(format!("reset by {admin_server}"))
        });
    vec![main, admin]
}

/// One test's topic, exchange, servers and event channel. Dropping it stops the servers and
/// deletes the queues and exchange it created.
pub struct Bus {
    pub url: String,
    /// Where to delete what the bus declared (the broker itself, not a proxy in front of it).
    admin_url: String,
    pub topic: String,
    pub exchange: String,
    pub events: Receiver<Event>,
    events_tx: Sender<Event>,
    servers: Vec<(String, RpcServer)>,
    transports: Vec<Transport>,
    /// More queues to delete (declared by peers outside the bus).
    extra_queues: Vec<String>,
}

impl Bus {
    pub fn new(url: &str) -> Bus {
        Bus::through(url, url)
    }

    /// A bus whose clients and servers use `url` (a proxy, say) while clean-up goes to
    /// `admin_url`.
    pub fn through(url: &str, admin_url: &str) -> Bus {
        let (events_tx, events) = crossbeam_channel::unbounded();
        Bus {
            url: url.to_string(),
            admin_url: admin_url.to_string(),
            topic: unique("topic"),
            exchange: unique("exchange"),
            events,
            events_tx,
            servers: Vec::new(),
            transports: Vec::new(),
            extra_queues: Vec::new(),
        }
    }

    pub fn is_rabbit(&self) -> bool {
        !self.url.starts_with("memory://")
    }

    /// A transport on this bus's exchange, sending with `codec`.
    pub fn transport(&self, codec: Codec) -> Transport {
        Transport::builder(&self.url)
            .control_exchange(self.exchange.as_str())
            .codec(codec)
            .build()
            .expect("transport")
    }

    /// Starts a server named `name` (own transport, msgpack) with `workers` workers.
    pub fn start_server(&mut self, name: &str, workers: usize) -> &RpcServer {
        self.start_server_with(name, |b| b.workers(workers))
    }

    /// Starts a server named `name` with the standard endpoints, configured by `configure`.
    pub fn start_server_with(
        &mut self,
        name: &str,
        configure: impl FnOnce(RpcServerBuilder) -> RpcServerBuilder,
    ) -> &RpcServer {
        let transport = self.transport(Codec::MsgPack);
        let target = Target::new(self.topic.as_str()).with_server(name);
        let mut builder = RpcServer::builder(&transport, target);
        for endpoint in endpoints(name, self.events_tx.clone()) {
            builder = builder.endpoint(endpoint);
        }
        let server = configure(builder).build().expect("server");
        server.start().expect("server start");
        self.transports.push(transport);
        self.servers.push((name.to_string(), server));
        &self.servers.last().expect("just pushed").1
    }

    pub fn server(&self, name: &str) -> &RpcServer {
        &self
            .servers
            .iter()
            .find(|(n, _)| n == name)
            .expect("server")
            .1
    }

    /// A client of this bus's topic.
    pub fn client(&self, codec: Codec) -> RpcClient {
        RpcClient::new(&self.transport(codec), Target::new(self.topic.as_str()))
    }

    /// Waits for `n` events (fails the test after `timeout`).
    pub fn expect_events(&self, n: usize, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.events.recv_deadline(deadline) {
                Ok(event) => got.push(event),
                Err(_) => panic!(
                    "expected {n} events within {timeout:?}, got {}: {got:?}",
                    got.len()
                ),
            }
        }
        got
    }

    /// Asserts that no further event arrives within `window`.
    pub fn expect_quiet(&self, window: Duration) {
        if let Ok(event) = self.events.recv_timeout(window) {
            panic!("unexpected event {event:?}");
        }
    }

    /// Deletes `queue` too when the bus is dropped (one a Python peer declared, say).
    pub fn track_queue(&mut self, queue: impl Into<String>) {
        self.extra_queues.push(queue.into());
    }

    fn queue_names(&self) -> Vec<String> {
        let mut names = vec![self.topic.clone(), format!("{}_dlq", self.topic)];
        // Notification queues a listener or notifier of the topic declared.
        for priority in [
            "audit", "debug", "info", "warn", "error", "critical", "sample",
        ] {
            names.push(format!("{}.{priority}", self.topic));
        }
        names.extend(self.extra_queues.iter().cloned());
        names.extend(
            self.servers
                .iter()
                .map(|(n, _)| format!("{}.{n}", self.topic)),
        );
        names
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        for (_, server) in &self.servers {
            server.stop();
        }
        for (_, server) in &self.servers {
            server.wait();
        }
        if self.is_rabbit() {
            delete_on_broker(
                &self.admin_url,
                &self.queue_names(),
                std::slice::from_ref(&self.exchange),
            );
        }
    }
}

/// Deletes queues and exchanges (missing ones are fine) through a plain AMQP connection to
/// `url` (its query, warren's options, is dropped).
pub fn delete_on_broker(url: &str, queues: &[String], exchanges: &[String]) {
    let url = url.split('?').next().unwrap_or(url);
    let mut connection = match amiquip::Connection::insecure_open(url) {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("clean-up: cannot connect to {url}: {e}");
            return;
        }
    };
    for queue in queues {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.queue_delete(queue.as_str(), amiquip::QueueDeleteOptions::default());
        }
    }
    for exchange in exchanges {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.exchange_delete(exchange.as_str(), false);
        }
    }
    let _ = connection.close();
}

/// Runs `rabbitmqctl -q <args>`, failing the test if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `rabbitmqctl -q <args>` for a clean-up, whatever it answers (from `Drop`: never a
/// panic).
pub fn rabbitmqctl_cleanup(args: &[&str]) {
    let _ = Command::new("rabbitmqctl").arg("-q").args(args).output();
}

/// Runs `rabbitmqctl -q <args> --formatter json` and parses the output.
pub fn rabbitmqctl_json(args: &[&str]) -> Vec<Value> {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&output.stdout).expect("rabbitmqctl JSON")
}

/// One numeric column of `rabbitmqctl list_queues` (`messages`, `messages_ready`...) for
/// `queue`; 0 if the queue does not exist.
pub fn queue_count(queue: &str, column: &str) -> u64 {
    rabbitmqctl_json(&["list_queues", "name", column])
        .iter()
        .find(|q| q["name"] == queue)
        .and_then(|q| q[column].as_u64())
        .unwrap_or(0)
}

/// Consumers whose queue name starts with `prefix`.
pub fn consumers_with_prefix(prefix: &str) -> Vec<String> {
    rabbitmqctl_json(&["list_consumers", "queue_name"])
        .into_iter()
        .filter_map(|c| c["queue_name"].as_str().map(str::to_string))
        .filter(|q| q.starts_with(prefix))
        .collect()
}

/// Number of threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Names of this process's threads (for failure messages).
pub fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// An observer counting the connections lost, of `role` only if one is given, and its count.
pub fn counting_lost_connections(
    role: Option<ConnectionRole>,
) -> (Arc<dyn Observer>, Arc<AtomicUsize>) {
    let lost = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&lost);
    let observer = move |event: &Observed<'_>| {
        if let Observed::Connection {
            role: lost_role,
            state: ConnectionState::Lost,
            ..
        } = event
        {
            if role.is_none_or(|role| role == *lost_role) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    (Arc::new(observer), lost)
}

/// Waits until `condition` holds (polling an external state we cannot subscribe to).
pub fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A shared counter handlers can bump.
pub type Counter = Arc<std::sync::atomic::AtomicUsize>;

/// A tap on the bus's in-process broker (it keeps the broker alive while it exists).
pub fn tap(bus: &Bus) -> warren::MemoryTap {
    Transport::new(&bus.url)
        .expect("transport")
        .memory_tap()
        .expect("a memory:// transport has a tap")
}

/// The next tapped message `what` describes (within 10 s), or a failure naming it.
pub fn next_tapped(
    tap: &warren::MemoryTap,
    what: &str,
    matches: impl FnMut(&warren::TappedMessage) -> bool,
) -> warren::TappedMessage {
    let wait = Duration::from_secs(10);
    tap.wait_for(wait, matches)
        .unwrap_or_else(|| panic!("no {what} was published within {wait:?}"))
}
