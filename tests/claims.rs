//! README claims that no other test proves, one test per claim; the README cites each next to
//! its claim. Memory tests use the in-process broker and its tap; broker tests use the shared
//! RabbitMQ (`WARREN_TEST_URL`) with names of their own, the fault-injecting proxy of
//! `tests/common/proxy.rs`, or a private node (`tests/common/node.rs`).
//!
//! Every log record of this binary is captured (`tests/common/logs.rs`); a test looks only at
//! the lines that carry a name it made unique (its topic, a marker) or a text only it causes.

mod common;

use common::{next_tapped as next, tap, with_query};

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::gate::{Gate, OpenOnDrop};
use common::logs::{capture_logs, capture_logs_at, captured};
use common::node::RabbitNode;
use common::proxy::Proxy;
use common::{
    broker_in_vhost, broker_url, consumers_with_prefix, counting_lost_connections, eventually,
    memory_url, queue_count, rabbitmqctl, rabbitmqctl_cleanup, rabbitmqctl_json, unique, Bus,
};
use serde_json::{json, Value};
use warren::observe::{ConnectionRole, Event};
use warren::{
    AckMode, Codec, Endpoint, Error, Failure, Launcher, NoArgs, Notification, NotificationEndpoint,
    NotificationListener, NotificationResult, Notifier, Priority, RequestContext, RpcClient,
    RpcServer, Shutdown, TappedMessage, Target, Transport,
};

const WAIT: Duration = Duration::from_secs(10);

/// Reconnection without long pauses; heartbeats stay at their default, so that a proxy's delay
/// is not taken for a dead connection.
const FAST_RECONNECT: &str = "kombu_reconnect_splay=0.1&rabbit_retry_interval=0.1&rabbit_retry_backoff=0.1&rabbit_interval_max=1";

fn ctx() -> RequestContext {
    RequestContext::new().with("user_id", "claims")
}

/// The captured lines of warren's own loggers that contain `needle`, as (level, line).
fn warren_lines(needle: &str) -> Vec<(String, String)> {
    captured()
        .lines()
        .filter(|line| line.contains(needle))
        .filter_map(|line| {
            let (level, rest) = line.split_once(' ')?;
            rest.starts_with("warren")
                .then(|| (level.to_string(), line.to_string()))
        })
        .collect()
}

/// Waits until warren logged a line containing `needle`; returns every such line.
fn wait_for_lines(needle: &str) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    eventually(&format!("a log line with {needle:?}"), WAIT, || {
        lines = warren_lines(needle);
        !lines.is_empty()
    });
    lines
}

fn levels(lines: &[(String, String)]) -> Vec<&str> {
    lines.iter().map(|(level, _)| level.as_str()).collect()
}

/// `message` with the JSON string `old` (found once in its body) replaced by `new`.
fn replaced(message: &TappedMessage, old: &str, new: &str) -> TappedMessage {
    let body = String::from_utf8(message.body.clone()).expect("JSON text");
    assert_eq!(body.matches(old).count(), 1, "{body}");
    let mut copy = message.clone();
    copy.body = body.replace(old, new).into_bytes();
    copy
}

fn queue_exists(name: &str) -> bool {
    rabbitmqctl_json(&["list_queues", "name"])
        .iter()
        .any(|q| q["name"] == name)
}

/// Features, "Failures travel as oslo's six fields": "Expected failures log at debug"; and
/// Security, "Logging levels": `error` for handler failures that are not expected and for a
/// panicking handler.
#[test]
fn expected_failures_log_at_debug_others_and_panics_at_error() {
    capture_logs();
    let mut bus = Bus::new(&memory_url());
    let panic_marker = unique("panic");
    let marker = panic_marker.clone();
    let explode = Endpoint::new().method(
        "explode",
        move |_: &RequestContext, _: NoArgs| -> Result<(), Failure> { panic!("{marker}") },
    );
    bus.start_server_with("s1", |b| b.workers(1).endpoint(explode));
    let client = bus.client(Codec::MsgPack);
    let (expected, unexpected) = (unique("expected"), unique("unexpected"));
    for (message, is_expected) in [(&expected, true), (&unexpected, false)] {
        let args = json!({"class": "InstanceNotFound", "module": "nova.exception", "message": message, "expected": is_expected});
        let err = client.call::<_, Value>(&ctx(), "fail", &args).unwrap_err();
        assert!(err.is_remote("InstanceNotFound"), "{err:?}");
    }
    let err = client.call::<_, Value>(&ctx(), "explode", &()).unwrap_err();
    assert!(err.is_remote("HandlerPanic"), "{err:?}");
    // The server logs a failure before it replies: the lines exist once the calls returned.
    let lines = warren_lines(&expected);
    assert!(!lines.is_empty(), "the expected failure is logged");
    assert!(
        lines.iter().all(|(level, _)| level == "DEBUG"),
        "an expected failure logs at debug only: {lines:?}"
    );
    for marker in [&unexpected, &panic_marker] {
        let lines = warren_lines(marker);
        assert!(
            lines.iter().any(|(level, _)| level == "ERROR"),
            "{marker} is logged at error: {lines:?}"
        );
    }
}

/// Features, "Robust intake" and Security, "Logging levels": an unreadable message is logged at
/// `warn` with its routing key, once per message; a duplicate dropped at `info`; a reply no call
/// waits for at `debug`; garbage on a reply queue at `warn`.
#[test]
fn intake_and_reply_log_levels_follow_the_readme() {
    capture_logs();
    let mut bus = Bus::new(&memory_url());
    let tap = tap(&bus);
    bus.start_server("s1", 1);
    let client = bus.client(Codec::Json);

    client.cast(&ctx(), "record", &json!({"n": 0})).unwrap();
    let cast = next(&tap, "cast", |m| m.routing_key == bus.topic);
    bus.expect_events(1, WAIT);
    // A peer's garbage, three times, with a valid cast behind it (one worker: in order).
    let mut garbage = cast.clone();
    garbage.body = b"\xff\xfe not a message".to_vec();
    for _ in 0..3 {
        assert_eq!(tap.publish(&garbage), 1);
    }
    client.cast(&ctx(), "record", &json!({"n": 1})).unwrap();
    assert_eq!(bus.expect_events(1, WAIT)[0].value, json!({"n": 1}));
    let rejected: Vec<_> = warren_lines(&bus.topic)
        .into_iter()
        .filter(|(_, line)| line.contains("unreadable"))
        .collect();
    assert_eq!(
        levels(&rejected),
        ["WARN"; 3],
        "one warning per unreadable message, naming its routing key: {rejected:?}"
    );

    // The first cast again: a duplicate, dropped at info.
    let unique_id = cast.field("_unique_id").expect("a _unique_id");
    assert_eq!(tap.publish(&cast), 1);
    let duplicate = wait_for_lines(&unique_id);
    assert_eq!(levels(&duplicate), ["INFO"], "{duplicate:?}");
    assert!(duplicate[0].1.contains("duplicate"), "{duplicate:?}");

    // A forged reply (an id no call waits for) and garbage on the client's reply queue.
    let _: String = client.call(&ctx(), "whoami", &()).unwrap();
    let reply = next(&tap, "reply", |m| {
        m.exchange.is_empty() && m.field("_msg_id").is_some()
    });
    let msg_id = reply.field("_msg_id").expect("a _msg_id");
    let forged_id = uuid::Uuid::new_v4().simple().to_string();
    tap.publish(&replaced(&reply, &msg_id, &forged_id));
    let forged = wait_for_lines(&forged_id);
    assert_eq!(levels(&forged), ["DEBUG"], "{forged:?}");
    let mut garbage_reply = reply.clone();
    garbage_reply.body = b"\x00garbage".to_vec();
    tap.publish(&garbage_reply);
    let dropped = wait_for_lines("dropping an unreadable reply");
    assert_eq!(levels(&dropped), ["WARN"], "{dropped:?}");
}

/// Features, "Delivery options beyond oslo": "a configurable duplicate window".
#[test]
fn the_duplicate_window_is_configurable() {
    let mut bus = Bus::new(&memory_url());
    let tap = tap(&bus);
    bus.start_server_with("s1", |b| b.workers(1).duplicate_window(1));
    let client = bus.client(Codec::Json);
    let mut sent = Vec::new();
    for id in ["a", "b"] {
        client.cast(&ctx(), "record", &json!({"id": id})).unwrap();
        sent.push(next(&tap, "cast", |m| m.routing_key == bus.topic));
    }
    let ids = |n| -> Vec<Value> {
        bus.expect_events(n, WAIT)
            .into_iter()
            .map(|e| e.value["id"].clone())
            .collect()
    };
    assert_eq!(ids(2), ["a", "b"]);
    // A window of one remembers `b` only: `b` again is dropped, `a` again runs again (the
    // default window would drop both).
    assert_eq!(tap.publish(&sent[1]), 1);
    assert_eq!(tap.publish(&sent[0]), 1);
    client.cast(&ctx(), "record", &json!({"id": "c"})).unwrap();
    assert_eq!(ids(2), ["a", "c"]);
    bus.expect_quiet(Duration::from_millis(100));
}

/// Features, "Delivery options beyond oslo": "a duplicate window of 4,096 ids by default where
/// oslo keeps 16": a copy that comes back after 1,000 other messages is still dropped, by a
/// server and by a notification listener; one after 4,096 others runs again.
#[test]
fn the_default_duplicate_window_drops_a_copy_after_a_thousand_other_messages() {
    let mut bus = Bus::new(&memory_url());
    let tap = tap(&bus);
    bus.start_server_with("s1", |b| b.workers(2));
    let client = bus.client(Codec::MsgPack);
    client
        .cast(&ctx(), "record", &json!({"id": "first"}))
        .unwrap();
    let first = next(&tap, "the first cast", |m| m.routing_key == bus.topic);
    for i in 0..1000 {
        client.cast(&ctx(), "record", &json!({"id": i})).unwrap();
    }
    bus.expect_events(1001, WAIT);
    assert_eq!(tap.publish(&first), 1);
    client
        .cast(&ctx(), "record", &json!({"id": "last"}))
        .unwrap();
    let after: Vec<Value> = bus
        .expect_events(1, WAIT)
        .into_iter()
        .map(|e| e.value["id"].clone())
        .collect();
    assert_eq!(
        after,
        ["last"],
        "the copy of the first cast was handled again"
    );
    bus.expect_quiet(Duration::from_millis(100));
    // Past the window, the copy runs again (the window has the size it claims).
    for i in 0..4096 {
        client.cast(&ctx(), "record", &json!({"id": i})).unwrap();
    }
    bus.expect_events(4096, WAIT);
    assert_eq!(tap.publish(&first), 1);
    let again: Vec<Value> = bus
        .expect_events(1, WAIT)
        .into_iter()
        .map(|e| e.value["id"].clone())
        .collect();
    assert_eq!(again, ["first"]);

    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n: &Notification| {
        let _ = seen_tx.send(n.payload["id"].clone());
        NotificationResult::Handled
    });
    let topic = unique("dedup_notifications");
    let listener = NotificationListener::builder(&transport, vec![Target::new(topic.as_str())])
        .endpoint(endpoint)
        .build()
        .unwrap();
    listener.start().unwrap();
    let notifier = Notifier::new(&transport, "claims.host-1").topics([topic.as_str()]);
    let queue = format!("{topic}.info");
    notifier
        .info(&ctx(), "claims.first", &json!({"id": "first"}))
        .unwrap();
    let first = next(&tap, "the first notification", |m| m.routing_key == queue);
    for i in 0..1000 {
        notifier
            .info(&ctx(), "claims.other", &json!({"id": i}))
            .unwrap();
    }
    for _ in 0..1001 {
        seen.recv_timeout(WAIT).expect("a notification handled");
    }
    assert_eq!(tap.publish(&first), 1);
    notifier
        .info(&ctx(), "claims.last", &json!({"id": "last"}))
        .unwrap();
    assert_eq!(
        seen.recv_timeout(WAIT).unwrap(),
        json!("last"),
        "the copy was handled again"
    );
    assert!(seen.recv_timeout(Duration::from_millis(100)).is_err());
    listener.stop();
    listener.wait();
}

/// Transport URL and options: "oslo 18.3.1 options warren does not act on are accepted with a
/// warning"; Production deployment: "one warning each, values still checked".
#[test]
fn oslo_options_warren_does_not_act_on_are_accepted_with_one_warning_each() {
    capture_logs();
    let url = format!(
        "{}?rpc_conn_pool_size=30&kombu_compression=gzip",
        memory_url()
    );
    drop(Transport::new(&url).expect("accepted"));
    for option in ["rpc_conn_pool_size", "kombu_compression"] {
        let lines = warren_lines(&format!("transport option {option} has no effect"));
        assert_eq!(levels(&lines), ["WARN"], "{option}: {lines:?}");
    }
    let bad = Transport::new(&format!("{}?conn_pool_ttl=forever", memory_url()));
    match bad {
        Err(Error::InvalidOption { name, .. }) => assert_eq!(name, "conn_pool_ttl"),
        other => panic!("{other:?}"),
    }
}

/// oslo.messaging compatibility, "Differences": a closed warren transport deletes its reply
/// queue (oslo leaves it to expire); so does dropping its last handle.
#[test]
fn closing_or_dropping_a_transport_deletes_its_reply_queue() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    for close in [true, false] {
        let transport = bus.transport(Codec::MsgPack);
        let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
        let who: String = client.call(&ctx(), "whoami", &()).unwrap();
        assert_eq!(who, "s1");
        let reply_queue = transport.reply_queue_name().expect("a reply queue in use");
        // Neither exclusive nor auto-delete (as oslo declares it): only warren's delete
        // removes it before its `x-expires`.
        let shape = rabbitmqctl_json(&["list_queues", "name", "auto_delete", "exclusive"])
            .into_iter()
            .find(|q| q["name"] == reply_queue.as_str())
            .expect("the reply queue exists");
        assert_eq!(
            (&shape["auto_delete"], &shape["exclusive"]),
            (&json!(false), &json!(false)),
            "{shape}"
        );
        if close {
            transport.close();
        } else {
            drop(client);
            drop(transport);
        }
        eventually("the reply queue is deleted", WAIT, || {
            !queue_exists(&reply_queue)
        });
    }
}

/// Reliability, call: "At most once: the server acks before running it". The call's server
/// remembers no `_unique_id` (`duplicate_window(0)`), so only the ack keeps the request from
/// running again when the server's connections are cut while its handler runs.
#[test]
fn a_call_is_acknowledged_before_it_runs_and_not_run_again_after_a_cut() {
    capture_logs();
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = with_query(&proxy.url(&broker_url()), FAST_RECONNECT);
    let mut bus = Bus::through(&url, &broker_url());
    let gate = Arc::new(Gate::default());
    let (started_tx, started) = crossbeam_channel::unbounded();
    let held = gate.clone();
    let hold = Endpoint::new().method("hold", move |_: &RequestContext, _: NoArgs| {
        let _ = started_tx.send(());
        held.pass();
        Ok::<_, Failure>("held".to_string())
    });
    bus.start_server_with("s1", |b| b.workers(1).duplicate_window(0).endpoint(hold));
    // Declared after the bus: dropped first, so a failing test never leaves a worker waiting.
    let _open = OpenOnDrop(gate.clone());
    let direct = Transport::builder(&broker_url())
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let client =
        RpcClient::new(&direct, Target::new(bus.topic.as_str())).timeout(Duration::from_secs(30));
    let caller = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, String>(&ctx(), "hold", &()))
    };
    started.recv_timeout(WAIT).expect("the handler started");
    eventually(
        "the request is acknowledged while its handler runs",
        WAIT,
        || queue_count(&bus.topic, "messages") == 0,
    );
    proxy.cut_all();
    wait_for_lines(&format!("listener on {} consumes again", bus.topic));
    // (Security, logging levels: a lost connection is a warning.)
    let lost = warren_lines(&format!("listener on {} lost its connection", bus.topic));
    assert_eq!(levels(&lost), ["WARN"], "{lost:?}");
    gate.open();
    assert_eq!(
        caller.join().expect("caller").expect("the call's reply"),
        "held"
    );
    // A redelivered request would reach the only worker before this call.
    let who: String = client.call(&ctx(), "whoami", &()).unwrap();
    assert_eq!(who, "s1");
    assert_eq!(started.try_iter().count(), 0, "the call ran again");
}

/// An endpoint whose `hold` cast reports its `n` on the receiver as it starts, then waits
/// until the gate opens.
fn holding_endpoint() -> (Arc<Gate>, Endpoint, crossbeam_channel::Receiver<u64>) {
    let gate = Arc::new(Gate::default());
    let (started_tx, started) = crossbeam_channel::unbounded();
    let held = gate.clone();
    let hold = Endpoint::new().method("hold", move |_: &RequestContext, args: Value| {
        let _ = started_tx.send(args["n"].as_u64().expect("n"));
        held.pass();
        Ok::<_, Failure>(())
    });
    (gate, hold, started)
}

/// Reliability, call: "the server acks before running it", and only when a worker is free to
/// run it at once. With the only worker busy, requests the listener has received stay
/// unacknowledged (a lost connection would give them back to the broker), and each is
/// acknowledged as the worker takes it.
#[test]
fn requests_no_worker_is_free_for_stay_unacknowledged_until_one_is() {
    let mut bus = Bus::new(&broker_url());
    let (gate, hold, started) = holding_endpoint();
    bus.start_server_with("s1", |b| b.workers(1).endpoint(hold));
    let _open = OpenOnDrop(gate.clone());
    let client = bus.client(Codec::MsgPack);
    for n in 0..3 {
        client.cast(&ctx(), "hold", &json!({ "n": n })).unwrap();
    }
    assert_eq!(started.recv_timeout(WAIT), Ok(0));
    let unacked = || queue_count(&bus.topic, "messages_unacknowledged");
    eventually("the listener holds the other two", WAIT, || {
        unacked() == 2 && queue_count(&bus.topic, "messages_ready") == 0
    });
    // (An ack sent for them would have reached the broker by now.)
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        unacked(),
        2,
        "a request was acknowledged with no worker free for it"
    );
    gate.open();
    assert_eq!(started.recv_timeout(WAIT), Ok(1));
    assert_eq!(started.recv_timeout(WAIT), Ok(2));
    eventually("every request acknowledged", WAIT, || unacked() == 0);
}

/// Running on a cluster: "at most once". A call whose connection dies after the broker took
/// the request but before its confirm arrived is sent again (kombu's `ensure()`), with the same
/// `_unique_id`: the server drops the copy as a duplicate; the call runs once.
#[test]
fn a_call_whose_confirm_is_lost_is_sent_again_and_the_copy_dropped() {
    capture_logs();
    let proxy = Arc::new(Proxy::start("127.0.0.1:5672"));
    let mut bus = Bus::new(&broker_url());
    let runs = Arc::new(AtomicUsize::new(0));
    let (cutter, counter) = (proxy.clone(), runs.clone());
    let method = "cut_before_the_confirm";
    let endpoint = Endpoint::new().method(method, move |_: &RequestContext, _: NoArgs| {
        let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 {
            // The broker has the request; its confirm is held in the proxy: cut the caller's
            // connections before it arrives.
            cutter.delay(Duration::ZERO);
            cutter.cut_all();
        }
        Ok::<_, Failure>(run)
    });
    bus.start_server_with("s1", |b| b.workers(1).endpoint(endpoint));
    let client_url = with_query(&proxy.url(&broker_url()), FAST_RECONNECT);
    let transport = Transport::builder(&client_url)
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()))
        .timeout(Duration::from_secs(30));
    let who: String = client.call(&ctx(), "whoami", &()).unwrap();
    assert_eq!(who, "s1");
    proxy.delay(Duration::from_secs(3));
    // Its reply is usually waiting in the reply queue when the client is back; it is lost
    // when the broker delivered it to the dying connection (replies are consumed without
    // acks, as a reply matters to this process only): a timeout then, never a second run.
    match client.call::<_, usize>(&ctx(), method, &()) {
        Ok(run) => assert_eq!(run, 1),
        Err(Error::Timeout { .. }) => {}
        Err(other) => panic!("the call failed: {other}"),
    }
    let copies: Vec<_> = wait_for_lines(&format!("({method})"))
        .into_iter()
        .filter(|(_, line)| line.contains("ignoring duplicate message"))
        .collect();
    assert_eq!(levels(&copies), ["INFO"], "the copy was sent and dropped");
    let _: String = client.call(&ctx(), "whoami", &()).unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the call ran once");
}

/// Reliability, recovery: "Acks for deliveries of a lost channel are dropped, never sent on the
/// new one: the broker redelivers those messages". Under `AckMode::AfterHandling` a cast's
/// handler finishes after its channel was lost; its delivery tag on the new channel belongs to
/// another message, which that ack would acknowledge before it is handled.
#[test]
fn acks_for_deliveries_of_a_lost_channel_are_dropped_not_sent_on_the_new_one() {
    capture_logs();
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = with_query(&proxy.url(&broker_url()), FAST_RECONNECT);
    let mut bus = Bus::through(&url, &broker_url());
    let gates = [Arc::new(Gate::default()), Arc::new(Gate::default())];
    let (started_tx, started) = crossbeam_channel::unbounded();
    let held = gates.clone();
    let hold = Endpoint::new().method("hold", move |_: &RequestContext, args: Value| {
        let gate = args["gate"].as_u64().expect("a gate") as usize;
        let _ = started_tx.send(gate);
        held[gate].pass();
        Ok::<_, Failure>(())
    });
    bus.start_server_with("s1", |b| {
        b.workers(1)
            .ack_mode(AckMode::AfterHandling { requeue_limit: 3 })
            .endpoint(hold)
    });
    let _open = gates.clone().map(OpenOnDrop);
    let direct = Transport::builder(&broker_url())
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let client = RpcClient::new(&direct, Target::new(bus.topic.as_str()));
    let unacked = || queue_count(&bus.topic, "messages_unacknowledged");
    // Old channel: tag 1 a handled cast, tag 2 the cast held at gate 0.
    client.cast(&ctx(), "record", &json!({})).unwrap();
    bus.expect_events(1, WAIT);
    client.cast(&ctx(), "hold", &json!({"gate": 0})).unwrap();
    assert_eq!(started.recv_timeout(WAIT), Ok(0));
    // The first cast's ack may still be on its way through the proxy (loaded run 5 on
    // `9ad8b72`: cut before it got there, that cast was redelivered too, and two stayed
    // unacknowledged).
    eventually("only the held cast is unacknowledged", WAIT, || {
        unacked() == 1
    });
    proxy.cut_all();
    wait_for_lines(&format!("listener on {} consumes again", bus.topic));
    // New channel: tag 1 the held cast, redelivered; tag 2 the next cast, held at gate 1.
    eventually("the held cast is redelivered", WAIT, || unacked() == 1);
    client.cast(&ctx(), "hold", &json!({"gate": 1})).unwrap();
    eventually("the next cast is delivered", WAIT, || unacked() == 2);
    // The first run ends: its ack (tag 2 of the lost channel) is dropped; its redelivery is
    // recognised as handled; the next cast runs, and stays unacknowledged while it does.
    gates[0].open();
    assert_eq!(started.recv_timeout(WAIT), Ok(1));
    let refused = wait_for_lines("cast hold was handled but its ack failed");
    assert_eq!(levels(&refused), ["WARN"], "{refused:?}");
    eventually("the redelivery is acknowledged", WAIT, || unacked() <= 1);
    // (An ack of the lost channel sent on the new one would have reached the broker by now.)
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        unacked(),
        1,
        "the cast at gate 1 was acknowledged before it was handled"
    );
    gates[1].open();
    eventually("everything handled and acknowledged", WAIT, || {
        queue_count(&bus.topic, "messages") == 0
    });
    assert!(started.try_iter().next().is_none(), "nothing ran twice");
}

/// Features, "Notifications": "ack after handling". While a handler runs, its notification is
/// unacknowledged on the broker; once the handler returns it is acknowledged.
#[test]
fn a_notification_is_acknowledged_only_once_its_handlers_return() {
    let bus = Bus::new(&broker_url());
    let transport = bus.transport(Codec::Json);
    let gate = Arc::new(Gate::default());
    let (started_tx, started) = crossbeam_channel::unbounded();
    let held = gate.clone();
    let endpoint = NotificationEndpoint::new().on(Priority::Info, move |_: &Notification| {
        let _ = started_tx.send(());
        held.pass();
        NotificationResult::Handled
    });
    let listener = NotificationListener::builder(&transport, vec![Target::new(bus.topic.as_str())])
        .endpoint(endpoint)
        .workers(1)
        .build()
        .unwrap();
    listener.start().unwrap();
    let _open = OpenOnDrop(gate.clone());
    let notifier = Notifier::new(&transport, "claims.host-1").topics([bus.topic.as_str()]);
    notifier.info(&ctx(), "claims.held", &json!({})).unwrap();
    started.recv_timeout(WAIT).expect("the handler started");
    let queue = format!("{}.info", bus.topic);
    eventually("unacknowledged while its handler runs", WAIT, || {
        queue_count(&queue, "messages_unacknowledged") == 1
    });
    gate.open();
    eventually("acknowledged once handled", WAIT, || {
        queue_count(&queue, "messages") == 0
    });
    listener.stop();
    listener.wait();
}

/// Reliability, recovery: "A broker resource alarm (`connection.blocked`) is logged once":
/// one warning however many publishes wait, one line when it clears. A private node, whose
/// memory watermark this test may set to 0.
#[test]
fn a_broker_alarm_is_logged_once_and_its_end_once() {
    capture_logs();
    let node = RabbitNode::start("alarm");
    let transport = Transport::new(&node.url()).unwrap();
    let client = RpcClient::new(&transport, Target::new(unique("alarm").as_str()))
        .timeout(Duration::from_millis(700));
    client.cast(&ctx(), "anything", &()).unwrap();
    node.ctl(&["set_vm_memory_high_watermark", "0"]);
    for _ in 0..3 {
        let blocked = client.cast(&ctx(), "anything", &());
        assert!(matches!(blocked, Err(Error::Timeout { .. })), "{blocked:?}");
    }
    let blocked = "the broker blocked the send connection";
    wait_for_lines(blocked);
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    client
        .prepare()
        .timeout(Duration::from_secs(10))
        .cast(&ctx(), "anything", &())
        .unwrap();
    let unblocked = wait_for_lines("the broker unblocked the send connection");
    assert_eq!(levels(&warren_lines(blocked)), ["WARN"]);
    assert_eq!(levels(&unblocked), ["INFO"]);
    transport.close();
}

/// Features, "Clean shutdown": "after `wait()` no thread, consumer, channel or connection of
/// the server remains" (threads: `lifecycle`). The server's connections go through a proxy,
/// which counts them; its transport's send connection (replies) is the transport's, not the
/// server's, and closes with the transport.
#[test]
fn after_wait_no_consumer_or_connection_of_the_server_remains() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.s1", bus.topic));
    let server_transport = Transport::builder(&proxy.url(&broker_url()))
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let echo = Endpoint::new().method("echo", |_: &RequestContext, v: Value| Ok::<_, Failure>(v));
    let server = RpcServer::builder(
        &server_transport,
        Target::new(bus.topic.as_str()).with_server("s1"),
    )
    .endpoint(echo)
    .workers(2)
    .build()
    .unwrap();
    server.start().unwrap();
    let client = bus.client(Codec::MsgPack);
    let echoed: Value = client.call(&ctx(), "echo", &json!({"n": 1})).unwrap();
    assert_eq!(echoed, json!({"n": 1}));
    assert_eq!(
        proxy.open_connections(),
        2,
        "the server's listen connection and its transport's send connection"
    );
    assert_eq!(consumers_with_prefix(&bus.topic).len(), 3);
    server.stop();
    server.wait();
    eventually("the listen connection is closed", WAIT, || {
        proxy.open_connections() == 1
    });
    assert_eq!(consumers_with_prefix(&bus.topic), Vec::<String>::new());
    server_transport.close();
    eventually("the send connection is closed", WAIT, || {
        proxy.open_connections() == 0
    });
}

/// Features, "Runs as a service" and Running as a service: `Launcher` drains on SIGINT as on
/// SIGTERM (`launcher` sends SIGTERM to the example agents) and removes its ready file;
/// `Drained` is exit code 0, `DrainTimedOut` and `Forced` 1; after `run` the handlers stay
/// installed (a second SIGINT does not end the process). The signals go to a child process
/// running this test alone (`SIGINT_READY` set), so that this test binary still stops on
/// Ctrl-C.
#[test]
fn a_launcher_drains_on_sigint_and_maps_outcomes_to_exit_codes() {
    const NAME: &str = "a_launcher_drains_on_sigint_and_maps_outcomes_to_exit_codes";
    const SIGINT_READY: &str = "WARREN_CLAIMS_SIGINT_READY";
    if let Ok(ready_file) = std::env::var(SIGINT_READY) {
        let bus = Bus::new(&memory_url());
        let transport = bus.transport(Codec::MsgPack);
        let ping = Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| {
            Ok::<_, Failure>("pong")
        });
        let server = RpcServer::builder(
            &transport,
            Target::new(bus.topic.as_str()).with_server("s1"),
        )
        .endpoint(ping)
        .build()
        .unwrap();
        let outcome = Launcher::new()
            .service(server)
            .transport(&transport)
            .ready_file(&ready_file)
            .run()
            .expect("run");
        assert_eq!(outcome, Shutdown::Drained);
        assert_eq!(outcome.exit_code(), 0);
        assert_eq!(Shutdown::DrainTimedOut.exit_code(), 1);
        assert_eq!(Shutdown::Forced.exit_code(), 1);
        // The handlers stay installed: another SIGINT does not end this process.
        let status = Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        thread::sleep(Duration::from_millis(300));
        return;
    }
    let ready = std::env::temp_dir().join(unique("sigint_ready"));
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", NAME, "--nocapture"])
        .env(SIGINT_READY, &ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child runs");
    eventually("the child's launcher is ready", WAIT, || ready.exists());
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the launcher did not stop on SIGINT");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        pipe.read_to_string(&mut output)
            .expect("the child's output");
    }
    assert!(
        status.success() && output.contains("1 passed"),
        "{status}: {output}"
    );
    assert!(!ready.exists(), "the ready file is removed at shutdown");
}

/// Observability: every event is reported "on the thread that did it": a request's on the
/// server's worker, a call's and a cast's on the caller's thread.
#[test]
fn observer_events_come_on_the_thread_that_did_it() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let transport = Transport::builder(&memory_url())
        .observer(Arc::new(move |event: &Event<'_>| {
            let kind = match event {
                Event::RequestStarted { .. } => "request started",
                Event::RequestFinished { .. } => "request finished",
                Event::CallFinished { .. } => "call finished",
                Event::CastSent { .. } => "cast sent",
                _ => return,
            };
            let current = thread::current();
            let _ = tx.send((kind, current.id(), current.name().map(str::to_string)));
        }))
        .build()
        .unwrap();
    let topic = unique("observed");
    let ping = Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| {
        Ok::<_, Failure>("pong")
    });
    let server = RpcServer::builder(&transport, Target::new(topic.as_str()).with_server("s1"))
        .endpoint(ping)
        .workers(1)
        .build()
        .unwrap();
    server.start().unwrap();
    let client = RpcClient::new(&transport, Target::new(topic.as_str()));
    let _: String = client.call(&ctx(), "ping", &()).unwrap();
    client.cast(&ctx(), "ping", &()).unwrap();
    let events: Vec<_> = (0..6)
        .map(|_| rx.recv_timeout(WAIT).expect("six events"))
        .collect();
    server.stop();
    server.wait();
    let caller = thread::current().id();
    for (kind, id, name) in &events {
        if kind.starts_with("request") {
            assert!(
                name.as_deref()
                    .is_some_and(|n| n.starts_with("warren-worker")),
                "{kind} on {name:?}"
            );
        } else {
            assert_eq!(*id, caller, "{kind} on {name:?}");
        }
    }
    let mut kinds: Vec<&str> = events.iter().map(|(kind, ..)| *kind).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "call finished",
            "cast sent",
            "request finished",
            "request finished",
            "request started",
            "request started"
        ]
    );
}

/// Production deployment, `use_queue_manager`: a fanout queue named by the queue manager
/// (`<topic>_fanout_<hostname>:<processname>:<n>`) is kept when its server stops, as oslo keeps
/// it (without the queue manager it is deleted: `rpc_rabbit`).
#[test]
fn queue_manager_fanout_queues_are_kept_when_a_server_stops() {
    /// Removes the queue manager's counter file, whatever the test's outcome.
    struct CounterFile(String);
    impl Drop for CounterFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let mut bus = Bus::new(&broker_url());
    let process = unique("proc");
    let _counter = CounterFile(format!("/dev/shm/claims_{process}_qmanager"));
    let url = with_query(
        &broker_url(),
        &format!("use_queue_manager=true&hostname=claims&processname={process}"),
    );
    let transport = Transport::builder(&url)
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let server = RpcServer::builder(
        &transport,
        Target::new(bus.topic.as_str()).with_server("s1"),
    )
    .build()
    .unwrap();
    server.start().unwrap();
    let fanout = format!("{}_fanout_claims:{process}:1", bus.topic);
    bus.track_queue(fanout.as_str());
    bus.track_queue(format!("{}.s1", bus.topic));
    assert!(queue_exists(&fanout), "the queue manager's name");
    server.stop();
    server.wait();
    assert!(queue_exists(&fanout), "kept after the server stopped");
}

/// Production deployment: "A server that is already running keeps retrying them [refused
/// logins, virtual hosts, certificates] in the background, with its backoff". The server's
/// virtual host is deleted under it (the broker closes its connections, and refuses them
/// while the vhost is missing) and created again: the server consumes again and serves.
#[test]
fn a_running_server_keeps_retrying_a_refused_virtual_host_until_it_is_back() {
    struct Vhost(String);
    impl Vhost {
        fn create(&self) {
            rabbitmqctl(&["add_vhost", &self.0]);
            rabbitmqctl(&["set_permissions", "-p", &self.0, "guest", ".*", ".*", ".*"]);
        }
    }
    impl Drop for Vhost {
        fn drop(&mut self) {
            rabbitmqctl_cleanup(&["delete_vhost", &self.0]);
        }
    }
    capture_logs();
    let vhost = Vhost(unique("vhost"));
    vhost.create();
    let url = with_query(&broker_in_vhost(&vhost.0), FAST_RECONNECT);
    let mut bus = Bus::new(&url);
    bus.start_server("s1", 1);
    // Casts only: the server sends nothing, so its transport's send connection plays no part
    // (closing a transport while it reconnects is
    // `closing_a_transport_while_its_send_connection_reconnects_returns`).
    let served = |n: i64| {
        bus.client(Codec::MsgPack)
            .cast(&ctx(), "record", &json!({"n": n}))
            .unwrap();
        assert_eq!(bus.expect_events(1, WAIT)[0].value, json!({"n": n}));
    };
    served(1);
    rabbitmqctl(&["delete_vhost", &vhost.0]);
    let server = bus.server("s1");
    eventually("the server lost its vhost", WAIT, || !server.is_consuming());
    // Refused again and again (the second refusal onwards logs at debug), not given up.
    let refusals = || {
        warren_lines(&vhost.0)
            .into_iter()
            .filter(|(_, line)| line.contains("(listen)") && line.contains("unreachable"))
            .count()
    };
    eventually("the server was refused three times", WAIT, || {
        refusals() >= 3
    });
    vhost.create();
    eventually("the server consumes again", WAIT, || server.is_consuming());
    served(2);
}

/// `1` inside `levels` nested arrays.
fn nested(levels: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..levels {
        value = json!([value]);
    }
    value
}

/// Security, limits: "nesting of arrays and maps", both codecs. Counted from the message's own
/// map, 127 levels are read and 128 are not: such a message is unreadable, rejected and logged
/// at `warn` with its routing key (so a call gets no reply), except in the arguments of a JSON
/// request, where the caller gets a `TypeError` naming the argument. The handler never runs.
#[test]
fn nesting_beyond_127_levels_is_refused_in_both_codecs() {
    capture_logs();
    for codec in [Codec::Json, Codec::MsgPack] {
        let mut bus = Bus::new(&memory_url());
        bus.start_server("s1", 1);
        let client = bus.client(codec);
        let rejected = || {
            warren_lines(&bus.topic)
                .into_iter()
                .filter(|(_, line)| line.contains("unreadable"))
                .map(|(level, _)| level)
                .collect::<Vec<_>>()
        };
        // The message map, `args` and 125 arrays: 127 levels.
        let args = json!({ "x": nested(125) });
        let echoed: Value = client.call(&ctx(), "echo", &args).unwrap();
        assert_eq!(echoed, args, "{codec}");
        let too_deep = client
            .clone()
            .timeout(Duration::from_secs(1))
            .call::<_, Value>(&ctx(), "echo", &json!({ "x": nested(126) }));
        match (codec, too_deep) {
            (Codec::Json, Err(Error::Remote { class, message, .. })) => {
                assert_eq!(class, "TypeError", "{message}");
                assert!(message.contains("argument `x"), "{message}");
                assert_eq!(rejected(), Vec::<String>::new());
            }
            (Codec::MsgPack, Err(Error::Timeout { .. })) => assert_eq!(rejected(), ["WARN"]),
            (_, other) => panic!("{codec}: {other:?}"),
        }
        // The message map and 126 arrays in a context value (`_context_deep`): 127 levels.
        let deep = |levels| RequestContext::new().with("deep", nested(levels));
        for (levels, n) in [(126, json!(126)), (127, json!(127)), (0, json!("after"))] {
            client
                .cast(&deep(levels), "record", &json!({ "n": n }))
                .unwrap();
        }
        let handled: Vec<Value> = bus
            .expect_events(2, WAIT)
            .into_iter()
            .map(|e| e.value["n"].clone())
            .collect();
        assert_eq!(handled, [json!(126), json!("after")], "{codec}");
        bus.expect_quiet(Duration::from_millis(100));
        let expected = if codec == Codec::Json { 1 } else { 2 };
        assert_eq!(rejected(), vec!["WARN"; expected], "{codec}");
    }
}

/// How it works: the reply thread consumes the transport's reply queue "without acks"; a
/// server's queues are consumed with acks (manual acknowledgement).
#[test]
fn the_reply_queue_is_consumed_without_acks_and_server_queues_with_acks() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let _: String = client.call(&ctx(), "whoami", &()).unwrap();
    let reply_queue = transport.reply_queue_name().expect("a reply queue in use");
    let consumers = rabbitmqctl_json(&["list_consumers", "queue_name", "ack_required"]);
    let ack_required = |queue: &str| -> Vec<Value> {
        consumers
            .iter()
            .filter(|c| c["queue_name"] == queue)
            .map(|c| c["ack_required"].clone())
            .collect()
    };
    assert_eq!(ack_required(&reply_queue), [json!(false)]);
    for queue in [bus.topic.clone(), format!("{}.s1", bus.topic)] {
        assert_eq!(ack_required(&queue), [json!(true)], "{queue}");
    }
}

/// Production deployment: "Queues are never deleted `if_unused` (RabbitMQ closes the
/// connection with 540 for quorum queues)": with `rabbit_transient_quorum_queue` a server's
/// fanout queue is a quorum queue, and its server deletes it when it stops. In a virtual host of
/// its own (quorum queues are durable).
#[test]
fn a_quorum_fanout_queue_is_deleted_when_its_server_stops() {
    struct Vhost(String);
    impl Drop for Vhost {
        fn drop(&mut self) {
            rabbitmqctl_cleanup(&["delete_vhost", &self.0]);
        }
    }
    let vhost = Vhost(unique("vhost"));
    rabbitmqctl(&["add_vhost", &vhost.0]);
    rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"]);
    let url = with_query(
        &broker_in_vhost(&vhost.0),
        "rabbit_transient_quorum_queue=true",
    );
    let topic = unique("topic");
    let fanout_queues = || -> Vec<(String, String)> {
        let output = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "-p", &vhost.0, "--no-table-headers"])
            .args(["name", "type"])
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(name, _)| name.starts_with(&format!("{topic}_fanout")))
            .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
            .collect()
    };
    let transport = Transport::new(&url).unwrap();
    let server = RpcServer::builder(&transport, Target::new(topic.as_str()).with_server("s1"))
        .build()
        .unwrap();
    server.start().unwrap();
    let declared = fanout_queues();
    assert_eq!(declared.len(), 1, "{declared:?}");
    assert_eq!(declared[0].1, "quorum", "{declared:?}");
    server.stop();
    server.wait();
    assert_eq!(fanout_queues(), Vec::new(), "deleted, not refused");
    transport.close();
}

/// Security, "hold the workers": at most 1,024 replies per server wait for reply queues that do
/// not exist; further ones are dropped with a warning.
#[test]
fn at_most_1024_replies_wait_for_missing_reply_queues() {
    capture_logs();
    let mut bus = Bus::new(&memory_url());
    bus.start_server("s1", 4);
    let tap = tap(&bus);
    let client = bus.client(Codec::Json);
    let _: String = client.call(&ctx(), "whoami", &()).expect("a first call");
    let request = next(&tap, "the first request", |m| {
        m.routing_key == bus.topic && m.field("method").as_deref() == Some("whoami")
    });
    let field = |name: &str| request.field(name).expect(name);
    let (reply_q, msg_id, unique_id) = (field("_reply_q"), field("_msg_id"), field("_unique_id"));
    let missing = unique("gone_reply");
    let sent = 1_100;
    for n in 0..sent {
        let copy = replaced(&request, &reply_q, &format!("{missing}_{n}"));
        let copy = replaced(&copy, &msg_id, &format!("m{n}"));
        let copy = replaced(&copy, &unique_id, &unique("u"));
        assert_eq!(tap.publish(&copy), 1, "the request reached the topic queue");
    }
    let dropped = || {
        warren_lines("replies already wait for their reply queue")
            .iter()
            .filter(|(_, line)| line.contains(&missing))
            .count()
    };
    // At most 1,024 wait: the rest are dropped (more may be, while the retry thread is busy
    // with a round and its hand-off is full), and not all of them are.
    eventually("the replies over 1,024 dropped", WAIT, || {
        dropped() >= sent - 1_024
    });
    assert!(
        dropped() < sent,
        "replies wait for their queue rather than all dropped"
    );
}

/// Reliability, "Clean shutdown": closing a transport while its send connection is being
/// re-established (the broker refuses it) returns promptly; the heartbeat thread's reconnect
/// is interrupted, not waited for.
#[test]
fn closing_a_transport_while_its_send_connection_reconnects_returns() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = with_query(&proxy.url(&broker_url()), FAST_RECONNECT);
    let transport = Transport::new(&url).expect("transport");
    RpcClient::new(&transport, Target::new(unique("nobody")))
        .cast(&ctx(), "ping", &json!({}))
        .expect("a cast opens the send connection");
    let before = proxy.attempts();
    proxy.refuse(true);
    proxy.cut_all();
    eventually("the heartbeat thread trying to reconnect", WAIT, || {
        proxy.attempts().len() > before.len()
    });
    let (closed_tx, closed) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        transport.close();
        drop(transport);
        let _ = closed_tx.send(());
    });
    closed
        .recv_timeout(WAIT)
        .expect("close() returned while the send connection was reconnecting");
}

/// Options table, `executor_thread_pool_size`: a server built without `workers(..)` runs as
/// many handlers at once as the URL says, and no more.
#[test]
fn the_url_sets_how_many_handlers_a_server_runs_at_once() {
    let mut bus = Bus::new(&with_query(&memory_url(), "executor_thread_pool_size=3"));
    let (gate, hold, started) = holding_endpoint();
    bus.start_server_with("s1", |b| b.endpoint(hold));
    let _open = OpenOnDrop(gate.clone());
    let client = bus.client(Codec::MsgPack);
    for n in 0..5 {
        client.cast(&ctx(), "hold", &json!({ "n": n })).unwrap();
    }
    for _ in 0..3 {
        started
            .recv_timeout(WAIT)
            .expect("three handlers run at once");
    }
    // A fourth worker would have taken the fourth cast by now (the default is 16).
    assert_eq!(
        started.recv_timeout(Duration::from_millis(300)),
        Err(crossbeam_channel::RecvTimeoutError::Timeout),
        "a fourth handler ran"
    );
    gate.open();
    for _ in 0..2 {
        started
            .recv_timeout(WAIT)
            .expect("the other two once workers are free");
    }
}

/// Options table, `rabbit_qos_prefetch_count`: the broker gets the URL's value as each
/// consumer's prefetch, 0 (unbounded, in AMQP) included; unset, 64.
#[test]
fn the_broker_gets_the_prefetch_count_of_the_url() {
    let mut unbounded = Bus::new(&with_query(&broker_url(), "rabbit_qos_prefetch_count=0"));
    unbounded.start_server("s1", 1);
    let mut default = Bus::new(&broker_url());
    default.start_server("s1", 1);
    let prefetch = |queue: &str| -> Vec<u64> {
        rabbitmqctl_json(&["list_consumers", "queue_name", "prefetch_count"])
            .iter()
            .filter(|c| c["queue_name"] == queue)
            .filter_map(|c| c["prefetch_count"].as_u64())
            .collect()
    };
    assert_eq!(prefetch(&unbounded.topic), [0]);
    assert_eq!(prefetch(&default.topic), [64]);
}

/// Options table, `amqp_auto_delete`: the topic exchange and the server's queues are declared
/// auto-delete, and the broker deletes them once the last server of the topic left.
#[test]
fn auto_delete_queues_and_their_exchange_go_with_the_last_server() {
    let mut bus = Bus::new(&with_query(&broker_url(), "amqp_auto_delete=true"));
    bus.start_server("s1", 1);
    let server_queue = format!("{}.s1", bus.topic);
    let auto_delete = |queue: &str| -> Option<bool> {
        rabbitmqctl_json(&["list_queues", "name", "auto_delete"])
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| q["auto_delete"].as_bool())
    };
    let exchange = || -> Option<bool> {
        rabbitmqctl_json(&["list_exchanges", "name", "auto_delete"])
            .iter()
            .find(|e| e["name"] == bus.exchange.as_str())
            .and_then(|e| e["auto_delete"].as_bool())
    };
    assert_eq!(auto_delete(&bus.topic), Some(true));
    assert_eq!(auto_delete(&server_queue), Some(true));
    assert_eq!(exchange(), Some(true));
    let server = bus.server("s1");
    server.stop();
    server.wait();
    eventually("the broker deleted them", WAIT, || {
        auto_delete(&bus.topic).is_none()
            && auto_delete(&server_queue).is_none()
            && exchange().is_none()
    });
}

/// Failures that retrying cannot fix end `start()` after one pass over the hosts: a server
/// (`retry` unset) whose login is refused fails to start with `Error::Authentication` after
/// one attempt, where an unreachable broker lets it start and consume once one is reachable.
#[test]
fn a_refused_login_fails_a_servers_start_after_one_attempt() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = proxy.url("amqp://guest:Wrong-Pw-Qx@127.0.0.1:5672/");
    let transport = Transport::new(&url).unwrap();
    let server = RpcServer::builder(
        &transport,
        Target::new(unique("refused").as_str()).with_server("s1"),
    )
    .endpoint(Endpoint::new())
    .build()
    .unwrap();
    let started = server.start();
    assert!(
        matches!(started, Err(Error::Authentication { .. })),
        "{started:?}"
    );
    assert_eq!(proxy.attempts().len(), 1, "one pass over the one host");
    assert!(!format!("{started:?}").contains("Wrong-Pw-Qx"));
}

/// How it works: where the deliveries handed over together "are exactly those outstanding up
/// to the newest, and the poll thread has read every delivery up to it", one `basic.ack`
/// (`multiple`) acknowledges them. A channel numbers the deliveries of a server's three
/// consumers together; with a backlog on two of its queues and many idle workers the thread
/// reads one consumer's receiver ahead of the other's, and a `multiple` ack over a delivery it
/// had not read yet makes that delivery's own ack unknown to the broker, which closes the
/// channel (`PRECONDITION_FAILED`): the listener loses its connection and reconnects, and what
/// such an ack covered that the thread had not handed over yet is lost with the channel (the
/// rule before this test: six lost channels among 4,000 casts, or casts never handled).
#[test]
fn a_backlog_on_two_queues_of_one_server_is_acknowledged_without_losing_the_channel() {
    const CASTS: usize = 4000;
    capture_logs_at(log::LevelFilter::Warn);
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.s1", bus.topic));
    let (observer, lost) = counting_lost_connections(Some(ConnectionRole::Listen));
    let transport = Transport::builder(&bus.url)
        .control_exchange(bus.exchange.as_str())
        .observer(observer)
        .build()
        .unwrap();
    let (done_tx, done) = crossbeam_channel::unbounded();
    let server = |workers| {
        let done_tx = done_tx.clone();
        let record = Endpoint::new().method("record", move |_: &RequestContext, args: Value| {
            let _ = done_tx.send(args["n"].as_u64());
            Ok::<_, Failure>(())
        });
        let target = Target::new(bus.topic.as_str()).with_server("s1");
        let server = RpcServer::builder(&transport, target)
            .endpoint(record)
            .workers(workers)
            .build()
            .unwrap();
        server.start().unwrap();
        server
    };
    // The first server declares the queues, which outlive it.
    let declaring = server(1);
    declaring.stop();
    declaring.wait();
    drop(declaring);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let to_s1 = client.prepare().server("s1");
    for n in 0..CASTS {
        let to = if n % 2 == 0 { &client } else { &to_s1 };
        to.cast(&ctx(), "record", &json!({ "n": n })).unwrap();
    }
    let serving = server(64);
    let mut handled = vec![0; CASTS];
    for _ in 0..CASTS {
        let n = done
            .recv_timeout(Duration::from_secs(60))
            .expect("every cast handled (none acknowledged unread, then lost with its channel)");
        handled[n
            .and_then(|n| usize::try_from(n).ok())
            .expect("a cast's number")] += 1;
    }
    serving.stop();
    serving.wait();
    assert_eq!(
        lost.load(Ordering::SeqCst),
        0,
        "the listener lost its channel: {:?}",
        warren_lines("lost its connection")
    );
    let not_once: Vec<usize> = (0..CASTS).filter(|n| handled[*n] != 1).collect();
    assert!(not_once.is_empty(), "not handled once: {not_once:?}");
}
