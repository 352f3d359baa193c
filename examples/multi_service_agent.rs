//! A thread-per-service agent: several services in one process, each with its own topic and
//! worker pool — a compute service (4 workers), a network service (2 workers) and a
//! notification listener — started, supervised and drained together by one [`Launcher`] until
//! SIGTERM / SIGINT (or `--seconds`).
//!
//! ```text
//! cargo run --example multi_service_agent -- --seconds 60 --ready-file /tmp/agent.ready &
//! warren call --topic agent_network --server "$(hostname)" allocate_port '{"network": "net-1"}'
//! kill -TERM %1
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use warren::{
    Endpoint, Failure, Launcher, NotificationEndpoint, NotificationListener, NotificationResult,
    Priority, RequestContext, RpcServer, Target, Transport,
};

#[derive(Deserialize)]
struct Instance {
    instance_id: String,
}

#[derive(Deserialize)]
struct Network {
    network: String,
}

fn main() -> Result<(), warren::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let seconds = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(60);
    let url =
        std::env::var("WARREN_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let transport = Transport::new(&url)?;

    let compute = RpcServer::builder(
        &transport,
        Target::new("agent_compute").with_server(host.as_str()),
    )
    .endpoint(
        Endpoint::new().method("reboot", |_: &RequestContext, i: Instance| {
            Ok::<_, Failure>(json!({"instance_id": i.instance_id, "state": "rebooting"}))
        }),
    )
    .workers(4)
    .build()?;

    let ports = Arc::new(AtomicU64::new(0));
    let network = RpcServer::builder(
        &transport,
        Target::new("agent_network").with_server(host.as_str()),
    )
    .endpoint(
        Endpoint::new().method("allocate_port", move |_: &RequestContext, n: Network| {
            let port = ports.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Failure>(json!({"network": n.network, "port": format!("port-{port}")}))
        }),
    )
    .workers(2)
    .build()?;

    let events = NotificationListener::builder(&transport, vec![Target::new("agent_events")])
        .endpoint(
            NotificationEndpoint::new().on(Priority::Info, |n: &warren::Notification| {
                println!("event {} from {}", n.event_type, n.publisher_id);
                NotificationResult::Handled
            }),
        )
        .workers(1)
        .build()?;

    let mut launcher = Launcher::new()
        .service(compute)
        .service(network)
        .service(events)
        .transport(&transport)
        .drain_timeout(Duration::from_secs(20))
        .on_ready(move || {
            println!("agent ready: agent_compute, agent_network, agent_events on {host}")
        });
    if let Some(path) = arg("--ready-file") {
        launcher = launcher.ready_file(path);
    }
    let stop = launcher.shutdown_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        stop.shutdown();
    });
    let outcome = launcher.run()?;
    println!("agent stopped: {outcome:?}");
    std::process::exit(outcome.exit_code());
}
