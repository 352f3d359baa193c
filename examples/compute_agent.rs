//! A nova-compute-like agent: serves `start_instance` / `stop_instance` on topic `compute`,
//! server = this host's name, under a [`Launcher`]: until SIGTERM / SIGINT (as an init system
//! stops it), a `shutdown` cast (as `compute_api --shutdown-agent` sends) or `--seconds` have
//! passed; then it drains the calls in flight and exits 0 (1 if the drain did not complete).
//! `--ready-file PATH` is touched once it consumes. An observer (`warren::observe::Stats`)
//! records what it served; its per-method table is printed when the agent stops.
//!
//! ```text
//! cargo run --example compute_agent -- --seconds 60 &
//! cargo run --example compute_api -- --shutdown-agent   # or: kill -TERM %1
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use warren::observe::Stats;
use warren::{
    Endpoint, Failure, Launcher, NoArgs, RequestContext, RpcServer, ShutdownHandle, Target,
    Transport, Version,
};

#[derive(Deserialize)]
struct InstanceArgs {
    instance_id: String,
}

#[derive(Serialize)]
struct InstanceState {
    instance_id: String,
    state: &'static str,
    host: String,
}

/// The agent's "hypervisor": instance id -> running?
type Hypervisor = Arc<Mutex<HashMap<String, bool>>>;

fn not_found(instance_id: &str) -> Failure {
    Failure::new(
        "InstanceNotFound",
        "nova.exception",
        format!("Instance {instance_id} could not be found."),
    )
    .with_kwargs(
        [("instance_id".to_string(), instance_id.into())]
            .into_iter()
            .collect(),
    )
    .expected()
}

fn compute_endpoint(host: &str, hypervisor: &Hypervisor, shutdown: ShutdownHandle) -> Endpoint {
    let (h1, h2) = (hypervisor.clone(), hypervisor.clone());
    let (host1, host2) = (host.to_string(), host.to_string());
    Endpoint::new()
        .version(Version::new(6, 2))
        .method(
            "start_instance",
            move |ctx: &RequestContext, args: InstanceArgs| {
                log::info!(
                    "start_instance {} for {:?}",
                    args.instance_id,
                    ctx.get_str("user_id")
                );
                h1.lock().insert(args.instance_id.clone(), true);
                Ok::<_, Failure>(InstanceState {
                    instance_id: args.instance_id,
                    state: "running",
                    host: host1.clone(),
                })
            },
        )
        .method(
            "stop_instance",
            move |_: &RequestContext, args: InstanceArgs| {
                let mut instances = h2.lock();
                match instances.get_mut(&args.instance_id) {
                    Some(running) => {
                        *running = false;
                        Ok(InstanceState {
                            instance_id: args.instance_id,
                            state: "stopped",
                            host: host2.clone(),
                        })
                    }
                    None => Err(not_found(&args.instance_id)),
                }
            },
        )
        .method("shutdown", move |_: &RequestContext, _: NoArgs| {
            shutdown.shutdown();
            Ok::<_, Failure>(())
        })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
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
    let host = hostname();

    // Calls per method, failures by class, latency, connections: printed when the agent stops.
    let stats = Arc::new(Stats::new());
    let transport = Transport::builder(&url)
        .control_exchange("nova")
        .observer(stats.clone())
        .build()?;
    let hypervisor = Hypervisor::default();
    let mut launcher = Launcher::new()
        .transport(&transport)
        .drain_timeout(Duration::from_secs(30));
    let shutdown = launcher.shutdown_handle();
    let server = RpcServer::builder(
        &transport,
        Target::new("compute").with_server(host.as_str()),
    )
    .endpoint(compute_endpoint(&host, &hypervisor, shutdown.clone()))
    .workers(4)
    .build()?;
    launcher = launcher.service(server).on_ready(move || {
        println!(
            "compute agent ready: topic compute, server {host}, exchange nova (for {seconds}s at most)"
        )
    });
    if let Some(path) = arg("--ready-file") {
        launcher = launcher.ready_file(path);
    }
    // The time limit is one more way to ask for the shutdown.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        println!("{seconds}s elapsed");
        shutdown.shutdown();
    });
    let outcome = launcher.run()?;
    println!(
        "compute agent stopped ({outcome:?}); {} instance(s) known",
        hypervisor.lock().len()
    );
    print!("{}", stats.snapshot());
    std::process::exit(outcome.exit_code());
}
