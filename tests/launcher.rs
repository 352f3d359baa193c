//! The service launcher against the real broker: readiness, drain on shutdown, the drain
//! deadline, a second request, a service that cannot start, and the example agents stopped by
//! SIGTERM as an init system stops them.

mod common;

use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{broker_url, ctx, delete_on_broker, eventually, unique, Bus};
use crossbeam_channel::Receiver;
use serde_json::{json, Value};
use warren::{Codec, Error, Launcher, RpcServer, Shutdown, Target, Transport};

/// A server of `bus` (standard endpoints) not yet started, for a launcher to run, and what its
/// handlers report.
fn server(bus: &Bus, name: &str) -> (Transport, RpcServer, Receiver<common::Event>) {
    let transport = bus.transport(Codec::MsgPack);
    let (events_tx, events) = crossbeam_channel::unbounded();
    let mut builder = RpcServer::builder(
        &transport,
        Target::new(bus.topic.as_str()).with_server(name),
    )
    .workers(2);
    for endpoint in common::endpoints(name, events_tx) {
        builder = builder.endpoint(endpoint);
    }
    (transport.clone(), builder.build().unwrap(), events)
}

/// Waits until the `slow` handler started.
fn slow_started(events: &Receiver<common::Event>) {
    let event = events
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow call started");
    assert_eq!(event.method, "slow");
}

#[test]
fn a_shutdown_drains_calls_in_flight_and_announces_readiness() {
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.l1", bus.topic));
    let (transport, server, events) = server(&bus, "l1");
    let ready_file = std::env::temp_dir().join(unique("ready"));
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let launcher = Launcher::new()
        .service(server)
        .transport(&transport)
        .handle_signals(false)
        .ready_file(&ready_file)
        .on_ready(move || {
            let _ = ready_tx.send(());
        });
    let stop = launcher.shutdown_handle();
    let run = thread::spawn(move || launcher.run());
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("ready callback");
    assert!(
        ready_file.exists(),
        "the ready file is there once consuming"
    );
    let client = bus.client(Codec::MsgPack);
    let slow = {
        let client = client.clone();
        thread::spawn(move || client.call::<_, u64>(&ctx(), "slow", &json!({"ms": 800})))
    };
    // The call is in flight (its handler started) when the shutdown is requested.
    slow_started(&events);
    stop.shutdown();
    assert_eq!(
        slow.join().unwrap().unwrap(),
        800,
        "the call in flight finished"
    );
    assert_eq!(run.join().unwrap().unwrap(), Shutdown::Drained);
    assert!(
        !ready_file.exists(),
        "the ready file is removed at shutdown"
    );
}

#[test]
fn a_drain_past_its_deadline_is_reported_and_a_second_request_forces() {
    for (second_request, expected) in [(false, Shutdown::DrainTimedOut), (true, Shutdown::Forced)] {
        let mut bus = Bus::new(&broker_url());
        bus.track_queue(format!("{}.l2", bus.topic));
        let (transport, server, events) = server(&bus, "l2");
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let timeout = if second_request {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(300)
        };
        // Removed when the shutdown begins: what the second request waits for.
        let ready_file = std::env::temp_dir().join(unique("ready"));
        let launcher = Launcher::new()
            .service(server)
            .transport(&transport)
            .handle_signals(false)
            .drain_timeout(timeout)
            .ready_file(&ready_file)
            .on_ready(move || {
                let _ = ready_tx.send(());
            });
        let stop = launcher.shutdown_handle();
        let run = thread::spawn(move || launcher.run());
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let client = bus.client(Codec::MsgPack).timeout(Duration::from_secs(10));
        let busy =
            thread::spawn(move || client.call::<_, u64>(&ctx(), "slow", &json!({"ms": 5000})));
        slow_started(&events);
        let started = Instant::now();
        stop.shutdown();
        if second_request {
            // The second request comes during the drain, once the shutdown began.
            eventually("the shutdown begins", Duration::from_secs(10), || {
                !ready_file.exists()
            });
            stop.shutdown();
        }
        assert_eq!(run.join().unwrap().unwrap(), expected);
        // Well before the handler's 5 s are over.
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "{expected:?} after {:?}",
            started.elapsed()
        );
        // The abandoned handler still finishes in the background.
        let _ = busy.join();
    }
}

#[test]
fn a_service_that_cannot_start_stops_the_ones_started() {
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.ok", bus.topic));
    let (transport, good, _events) = server(&bus, "ok");
    // Same topic on a vhost that does not exist: refused at start.
    let refused = Transport::new(&common::broker_in_vhost(&unique("no_vhost"))).unwrap();
    let bad = RpcServer::builder(&refused, Target::new(bus.topic.as_str()).with_server("bad"))
        .retry(0)
        .build()
        .unwrap();
    let result = Launcher::new()
        .service(good)
        .service(bad)
        .transport(&transport)
        .handle_signals(false)
        .run();
    assert!(
        matches!(result, Err(Error::Authentication { .. })),
        "{result:?}"
    );
    // The first server was stopped again: nobody consumes its queue.
    eventually("no consumer left", Duration::from_secs(5), || {
        common::consumers_with_prefix(&bus.topic).is_empty()
    });
}

/// Runs an example binary with the shared broker; `target/debug/examples/<name>` is built by
/// `cargo test` (examples are compiled with the tests).
fn example(name: &str, args: &[&str]) -> Child {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/debug/examples")
        .join(name);
    Command::new(path)
        .args(args)
        .env("WARREN_URL", broker_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{name} runs (built by cargo test): {e}"))
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[test]
fn the_example_agents_stop_cleanly_on_sigterm() {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    for (name, topic) in [
        ("compute_agent", "compute"),
        ("multi_service_agent", "agent_network"),
    ] {
        let ready = std::env::temp_dir().join(unique("agent_ready"));
        let ready_arg = ready.to_string_lossy().into_owned();
        let child = example(name, &["--seconds", "120", "--ready-file", &ready_arg]);
        eventually(&format!("{name} ready"), Duration::from_secs(20), || {
            ready.exists()
        });
        // It serves: one call to its own queue.
        let transport = Transport::builder(&broker_url())
            .control_exchange(if name == "compute_agent" {
                "nova"
            } else {
                "openstack"
            })
            .codec(Codec::Json)
            .build()
            .unwrap();
        let client = warren::RpcClient::new(
            &transport,
            Target::new(topic).with_server(hostname.as_str()),
        )
        .timeout(Duration::from_secs(10));
        let (method, args) = if name == "compute_agent" {
            ("start_instance", json!({"instance_id": "vm-1"}))
        } else {
            ("allocate_port", json!({"network": "net-1"}))
        };
        let version_client = if name == "compute_agent" {
            client.version("6.0")
        } else {
            client
        };
        let answer: Value = version_client.call(&ctx(), method, &args).unwrap();
        assert!(answer.is_object(), "{answer}");
        let started = Instant::now();
        sigterm(&child);
        let output = child.wait_with_output().expect("the agent exits");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("Drained"), "{name}: {stdout}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} stopped promptly"
        );
        assert!(!ready.exists(), "{name} removed its ready file");
    }
    // What the multi-service agent's notification listener declared.
    let priorities = [
        "audit", "debug", "info", "warn", "error", "critical", "sample",
    ];
    let mut queues: Vec<String> = priorities
        .iter()
        .map(|p| format!("agent_events.{p}"))
        .collect();
    for topic in ["agent_compute", "agent_network", "compute"] {
        queues.push(topic.to_string());
        queues.push(format!("{topic}.{hostname}"));
    }
    delete_on_broker(&broker_url(), &queues, &[]);
}
