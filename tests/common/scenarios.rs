//! Behaviour every transport must show, written once and run against RabbitMQ
//! (`tests/rpc_rabbit.rs`) and `memory://` (`tests/rpc_memory.rs`).

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warren::{
    Codec, Endpoint, Error, Failure, Notification, NotificationEndpoint, NotificationFilter,
    NotificationFormat, NotificationListener, NotificationResult, Notifier, Priority,
    RequestContext, RpcClient, RpcServer, Target,
};

use super::dispatch::{check_warren_client, Server};
use super::gate::{Gate, OpenOnDrop};
use super::{ctx, eventually, oslo_ctx, queue_count, remote, unique, Bus};

const WAIT: Duration = Duration::from_secs(10);

/// Generates one `#[test]` per scenario for the URL expression given.
#[macro_export]
macro_rules! scenario_tests {
    ($url:expr) => {
        $crate::scenario_tests!(@each $url;
            calls_return_typed_results,
            call_context_reaches_the_handler,
            casts_are_handled_once_each,
            fanout_casts_reach_every_server,
            calls_round_robin_across_servers,
            server_routing_reaches_only_that_server,
            many_client_threads_share_one_client,
            one_thread_keeps_many_calls_outstanding,
            unconfirmed_casts_are_delivered,
            confirmed_and_unconfirmed_publishers_share_the_channels,
            slow_handler_times_out_and_late_reply_is_dropped,
            topic_nobody_serves_times_out,
            remote_failures_carry_class_module_message,
            panics_become_failures_and_workers_survive,
            bad_arguments_are_type_errors_naming_the_argument,
            dispatch_rules_over_the_wire,
            version_cap_is_enforced_before_sending,
            large_payloads_round_trip_in_both_codecs,
            one_server_serves_json_and_msgpack_clients,
            invalid_targets_are_refused,
            stop_then_wait_finishes_taken_messages_and_restart_serves_the_rest,
            expired_calls_are_not_run_late,
            at_least_once_fails_fast_when_no_queue_takes_the_message,
            call_monitoring_keeps_long_calls_alive_and_catches_lost_ones,
            notifications_reach_endpoints_by_priority_and_filter,
            notification_pools_each_get_a_copy,
            requeued_notifications_come_back_only_when_allowed,
            a_notification_to_two_topics_reaches_a_listener_of_both_twice,
            a_timeout_of_duration_max_means_no_limit,
        );
    };
    (@each $url:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                common::scenarios::$name(&$url);
            }
        )*
    };
}

pub fn calls_return_typed_results(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    for codec in [Codec::MsgPack, Codec::Json] {
        let client = bus.client(codec);
        let sum: i64 = client
            .call(&ctx(), "add", &json!({"a": 2, "b": 40}))
            .unwrap();
        assert_eq!(sum, 42);
        let nested = json!({"s": "h\u{e9}llo \u{2603} \u{1F680}", "n": null, "f": 1.5, "l": [1, [2, {"x": true}]], "big": 9007199254740993_u64});
        let echoed: Value = client.call(&ctx(), "echo", &nested).unwrap();
        assert_eq!(echoed, nested, "{codec}");
        // A result that does not fit the caller's type is a decode error, not a panic.
        let wrong: Result<Vec<String>, Error> =
            client.call(&ctx(), "add", &json!({"a": 1, "b": 1}));
        assert!(matches!(wrong, Err(Error::Decode { .. })), "{wrong:?}");
        // `()` means no arguments.
        let who: String = client.call(&ctx(), "whoami", &()).unwrap();
        assert_eq!(who, "s1");
    }
}

pub fn call_context_reaches_the_handler(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    for codec in [Codec::MsgPack, Codec::Json] {
        let seen: Value = bus.client(codec).call(&oslo_ctx(), "context", &()).unwrap();
        assert_eq!(
            seen,
            json!({"user_id": "alice", "project_id": "demo", "roles": ["member", "reader"], "is_admin": false, "client_timeout": null}),
            "{codec}"
        );
    }
}

pub fn casts_are_handled_once_each(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 4);
    bus.start_server("s2", 4);
    let client = bus.client(Codec::MsgPack);
    for i in 0..50 {
        client.cast(&ctx(), "record", &json!({"id": i})).unwrap();
    }
    let events = bus.expect_events(50, WAIT);
    let mut ids: Vec<i64> = events
        .iter()
        .map(|e| e.value["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..50).collect::<Vec<_>>());
    bus.expect_quiet(Duration::from_millis(300));
}

pub fn fanout_casts_reach_every_server(url: &str) {
    let mut bus = Bus::new(url);
    for name in ["s1", "s2", "s3"] {
        bus.start_server(name, 1);
    }
    let client = bus.client(Codec::Json);
    client
        .prepare()
        .fanout(true)
        .cast(&ctx(), "record", &json!({"kind": "fanout"}))
        .unwrap();
    let mut servers: Vec<String> = bus
        .expect_events(3, WAIT)
        .into_iter()
        .map(|e| e.server)
        .collect();
    servers.sort();
    assert_eq!(servers, ["s1", "s2", "s3"]);
    // A plain cast goes to one server only.
    client
        .cast(&ctx(), "record", &json!({"kind": "topic"}))
        .unwrap();
    assert_eq!(bus.expect_events(1, WAIT)[0].value["kind"], "topic");
    bus.expect_quiet(Duration::from_millis(300));
}

pub fn calls_round_robin_across_servers(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    bus.start_server("s2", 1);
    let client = bus.client(Codec::MsgPack);
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let who: String = client.call(&ctx(), "whoami", &()).unwrap();
        *served.entry(who).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(served.values().all(|&n| n >= 10), "{served:?}");
    if !bus.is_rabbit() {
        // The in-process broker deals a queue's messages to its consumers in turn, as
        // RabbitMQ does, whatever the threads' scheduling.
        assert_eq!(served["s1"], 20, "{served:?}");
        assert_eq!(served["s2"], 20, "{served:?}");
    }
}

pub fn server_routing_reaches_only_that_server(url: &str) {
    let mut bus = Bus::new(url);
    for name in ["s1", "s2", "s3"] {
        bus.start_server(name, 1);
    }
    let to_s2 = bus.client(Codec::MsgPack).prepare().server("s2");
    for _ in 0..15 {
        let who: String = to_s2.call(&ctx(), "whoami", &()).unwrap();
        assert_eq!(who, "s2");
    }
}

pub fn many_client_threads_share_one_client(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 4);
    bus.start_server("s2", 4);
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let threads: Vec<_> = (0..8_i64)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                for i in 0..25_i64 {
                    let sum: i64 = client
                        .call(&ctx(), "add", &json!({"a": t * 1000, "b": i}))
                        .unwrap();
                    assert_eq!(sum, t * 1000 + i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(transport.pending_calls(), 0, "no waiter left behind");
}

pub fn one_thread_keeps_many_calls_outstanding(url: &str) {
    let mut bus = Bus::new(url);
    let gate = std::sync::Arc::new(Gate::default());
    let (gated_tx, gated_calls) = crossbeam_channel::unbounded();
    let held = gate.clone();
    let gated = Endpoint::new().method("gated", move |_: &RequestContext, args: Value| {
        let _ = gated_tx.send(args["n"].as_i64().unwrap_or_default());
        held.pass();
        Ok::<_, Failure>(args["n"].clone())
    });
    bus.start_server_with("s1", |b| b.workers(4).endpoint(gated));
    // Declared after the bus: dropped first, so a failing test never leaves a worker waiting.
    let _open = OpenOnDrop(gate.clone());
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let pending: Vec<_> = (0..40_i64)
        .map(|i| {
            client
                .start_call::<_, i64>(&ctx(), "add", &json!({"a": i, "b": 1000}))
                .unwrap()
        })
        .collect();
    assert_eq!(transport.pending_calls(), 40);
    // Taken in reverse order: each result is its own call's.
    for (i, call) in pending.into_iter().enumerate().rev() {
        assert_eq!(call.wait().unwrap(), i as i64 + 1000);
    }
    // A pending call keeps its own deadline, counted from when it was sent: once it has
    // passed, wait() fails at once, while the handler (held at a gate) still runs.
    let timeout = Duration::from_millis(500);
    let sent = Instant::now();
    let slow = client
        .prepare()
        .timeout(timeout)
        .start_call::<_, u64>(&ctx(), "gated", &json!({"n": 1}))
        .unwrap();
    assert_eq!(
        gated_calls.recv_timeout(WAIT),
        Ok(1),
        "the gated handler never started"
    );
    let deadline = sent + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        thread::sleep(left);
    }
    let waited = Instant::now();
    let outcome = slow.wait();
    let took = waited.elapsed();
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    // Counted from wait() instead of from the send, it would block for the whole timeout.
    assert!(
        took < timeout,
        "wait() blocked {took:?} past the call's deadline"
    );
    gate.open();
    // An abandoned call leaves nothing registered.
    let abandoned = client.start_call::<_, i64>(&ctx(), "add", &json!({"a": 1, "b": 1}));
    drop(abandoned);
    assert_eq!(transport.pending_calls(), 0);
}

pub fn unconfirmed_casts_are_delivered(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    let client = bus.client(Codec::MsgPack).confirm(false);
    for i in 0..200 {
        client.cast(&ctx(), "record", &json!({"id": i})).unwrap();
    }
    let mut ids: Vec<i64> = bus
        .expect_events(200, WAIT)
        .iter()
        .map(|e| e.value["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..200).collect::<Vec<_>>());
    // Calls work unconfirmed too (their reply proves delivery).
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 1, "b": 2}))
        .unwrap();
    assert_eq!(sum, 3);
}

pub fn confirmed_and_unconfirmed_publishers_share_the_channels(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 4);
    let client = bus.client(Codec::MsgPack).timeout(Duration::from_secs(10));
    // More threads than a transport has publishing channels (32), switching between
    // confirmed and unconfirmed sends: each kind must get a channel, taking the other's idle
    // ones when the limit is reached.
    let start = std::sync::Arc::new(std::sync::Barrier::new(40));
    let threads: Vec<_> = (0..40_i64)
        .map(|t| {
            let (client, start) = (client.clone(), start.clone());
            thread::spawn(move || {
                // All at once, so that more send at the same time than there are channels.
                start.wait();
                for i in 0..6_i64 {
                    let confirmed = (t + i) % 2 == 0;
                    client
                        .prepare()
                        .confirm(confirmed)
                        .cast(&ctx(), "record", &json!({"id": t * 10 + i}))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("publisher thread");
    }
    let mut ids: Vec<i64> = bus
        .expect_events(240, WAIT)
        .iter()
        .map(|e| e.value["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected: Vec<i64> = (0..40)
        .flat_map(|t| (0..6).map(move |i| t * 10 + i))
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

pub fn slow_handler_times_out_and_late_reply_is_dropped(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    // Connected, with its reply queue, before the timed part.
    let warm: i64 = client
        .call(&ctx(), "add", &json!({"a": 1, "b": 1}))
        .unwrap();
    assert_eq!(warm, 2);
    let timeout = Duration::from_millis(400);
    let started = Instant::now();
    let result: Result<u64, Error> =
        client
            .prepare()
            .timeout(timeout)
            .call(&ctx(), "sleep", &json!({"ms": 1500}));
    let elapsed = started.elapsed();
    match result {
        Err(Error::Timeout {
            msg_id,
            method,
            timeout: t,
        }) => {
            assert_eq!(msg_id.len(), 32, "msg_id is a uuid hex");
            assert_eq!(method, "sleep");
            assert_eq!(t, timeout);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "{elapsed:?}"
    );
    assert_eq!(transport.pending_calls(), 0);
    // The handler finishes, its reply arrives late and is dropped; the client keeps working.
    assert_eq!(bus.expect_events(1, WAIT)[0].method, "sleep");
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 1, "b": 2}))
        .unwrap();
    assert_eq!(sum, 3);
    assert_eq!(transport.pending_calls(), 0);
}

pub fn topic_nobody_serves_times_out(url: &str) {
    let bus = Bus::new(url);
    let client = bus
        .client(Codec::MsgPack)
        .prepare()
        .topic(unique("nobody"))
        .timeout(Duration::from_millis(300));
    // A cast to nobody is accepted by the broker and dropped (oslo semantics); it connects the
    // transport before the timed part.
    client.cast(&ctx(), "echo", &json!({})).unwrap();
    let started = Instant::now();
    let result: Result<Value, Error> = client.call(&ctx(), "echo", &json!({}));
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
}

pub fn remote_failures_carry_class_module_message(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    for codec in [Codec::MsgPack, Codec::Json] {
        let client = bus.client(codec);
        for expected in [false, true] {
            let args = json!({"class": "InstanceNotFound", "module": "nova.exception", "message": "Instance i-1 could not be found.", "expected": expected});
            let failure = remote(client.call::<_, Value>(&ctx(), "fail", &args));
            assert_eq!(
                (
                    failure.class.as_str(),
                    failure.module.as_str(),
                    failure.message.as_str()
                ),
                (
                    "InstanceNotFound",
                    "nova.exception",
                    "Instance i-1 could not be found."
                ),
                "{codec}"
            );
            assert_eq!(
                failure.details.args,
                vec![json!("Instance i-1 could not be found.")],
                "{codec}"
            );
        }
    }
}

pub fn panics_become_failures_and_workers_survive(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    let client = bus.client(Codec::MsgPack);
    for _ in 0..5 {
        let failure = remote(client.call::<_, Value>(&ctx(), "panic", &()));
        assert_eq!(failure.class, "HandlerPanic");
        assert!(
            failure.message.contains("handler exploded"),
            "{}",
            failure.message
        );
    }
    // More panics than workers, and both workers still answer.
    let answers: Vec<i64> = (0..4)
        .map(|i| {
            client
                .call(&ctx(), "add", &json!({"a": i, "b": 1}))
                .unwrap()
        })
        .collect();
    assert_eq!(answers, [1, 2, 3, 4]);
}

pub fn bad_arguments_are_type_errors_naming_the_argument(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    for codec in [Codec::MsgPack, Codec::Json] {
        let client = bus.client(codec);
        for (args, needle) in [
            (json!({"a": "two", "b": 3}), "argument `a`"),
            (json!({"a": 1}), "missing field `b`"),
        ] {
            let failure = remote(client.call::<_, Value>(&ctx(), "add", &args));
            assert_eq!(
                (failure.class.as_str(), failure.module.as_str()),
                ("TypeError", "builtins"),
                "{codec}"
            );
            assert!(
                failure.message.contains(needle),
                "{codec}: {}",
                failure.message
            );
        }
    }
}

/// The case table of `tests/fixtures/dispatch-rules.json`, in both codecs.
pub fn dispatch_rules_over_the_wire(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    for codec in [Codec::Json, Codec::MsgPack] {
        check_warren_client(&bus.client(codec), Server::Warren, "s1");
    }
}

pub fn version_cap_is_enforced_before_sending(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    let capped = bus.client(Codec::MsgPack).prepare().version_cap("1.2");
    assert!(capped.can_send_version("1.1") && capped.can_send_version("1.2"));
    assert!(!capped.can_send_version("1.3") && !capped.can_send_version("2.0"));
    let too_new = capped.prepare().version("1.3");
    assert!(matches!(
        too_new.cast(&ctx(), "record", &json!({})),
        Err(Error::VersionCap { .. })
    ));
    let result: Result<Value, Error> = too_new.call(&ctx(), "whoami", &());
    match result {
        Err(Error::VersionCap { version, cap }) => {
            assert_eq!((version.as_str(), cap.as_str()), ("1.3", "1.2"))
        }
        other => panic!("{other:?}"),
    }
    // A capped client must name a version, as in oslo.
    assert!(matches!(
        capped.call::<_, Value>(&ctx(), "whoami", &()),
        Err(Error::VersionCap { .. })
    ));
    let ok: String = capped
        .prepare()
        .version("1.2")
        .call(&ctx(), "whoami", &())
        .unwrap();
    assert_eq!(ok, "s1");
    bus.expect_quiet(Duration::from_millis(200));
}

pub fn large_payloads_round_trip_in_both_codecs(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    let big = "x\u{e9}".repeat(512 * 1024 / 2 * 2); // ~1.5 MiB of UTF-8, 1 Mi characters
    for codec in [Codec::MsgPack, Codec::Json] {
        let echoed: Value = bus
            .client(codec)
            .call(&ctx(), "echo", &json!({"blob": big}))
            .unwrap();
        assert_eq!(
            echoed["blob"].as_str().map(str::len),
            Some(big.len()),
            "{codec}"
        );
        assert!(echoed["blob"] == big.as_str());
    }
}

pub fn one_server_serves_json_and_msgpack_clients(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 4);
    let handles: Vec<_> = [Codec::Json, Codec::MsgPack, Codec::Json, Codec::MsgPack]
        .into_iter()
        .enumerate()
        .map(|(t, codec)| {
            let client = bus.client(codec);
            thread::spawn(move || {
                for i in 0..20_i64 {
                    let echoed: Value = client
                        .call(
                            &ctx(),
                            "echo",
                            &json!({"t": t, "i": i, "codec": codec.to_string()}),
                        )
                        .unwrap();
                    assert_eq!(echoed, json!({"t": t, "i": i, "codec": codec.to_string()}));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
}

pub fn invalid_targets_are_refused(url: &str) {
    let bus = Bus::new(url);
    let transport = bus.transport(Codec::MsgPack);
    let fanout_call = RpcClient::new(&transport, Target::new("t").with_fanout(true));
    assert!(matches!(
        fanout_call.call::<_, Value>(&ctx(), "m", &()),
        Err(Error::InvalidTarget { .. })
    ));
    let no_topic = RpcClient::new(&transport, Target::default());
    assert!(matches!(
        no_topic.call::<_, Value>(&ctx(), "m", &()),
        Err(Error::InvalidTarget { .. })
    ));
    assert!(matches!(
        no_topic.cast(&ctx(), "m", &()),
        Err(Error::InvalidTarget { .. })
    ));
    let bad_version = RpcClient::new(&transport, Target::new("t")).version("one.two");
    assert!(matches!(
        bad_version.cast(&ctx(), "m", &()),
        Err(Error::InvalidVersion { .. })
    ));
    for target in [
        Target::new("t"),
        Target::default().with_server("s"),
        Target::new("t").with_server("s").with_fanout(true),
    ] {
        let built = RpcServer::builder(&transport, target.clone()).build();
        assert!(
            matches!(built, Err(Error::InvalidTarget { .. })),
            "{target:?}"
        );
    }
}

pub fn stop_then_wait_finishes_taken_messages_and_restart_serves_the_rest(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    let client = bus.client(Codec::MsgPack);
    for id in 0..6 {
        client
            .cast(&ctx(), "sleep", &json!({"ms": 100, "id": id}))
            .unwrap();
    }
    let first = bus.expect_events(1, WAIT);
    let server = bus.server("s1");
    server.stop();
    assert!(!server.is_running());
    // Sent while stopped: waits in the queue.
    client
        .cast(&ctx(), "record", &json!({"while": "stopped"}))
        .unwrap();
    server.wait();
    // Everything the server had taken is finished when wait() returns, and nothing runs after.
    let finished = first.len() + bus.events.try_iter().count();
    bus.expect_quiet(Duration::from_millis(300));
    // Whatever it had not taken is still queued, and a restart serves it.
    server.start().unwrap();
    let rest = bus.expect_events(7 - finished, WAIT);
    assert!(
        rest.iter().any(|e| e.value == json!({"while": "stopped"})),
        "{rest:?}"
    );
    bus.expect_quiet(Duration::from_millis(300));
}

pub fn expired_calls_are_not_run_late(url: &str) {
    let mut bus = Bus::new(url);
    // Declare the queues, then stop serving so requests wait in them.
    bus.start_server("s1", 1);
    let server = bus.server("s1");
    server.stop();
    server.wait();
    let client = bus.client(Codec::MsgPack);
    let timeout = Duration::from_millis(200);
    let result: Result<Value, Error> =
        client
            .prepare()
            .timeout(timeout)
            .call(&ctx(), "record", &json!({"stale": true}));
    let returned = Instant::now();
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    // The request lives `timeout` from when the broker queued it, which can be later than the
    // caller's deadline: restarting the server as soon as the call timed out could still hand
    // it the request. The claim is that it expires in its queue, so wait for that.
    if bus.is_rabbit() {
        // A loaded broker queues it late, by its own clock: ask the broker.
        eventually("the expired request leaves its queue", WAIT, || {
            queue_count(&bus.topic, "messages") == 0
        });
    } else {
        // The in-process broker queued it before the call returned, with our clock: it has
        // expired `timeout` after that.
        let expired = returned + timeout;
        while let Some(left) = expired.checked_duration_since(Instant::now()) {
            thread::sleep(left);
        }
    }
    client
        .cast(&ctx(), "record", &json!({"fresh": true}))
        .unwrap();
    server.start().unwrap();
    let events = bus.expect_events(1, WAIT);
    assert_eq!(
        events[0].value,
        json!({"fresh": true}),
        "the expired call never runs"
    );
    bus.expect_quiet(Duration::from_millis(300));
}

pub fn at_least_once_fails_fast_when_no_queue_takes_the_message(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    let nobody = bus
        .client(Codec::MsgPack)
        .prepare()
        .topic(unique("nobody"))
        .at_least_once(true)
        .timeout(Duration::from_secs(10));
    let started = Instant::now();
    let cast = nobody.cast(&ctx(), "record", &json!({}));
    assert!(matches!(cast, Err(Error::Undeliverable { .. })), "{cast:?}");
    let call: Result<Value, Error> = nobody.call(&ctx(), "whoami", &());
    assert!(matches!(call, Err(Error::Undeliverable { .. })), "{call:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Routable messages are unaffected.
    let served = bus.client(Codec::MsgPack).at_least_once(true);
    let who: String = served.call(&ctx(), "whoami", &()).unwrap();
    assert_eq!(who, "s1");
    served.cast(&ctx(), "record", &json!({"ok": true})).unwrap();
    bus.expect_events(1, WAIT);
}

pub fn call_monitoring_keeps_long_calls_alive_and_catches_lost_ones(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 2);
    let monitored = bus
        .client(Codec::Json)
        .timeout(Duration::from_secs(15))
        .call_monitor_timeout(Duration::from_secs(4));
    // 6 s of work, longer than the 4 s monitor: keep-alives every 2 s keep it going (each
    // with 2 s to spare, for a loaded machine).
    let started = Instant::now();
    let slept: u64 = monitored
        .call(&ctx(), "sleep", &json!({"ms": 6000}))
        .unwrap();
    assert_eq!(slept, 6000);
    assert!(started.elapsed() >= Duration::from_millis(6000));
    let seen: Value = monitored.call(&ctx(), "context", &()).unwrap();
    assert_eq!(
        seen["client_timeout"], 4,
        "the server sees the monitor timeout"
    );
    // Nobody consumes the queue any more: the monitor, not the 15 s timeout, ends the call.
    let server = bus.server("s1");
    server.stop();
    server.wait();
    let started = Instant::now();
    let lost: Result<Value, Error> = monitored.call(&ctx(), "whoami", &());
    match lost {
        Err(Error::Timeout { timeout, .. }) => assert_eq!(timeout, Duration::from_secs(4)),
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(7),
        "{waited:?}"
    );
}

/// A notification as the tests record it: (tag of the endpoint, priority, event type).
type Seen = (String, Priority, String);

fn recording(
    tag: &str,
    priorities: &[Priority],
    seen: &crossbeam_channel::Sender<(Seen, Notification)>,
) -> NotificationEndpoint {
    let mut endpoint = NotificationEndpoint::new();
    for priority in priorities {
        let (tag, seen) = (tag.to_string(), seen.clone());
        endpoint = endpoint.on(*priority, move |n: &Notification| {
            let _ = seen.send(((tag.clone(), n.priority, n.event_type.clone()), n.clone()));
            NotificationResult::Handled
        });
    }
    endpoint
}

/// Cleans up what notifiers and listeners declare on `bus`'s topic.
fn track_notification_queues(bus: &mut Bus, pools: &[&str]) {
    for priority in Priority::ALL {
        let queue = format!("{}.{priority}", bus.topic);
        bus.track_queue(queue);
    }
    for pool in pools {
        bus.track_queue(pool.to_string());
    }
}

fn collect(
    seen: &crossbeam_channel::Receiver<(Seen, Notification)>,
    n: usize,
) -> Vec<(Seen, Notification)> {
    (0..n)
        .map(|i| {
            seen.recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("notification {i} of {n} never came"))
        })
        .collect()
}

pub fn notifications_reach_endpoints_by_priority_and_filter(url: &str) {
    let mut bus = Bus::new(url);
    track_notification_queues(&mut bus, &[]);
    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let everything = recording("all", &[Priority::Info, Priority::Error], &seen_tx);
    let compute_only = recording("compute", &[Priority::Info], &seen_tx)
        .filter(NotificationFilter::new().event_type(r"compute\.").unwrap());
    let listener = NotificationListener::builder(&transport, vec![Target::new(bus.topic.as_str())])
        .endpoint(everything)
        .endpoint(compute_only)
        .workers(2)
        .build()
        .unwrap();
    let mut queues = listener.queues();
    queues.sort_unstable();
    assert_eq!(
        queues,
        [
            format!("{}.error", bus.topic),
            format!("{}.info", bus.topic)
        ]
    );
    listener.start().unwrap();

    let notifier = Notifier::new(&transport, "compute.host-1").topics([bus.topic.as_str()]);
    let ctx = ctx().with("auth_token", "s3cret");
    notifier
        .info(&ctx, "compute.instance.create.end", &json!({"id": 1}))
        .unwrap();
    notifier
        .info(&ctx, "network.port.create.end", &json!({"id": 2}))
        .unwrap();
    notifier
        .error(&ctx, "compute.instance.create.error", &json!({"id": 3}))
        .unwrap();
    notifier
        .warn(&ctx, "compute.instance.slow", &json!({"id": 4}))
        .unwrap();
    notifier
        .prepare()
        .format(NotificationFormat::V1)
        .info(&ctx, "compute.instance.delete.end", &json!({"id": 5}))
        .unwrap();
    let got = collect(&seen, 6);
    let mut keys: Vec<Seen> = got.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    let expected: Vec<Seen> = vec![
        (
            "all".into(),
            Priority::Info,
            "compute.instance.create.end".into(),
        ),
        (
            "all".into(),
            Priority::Info,
            "compute.instance.delete.end".into(),
        ),
        (
            "all".into(),
            Priority::Info,
            "network.port.create.end".into(),
        ),
        (
            "all".into(),
            Priority::Error,
            "compute.instance.create.error".into(),
        ),
        (
            "compute".into(),
            Priority::Info,
            "compute.instance.create.end".into(),
        ),
        (
            "compute".into(),
            Priority::Info,
            "compute.instance.delete.end".into(),
        ),
    ];
    let mut expected = expected;
    expected.sort();
    assert_eq!(keys, expected);
    assert!(
        seen.recv_timeout(Duration::from_millis(300)).is_err(),
        "no warn handler, nothing else"
    );
    let (_, first) = &got[0];
    assert_eq!(first.publisher_id, "compute.host-1");
    assert_eq!(first.ctxt.get_str("user_id"), Some("alice"));
    assert_eq!(
        first.ctxt.get("auth_token"),
        Some(&Value::Null),
        "the token is blanked"
    );
    assert_eq!(first.metadata.message_id.len(), 36, "uuid4 with dashes");
    assert_eq!(
        first.metadata.timestamp.len(),
        "2026-11-25 12:37:22.404495".len()
    );
    let payload: Value = first.payload_as().unwrap();
    assert!(payload["id"].is_number());
    listener.stop();
    listener.wait();
}

pub fn notification_pools_each_get_a_copy(url: &str) {
    let mut bus = Bus::new(url);
    let (pool_a, pool_b) = (unique("pool"), unique("pool"));
    track_notification_queues(&mut bus, &[&pool_a, &pool_b]);
    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let target = || vec![Target::new(bus.topic.as_str())];
    let listeners: Vec<NotificationListener> =
        [
            ("a1", Some(&pool_a)),
            ("a2", Some(&pool_a)),
            ("b", Some(&pool_b)),
            ("plain", None),
        ]
        .into_iter()
        .map(|(tag, pool)| {
            let mut builder = NotificationListener::builder(&transport, target())
                .endpoint(recording(tag, &[Priority::Info], &seen_tx));
            if let Some(pool) = pool {
                builder = builder.pool(pool.as_str());
            }
            let listener = builder.workers(1).build().unwrap();
            listener.start().unwrap();
            listener
        })
        .collect();
    let notifier = Notifier::new(&transport, "compute.host-1").topics([bus.topic.as_str()]);
    notifier
        .info(&ctx(), "compute.instance.create.end", &json!({}))
        .unwrap();
    let mut tags: Vec<String> = collect(&seen, 3)
        .into_iter()
        .map(|((tag, _, _), _)| tag)
        .collect();
    tags.sort();
    assert!(
        seen.recv_timeout(Duration::from_millis(300)).is_err(),
        "one copy per pool and one for the plain queue"
    );
    assert!(tags[0] == "a1" || tags[0] == "a2", "{tags:?}");
    assert_eq!(&tags[1..], ["b", "plain"]);
    drop(listeners);
}

pub fn requeued_notifications_come_back_only_when_allowed(url: &str) {
    let mut bus = Bus::new(url);
    track_notification_queues(&mut bus, &[]);
    let transport = bus.transport(Codec::Json);
    for allow in [true, false] {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = attempts.clone();
        let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
            let _ = seen_tx.send(n.metadata.message_id.clone());
            if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                NotificationResult::Requeue
            } else {
                NotificationResult::Handled
            }
        });
        let listener =
            NotificationListener::builder(&transport, vec![Target::new(bus.topic.as_str())])
                .endpoint(endpoint)
                .allow_requeue(allow)
                .workers(1)
                .build()
                .unwrap();
        listener.start().unwrap();
        let notifier = Notifier::new(&transport, "p").topics([bus.topic.as_str()]);
        notifier.info(&ctx(), "retry.me", &json!({})).unwrap();
        let first = seen.recv_timeout(WAIT).unwrap();
        if allow {
            assert_eq!(
                seen.recv_timeout(WAIT).unwrap(),
                first,
                "delivered again after the requeue"
            );
        }
        assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
        listener.stop();
        listener.wait();
    }
}

/// oslo's driver gives each topic's copy its own `_unique_id`: a listener of both topics
/// handles both copies (with one id, the second was dropped as a duplicate).
pub fn a_notification_to_two_topics_reaches_a_listener_of_both_twice(url: &str) {
    let mut bus = Bus::new(url);
    let other = unique("topic");
    track_notification_queues(&mut bus, &[]);
    bus.track_queue(format!("{other}.info"));
    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let listener = NotificationListener::builder(
        &transport,
        vec![Target::new(bus.topic.as_str()), Target::new(other.as_str())],
    )
    .endpoint(recording("both", &[Priority::Info], &seen_tx))
    .workers(1)
    .build()
    .unwrap();
    listener.start().unwrap();
    let notifier =
        Notifier::new(&transport, "compute.host-1").topics([bus.topic.as_str(), other.as_str()]);
    notifier
        .info(&ctx(), "compute.instance.create.end", &json!({"id": 7}))
        .unwrap();
    let copies = collect(&seen, 2);
    // The same notification (oslo keeps one message_id across topics), once per topic.
    assert_eq!(
        copies[0].1.metadata.message_id,
        copies[1].1.metadata.message_id
    );
    assert!(
        seen.recv_timeout(Duration::from_millis(300)).is_err(),
        "one copy per topic"
    );
    listener.stop();
    listener.wait();
}

/// `Duration::MAX` as a timeout means "as long as it takes": calls, monitored calls, casts
/// and notifications go through (no overflow, and RabbitMQ gets an expiration it accepts).
pub fn a_timeout_of_duration_max_means_no_limit(url: &str) {
    let mut bus = Bus::new(url);
    bus.start_server("s1", 1);
    track_notification_queues(&mut bus, &[]);
    let client = bus.client(Codec::Json).timeout(Duration::MAX);
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 1, "b": 2}))
        .unwrap();
    assert_eq!(sum, 3);
    let monitored = client.clone().call_monitor_timeout(Duration::MAX);
    let sum: i64 = monitored
        .call(&ctx(), "add", &json!({"a": 2, "b": 2}))
        .unwrap();
    assert_eq!(sum, 4);
    client.cast(&ctx(), "record", &json!({"id": 1})).unwrap();
    bus.expect_events(1, WAIT);
    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let listener = NotificationListener::builder(&transport, vec![Target::new(bus.topic.as_str())])
        .endpoint(recording("all", &[Priority::Info], &seen_tx))
        .build()
        .unwrap();
    listener.start().unwrap();
    Notifier::new(&transport, "compute.host-1")
        .topics([bus.topic.as_str()])
        .timeout(Duration::MAX)
        .info(&ctx(), "compute.instance.create.end", &json!({}))
        .unwrap();
    collect(&seen, 1);
    listener.stop();
    listener.wait();
}
