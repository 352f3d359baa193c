//! Observability: a transport's `Observer` sees the calls, casts and requests of its clients
//! and servers (outcome, failure class, timeouts, in-flight requests) on `memory://`, and the
//! connection events (connected, lost, reconnected, closed) of a RabbitMQ transport whose
//! connections are cut by the fault-injecting proxy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;
use serde_json::json;
use warren::observe::{
    ConnectionRole, ConnectionState, Event, Observer, Side, Stats, StatsSnapshot,
};
use warren::{
    Endpoint, Error, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport,
};

use common::proxy::Proxy;
use common::{broker_url, ctx, eventually, memory_url, unique};

/// What the tests wait for, without sleeping: the events a [`Stats`] also records.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Finished(String),
    Connection(ConnectionRole, ConnectionState),
}

/// Records into `stats` and reports the events tests wait on.
struct Tee {
    stats: Arc<Stats>,
    seen: Sender<Seen>,
}

impl Observer for Tee {
    fn observe(&self, event: &Event<'_>) {
        self.stats.observe(event);
        let seen = match event {
            Event::RequestFinished { request, .. } => Seen::Finished(request.method.to_string()),
            Event::Connection { role, state, .. } => Seen::Connection(*role, *state),
            _ => return,
        };
        let _ = self.seen.send(seen);
    }
}

fn observed(url: &str) -> (Transport, Arc<Stats>, Receiver<Seen>) {
    observed_with(Transport::builder(url))
}

fn observed_with(builder: warren::TransportBuilder) -> (Transport, Arc<Stats>, Receiver<Seen>) {
    let stats = Arc::new(Stats::new());
    let (seen, events) = crossbeam_channel::unbounded();
    let tee = Tee {
        stats: stats.clone(),
        seen,
    };
    let transport = builder.observer(Arc::new(tee)).build().expect("transport");
    (transport, stats, events)
}

/// Waits for `want` among `events` (others are skipped).
fn expect(events: &Receiver<Seen>, want: &Seen, within: Duration) {
    expect_all(events, std::slice::from_ref(want), within);
}

/// Waits for every event of `want`, in any order, among `events` (others are skipped).
fn expect_all(events: &Receiver<Seen>, want: &[Seen], within: Duration) {
    let deadline = std::time::Instant::now() + within;
    let mut missing = want.to_vec();
    while !missing.is_empty() {
        match events.recv_deadline(deadline) {
            Ok(seen) => {
                if let Some(i) = missing.iter().position(|w| *w == seen) {
                    missing.remove(i);
                }
            }
            Err(_) => panic!("no {missing:?} within {within:?}"),
        }
    }
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[test]
fn calls_casts_failures_and_timeouts_are_counted_per_method() {
    let (transport, stats, events) = observed(&memory_url());
    let (noted_tx, noted) = crossbeam_channel::unbounded();
    let endpoint = Endpoint::new()
        .method("add", |_: &RequestContext, x: Add| {
            Ok::<_, Failure>(x.a + x.b)
        })
        .method("fail", |_: &RequestContext, _: NoArgs| {
            Err::<(), _>(Failure::new("ValueError", "builtins", "bad value"))
        })
        .method("missing", |_: &RequestContext, _: NoArgs| {
            Err::<(), _>(Failure::new("InstanceNotFound", "nova.exception", "vm-9").expected())
        })
        .method("note", move |_: &RequestContext, _: NoArgs| {
            noted_tx.send(()).expect("test listens");
            Ok::<_, Failure>(())
        });
    let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
        .endpoint(endpoint)
        .workers(2)
        .build()
        .expect("server");
    server.start().expect("start");
    let client = RpcClient::new(&transport, Target::new("calc"));

    for i in 0..5 {
        let sum: i64 = client
            .call(&ctx(), "add", &json!({"a": i, "b": 1}))
            .expect("add");
        assert_eq!(sum, i + 1);
    }
    for _ in 0..2 {
        let err = client.call::<_, ()>(&ctx(), "fail", &()).unwrap_err();
        assert!(err.is_remote("ValueError"), "{err}");
    }
    let err = client.call::<_, ()>(&ctx(), "missing", &()).unwrap_err();
    assert!(err.is_remote("InstanceNotFound"), "{err}");
    let err = client
        .call::<_, ()>(&ctx(), "no_such_method_42", &())
        .unwrap_err();
    assert!(err.is_remote("NoSuchMethod"), "{err}");
    client.cast(&ctx(), "note", &()).expect("cast");
    noted
        .recv_timeout(Duration::from_secs(5))
        .expect("cast handled");
    expect(
        &events,
        &Seen::Finished("note".into()),
        Duration::from_secs(5),
    );
    // Nobody serves this topic: the call times out.
    let nobody = RpcClient::new(&transport, Target::new(unique("nobody")))
        .timeout(Duration::from_millis(200));
    let err = nobody.call::<_, ()>(&ctx(), "ping", &()).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // A call that cannot even be sent (a call to a fanout target) is an error outcome.
    let err = client
        .prepare()
        .fanout(true)
        .call::<_, ()>(&ctx(), "add", &())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTarget { .. }), "{err}");
    server.stop();
    server.wait();

    let snapshot = stats.snapshot();
    println!("{snapshot}");
    let get = |side, method| {
        snapshot
            .method(side, method)
            .unwrap_or_else(|| panic!("{side} {method} in\n{snapshot}"))
    };

    let add = get(Side::Server, "add");
    assert_eq!(add.service, "calc");
    assert_eq!((add.calls, add.casts, add.ok, add.failures()), (5, 0, 5, 0));
    assert_eq!((add.in_flight, add.latency.count), (0, 5));
    let add = get(Side::Client, "add");
    assert_eq!((add.calls, add.ok, add.timeouts), (6, 5, 0));
    assert_eq!(add.failed("invalid_target"), 1);
    assert_eq!(add.latency.count, 6);

    let fail = get(Side::Server, "fail");
    assert_eq!((fail.calls, fail.ok, fail.failed("ValueError")), (2, 0, 2));
    assert_eq!(fail.expected, 0);
    assert_eq!(get(Side::Client, "fail").failed("ValueError"), 2);

    let missing = get(Side::Server, "missing");
    assert_eq!(
        (missing.failed("InstanceNotFound"), missing.expected),
        (1, 1)
    );

    // The server labels a method it does not have _OTHER, not with the caller's name.
    let other = get(Side::Server, "_OTHER");
    assert_eq!((other.calls, other.failed("NoSuchMethod")), (1, 1));
    assert!(snapshot.method(Side::Server, "no_such_method_42").is_none());
    assert_eq!(
        get(Side::Client, "no_such_method_42").failed("NoSuchMethod"),
        1
    );

    let note = get(Side::Server, "note");
    assert_eq!((note.calls, note.casts, note.ok), (0, 1, 1));
    let note = get(Side::Client, "note");
    assert_eq!((note.casts, note.ok), (1, 1));

    let ping = get(Side::Client, "ping");
    assert!(ping.service.starts_with("wt_nobody_"), "{}", ping.service);
    assert_eq!(
        (ping.calls, ping.ok, ping.timeouts, ping.failures()),
        (1, 0, 1, 0)
    );
    assert!(
        ping.latency.min >= Duration::from_millis(200),
        "{:?}",
        ping.latency
    );

    assert!(snapshot.connections.is_empty(), "memory:// has none");
    let table = snapshot.to_string();
    assert!(table.contains("_OTHER"), "{table}");
    assert!(
        table.contains("failed: InstanceNotFound 1 (1 expected)"),
        "{table}"
    );
}

#[test]
fn in_flight_rises_while_handlers_block_and_returns_to_zero() {
    let (transport, stats, events) = observed(&memory_url());
    let (entered_tx, entered) = crossbeam_channel::unbounded::<()>();
    let (release_tx, release) = crossbeam_channel::unbounded::<()>();
    let endpoint = Endpoint::new().method("block", move |_: &RequestContext, _: NoArgs| {
        entered_tx.send(()).expect("test listens");
        release
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| Failure::new("RuntimeError", "builtins", "never released"))
    });
    let server = RpcServer::builder(&transport, Target::new("slow").with_server("slow-1"))
        .endpoint(endpoint)
        .workers(4)
        .build()
        .expect("server");
    server.start().expect("start");
    let client = RpcClient::new(&transport, Target::new("slow"));

    let in_flight = |snapshot: StatsSnapshot| {
        snapshot
            .method(Side::Server, "block")
            .map_or(0, |m| m.in_flight)
    };
    let pending: Vec<_> = (0..3)
        .map(|_| {
            client
                .start_call::<_, ()>(&ctx(), "block", &())
                .expect("sent")
        })
        .collect();
    for _ in 0..3 {
        entered
            .recv_timeout(Duration::from_secs(5))
            .expect("handler entered");
    }
    // Each request was reported started before its handler ran.
    assert_eq!(in_flight(stats.snapshot()), 3);
    assert_eq!(
        stats
            .snapshot()
            .method(Side::Client, "block")
            .map(|m| m.calls),
        None,
        "no call has returned yet"
    );

    // One handler (whichever takes the release) returns.
    release_tx.send(()).expect("release one");
    expect(
        &events,
        &Seen::Finished("block".into()),
        Duration::from_secs(5),
    );
    assert_eq!(in_flight(stats.snapshot()), 2);

    release_tx.send(()).expect("release");
    release_tx.send(()).expect("release");
    for call in pending {
        call.wait().expect("released call");
    }
    for _ in 0..2 {
        expect(
            &events,
            &Seen::Finished("block".into()),
            Duration::from_secs(5),
        );
    }
    let snapshot = stats.snapshot();
    let served = snapshot.method(Side::Server, "block").expect("served");
    assert_eq!((served.in_flight, served.calls, served.ok), (0, 3, 3));
    let called = snapshot.method(Side::Client, "block").expect("called");
    assert_eq!((called.calls, called.ok), (3, 3));
    server.stop();
    server.wait();
}

#[test]
fn an_observer_can_be_a_closure() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let transport = Transport::builder(&memory_url())
        .observer(Arc::new(move |event: &Event<'_>| {
            if let Event::CastSent { cast, outcome, .. } = event {
                let _ = tx.send((cast.method.to_string(), cast.fanout, outcome.is_ok()));
            }
        }))
        .build()
        .expect("transport");
    let client = RpcClient::new(&transport, Target::new(unique("nobody")));
    client
        .cast(&ctx(), "fire", &())
        .expect("a cast nobody takes is sent");
    client
        .prepare()
        .fanout(true)
        .cast(&ctx(), "shout", &())
        .expect("fanout");
    assert_eq!(rx.try_recv(), Ok(("fire".to_string(), false, true)));
    assert_eq!(rx.try_recv(), Ok(("shout".to_string(), true, true)));
    assert!(rx.try_recv().is_err());
}

/// Options that make recovery fast: 1 s heartbeats, short pauses.
const FAST: &str = "heartbeat_timeout_threshold=1&kombu_reconnect_splay=0.2&rabbit_retry_interval=0.2&rabbit_retry_backoff=0.2&rabbit_interval_max=1";

#[test]
fn rabbit_connection_events_and_reconnects_are_reported() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = format!("{}?{FAST}", proxy.url(&broker_url()));
    let (transport, stats, events) = observed(&url);
    let topic = unique("observe");
    let exchange = unique("observe_x");
    let server = RpcServer::builder(
        &transport,
        Target::new(topic.as_str())
            .with_server("obs-1")
            .with_exchange(exchange.as_str()),
    )
    .endpoint(
        Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>("pong")
        }),
    )
    .build()
    .expect("server");
    server.start().expect("start");
    let within = Duration::from_secs(10);
    expect(
        &events,
        &Seen::Connection(ConnectionRole::Listen, ConnectionState::Connected),
        within,
    );
    let client = RpcClient::new(
        &transport,
        Target::new(topic.as_str()).with_exchange(exchange.as_str()),
    )
    .timeout(Duration::from_secs(5));
    let pong: String = client.call(&ctx(), "ping", &()).expect("ping");
    assert_eq!(pong, "pong");
    let before = stats.snapshot();
    for role in ConnectionRole::ALL {
        let c = before.connection(role).unwrap_or_else(|| panic!("{role}"));
        assert_eq!(
            (c.open, c.connects, c.losses, c.reconnects),
            (1, 1, 0, 0),
            "{c:?}"
        );
        assert_eq!(c.address, proxy.address());
    }

    proxy.cut_all();
    expect_all(
        &events,
        &[
            Seen::Connection(ConnectionRole::Listen, ConnectionState::Lost),
            Seen::Connection(ConnectionRole::Reply, ConnectionState::Lost),
            Seen::Connection(ConnectionRole::Listen, ConnectionState::Reconnected),
            Seen::Connection(ConnectionRole::Reply, ConnectionState::Reconnected),
        ],
        within,
    );
    // Served again; the send connection reconnects too (on its watchdog or this call).
    let pong: String = client
        .call(&ctx(), "ping", &())
        .expect("ping after the cut");
    assert_eq!(pong, "pong");
    // The server reports a request finished once its reply is sent: maybe after the caller
    // has it.
    expect(&events, &Seen::Finished("ping".into()), within);
    // Two threads may reconnect the send connection at once (its watchdog and this call): the
    // one that loses the race closes its spare, once its connect (slow on a loaded machine)
    // returns. Until then two are open.
    let one_each = |snapshot: &StatsSnapshot| {
        ConnectionRole::ALL
            .iter()
            .all(|role| snapshot.connection(*role).is_some_and(|c| c.open == 1))
    };
    let mut after = stats.snapshot();
    eventually("one open connection of each role", within, || {
        after = stats.snapshot();
        one_each(&after)
    });
    println!("{after}");
    for role in ConnectionRole::ALL {
        let c = after.connection(role).unwrap_or_else(|| panic!("{role}"));
        assert_eq!((c.open, c.losses, c.reconnects), (1, 1, 1), "{c:?}");
    }
    assert_eq!(after.reconnects(), 3);
    let served = after.method(Side::Server, "ping").expect("served");
    assert_eq!((served.calls, served.ok), (2, 2));

    server.stop();
    server.wait();
    transport.close();
    let closed = stats.snapshot();
    for role in ConnectionRole::ALL {
        let c = closed.connection(role).unwrap_or_else(|| panic!("{role}"));
        // (A spare send connection, made by two threads reconnecting at once, closes too.)
        assert_eq!(c.open, 0, "{c:?}");
        assert!(c.closes >= 1, "{c:?}");
        assert_eq!(c.state, ConnectionState::Closed);
    }
    common::delete_on_broker(
        &broker_url(),
        &[topic.clone(), format!("{topic}.obs-1")],
        &[exchange],
    );
}

/// `warren bench --stats` prints the observer's table after its summary, before the JSON
/// line, and the table's numbers agree with the bench's own.
#[cfg(feature = "cli")]
#[test]
fn bench_prints_the_observed_table() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--url",
            &broker_url(),
            "bench",
            "--quiet",
            "--stats",
            "--json",
        ])
        .args(["--count", "200", "--clients", "2", "--workers", "4"])
        .output()
        .expect("warren bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let report: serde_json::Value =
        serde_json::from_str(lines.last().expect("output")).expect("JSON last");
    assert_eq!(report["ok"], 200, "{stdout}");
    let header = lines
        .iter()
        .position(|l| l.starts_with("side "))
        .unwrap_or_else(|| panic!("a table in {stdout}"));
    assert!(lines[header - 1].starts_with("warren call"), "{stdout}");
    let row = |side: &str| -> Vec<&str> {
        lines
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(&side) && cells.get(2) == Some(&"echo"))
            .unwrap_or_else(|| panic!("{side} echo in {stdout}"))
    };
    // side, service, method, calls, casts, ok, failed, timeouts, in-flight, p50, p99, max
    for side in ["server", "client"] {
        let cells = row(side);
        assert_eq!(&cells[3..9], ["200", "0", "200", "0", "0", "0"], "{stdout}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("connection listen")),
        "{stdout}"
    );
}
