//! Live interoperability with Python oslo.messaging 18.3.1 (from PyPI, in the virtualenv of
//! `scripts/ensure-oslo-venv`): warren calls Python servers and serves Python clients on the
//! real broker, both directions, with no change on the Python side.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::dispatch::{check_oslo_client, check_warren_client, Server};
use common::python::Peer;
use common::{broker_url, oslo_ctx, remote, Bus};
use serde_json::{json, Value};
use warren::{Codec, Error, RequestContext, RpcClient};

const WAIT: Duration = Duration::from_secs(20);

/// A bus whose Python server `name` is running; its queue is cleaned up with the bus.
fn python_server(bus: &mut Bus, name: &str) -> Peer {
    bus.track_queue(format!("{}.{name}", bus.topic));
    Peer::start(
        "rpc-server",
        &bus.url,
        &bus.exchange,
        &bus.topic,
        &["--server", name],
    )
}

fn json_client(bus: &Bus) -> RpcClient {
    bus.client(Codec::Json).timeout(Duration::from_secs(20))
}

#[test]
fn rust_calls_a_python_server_and_gets_every_json_type() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    let client = json_client(&bus);
    let types: Value = client.call(&oslo_ctx(), "types", &()).unwrap();
    assert_eq!(
        types,
        json!({
            "int": 42, "negative": -7, "big": 4611686018427387904_i64, "float": 1.5, "small": 1e-05,
            "unicode": "h\u{e9}llo \u{2603} \u{1F680}", "null": null, "true": true, "false": false,
            "list": [1, "two", [3.0, null]], "nested": {"a": {"b": {"c": [1, 2, 3]}}},
            "empty_list": [], "empty_dict": {}
        })
    );
    let args = json!({"s": "\u{e9}\u{1F680}\"\\\n", "f": 0.1, "n": null, "l": [true, false, {"k": [1.25e100]}]});
    let echoed: Value = client.call(&oslo_ctx(), "echo", &args).unwrap();
    assert_eq!(echoed, args);
    let big: String = client
        .call(&oslo_ctx(), "big", &json!({"size": 1 << 20}))
        .unwrap();
    assert_eq!(big.len(), 1 << 20);
    // oslo servers hand the context to the endpoint, plus client_timeout.
    let seen: Value = client.call(&oslo_ctx(), "context", &()).unwrap();
    assert_eq!(
        seen,
        json!({"user_id": "alice", "project_id": "demo", "roles": ["member", "reader"], "is_admin": false, "client_timeout": null})
    );
}

#[test]
fn python_exceptions_arrive_as_remote_errors() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    let client = json_client(&bus);
    let failure =
        remote(client.call::<_, Value>(&oslo_ctx(), "fail", &json!({"message": "bad value"})));
    assert_eq!(
        (
            failure.class.as_str(),
            failure.module.as_str(),
            failure.message.as_str()
        ),
        ("ValueError", "builtins", "bad value")
    );
    assert_eq!(failure.details.args, vec![json!("bad value")]);
    let failure =
        remote(client.call::<_, Value>(&oslo_ctx(), "not_found", &json!({"instance_id": "vm-9"})));
    assert_eq!(
        (failure.class.as_str(), failure.module.as_str()),
        ("InstanceNotFound", "__main__")
    );
    assert_eq!(failure.message, "Instance vm-9 could not be found.");
    assert_eq!(
        failure.details.kwargs.get("instance_id"),
        Some(&json!("vm-9"))
    );
    // An expected exception is logged differently on the server; the caller sees the original.
    let failure = remote(client.call::<_, Value>(&oslo_ctx(), "expected", &json!({"key": "k1"})));
    assert_eq!(
        (
            failure.class.as_str(),
            failure.module.as_str(),
            failure.message.as_str()
        ),
        ("KeyError", "builtins", "'k1'")
    );
    // Typed matching on the class name.
    let error = client
        .call::<_, Value>(&oslo_ctx(), "fail", &json!({"message": "x"}))
        .unwrap_err();
    assert!(error.is_remote("ValueError"));
}

/// The case table of `tests/fixtures/dispatch-rules.json`: a warren client against oslo's
/// dispatcher.
#[test]
fn python_dispatch_rules_reach_rust_callers() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    let client = json_client(&bus);
    check_warren_client(&client, Server::Python, "py1");
    let who: Value = client
        .prepare()
        .server("py1")
        .call(&oslo_ctx(), "whoami", &())
        .unwrap();
    assert_eq!(who, json!("py1"));
}

#[test]
fn a_rust_call_to_a_slow_python_method_times_out() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    let client = json_client(&bus);
    // Connected, with its reply queue, before the timed part.
    let who: Value = client.call(&oslo_ctx(), "whoami", &()).unwrap();
    assert_eq!(who, json!("py1"));
    let client = client.timeout(Duration::from_millis(800));
    let started = Instant::now();
    let result: Result<Value, Error> = client.call(&oslo_ctx(), "sleep", &json!({"seconds": 2}));
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn rust_casts_are_counted_by_python_and_fanout_reaches_both_python_servers() {
    let mut bus = Bus::new(&broker_url());
    let mut first = python_server(&mut bus, "py1");
    let mut second = python_server(&mut bus, "py2");
    let client = json_client(&bus);
    for n in 0..40 {
        client
            .prepare()
            .server("py1")
            .cast(&oslo_ctx(), "count", &json!({"n": n}))
            .unwrap();
    }
    let mut seen: Vec<i64> = first
        .events("cast", 40, WAIT)
        .iter()
        .map(|e| e["n"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..40).collect::<Vec<_>>(), "no loss, no duplicate");
    first.quiet("cast", Duration::from_millis(300));
    client
        .prepare()
        .fanout(true)
        .cast(&oslo_ctx(), "count", &json!({"n": 1000}))
        .unwrap();
    assert_eq!(first.events("cast", 1, WAIT)[0]["n"], 1000);
    assert_eq!(second.events("cast", 1, WAIT)[0]["n"], 1000);
    second.quiet("cast", Duration::from_millis(300));
}

/// A Python client against a Rust server.
fn python_client(bus: &Bus, allow: &[&str]) -> Peer {
    let extra: Vec<&str> = allow.iter().flat_map(|m| ["--allow", m]).collect();
    Peer::start("rpc-client", &bus.url, &bus.exchange, &bus.topic, &extra)
}

fn py_call(peer: &mut Peer, method: &str, args: Value, more: Value) -> Value {
    let mut request =
        json!({"op": "call", "method": method, "args": args, "ctxt": {"user_id": "py-user"}});
    if let (Some(request), Some(more)) = (request.as_object_mut(), more.as_object()) {
        request.extend(more.clone());
    }
    peer.request(request, WAIT)
}

#[test]
fn python_calls_a_rust_server_and_gets_every_json_type() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("rs1", 4);
    let mut python = python_client(&bus, &[]);
    let args = json!({"s": "h\u{e9}llo \u{2603} \u{1F680}", "i": -3, "big": 4611686018427387904_i64, "f": 0.1,
        "n": null, "b": [true, false], "nested": {"a": [1, {"b": {}}]}, "empty": []});
    assert_eq!(
        py_call(&mut python, "echo", args.clone(), json!({})),
        json!({"id": 1, "result": args})
    );
    let sum = py_call(&mut python, "add", json!({"a": 40, "b": 2}), json!({}));
    assert_eq!(sum["result"], 42);
    let big = "y".repeat(1 << 20);
    let echoed = py_call(&mut python, "echo", json!({"blob": big}), json!({}));
    assert_eq!(
        echoed["result"]["blob"].as_str().map(str::len),
        Some(1 << 20)
    );
    let seen = py_call(&mut python, "context", json!({}), json!({}));
    assert_eq!(
        seen["result"],
        json!({"user_id": "py-user", "client_timeout": null})
    );
    let seen = py_call(
        &mut python,
        "context",
        json!({}),
        json!({"call_monitor_timeout": 4}),
    );
    assert_eq!(
        seen["result"]["client_timeout"], 4,
        "oslo's client_timeout carries _timeout"
    );
    let who = py_call(
        &mut python,
        "whoami",
        json!({}),
        json!({"server": "rs1", "version": "1.3"}),
    );
    assert_eq!(who["result"], "rs1");
}

#[test]
fn python_gets_its_own_exception_types_from_rust() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("rs1", 2);
    let mut python = python_client(&bus, &[]);
    let builtin = py_call(
        &mut python,
        "fail",
        json!({"class": "ValueError", "module": "builtins", "message": "bad from rust"}),
        json!({}),
    );
    let error = &builtin["error"];
    assert_eq!(
        (error["type"].as_str(), error["module"].as_str()),
        (Some("ValueError"), Some("builtins")),
        "{builtin}"
    );
    assert!(
        error["str"].as_str().unwrap().starts_with("bad from rust"),
        "{builtin}"
    );
    let foreign = py_call(
        &mut python,
        "fail",
        json!({"class": "InstanceNotFound", "module": "nova.exception", "message": "Instance vm-1 could not be found."}),
        json!({}),
    );
    let error = &foreign["error"];
    assert_eq!(error["type"], "RemoteError", "{foreign}");
    assert_eq!(error["exc_type"], "InstanceNotFound");
    assert_eq!(error["value"], "Instance vm-1 could not be found.");
    let bad_args = py_call(&mut python, "add", json!({"a": "one", "b": 2}), json!({}));
    assert_eq!(bad_args["error"]["type"], "TypeError", "{bad_args}");
    // oslo's dispatcher failures from warren's dispatcher (the case table of
    // tests/fixtures/dispatch-rules.json): a `RemoteError` for this client...
    check_oslo_client(&mut python, "rs1", false, WAIT);
    drop(python);
    // ...while a client that allows oslo's dispatcher module rebuilds them
    // (`NoSuchMethod_Remote`...).
    let mut allowing = python_client(&bus, &[common::dispatch::DISPATCHER_MODULE]);
    check_oslo_client(&mut allowing, "rs1", true, WAIT);
}

#[test]
fn python_times_out_on_a_slow_rust_handler() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("rs1", 2);
    let mut python = python_client(&bus, &[]);
    let slow = py_call(
        &mut python,
        "sleep",
        json!({"ms": 2500}),
        json!({"timeout": 1}),
    );
    assert_eq!(slow["error"]["type"], "MessagingTimeout", "{slow}");
}

#[test]
fn python_casts_and_fanout_reach_rust_servers() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("rs1", 2);
    bus.start_server("rs2", 2);
    let mut python = python_client(&bus, &[]);
    for n in 0..20 {
        let sent = python.request(
            json!({"op": "cast", "method": "record", "args": {"n": n}}),
            WAIT,
        );
        assert_eq!(sent["result"], Value::Null, "{sent}");
    }
    let mut seen: Vec<i64> = bus
        .expect_events(20, WAIT)
        .iter()
        .map(|e| e.value["n"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    python.request(
        json!({"op": "cast", "method": "record", "args": {"n": 99}, "fanout": true}),
        WAIT,
    );
    let mut servers: Vec<String> = bus
        .expect_events(2, WAIT)
        .into_iter()
        .map(|e| e.server)
        .collect();
    servers.sort();
    assert_eq!(servers, ["rs1", "rs2"]);
    bus.expect_quiet(Duration::from_millis(300));
}

#[test]
fn a_mixed_fleet_of_python_and_rust_servers_shares_a_topic() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    bus.start_server("rs1", 2);
    let client = json_client(&bus);
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let who: String = client.call(&oslo_ctx(), "whoami", &()).unwrap();
        *served.entry(who).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(served.values().all(|n| *n >= 10), "{served:?}");
    let mut python = python_client(&bus, &[]);
    let mut by_python: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        let who = py_call(&mut python, "whoami", json!({}), json!({}));
        *by_python
            .entry(who["result"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(by_python.len(), 2, "{by_python:?}");
}

#[test]
fn call_monitoring_keep_alives_work_both_ways() {
    let mut bus = Bus::new(&broker_url());
    let _python = python_server(&mut bus, "py1");
    bus.start_server("rs1", 2);
    // Rust → Python: a 3 s method under a 2 s monitor lives on Python's keep-alives.
    let monitored = json_client(&bus)
        .timeout(Duration::from_secs(15))
        .call_monitor_timeout(Duration::from_secs(2));
    let slept: i64 = monitored
        .prepare()
        .server("py1")
        .call(&oslo_ctx(), "sleep", &json!({"seconds": 3}))
        .unwrap();
    assert_eq!(slept, 3);
    // Python → Rust: the same, on warren's keep-alives.
    let mut python = python_client(&bus, &[]);
    let slow = py_call(
        &mut python,
        "sleep",
        json!({"ms": 3000}),
        json!({"server": "rs1", "timeout": 15, "call_monitor_timeout": 2}),
    );
    assert_eq!(slow["result"], 3000, "{slow}");
}

/// Notifications: Python notifier → Rust listeners (plain and pooled), messagingv2 and v1.
#[test]
fn python_notifications_reach_rust_listeners() {
    use warren::{
        Notification, NotificationEndpoint, NotificationListener, NotificationResult, Priority,
        Target,
    };
    let mut bus = Bus::new(&broker_url());
    let pool = common::unique("pool");
    for priority in ["info", "error"] {
        bus.track_queue(format!("{}.{priority}", bus.topic));
    }
    bus.track_queue(pool.clone());
    let transport = bus.transport(Codec::Json);
    let (seen_tx, seen) = crossbeam_channel::unbounded::<(String, Notification)>();
    let listeners: Vec<NotificationListener> = [None, Some(pool.as_str())]
        .into_iter()
        .map(|pool| {
            let tag = pool.map_or("plain", |_| "pool").to_string();
            let mut endpoint = NotificationEndpoint::new();
            for priority in [Priority::Info, Priority::Error] {
                let (tag, seen_tx) = (tag.clone(), seen_tx.clone());
                endpoint = endpoint.on(priority, move |n: &Notification| {
                    let _ = seen_tx.send((tag.clone(), n.clone()));
                    NotificationResult::Handled
                });
            }
            let mut builder =
                NotificationListener::builder(&transport, vec![Target::new(bus.topic.as_str())])
                    .endpoint(endpoint);
            if let Some(pool) = pool {
                builder = builder.pool(pool);
            }
            let listener = builder.build().unwrap();
            listener.start().unwrap();
            listener
        })
        .collect();

    let mut v2 = Peer::start(
        "notify",
        &bus.url,
        &bus.exchange,
        &bus.topic,
        &["--publisher", "compute.py-host"],
    );
    v2.request(json!({"priority": "info", "event_type": "compute.instance.create.end", "payload": {"id": 1}, "ctxt": {"user_id": "dropped"}}), WAIT);
    v2.request(
        json!({"priority": "error", "event_type": "compute.instance.create.error", "payload": {"id": 2},
               "request_context": {"user_id": "u1", "project_id": "p1", "auth_token": "tok"}}),
        WAIT,
    );
    let mut v1 = Peer::start(
        "notify",
        &bus.url,
        &bus.exchange,
        &bus.topic,
        &["--driver", "messaging", "--publisher", "compute.py-v1"],
    );
    v1.request(
        json!({"priority": "info", "event_type": "v1.event", "payload": {"id": 3}}),
        WAIT,
    );

    let mut got: Vec<(String, Notification)> = (0..6)
        .map(|_| seen.recv_timeout(WAIT).expect("a notification"))
        .collect();
    assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
    got.sort_by(|a, b| (&a.0, &a.1.event_type).cmp(&(&b.0, &b.1.event_type)));
    let events: Vec<(&str, &str)> = got
        .iter()
        .map(|(tag, n)| (tag.as_str(), n.event_type.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            ("plain", "compute.instance.create.end"),
            ("plain", "compute.instance.create.error"),
            ("plain", "v1.event"),
            ("pool", "compute.instance.create.end"),
            ("pool", "compute.instance.create.error"),
            ("pool", "v1.event"),
        ]
    );
    let (_, created) = &got[0];
    assert_eq!(
        (created.priority, created.publisher_id.as_str()),
        (Priority::Info, "compute.py-host")
    );
    assert_eq!(created.payload, json!({"id": 1}));
    assert!(
        created.ctxt.is_empty(),
        "oslo drops a plain dict context: {:?}",
        created.ctxt
    );
    assert_eq!(created.metadata.message_id.len(), 36);
    let (_, failed) = &got[1];
    assert_eq!(failed.priority, Priority::Error);
    assert_eq!(
        failed.ctxt.get_str("user"),
        Some("u1"),
        "oslo.context sends `user`"
    );
    assert_eq!(failed.ctxt.get_str("project_id"), Some("p1"));
    assert_eq!(
        failed.ctxt.get("auth_token"),
        Some(&Value::Null),
        "oslo sends a redacted context"
    );
    assert_eq!(got[2].1.publisher_id, "compute.py-v1");
    drop(listeners);
}

/// Notifications: Rust notifier → Python listeners (plain and pooled), and a Python listener
/// that asks for a requeue.
#[test]
fn rust_notifications_reach_python_listeners() {
    use warren::{NotificationFormat, Notifier};
    let mut bus = Bus::new(&broker_url());
    let pool = common::unique("pool");
    for priority in [
        "audit", "debug", "info", "warn", "error", "critical", "sample",
    ] {
        bus.track_queue(format!("{}.{priority}", bus.topic));
    }
    bus.track_queue(pool.clone());
    let mut plain = Peer::start(
        "listen",
        &bus.url,
        &bus.exchange,
        &bus.topic,
        &["--requeue-once", "requeue.me"],
    );
    let mut pooled = Peer::start(
        "listen",
        &bus.url,
        &bus.exchange,
        &bus.topic,
        &["--pool", &pool],
    );
    let transport = bus.transport(Codec::Json);
    let notifier = Notifier::new(&transport, "compute.rust-host").topics([bus.topic.as_str()]);
    notifier
        .info(
            &oslo_ctx(),
            "compute.instance.create.end",
            &json!({"instance_id": "vm-1", "memory_mb": 512}),
        )
        .unwrap();
    notifier
        .prepare()
        .format(NotificationFormat::V1)
        .warn(
            &oslo_ctx(),
            "compute.instance.slow",
            &json!({"seconds": 9.5}),
        )
        .unwrap();
    notifier
        .sample(&oslo_ctx(), "requeue.me", &json!({}))
        .unwrap();

    for peer in [&mut plain, &mut pooled] {
        let mut got = peer.events("notification", 3, WAIT);
        got.sort_by_key(|n| n["event_type"].as_str().map(str::to_string));
        let created = &got[0];
        assert_eq!(created["event_type"], "compute.instance.create.end");
        assert_eq!(created["priority"], "info");
        assert_eq!(created["publisher_id"], "compute.rust-host");
        assert_eq!(
            created["payload"],
            json!({"instance_id": "vm-1", "memory_mb": 512})
        );
        assert_eq!(created["ctxt"]["user_id"], "alice");
        assert_eq!(
            created["metadata"]["message_id"].as_str().map(str::len),
            Some(36)
        );
        assert_eq!(
            created["metadata"]["timestamp"].as_str().map(str::len),
            Some(26)
        );
        assert_eq!(got[1]["event_type"], "compute.instance.slow");
        assert_eq!(got[1]["priority"], "warn");
        assert_eq!(got[1]["payload"], json!({"seconds": 9.5}));
        assert_eq!(got[2]["event_type"], "requeue.me");
        assert_eq!(got[2]["priority"], "sample");
    }
    // The plain listener asked for a requeue of requeue.me first.
    assert_eq!(
        plain.events("requeued", 1, WAIT)[0]["event_type"],
        "requeue.me"
    );
    plain.quiet("notification", Duration::from_millis(300));
}

/// Typed services (`warren::service!`) against Python oslo.messaging, both ways: the typed
/// client's arguments are the Python method's keyword arguments, and a Python client's
/// keyword arguments reach the typed Rust method's parameters.
mod typed {
    use super::*;
    use serde::{Deserialize, Serialize};
    use warren::{Failure, Target};

    warren::service! {
        /// The Python peer's main endpoint (tests/interop/peer.py, `MainEndpoint`).
        pub trait PyMain {
            version = "1.3";
            client = PyMainClient;

            fn echo(instance_id: String, memory_mb: u32, host: Option<String>) -> Value;
            fn whoami() -> String;
            fn big(size: usize) -> String;
            fn fail(message: String);
            fn not_found(instance_id: String);
            fn count(n: i64);
        }
    }

    warren::service! {
        /// The Python peer's admin endpoint (`AdminEndpoint`).
        pub trait PyAdmin {
            namespace = "admin";
            version = "2.1";
            client = PyAdminClient;

            fn reset() -> String;
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Instance {
        id: String,
        memory_mb: u32,
        host: Option<String>,
        user: Option<String>,
    }

    warren::service! {
        /// A typed Rust service that Python calls.
        pub trait Compute {
            namespace = "compute";
            version = "4.2";
            client = ComputeClient;

            fn start_instance(instance_id: String, memory_mb: u32, host: Option<String>) -> Instance;
            fn stop_instance(instance_id: String);
            fn refresh(generation: u64);
        }
    }

    struct Agent(crossbeam_channel::Sender<u64>);

    impl Compute for Agent {
        fn start_instance(
            &self,
            ctx: &RequestContext,
            instance_id: String,
            memory_mb: u32,
            host: Option<String>,
        ) -> Result<Instance, Failure> {
            Ok(Instance {
                id: instance_id,
                memory_mb,
                host,
                user: ctx.get_str("user_id").map(str::to_string),
            })
        }

        fn stop_instance(&self, _: &RequestContext, instance_id: String) -> Result<(), Failure> {
            Err(Failure::new(
                "ValueError",
                "builtins",
                format!("{instance_id} is not running"),
            ))
        }

        fn refresh(&self, _: &RequestContext, generation: u64) -> Result<(), Failure> {
            let _ = self.0.send(generation);
            Ok(())
        }
    }

    #[test]
    fn a_typed_rust_client_calls_a_python_server() {
        let mut bus = Bus::new(&broker_url());
        let mut python = python_server(&mut bus, "py1");
        let transport = bus.transport(Codec::Json);
        let main = PyMainClient::new(&transport, Target::new(bus.topic.as_str()))
            .timeout(Duration::from_secs(20));

        // Python's echo(**kwargs) returns the keyword arguments it was called with.
        let kwargs = main
            .echo(&oslo_ctx(), "vm-1", 512u32, Some("host-1".to_string()))
            .unwrap();
        assert_eq!(
            kwargs,
            json!({"instance_id": "vm-1", "memory_mb": 512, "host": "host-1"})
        );
        assert_eq!(main.whoami(&oslo_ctx()).unwrap(), "py1");
        assert_eq!(main.big(&oslo_ctx(), 70_000usize).unwrap().len(), 70_000);

        let failure = remote(main.fail(&oslo_ctx(), "typed failure"));
        assert_eq!(
            (failure.class.as_str(), failure.message.as_str()),
            ("ValueError", "typed failure")
        );
        let failure = remote(main.not_found(&oslo_ctx(), "vm-404"));
        assert_eq!(failure.class, "InstanceNotFound");
        assert_eq!(
            failure.details.kwargs.get("instance_id"),
            Some(&json!("vm-404"))
        );

        main.prepare()
            .server("py1")
            .cast()
            .count(&oslo_ctx(), 7i64)
            .unwrap();
        assert_eq!(python.events("cast", 1, WAIT)[0]["n"], 7);

        let admin = PyAdminClient::new(&transport, Target::new(bus.topic.as_str()))
            .timeout(Duration::from_secs(20));
        assert_eq!(admin.reset(&oslo_ctx()).unwrap(), "reset by py1");
        // The Python server is at 1.3: asking the main endpoint for 1.4 is refused by oslo.
        assert_eq!(
            remote(main.prepare().version("1.4").whoami(&oslo_ctx())).class,
            "UnsupportedVersion"
        );
    }

    #[test]
    fn a_python_client_calls_a_typed_rust_server() {
        let mut bus = Bus::new(&broker_url());
        let (refreshed_tx, refreshed) = crossbeam_channel::unbounded();
        bus.start_server_with("rs1", |b| {
            b.endpoint(Compute::endpoint(Agent(refreshed_tx)))
        });
        let mut python = python_client(&bus, &[]);
        let compute = json!({"namespace": "compute", "version": "4.2"});

        let started = py_call(
            &mut python,
            "start_instance",
            json!({"memory_mb": 2048, "instance_id": "vm-py"}),
            compute.clone(),
        );
        assert_eq!(
            started["result"],
            json!({"id": "vm-py", "memory_mb": 2048, "host": null, "user": "py-user"}),
            "{started}"
        );

        let failed = py_call(
            &mut python,
            "stop_instance",
            json!({"instance_id": "vm-py"}),
            compute.clone(),
        );
        assert_eq!(failed["error"]["type"], "ValueError", "{failed}");
        // oslo appends the (empty) remote traceback to the message.
        assert_eq!(failed["error"]["str"], "vm-py is not running\n", "{failed}");

        // Python's own binding errors, from the Rust side: an unknown keyword argument and a
        // missing one are TypeErrors, as a Python server would raise.
        let unexpected = py_call(
            &mut python,
            "start_instance",
            json!({"instance_id": "vm", "memory_mb": 1, "flavor": "m1"}),
            compute.clone(),
        );
        assert_eq!(unexpected["error"]["type"], "TypeError", "{unexpected}");
        assert!(
            unexpected["error"]["str"]
                .as_str()
                .is_some_and(|s| s.contains("flavor")),
            "{unexpected}"
        );
        let missing = py_call(
            &mut python,
            "start_instance",
            json!({"memory_mb": 1}),
            compute.clone(),
        );
        assert_eq!(missing["error"]["type"], "TypeError", "{missing}");
        assert!(
            missing["error"]["str"]
                .as_str()
                .is_some_and(|s| s.contains("instance_id")),
            "{missing}"
        );

        let sent = python.request(
            json!({"op": "cast", "method": "refresh", "args": {"generation": 3},
                   "namespace": "compute", "version": "4.0"}),
            WAIT,
        );
        assert_eq!(sent["result"], Value::Null, "{sent}");
        assert_eq!(refreshed.recv_timeout(WAIT).unwrap(), 3);

        // Without the namespace the typed methods are not reachable: the null namespace's
        // endpoint is compatible but lacks the method: oslo's NoSuchMethod, which Python
        // sees as a RemoteError (its module is not in the client's allowed list).
        let wrong = py_call(
            &mut python,
            "start_instance",
            json!({"instance_id": "vm", "memory_mb": 1}),
            json!({}),
        );
        assert_eq!(wrong["error"]["type"], "RemoteError", "{wrong}");
        assert_eq!(wrong["error"]["exc_type"], "NoSuchMethod", "{wrong}");
    }
}
