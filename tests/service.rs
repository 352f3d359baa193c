//! Typed services (`warren::service!`) on the in-memory transport: the typed client and the
//! generated endpoint against each other and against the untyped API, which is what a Python
//! peer looks like on the wire (tests/interop.rs runs the same against real Python).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ctx, remote, Remote};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use warren::{Endpoint, Error, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    id: String,
    host: Option<String>,
    memory_mb: u32,
}

warren::service! {
    /// A nova-compute-like API.
    pub trait Compute {
        namespace = "compute";
        version = "4.2";
        client = ComputeClient;

        /// Boots an instance.
        fn start_instance(instance_id: String, memory_mb: u32, host: Option<String>) -> Instance;
        /// Fails with the instance's id in the failure's kwargs.
        fn destroy(instance_id: String);
        /// No arguments, a list back.
        fn list_instances() -> Vec<String>;
        /// Counted by the server; meant to be cast.
        fn refresh(generation: u64);
        /// Waits until the test releases it.
        fn block(key: String) -> String;
    }
}

warren::service! {
    /// A second service in the null namespace, version 1.0.
    pub trait Ping {
        client = PingClient;
        fn ping() -> String;
    }
}

struct Agent {
    name: String,
    refreshed: Arc<AtomicUsize>,
    refreshes: Sender<(String, u64)>,
    release: Receiver<()>,
}

impl Compute for Agent {
    fn start_instance(
        &self,
        ctx: &RequestContext,
        instance_id: String,
        memory_mb: u32,
        host: Option<String>,
    ) -> Result<Instance, Failure> {
        assert_eq!(ctx.get_str("user_id"), Some("alice"));
        Ok(Instance {
            id: instance_id,
            host,
            memory_mb,
        })
    }

    fn destroy(&self, _: &RequestContext, instance_id: String) -> Result<(), Failure> {
        let kwargs: Map<String, Value> = [("instance_id".to_string(), json!(instance_id))]
            .into_iter()
            .collect();
        Err(
            Failure::new("InstanceNotFound", "nova.exception", "no such instance")
                .with_kwargs(kwargs),
        )
    }

    fn list_instances(&self, _: &RequestContext) -> Result<Vec<String>, Failure> {
        Ok(vec!["vm-1".into(), "vm-2".into()])
    }

    fn refresh(&self, _: &RequestContext, generation: u64) -> Result<(), Failure> {
        self.refreshed.fetch_add(1, Ordering::SeqCst);
        let _ = self.refreshes.send((self.name.clone(), generation));
        Ok(())
    }

    fn block(&self, _: &RequestContext, key: String) -> Result<String, Failure> {
        self.release
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| Failure::new("RuntimeError", "builtins", "never released"))?;
        Ok(key)
    }
}

struct Pong(String);

impl Ping for Pong {
    fn ping(&self, _: &RequestContext) -> Result<String, Failure> {
        Ok(self.0.clone())
    }
}

/// A memory transport with servers `names` serving `Compute` and `Ping` on `topic`.
struct Fixture {
    transport: Transport,
    topic: String,
    servers: Vec<RpcServer>,
    refreshed: Arc<AtomicUsize>,
    refreshes: Receiver<(String, u64)>,
    release: Sender<()>,
}

impl Fixture {
    fn new(names: &[&str]) -> Fixture {
        let transport = Transport::new(&common::memory_url()).expect("memory transport");
        let topic = common::unique("compute");
        let refreshed = Arc::new(AtomicUsize::new(0));
        let (refreshes_tx, refreshes) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::unbounded();
        let servers = names
            .iter()
            .map(|name| {
                let agent = Agent {
                    name: name.to_string(),
                    refreshed: refreshed.clone(),
                    refreshes: refreshes_tx.clone(),
                    release: release_rx.clone(),
                };
                let server =
                    RpcServer::builder(&transport, Target::new(topic.as_str()).with_server(*name))
                        .endpoint(Compute::endpoint(agent))
                        .endpoint(Ping::endpoint(Pong(name.to_string())))
                        .workers(4)
                        .build()
                        .expect("server");
                server.start().expect("start");
                server
            })
            .collect();
        Fixture {
            transport,
            topic,
            servers,
            refreshed,
            refreshes,
            release,
        }
    }

    fn compute(&self) -> ComputeClient {
        ComputeClient::new(&self.transport, Target::new(self.topic.as_str()))
            .timeout(Duration::from_secs(10))
    }

    fn untyped(&self) -> RpcClient {
        RpcClient::new(&self.transport, Target::new(self.topic.as_str()))
            .timeout(Duration::from_secs(10))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for server in &self.servers {
            server.stop();
        }
        for server in &self.servers {
            server.wait();
        }
    }
}

#[test]
fn a_typed_client_calls_a_typed_server() {
    let fixture = Fixture::new(&["host-1"]);
    let compute = fixture.compute();
    let vm = compute
        .start_instance(&ctx(), "vm-1", 512u32, None)
        .unwrap();
    assert_eq!(
        vm,
        Instance {
            id: "vm-1".into(),
            host: None,
            memory_mb: 512
        }
    );
    let vm = compute
        .start_instance(&ctx(), "vm-2", 1024u32, Some("host-1".to_string()))
        .unwrap();
    assert_eq!(vm.host.as_deref(), Some("host-1"));
    assert_eq!(
        compute.list_instances(&ctx()).unwrap(),
        vec!["vm-1".to_string(), "vm-2".to_string()]
    );
    let ping = PingClient::new(&fixture.transport, Target::new(fixture.topic.as_str()));
    assert_eq!(ping.ping(&ctx()).unwrap(), "host-1");
}

#[test]
fn the_typed_client_sends_the_arguments_as_oslo_kwargs() {
    // An untyped endpoint in the service's namespace sees exactly the map a Python client
    // would send: parameter names as keys, in declaration order.
    let transport = Transport::new(&common::memory_url()).unwrap();
    let topic = common::unique("kwargs");
    let server = RpcServer::builder(&transport, Target::new(topic.as_str()).with_server("s"))
        .endpoint(
            Endpoint::new()
                .namespace("compute")
                .version(warren::Version::new(4, 2))
                .method("start_instance", |ctx: &RequestContext, args: Value| {
                    Ok::<_, Failure>(json!({
                        "id": "echo",
                        "host": serde_json::to_string(&args).unwrap(),
                        "memory_mb": ctx.get_str("user_id").map_or(0, str::len),
                    }))
                }),
        )
        .build()
        .unwrap();
    server.start().unwrap();
    let compute = ComputeClient::new(&transport, Target::new(topic.as_str()));
    let echoed = compute
        .start_instance(&ctx(), "vm-9", 64u32, Some("h".to_string()))
        .unwrap();
    assert_eq!(
        echoed.host.as_deref(),
        Some(r#"{"instance_id":"vm-9","memory_mb":64,"host":"h"}"#)
    );
    assert_eq!(echoed.memory_mb, 5, "the context travelled");
    let echoed = compute.start_instance(&ctx(), "vm-9", 64u32, None).unwrap();
    assert_eq!(
        echoed.host.as_deref(),
        Some(r#"{"instance_id":"vm-9","memory_mb":64,"host":null}"#),
        "None is sent as null, like Python's host=None"
    );
    server.stop();
    server.wait();
}

#[test]
fn untyped_callers_reach_the_typed_server_with_keyword_arguments() {
    let fixture = Fixture::new(&["host-1"]);
    let client = fixture.untyped().namespace("compute").version("4.0");
    let vm: Instance = client
        .call(
            &ctx(),
            "start_instance",
            &json!({"memory_mb": 256, "instance_id": "vm-3"}),
        )
        .unwrap();
    assert_eq!(
        vm,
        Instance {
            id: "vm-3".into(),
            host: None,
            memory_mb: 256
        },
        "key order does not matter and a missing Option is None"
    );
}

#[test]
fn bad_keyword_arguments_are_type_errors_naming_the_argument() {
    let fixture = Fixture::new(&["host-1"]);
    let client = fixture.untyped().namespace("compute").version("4.2");
    let call = |args: Value| client.call::<_, Value>(&ctx(), "start_instance", &args);

    let Remote { class, message, .. } = remote(call(json!({"memory_mb": 1})));
    assert_eq!(class, "TypeError");
    assert!(
        message.contains("missing required argument 'instance_id'"),
        "{message}"
    );

    let Remote { class, message, .. } = remote(call(
        json!({"instance_id": "vm", "memory_mb": 1, "flavor": "m1.small"}),
    ));
    assert_eq!(class, "TypeError");
    assert!(
        message.contains("unexpected keyword argument \"flavor\""),
        "{message}"
    );

    let Remote { class, message, .. } =
        remote(call(json!({"instance_id": "vm", "memory_mb": "lots"})));
    assert_eq!(class, "TypeError");
    assert!(message.contains("memory_mb"), "{message}");

    let Remote { class, message, .. } = remote(call(json!({"instance_id": "vm", "memory_mb": -1})));
    assert_eq!(class, "TypeError", "a negative number does not fit a u32");
    assert!(message.contains("memory_mb"), "{message}");

    let Remote { class, .. } =
        remote(client.call::<_, Value>(&ctx(), "list_instances", &json!({"x": 1})));
    assert_eq!(class, "TypeError", "a method without arguments refuses one");
}

#[test]
fn namespace_and_version_declared_on_the_trait_are_enforced() {
    let fixture = Fixture::new(&["host-1"]);
    // Without the namespace, the compute methods are not reachable: Ping, in the null
    // namespace, is the compatible endpoint and lacks the method.
    let Remote { class, .. } = remote(fixture.untyped().call::<_, Value>(
        &ctx(),
        "list_instances",
        &json!({}),
    ));
    assert_eq!(class, "NoSuchMethod");
    let Remote { class, .. } = remote(fixture.untyped().namespace("storage").call::<_, Value>(
        &ctx(),
        "list_instances",
        &json!({}),
    ));
    assert_eq!(class, "UnsupportedVersion", "no endpoint in that namespace");
    // A version above the service's is refused, a lower minor accepted.
    let Remote { class, .. } = remote(fixture.compute().version("4.3").list_instances(&ctx()));
    assert_eq!(class, "UnsupportedVersion");
    assert_eq!(
        fixture
            .compute()
            .version("4.1")
            .list_instances(&ctx())
            .unwrap()
            .len(),
        2
    );
    // version_cap is checked before sending.
    let capped = fixture.compute().version_cap("4.1").list_instances(&ctx());
    assert!(
        matches!(capped, Err(Error::VersionCap { .. })),
        "{capped:?}"
    );
    assert_eq!(ComputeClient::NAMESPACE, Some("compute"));
    assert_eq!(PingClient::NAMESPACE, None);
}

#[test]
fn remote_failures_keep_class_and_kwargs() {
    let fixture = Fixture::new(&["host-1"]);
    let failure = remote(fixture.compute().destroy(&ctx(), "vm-7"));
    assert_eq!(
        (failure.class.as_str(), failure.module.as_str()),
        ("InstanceNotFound", "nova.exception")
    );
    assert_eq!(
        failure.details.kwargs.get("instance_id"),
        Some(&json!("vm-7"))
    );
}

#[test]
fn cast_and_fanout_modes_reach_the_servers() {
    let fixture = Fixture::new(&["host-1", "host-2"]);
    let compute = fixture.compute();
    compute.cast().refresh(&ctx(), 1u64).unwrap();
    let (_, generation) = fixture
        .refreshes
        .recv_timeout(Duration::from_secs(10))
        .expect("the cast ran");
    assert_eq!(generation, 1);

    compute
        .prepare()
        .fanout(true)
        .cast()
        .refresh(&ctx(), 2u64)
        .unwrap();
    let mut hosts: Vec<String> = (0..2)
        .map(|_| {
            let (host, generation) = fixture
                .refreshes
                .recv_timeout(Duration::from_secs(10))
                .expect("the fanout cast ran on both servers");
            assert_eq!(generation, 2);
            host
        })
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["host-1", "host-2"]);
    assert_eq!(fixture.refreshed.load(Ordering::SeqCst), 3);

    let fanout_call = compute.prepare().fanout(true).list_instances(&ctx());
    assert!(
        matches!(fanout_call, Err(Error::InvalidTarget { .. })),
        "{fanout_call:?}"
    );
}

#[test]
fn start_call_mode_keeps_calls_outstanding_and_server_pins_one_host() {
    let fixture = Fixture::new(&["host-1", "host-2"]);
    let on_host_2 = fixture.compute().server("host-2");
    let pending = on_host_2.start_call().block(&ctx(), "k1").unwrap();
    let second = on_host_2.start_call().block(&ctx(), "k2").unwrap();
    assert_ne!(pending.msg_id(), second.msg_id());
    fixture.release.send(()).unwrap();
    fixture.release.send(()).unwrap();
    let mut got = [pending.wait().unwrap(), second.wait().unwrap()];
    got.sort();
    assert_eq!(got, ["k1", "k2"]);
    let ping =
        PingClient::new(&fixture.transport, Target::new(fixture.topic.as_str())).server("host-2");
    for _ in 0..5 {
        assert_eq!(ping.ping(&ctx()).unwrap(), "host-2");
    }
}

#[test]
fn a_typed_call_times_out_like_an_untyped_one() {
    let transport = Transport::new(&common::memory_url()).unwrap();
    let nobody = ComputeClient::new(&transport, Target::new(common::unique("nobody")))
        .timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    match nobody.list_instances(&ctx()) {
        Err(Error::Timeout {
            method, timeout, ..
        }) => {
            assert_eq!(method, "list_instances");
            assert_eq!(timeout, Duration::from_millis(200));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Never before the deadline; the exact arithmetic is unit-tested in client/deadline.rs.
    assert!(started.elapsed() >= Duration::from_millis(200));
}
