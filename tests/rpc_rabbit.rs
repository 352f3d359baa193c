//! The shared RPC scenarios against the real broker (`WARREN_TEST_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/`), plus what only a broker can show: the declared
//! topology, malformed messages, consumers after shutdown, refused declarations, unreachable
//! brokers.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Publish};
use common::{
    broker_url, consumers_with_prefix, counting_lost_connections, ctx, eventually, queue_count,
    rabbitmqctl_json, Bus,
};
use serde_json::{json, Value};
use warren::{Codec, Error, RequestContext, RpcClient, RpcServer, Target, Transport};

scenario_tests!(common::broker_url());

/// Replaces this test's names by the ones of the oslo capture.
fn normalize(name: &str, bus: &Bus) -> String {
    let name = name
        .replace(&bus.exchange, "openstack")
        .replace(&bus.topic, "oslo_wire_topic");
    let name = name.replace("oslo_wire_topic.s1", "oslo_wire_topic.oslo_wire_server");
    match name.find("_fanout_") {
        Some(i) => format!("{}_fanout_<uuid>", &name[..i]),
        None if name.starts_with("reply_") => "reply_<uuid>".into(),
        None => name,
    }
}

fn fixture_snapshot(name: &str) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/oslo-wire/topology.json"
    ))
    .unwrap();
    let topology: Value = serde_json::from_str(&text).unwrap();
    topology["snapshots"][name].clone()
}

/// Queues as (name, durable, auto_delete, exclusive, arguments) with normalized names.
fn queue_shapes(
    queues: &[Value],
    keep: impl Fn(&str) -> bool,
    bus: Option<&Bus>,
) -> BTreeSet<String> {
    queues
        .iter()
        .filter(|q| keep(q["name"].as_str().unwrap_or_default()))
        .map(|q| {
            let name = q["name"].as_str().unwrap_or_default();
            let name = bus.map_or_else(|| normalize_fixture(name), |b| normalize(name, b));
            let mut args: Vec<String> = match &q["arguments"] {
                // rabbitmqctl: [["x-expires", "signedint", 1800000]]; fixture: {"x-expires": {"type", "value"}}
                Value::Array(entries) => entries
                    .iter()
                    .map(|e| format!("{}:{}={}", e[0], e[1], e[2]))
                    .collect(),
                Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| format!("\"{k}\":{}={}", v["type"], v["value"]))
                    .collect(),
                _ => vec![],
            };
            args.sort();
            format!(
                "{name} durable={} auto_delete={} exclusive={} args={args:?}",
                q["durable"], q["auto_delete"], q["exclusive"]
            )
        })
        .collect()
}

fn normalize_fixture(name: &str) -> String {
    match name.find("_fanout_") {
        Some(i) => format!("{}_fanout_<uuid>", &name[..i]),
        None if name.starts_with("reply_") => "reply_<uuid>".into(),
        None => name.to_string(),
    }
}

fn exchange_shapes(exchanges: &[Value], names: &[(&str, String)]) -> BTreeSet<String> {
    exchanges
        .iter()
        .filter_map(|e| {
            let name = e["name"].as_str()?;
            let (label, _) = names.iter().find(|(_, n)| n == name)?;
            Some(format!(
                "{label} type={} durable={} auto_delete={}",
                e["type"], e["durable"], e["auto_delete"]
            ))
        })
        .collect()
}

#[test]
fn topology_matches_the_oslo_capture() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let transport = bus.transport(Codec::Json);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let _: String = client.call(&RequestContext::new(), "whoami", &()).unwrap();
    // The broker is shared with tests running in parallel: look at this test's names only
    // (its unique topic, and the reply queue of its own client's transport).
    let reply_q = transport.reply_queue_name().expect("reply queue in use");
    let ours_by_name = |name: &str| name.starts_with(&bus.topic) || name == reply_q;

    let expected = fixture_snapshot("rpc_server_and_client_after_one_call");
    let expected_queues = queue_shapes(expected["queues"].as_array().unwrap(), |_| true, None);
    let queues = rabbitmqctl_json(&[
        "list_queues",
        "name",
        "durable",
        "auto_delete",
        "exclusive",
        "arguments",
    ]);
    let ours = queue_shapes(&queues, ours_by_name, Some(&bus));
    assert_eq!(ours, expected_queues);

    let exchanges = rabbitmqctl_json(&["list_exchanges", "name", "type", "durable", "auto_delete"]);
    let names = [
        ("control", bus.exchange.clone()),
        ("fanout", format!("{}_fanout", bus.topic)),
    ];
    let fixture_names = [
        ("control", "openstack".to_string()),
        ("fanout", "oslo_wire_topic_fanout".to_string()),
    ];
    assert_eq!(
        exchange_shapes(&exchanges, &names),
        exchange_shapes(expected["exchanges"].as_array().unwrap(), &fixture_names)
    );

    let bindings = rabbitmqctl_json(&[
        "list_bindings",
        "source_name",
        "destination_name",
        "routing_key",
    ]);
    let shape = |b: &Value, bus: Option<&Bus>| {
        let n = |v: &Value| {
            let s = v.as_str().unwrap_or_default();
            bus.map_or_else(|| normalize_fixture(s), |b| normalize(s, b))
        };
        format!(
            "{} -> {} ({})",
            n(&b["source_name"]),
            n(&b["destination_name"]),
            n(&b["routing_key"])
        )
    };
    let ours: BTreeSet<String> = bindings
        .iter()
        .filter(|b| {
            b["source_name"] != ""
                && ours_by_name(b["destination_name"].as_str().unwrap_or_default())
        })
        .map(|b| shape(b, Some(&bus)))
        .collect();
    let expected_bindings: BTreeSet<String> = expected["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["source_name"] != "")
        .map(|b| shape(b, None))
        .collect();
    assert_eq!(ours, expected_bindings);

    let consumers =
        rabbitmqctl_json(&["list_consumers", "queue_name", "ack_required", "arguments"]);
    let ours: BTreeSet<String> = consumers
        .iter()
        // The server's consumers (the capture has no consumers of the client's reply queue).
        .filter(|c| {
            c["queue_name"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&bus.topic)
        })
        .map(|c| {
            format!(
                "{} ack={}",
                normalize(c["queue_name"].as_str().unwrap_or_default(), &bus),
                c["ack_required"]
            )
        })
        .collect();
    assert_eq!(
        ours,
        BTreeSet::from([
            "oslo_wire_topic ack=true".to_string(),
            "oslo_wire_topic.oslo_wire_server ack=true".to_string(),
            "oslo_wire_topic_fanout_<uuid> ack=true".to_string(),
        ])
    );
}

/// Publishes raw bytes to the server's topic queue, as a broken or foreign peer would.
fn publish_raw(bus: &Bus, body: &[u8], content_type: Option<&str>) {
    let mut connection = amiquip::Connection::insecure_open(&bus.url).unwrap();
    let channel = connection.open_channel(None).unwrap();
    let mut properties = AmqpProperties::default();
    if let Some(ct) = content_type {
        properties = properties.with_content_type(ct.to_string());
    }
    channel
        .basic_publish(
            bus.exchange.as_str(),
            Publish::with_properties(body, bus.topic.as_str(), properties),
        )
        .unwrap();
    connection.close().unwrap();
}

#[test]
fn malformed_messages_are_rejected_and_valid_ones_around_them_served() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 2);
    let client = bus.client(Codec::Json);
    let ctx = RequestContext::new();
    let valid_request = br#"{"oslo.version": "2.0", "oslo.message": "{\"method\": \"record\", \"args\": {\"raw\": 1}, \"_unique_id\": \"00000000000000000000000000000001\"}"}"#;
    let malformed: Vec<(&[u8], Option<&str>)> = vec![
        (b"\xff\xfe\x00garbage", Some("application/json")),
        (valid_request, Some("text/plain")),
        (valid_request, None),
        (
            br#"{"oslo.version": "2.1", "oslo.message": "{\"method\": \"record\", \"args\": {}}"}"#,
            Some("application/json"),
        ),
        (br#"[1, 2, 3]"#, Some("application/json")),
        (
            br#"{"oslo.version": "2.0", "oslo.message": "{\"args\": {}}"}"#,
            Some("application/json"),
        ),
        (b"\xc1\xc1\xc1", Some("application/msgpack")),
    ];
    let mut sent = 0;
    for (body, content_type) in &malformed {
        client.cast(&ctx, "record", &json!({"i": sent})).unwrap();
        sent += 1;
        publish_raw(&bus, body, *content_type);
    }
    // A bare (envelope-less, oslo 1.0) JSON message is still valid.
    publish_raw(
        &bus,
        br#"{"method": "record", "args": {"i": "bare"}}"#,
        Some("application/json"),
    );
    client.cast(&ctx, "record", &json!({"i": sent})).unwrap();
    sent += 1;

    let events = bus.expect_events(sent + 1, Duration::from_secs(10));
    let mut seen: Vec<String> = events.iter().map(|e| e.value["i"].to_string()).collect();
    seen.sort();
    let mut expected: Vec<String> = (0..sent).map(|i| i.to_string()).collect();
    expected.push("\"bare\"".into());
    expected.sort();
    assert_eq!(seen, expected);
    bus.expect_quiet(Duration::from_millis(300));
    // Rejected without requeue: nothing is left in the queue to be redelivered.
    eventually("the topic queue is empty", Duration::from_secs(10), || {
        queue_count(&bus.topic, "messages") == 0
    });
    let sum: i64 = client.call(&ctx, "add", &json!({"a": 1, "b": 1})).unwrap();
    assert_eq!(sum, 2, "the server still serves");
}

#[test]
fn stop_and_wait_leave_no_consumers_and_delete_the_fanout_queue() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 2);
    eventually("3 consumers", Duration::from_secs(10), || {
        consumers_with_prefix(&bus.topic).len() == 3
    });
    let server = bus.server("s1");
    server.stop();
    server.wait();
    assert_eq!(consumers_with_prefix(&bus.topic), Vec::<String>::new());
    let queues = rabbitmqctl_json(&["list_queues", "name"]);
    let fanout_prefix = format!("{}_fanout_", bus.topic);
    assert!(
        !queues.iter().any(|q| q["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&fanout_prefix)),
        "fanout queue deleted"
    );
    // The shared topic queues stay, as oslo leaves them.
    assert!(queues.iter().any(|q| q["name"] == bus.topic.as_str()));
}

/// A fanout exchange is auto-delete: it goes with the last server's fanout queue. A client
/// that declared it before casts to it again afterwards: the cast is not an error, the send
/// connection is not dropped for it (the broker closes only the channel), and the next
/// server of the topic gets the fanout casts sent after it started.
#[test]
fn a_fanout_cast_after_the_last_server_left_neither_fails_nor_drops_the_connection() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let (observer, lost) = counting_lost_connections(None);
    let transport = Transport::builder(&bus.url)
        .control_exchange(bus.exchange.as_str())
        .observer(observer)
        .build()
        .unwrap();
    let fanout = RpcClient::new(&transport, Target::new(bus.topic.as_str())).fanout(true);
    for unconfirmed in [false, true] {
        let client = fanout.clone().confirm(!unconfirmed);
        client.cast(&ctx(), "record", &json!({"n": 1})).unwrap();
    }
    bus.expect_events(2, Duration::from_secs(10));
    let server = bus.server("s1");
    server.stop();
    server.wait();
    let fanout_exchange = format!("{}_fanout", bus.topic);
    let fanout_exchange_exists = || {
        rabbitmqctl_json(&["list_exchanges", "name"])
            .iter()
            .any(|e| e["name"] == fanout_exchange.as_str())
    };
    assert!(!fanout_exchange_exists(), "it went with the last queue");
    // Unconfirmed first: the broker closes that channel while it sits in the pool, and the
    // last cast must not pick it up again.
    for unconfirmed in [true, false, true] {
        let client = fanout.clone().confirm(!unconfirmed);
        client
            .cast(&ctx(), "record", &json!({"n": 2}))
            .unwrap_or_else(|e| panic!("fanout cast to nobody (unconfirmed: {unconfirmed}): {e}"));
    }
    // Declared again by the client (with no binding since, the auto-delete exchange stays): no
    // server has started since s1 left.
    assert!(
        fanout_exchange_exists(),
        "{fanout_exchange} not declared again"
    );
    bus.start_server("s2", 1);
    fanout.cast(&ctx(), "record", &json!({"n": 3})).unwrap();
    let got = bus.expect_events(1, Duration::from_secs(10));
    assert_eq!(got[0].value, json!({"n": 3}), "{got:?}");
    assert_eq!(
        lost.load(Ordering::SeqCst),
        0,
        "the send connection was dropped"
    );
}

#[test]
fn mismatched_declarations_are_refused_with_406() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let durable = Transport::builder(&bus.url)
        .control_exchange(bus.exchange.as_str())
        .durable_queues(true)
        .build()
        .unwrap();
    let server = RpcServer::builder(&durable, Target::new(bus.topic.as_str()).with_server("s2"))
        .build()
        .unwrap();
    match server.start() {
        Err(Error::Refused { code, text }) => {
            assert_eq!(code, 406);
            assert!(text.contains("PRECONDITION_FAILED"), "{text}");
        }
        other => panic!("expected a 406 refusal, got {other:?}"),
    }
    assert!(!server.is_running());
    // The existing server is unaffected.
    let who: String = bus
        .client(Codec::MsgPack)
        .call(&RequestContext::new(), "whoami", &())
        .unwrap();
    assert_eq!(who, "s1");
}

#[test]
fn unreachable_broker_with_retry_0_fails_fast_with_a_delivery_failure() {
    let transport = Transport::new("amqp://guest:guest@127.0.0.1:1/").unwrap();
    let client = RpcClient::new(&transport, Target::new("t"))
        .timeout(Duration::from_secs(5))
        .retry(0);
    let started = Instant::now();
    let call: Result<Value, Error> = client.call(&RequestContext::new(), "m", &());
    match &call {
        Err(Error::DeliveryFailure { host, reason }) => {
            assert_eq!(host, "127.0.0.1:1");
            assert!(reason.contains("after 1 attempts"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let cast = client.cast(&RequestContext::new(), "m", &());
    assert!(
        matches!(cast, Err(Error::DeliveryFailure { .. })),
        "{cast:?}"
    );
    let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
        .retry(0)
        .build()
        .unwrap();
    assert!(matches!(server.start(), Err(Error::DeliveryFailure { .. })));
    assert!(!server.is_running());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_server_without_retry_limit_starts_without_its_broker() {
    let transport =
        Transport::new("amqp://guest:guest@127.0.0.1:1/?kombu_reconnect_splay=0").unwrap();
    let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
        .build()
        .unwrap();
    let started = Instant::now();
    server.start().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(server.is_running() && !server.is_consuming());
    // stop() and wait() interrupt the background reconnection at once.
    let stopping = Instant::now();
    server.stop();
    server.wait();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
}

#[test]
fn cast_retries_until_its_timeout_when_the_broker_stays_away() {
    let transport = Transport::new(
        "amqp://guest:guest@127.0.0.1:1/?rabbit_retry_interval=0.2&rabbit_retry_backoff=0&kombu_reconnect_splay=0",
    )
    .unwrap();
    let client = RpcClient::new(&transport, Target::new("t")).timeout(Duration::from_millis(1200));
    let started = Instant::now();
    let cast = client.cast(&RequestContext::new(), "m", &());
    let elapsed = started.elapsed();
    match &cast {
        Err(Error::DeliveryFailure { reason, .. }) => {
            let attempts: u32 = reason
                .split("after ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(attempts >= 3, "kept trying with backoff: {reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[test]
fn bad_credentials_never_show_the_password() {
    let url = broker_url().replace("guest:guest@", "guest:sekrit-pw@");
    let transport = Transport::new(&url).unwrap();
    assert!(!format!("{transport:?}").contains("sekrit"));
    let client = RpcClient::new(&transport, Target::new("t"))
        .timeout(Duration::from_secs(5))
        .retry(0);
    let error = client
        .call::<_, Value>(&RequestContext::new(), "m", &())
        .unwrap_err();
    assert!(matches!(error, Error::Authentication { .. }), "{error:?}");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("sekrit"), "{shown}");
}
