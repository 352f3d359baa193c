//! Live interoperability with Python oslo.messaging 18.3.1 under the production set that
//! oslo's admin guide recommends: quorum topic queues, quorum reply queues, one fanout stream
//! per topic and the queue manager's stable names —
//! `rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true&rabbit_stream_fanout=true&
//! rabbit_qos_prefetch_count=10&use_queue_manager=true`, the same `transport_url` query for
//! warren and for oslo.
//!
//! Each test runs on a vhost of its own (quorum queues and streams are durable: they never go
//! to vhost `/`), deleted at the end even when the test fails. Every peer, Rust or Python, has
//! its own `processname` (oslo's defaults: `hostname` is the machine's, `processname` is
//! `basename(argv[0])`), so that the queue manager's names `reply_<host>:<proc>:<n>` never
//! collide; the Python peers get `OSLO_LOCK_PATH` (oslo's queue manager needs
//! `[oslo_concurrency] lock_path`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::python::Peer;
use common::{broker_url, oslo_ctx, rabbitmqctl, rabbitmqctl_json, remote, Event};
use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};
use warren::{
    Codec, Endpoint, Error, Failure, RequestContext, RpcClient, RpcServer, Target, Transport,
    Version,
};

const WAIT: Duration = Duration::from_secs(20);

/// The recommended production options (oslo's admin guide), as a `transport_url` query.
const PRODUCTION: &str = "rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true\
&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10&use_queue_manager=true";

/// This machine's host name: the default `hostname` of oslo (`socket.gethostname()`) and of
/// warren.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_string()
}

/// One test's world: a vhost of its own with a unique exchange and topic, the Rust servers
/// started on it and the queue-manager identities its peers used. Dropping it stops the Rust
/// servers, deletes the vhost (and so everything declared in it), the queue manager's
/// counters in `/dev/shm` and the Python peers' lock directory.
struct Site {
    vhost: String,
    /// `amqp://guest:guest@host:port/<vhost>`, without a query.
    base_url: String,
    host: String,
    /// Unique per test: the prefix of every processname.
    tag: String,
    exchange: String,
    topic: String,
    lock_dir: PathBuf,
    processnames: Mutex<Vec<String>>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    servers: Vec<(String, RpcServer, Transport)>,
}

impl Site {
    fn new() -> Site {
        let vhost = common::unique("vhost");
        rabbitmqctl(&["add_vhost", &vhost]);
        // Nothing below can fail before the guard exists; once it does, a failure still
        // deletes the vhost.
        let tag = common::unique("p");
        let lock_dir = std::env::temp_dir().join(format!("{tag}_locks"));
        let (events_tx, events) = crossbeam_channel::unbounded();
        let root = broker_url();
        let root = root.split('?').next().unwrap_or(&root);
        let site = Site {
            base_url: format!("{}/{vhost}", root.trim_end_matches('/')),
            vhost,
            host: host_name(),
            tag,
            exchange: common::unique("exchange"),
            topic: common::unique("topic"),
            lock_dir,
            processnames: Mutex::new(Vec::new()),
            events,
            events_tx,
            servers: Vec::new(),
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &site.vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        std::fs::create_dir_all(&site.lock_dir).expect("lock directory");
        site
    }

    /// The processname of peer `role` in this test.
    fn processname(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    /// The production `transport_url` of peer `role` (its own processname).
    fn url(&self, role: &str) -> String {
        let processname = self.processname(role);
        self.processnames.lock().unwrap().push(processname.clone());
        format!("{}?{PRODUCTION}&processname={processname}", self.base_url)
    }

    /// The queue manager's name of the `n`th reply queue of peer `role`.
    fn reply_queue(&self, role: &str, n: u32) -> String {
        format!("reply_{}:{}:{n}", self.host, self.processname(role))
    }

    fn transport(&self, role: &str) -> Transport {
        Transport::builder(&self.url(role))
            .control_exchange(self.exchange.as_str())
            .codec(Codec::Json)
            .build()
            .expect("transport with the production options")
    }

    /// A Rust client (JSON, to talk to Python) with a transport of its own.
    fn rust_client(&self, role: &str) -> (Transport, RpcClient) {
        let transport = self.transport(role);
        let client = RpcClient::new(&transport, Target::new(self.topic.as_str())).timeout(WAIT);
        (transport, client)
    }

    /// Starts Rust server `name` (processname `name`) with the standard test endpoints plus
    /// `count`, the method Python's test servers have for casts; handlers report to
    /// `self.events`.
    fn start_rust_server(&mut self, name: &str) {
        let transport = self.transport(name);
        let mut builder = RpcServer::builder(
            &transport,
            Target::new(self.topic.as_str()).with_server(name),
        )
        .workers(4);
        for endpoint in common::endpoints(name, self.events_tx.clone()) {
            builder = builder.endpoint(endpoint);
        }
        let (server_name, events) = (name.to_string(), self.events_tx.clone());
        builder = builder.endpoint(Endpoint::new().version(Version::new(1, 0)).method(
            "count",
            move |_: &RequestContext, args: Value| {
                let _ = events.send(Event {
                    server: server_name.clone(),
                    method: "count".into(),
                    value: args["n"].clone(),
                    at: std::time::Instant::now(),
                });
                Ok::<_, Failure>(())
            },
        ));
        let server = builder.build().expect("server");
        server
            .start()
            .unwrap_or_else(|e| panic!("Rust server {name} starts: {e}"));
        self.servers.push((name.to_string(), server, transport));
    }

    /// Starts a Python peer (`rpc-server` with `--server <role>`, or `rpc-client`).
    fn python(&self, mode: &str, role: &str) -> Peer {
        let lock_path = self.lock_dir.to_str().expect("UTF-8 temp dir").to_string();
        let extra: Vec<&str> = if mode == "rpc-server" {
            vec!["--server", role]
        } else {
            Vec::new()
        };
        Peer::start_with_env(
            mode,
            &self.url(role),
            &self.exchange,
            &self.topic,
            &extra,
            &[("OSLO_LOCK_PATH", lock_path.as_str())],
        )
    }

    /// Waits for `n` events from the Rust servers.
    fn rust_events(&self, n: usize) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        (0..n)
            .map(|i| {
                self.events.recv_deadline(deadline).unwrap_or_else(|_| {
                    panic!("expected {n} events from the Rust servers, got {i}")
                })
            })
            .collect()
    }

    fn rust_quiet(&self, window: Duration) {
        if let Ok(event) = self.events.recv_timeout(window) {
            panic!("unexpected event from a Rust server: {event:?}");
        }
    }

    /// `rabbitmqctl list_queues` of this vhost: name → (type, durable, arguments).
    fn queues(&self) -> BTreeMap<String, (String, bool, Value)> {
        rabbitmqctl_json(&[
            "list_queues",
            "-p",
            &self.vhost,
            "name",
            "type",
            "durable",
            "arguments",
        ])
        .into_iter()
        .map(|q| {
            (
                q["name"].as_str().expect("queue name").to_string(),
                (
                    q["type"].as_str().unwrap_or("?").to_string(),
                    q["durable"].as_bool().unwrap_or(false),
                    q["arguments"].clone(),
                ),
            )
        })
        .collect()
    }

    /// `rabbitmqctl list_exchanges` of this vhost: name → (type, durable, auto_delete).
    fn exchanges(&self) -> BTreeMap<String, (String, bool, bool)> {
        rabbitmqctl_json(&[
            "list_exchanges",
            "-p",
            &self.vhost,
            "name",
            "type",
            "durable",
            "auto_delete",
        ])
        .into_iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                (
                    e["type"].as_str().unwrap_or("?").to_string(),
                    e["durable"].as_bool().unwrap_or(false),
                    e["auto_delete"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
    }

    /// Consumers per queue of this vhost.
    fn consumers(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for c in rabbitmqctl_json(&["list_consumers", "-p", &self.vhost, "queue_name"]) {
            if let Some(queue) = c["queue_name"].as_str() {
                *counts.entry(queue.to_string()).or_default() += 1;
            }
        }
        counts
    }

    /// Consumers of the fanout stream (RabbitMQ 3.10's `list_consumers` leaves stream
    /// consumers out; `list_queues consumers` counts them).
    fn stream_consumers(&self) -> u64 {
        let stream = format!("{}_fanout", self.topic);
        rabbitmqctl_json(&["list_queues", "-p", &self.vhost, "name", "consumers"])
            .iter()
            .find(|q| q["name"] == stream.as_str())
            .and_then(|q| q["consumers"].as_u64())
            .unwrap_or(0)
    }

    /// Asserts the vhost holds exactly what oslo 18.3.1 declares with the production set
    /// (reference §3.7, observed): the topic queue and one `<topic>.<server>` queue per server,
    /// quorum and durable with only `x-queue-type`; the reply queues, quorum and durable with
    /// oslo's `x-expires`; one fanout stream `<topic>_fanout` and no per-process fanout queue;
    /// the control exchange topic/durable, the fanout exchange fanout/durable/auto-delete.
    fn assert_production_declarations(&self, servers: &[&str], reply_queues: &[String]) {
        let queues = self.queues();
        let topic_queue = (
            "quorum".to_string(),
            true,
            json!([["x-queue-type", "longstr", "quorum"]]),
        );
        let reply_queue = (
            "quorum".to_string(),
            true,
            json!([
                ["x-expires", "signedint", 1_800_000],
                ["x-queue-type", "longstr", "quorum"]
            ]),
        );
        let stream = (
            "stream".to_string(),
            true,
            json!([
                ["x-max-age", "longstr", "1800s"],
                ["x-queue-type", "longstr", "stream"]
            ]),
        );
        let mut expected = BTreeMap::new();
        expected.insert(self.topic.clone(), topic_queue.clone());
        for server in servers {
            expected.insert(format!("{}.{server}", self.topic), topic_queue.clone());
        }
        for reply in reply_queues {
            expected.insert(reply.clone(), reply_queue.clone());
        }
        expected.insert(format!("{}_fanout", self.topic), stream);
        let found: BTreeMap<String, (String, bool, Value)> = queues
            .iter()
            .map(|(name, (kind, durable, arguments))| {
                (name.clone(), (kind.clone(), *durable, normalize(arguments)))
            })
            .collect();
        assert_eq!(
            found, expected,
            "queues of vhost {} (raw: {queues:?})",
            self.vhost
        );
        let exchanges = self.exchanges();
        assert_eq!(
            exchanges.get(&self.exchange),
            Some(&("topic".to_string(), true, false)),
            "control exchange; all: {exchanges:?}"
        );
        assert_eq!(
            exchanges.get(&format!("{}_fanout", self.topic)),
            Some(&("fanout".to_string(), true, true)),
            "fanout exchange; all: {exchanges:?}"
        );
    }
}

/// Queue arguments as `rabbitmqctl --formatter json` prints them, `[name, type, value]`
/// triples, sorted by name (the AMQP type matters: RabbitMQ compares it on re-declaration).
fn normalize(arguments: &Value) -> Value {
    let mut triples = arguments.as_array().cloned().unwrap_or_default();
    triples.sort_by_key(|t| t[0].as_str().map(str::to_string));
    Value::Array(triples)
}

impl Drop for Site {
    fn drop(&mut self) {
        for (_, server, _) in &self.servers {
            server.stop();
        }
        for (_, server, transport) in &self.servers {
            server.wait();
            transport.close();
        }
        let deleted = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        match deleted {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "clean-up: rabbitmqctl delete_vhost {}: {}",
                self.vhost,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("clean-up: rabbitmqctl delete_vhost {}: {e}", self.vhost),
        }
        let processnames = self
            .processnames
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        for processname in processnames {
            let _ = std::fs::remove_file(format!("/dev/shm/{}_{processname}_qmanager", self.host));
        }
        let _ = std::fs::remove_dir_all(&self.lock_dir);
    }
}

fn py_request(peer: &mut Peer, request: Value) -> Value {
    peer.request(request, WAIT)
}

fn py_call(peer: &mut Peer, method: &str, args: Value, more: Value) -> Value {
    let mut request =
        json!({"op": "call", "method": method, "args": args, "ctxt": {"user_id": "py-user"}});
    if let (Some(request), Some(more)) = (request.as_object_mut(), more.as_object()) {
        request.extend(more.clone());
    }
    py_request(peer, request)
}

fn cast_numbers(events: &[Value]) -> Vec<i64> {
    let mut seen: Vec<i64> = events.iter().map(|e| e["n"].as_i64().unwrap()).collect();
    seen.sort_unstable();
    seen
}

#[test]
fn rust_client_and_python_server_under_the_production_set() {
    let mut site = Site::new();
    let mut python = site.python("rpc-server", "py1");
    let (transport, client) = site.rust_client("rsclient");

    // Calls: through the shared topic queue and the server's own queue.
    let args = json!({"s": "h\u{e9}llo \u{1F680}", "n": [1, 2.5, null], "nested": {"a": true}});
    let echoed: Value = client.call(&oslo_ctx(), "echo", &args).unwrap();
    assert_eq!(echoed, args);
    let who: String = client.call(&oslo_ctx(), "whoami", &()).unwrap();
    assert_eq!(who, "py1");
    let who: String = client
        .prepare()
        .server("py1")
        .call(&oslo_ctx(), "whoami", &())
        .unwrap();
    assert_eq!(who, "py1");
    assert_eq!(
        transport.reply_queue_name(),
        Some(site.reply_queue("rsclient", 1)),
        "the queue manager's stable reply queue name"
    );

    // Casts: each handled once.
    for n in 0..20 {
        client.cast(&oslo_ctx(), "count", &json!({"n": n})).unwrap();
    }
    assert_eq!(
        cast_numbers(&python.events("cast", 20, WAIT)),
        (0..20).collect::<Vec<_>>(),
        "no loss, no duplicate"
    );
    python.quiet("cast", Duration::from_millis(300));

    // A fanout cast goes through the topic's stream and reaches the server once.
    client
        .prepare()
        .fanout(true)
        .cast(&oslo_ctx(), "count", &json!({"n": 1000}))
        .unwrap();
    let fanned = python.events("cast", 1, WAIT);
    assert_eq!(fanned[0]["n"], 1000);
    assert_eq!(fanned[0]["server"], "py1");
    python.quiet("cast", Duration::from_millis(300));

    // A Python exception arrives as a remote error with its class.
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

    // A slow method: the call times out within its bound.
    let started = Instant::now();
    let slow: Result<Value, Error> = client.prepare().timeout(Duration::from_millis(800)).call(
        &oslo_ctx(),
        "sleep",
        &json!({"seconds": 2}),
    );
    let elapsed = started.elapsed();
    assert!(matches!(slow, Err(Error::Timeout { .. })), "{slow:?}");
    assert!(
        elapsed >= Duration::from_millis(750) && elapsed < Duration::from_millis(1800),
        "{elapsed:?}"
    );
    // The late reply is dropped; the next call gets its own answer.
    let after: Value = client
        .call(&oslo_ctx(), "echo", &json!({"after": "timeout"}))
        .unwrap();
    assert_eq!(after, json!({"after": "timeout"}));

    // Python declared the topic queues, the stream and the exchanges; Rust its reply queue.
    site.assert_production_declarations(&["py1"], &[site.reply_queue("rsclient", 1)]);

    // A Rust server re-declares everything Python declared, identically (no 406), and serves.
    site.start_rust_server("rslate");
    let who: String = client
        .prepare()
        .server("rslate")
        .call(&oslo_ctx(), "whoami", &())
        .unwrap();
    assert_eq!(who, "rslate");
    site.assert_production_declarations(&["py1", "rslate"], &[site.reply_queue("rsclient", 1)]);
}

#[test]
fn python_client_and_rust_servers_under_the_production_set() {
    let mut site = Site::new();
    site.start_rust_server("rs1");
    site.start_rust_server("rs2");
    let mut python = site.python("rpc-client", "pyclient");

    // Calls.
    let args = json!({"s": "h\u{e9}llo \u{2603}", "i": -3, "f": 0.1, "nested": {"a": [1, {}]}});
    let echoed = py_call(&mut python, "echo", args.clone(), json!({}));
    assert_eq!(echoed["result"], args, "{echoed}");
    let sum = py_call(&mut python, "add", json!({"a": 40, "b": 2}), json!({}));
    assert_eq!(sum["result"], 42, "{sum}");
    for server in ["rs1", "rs2"] {
        let who = py_call(&mut python, "whoami", json!({}), json!({"server": server}));
        assert_eq!(who["result"], server, "{who}");
    }

    // Casts: each handled once by one of the servers.
    for n in 0..20 {
        let sent = py_request(
            &mut python,
            json!({"op": "cast", "method": "record", "args": {"n": n}}),
        );
        assert_eq!(sent["result"], Value::Null, "{sent}");
    }
    let mut seen: Vec<i64> = site
        .rust_events(20)
        .iter()
        .map(|e| e.value["n"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "no loss, no duplicate");
    site.rust_quiet(Duration::from_millis(300));

    // A fanout cast reaches both servers, once each.
    py_request(
        &mut python,
        json!({"op": "cast", "method": "record", "args": {"n": 99}, "fanout": true}),
    );
    let fanned = site.rust_events(2);
    let mut servers: Vec<&str> = fanned.iter().map(|e| e.server.as_str()).collect();
    servers.sort_unstable();
    assert_eq!(servers, ["rs1", "rs2"]);
    assert!(fanned.iter().all(|e| e.value["n"] == 99), "{fanned:?}");
    site.rust_quiet(Duration::from_millis(300));

    // Failures and timeouts as Python sees them.
    let failed = py_call(
        &mut python,
        "fail",
        json!({"class": "ValueError", "module": "builtins", "message": "bad from rust"}),
        json!({}),
    );
    assert_eq!(failed["error"]["type"], "ValueError", "{failed}");
    assert!(
        failed["error"]["str"]
            .as_str()
            .is_some_and(|s| s.starts_with("bad from rust")),
        "{failed}"
    );
    assert_eq!(site.rust_events(1)[0].method, "fail");
    let slow = py_call(
        &mut python,
        "sleep",
        json!({"ms": 2500}),
        json!({"timeout": 1}),
    );
    assert_eq!(slow["error"]["type"], "MessagingTimeout", "{slow}");

    // Rust declared the topic queues, the stream and the exchanges; Python its reply queue
    // (checked while the Python client lives: it deletes its reply queue when it stops).
    let slept = site.rust_events(1);
    assert_eq!(
        (slept[0].method.as_str(), &slept[0].value),
        ("sleep", &json!(2500))
    );
    site.assert_production_declarations(&["rs1", "rs2"], &[site.reply_queue("pyclient", 1)]);
}

#[test]
fn a_mixed_python_and_rust_fleet_shares_quorum_queues_and_the_fanout_stream() {
    let mut site = Site::new();
    // Rust declares first; Python re-declares the same topic queue, stream and exchanges.
    site.start_rust_server("rs1");
    let declared = site.queues();
    assert!(
        declared.contains_key(&site.topic)
            && declared.contains_key(&format!("{}_fanout", site.topic)),
        "the Rust server declared the topic queue and the stream: {declared:?}"
    );
    // A refused (406) declaration makes oslo's server raise instead of reporting `ready`
    // (and warren's `start()` fail): both starting means both declarations were accepted.
    let mut py_server = site.python("rpc-server", "py1");
    let (rust_transport, client) = site.rust_client("rsclient");

    // Calls from a Rust client go round the shared quorum queue to both servers.
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let who: String = client.call(&oslo_ctx(), "whoami", &()).unwrap();
        *served.entry(who).or_default() += 1;
    }
    assert_eq!(
        served.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["py1", "rs1"]),
        "{served:?}"
    );
    assert!(served.values().all(|n| *n >= 10), "{served:?}");

    // A fanout cast from Rust reaches both servers through the stream, once each.
    client
        .prepare()
        .fanout(true)
        .cast(&oslo_ctx(), "count", &json!({"n": 7}))
        .unwrap();
    assert_eq!(py_server.events("cast", 1, WAIT)[0]["n"], 7);
    let from_rust = site.rust_events(1);
    assert_eq!(
        (from_rust[0].server.as_str(), &from_rust[0].value),
        ("rs1", &json!(7))
    );
    py_server.quiet("cast", Duration::from_millis(300));
    site.rust_quiet(Duration::from_millis(100));

    // The same from a Python client.
    let mut py_client = site.python("rpc-client", "pyclient");
    let mut by_python: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        let who = py_call(&mut py_client, "whoami", json!({}), json!({}));
        *by_python
            .entry(who["result"].as_str().expect("a server name").to_string())
            .or_default() += 1;
    }
    assert_eq!(
        by_python
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["py1", "rs1"]),
        "{by_python:?}"
    );
    py_request(
        &mut py_client,
        json!({"op": "cast", "method": "count", "args": {"n": 8}, "fanout": true}),
    );
    assert_eq!(py_server.events("cast", 1, WAIT)[0]["n"], 8);
    let from_rust = site.rust_events(1);
    assert_eq!(
        (from_rust[0].server.as_str(), &from_rust[0].value),
        ("rs1", &json!(8))
    );
    py_server.quiet("cast", Duration::from_millis(300));
    site.rust_quiet(Duration::from_millis(100));

    // Both servers consume the shared topic queue and the stream.
    let consumers = site.consumers();
    assert_eq!(consumers.get(&site.topic), Some(&2), "{consumers:?}");
    assert_eq!(site.stream_consumers(), 2);
    assert_eq!(
        rust_transport.reply_queue_name(),
        Some(site.reply_queue("rsclient", 1))
    );
    site.assert_production_declarations(
        &["rs1", "py1"],
        &[
            site.reply_queue("rsclient", 1),
            site.reply_queue("pyclient", 1),
        ],
    );
}
