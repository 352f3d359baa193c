//! Production broker configurations against the real broker, each in a vhost of its own
//! (quorum and stream queues are durable: they never go into the shared vhost `/`):
//! oslo's quorum / transient quorum / stream fanout / queue-manager options, the declarations
//! they make, and the errors an operator sees when warren and the broker disagree.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{broker_url, ctx, rabbitmqctl, rabbitmqctl_cleanup, unique, Bus};
use serde_json::{json, Value};
use warren::{Codec, Error, RpcClient, RpcServer, Target, Transport};

/// oslo's recommended production set (its admin guide), with a stable process name.
const PRODUCTION: &str = "rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10&use_queue_manager=true&rabbit_quorum_delivery_limit=5";

/// A vhost of the test's own, deleted (with everything in it) when dropped, and a process
/// name for the queue manager, whose counter files are removed then too.
struct Vhost {
    name: String,
    process: String,
}

impl Vhost {
    fn new() -> Vhost {
        let name = unique("vhost");
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost {
            name,
            process: unique("proc"),
        }
    }

    /// The shared broker's URL in this vhost, with `query`.
    fn url(&self, query: &str) -> String {
        format!("{}?{query}", common::broker_in_vhost(&self.name))
    }

    /// `(name, type, durable, arguments)` of every queue in the vhost. (The JSON formatter
    /// of RabbitMQ 3.10 prints an argument's type instead of its value: the table is parsed.)
    fn queues(&self) -> Vec<(String, String, bool, Value)> {
        let output = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "-p", &self.name, "--no-table-headers"])
            .args(["name", "type", "durable", "arguments"])
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(4, '\t');
                let name = fields.next()?.to_string();
                let kind = fields.next()?.to_string();
                let durable = fields.next()? == "true";
                Some((
                    name,
                    kind,
                    durable,
                    parse_arguments(fields.next().unwrap_or("[]")),
                ))
            })
            .collect()
    }

    fn queue(&self, name: &str) -> (String, bool, Value) {
        let (_, kind, durable, arguments) = self
            .queues()
            .into_iter()
            .find(|(n, ..)| n == name)
            .unwrap_or_else(|| panic!("queue {name} in {:?}", self.queues()));
        (kind, durable, arguments)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl_cleanup(&["delete_vhost", &self.name]);
        let suffix = format!("_{}_qmanager", self.process);
        for entry in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().ends_with(&suffix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// `[{"x-queue-type","quorum"},{"x-expires",1800000}]` (rabbitmqctl's table) as a JSON map.
fn parse_arguments(text: &str) -> Value {
    let mut map = serde_json::Map::new();
    for item in text.trim_matches(|c| c == '[' || c == ']').split("},{") {
        let item = item.trim_matches(|c| c == '{' || c == '}');
        let Some((key, value)) = item.split_once(',') else {
            continue;
        };
        let value = match value.parse::<i64>() {
            Ok(n) => json!(n),
            Err(_) => json!(value.trim_matches('"')),
        };
        map.insert(key.trim_matches('"').to_string(), value);
    }
    Value::Object(map)
}

/// The arguments as a map.
fn arguments(value: &Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

#[test]
fn the_production_set_serves_calls_casts_and_fanout_with_oslos_declarations() {
    let vhost = Vhost::new();
    let process = vhost.process.clone();
    let url = vhost.url(&format!(
        "{PRODUCTION}&hostname=nodeA&processname={process}"
    ));
    let mut bus = Bus::new(&url);
    bus.start_server("s1", 2);
    bus.start_server("s2", 2);
    let transport = bus.transport(Codec::Json);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 2, "b": 3}))
        .unwrap();
    assert_eq!(sum, 5);
    client.cast(&ctx(), "record", &json!({"cast": 1})).unwrap();
    let events = bus.expect_events(1, Duration::from_secs(10));
    assert_eq!(events[0].value, json!({"cast": 1}));
    client
        .clone()
        .fanout(true)
        .cast(&ctx(), "record", &json!({"fanout": 1}))
        .unwrap();
    let mut servers: Vec<String> = bus
        .expect_events(2, Duration::from_secs(10))
        .into_iter()
        .map(|e| e.server)
        .collect();
    servers.sort();
    assert_eq!(servers, ["s1", "s2"], "the stream reaches every server");

    // oslo's declarations (reference §3.7, observed with the same options).
    let quorum = json!({"x-queue-type": "quorum", "x-delivery-limit": 5});
    for queue in [bus.topic.clone(), format!("{}.s1", bus.topic)] {
        let (kind, durable, args) = vhost.queue(&queue);
        assert_eq!((kind.as_str(), durable), ("quorum", true), "{queue}");
        assert_eq!(Value::Object(arguments(&args)), quorum, "{queue}");
    }
    let reply = transport.reply_queue_name().expect("reply queue");
    // Named when the first call needed it, as oslo does: the servers (whose fanout is the
    // stream) took no number, so the client's is the first.
    assert_eq!(reply, format!("reply_nodeA:{process}:1"));
    let (kind, durable, args) = vhost.queue(&reply);
    assert_eq!((kind.as_str(), durable), ("quorum", true));
    assert_eq!(
        Value::Object(arguments(&args)),
        json!({"x-queue-type": "quorum", "x-delivery-limit": 5, "x-expires": 1_800_000})
    );
    let (kind, durable, args) = vhost.queue(&format!("{}_fanout", bus.topic));
    assert_eq!((kind.as_str(), durable), ("stream", true));
    assert_eq!(
        Value::Object(arguments(&args)),
        json!({"x-queue-type": "stream", "x-max-age": "1800s"})
    );
    // Only the client made calls: one reply queue.
    let replies: Vec<String> = vhost
        .queues()
        .into_iter()
        .map(|(n, ..)| n)
        .filter(|n| n.starts_with("reply_"))
        .collect();
    assert_eq!(replies, [reply]);
}

/// The stream fanout consumer resumes after the offset it last saw: a fanout cast sent while
/// the server was disconnected arrives once it reconnects, and nothing is delivered twice.
#[test]
fn a_stream_fanout_consumer_resumes_where_it_left_off() {
    let vhost = Vhost::new();
    let url = vhost.url(&format!(
        "{PRODUCTION}&processname={}&heartbeat_timeout_threshold=1&rabbit_retry_interval=0.2&kombu_reconnect_splay=0",
        vhost.process
    ));
    let mut bus = Bus::new(&url);
    bus.start_server("s1", 1);
    let client = bus.client(Codec::MsgPack).fanout(true);
    client.cast(&ctx(), "record", &json!({"n": 1})).unwrap();
    assert_eq!(
        bus.expect_events(1, Duration::from_secs(10))[0].value["n"],
        1
    );
    // Cut every connection of the vhost (the server's listener among them).
    let before = listener_connections(&vhost);
    assert!(before > 0);
    rabbitmqctl(&["close_all_connections", "--vhost", &vhost.name, "test: cut"]);
    // Published while the listener reconnects (the publisher reconnects within the cast).
    client.cast(&ctx(), "record", &json!({"n": 2})).unwrap();
    client.cast(&ctx(), "record", &json!({"n": 3})).unwrap();
    let seen: Vec<i64> = bus
        .expect_events(2, Duration::from_secs(20))
        .iter()
        .map(|e| e.value["n"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, [2, 3], "nothing missed, nothing repeated");
    bus.expect_quiet(Duration::from_millis(500));
    assert!(
        bus.server("s1").is_consuming(),
        "the server consumes again (it reconnected)"
    );
}

/// Connections open in `vhost`.
fn listener_connections(vhost: &Vhost) -> usize {
    common::rabbitmqctl_json(&["list_connections", "vhost"])
        .iter()
        .filter(|c| c["vhost"] == vhost.name.as_str())
        .count()
}

/// A server with classic options meeting a deployment's quorum queue gets a 406 that says
/// which option to set; one with the quorum options joins it.
#[test]
fn a_406_tells_the_operator_which_option_to_set() {
    let vhost = Vhost::new();
    let topic = unique("topic");
    let quorum = Transport::new(&vhost.url("rabbit_quorum_queue=true")).unwrap();
    let first = RpcServer::builder(&quorum, Target::new(topic.as_str()).with_server("a"))
        .build()
        .unwrap();
    first.start().unwrap();
    // Durable like the quorum deployment's exchange, but classic queues.
    let classic = Transport::new(&vhost.url("amqp_durable_queues=true")).unwrap();
    let second = RpcServer::builder(&classic, Target::new(topic.as_str()).with_server("b"))
        .retry(0)
        .build()
        .unwrap();
    match second.start() {
        Err(Error::Refused { code: 406, text }) => assert!(
            text.contains("is a quorum queue on the broker: set rabbit_quorum_queue=true"),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
    first.stop();
    first.wait();
}

/// A misspelled or removed option names itself; oslo options warren does not act on are
/// accepted (a real nova.conf `transport_url` parses).
#[test]
fn a_nova_conf_transport_url_parses_and_typos_are_named() {
    let nova = format!(
        "{}?rabbit_ha_queues=false&heartbeat_rate=3&rpc_conn_pool_size=30&kombu_reconnect_delay=1.0&ssl_enforce_fips_mode=false&rabbit_login_method=AMQPLAIN&amqp_durable_queues=false",
        common::broker_in_vhost("")
    );
    let transport = Transport::new(&nova).unwrap();
    let server_name = unique("srv");
    let mut bus = Bus::new(&nova);
    bus.start_server(&server_name, 1);
    let client =
        RpcClient::new(&transport, Target::new(bus.topic.as_str())).exchange(bus.exchange.as_str());
    let who: String = client.call(&ctx(), "whoami", &()).unwrap();
    assert_eq!(who, server_name);
    for typo in ["rabbit_quroum_delivery_limit=5", "rabit_quorum_queue=true"] {
        let url = format!("{}?{typo}", broker_url().split('?').next().unwrap());
        match Transport::new(&url) {
            Err(Error::InvalidOption { name, .. }) => {
                assert_eq!(name, typo.split('=').next().unwrap())
            }
            other => panic!("{typo}: {other:?}"),
        }
    }
}

/// A virtual host the user may not use is refused for good: the call fails after one pass over
/// the hosts with `Error::Authentication`, not at its timeout.
#[test]
fn a_refused_virtual_host_fails_at_once() {
    let transport = Transport::new(&common::broker_in_vhost(&unique("no_such_vhost"))).unwrap();
    let started = std::time::Instant::now();
    let err = RpcClient::new(&transport, Target::new("t"))
        .timeout(Duration::from_secs(30))
        .cast(&ctx(), "m", &json!({}))
        .expect_err("the vhost does not exist");
    assert!(matches!(err, Error::Authentication { .. }), "{err:?}");
    assert!(err.to_string().contains("vhost"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
