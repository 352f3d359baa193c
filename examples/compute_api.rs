//! A nova-api-like caller: asks the compute agent on this host (see `compute_agent`) to start
//! and stop an instance, shows how remote errors and version caps surface, and with
//! `--shutdown-agent` tells the agent to exit.
//!
//! ```text
//! cargo run --example compute_api -- [--host HOST] [--shutdown-agent]
//! ```

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use warren::{Error, RequestContext, RpcClient, Target, Transport};

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct InstanceState {
    instance_id: String,
    state: String,
    host: String,
}

fn main() -> Result<(), Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let host = args
        .iter()
        .position(|a| a == "--host")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string()
        });
    let url =
        std::env::var("WARREN_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());

    let transport = Transport::builder(&url).control_exchange("nova").build()?;
    // Like nova's ComputeAPI: one client, pinned to a version cap, prepared per call.
    let compute = RpcClient::new(&transport, Target::new("compute"))
        .version_cap("6.2")
        .timeout(Duration::from_secs(10));
    let ctx = RequestContext::new()
        .with("user_id", "demo-user")
        .with("project_id", "demo-project")
        .with("request_id", format!("req-{}", std::process::id()));
    let on_host = compute.prepare().server(host.as_str()).version("6.0");

    let started: InstanceState =
        on_host.call(&ctx, "start_instance", &json!({"instance_id": "vm-1"}))?;
    println!("start_instance vm-1 -> {started:?}");
    let stopped: InstanceState =
        on_host.call(&ctx, "stop_instance", &json!({"instance_id": "vm-1"}))?;
    println!("stop_instance vm-1  -> {stopped:?}");

    match on_host.call::<_, InstanceState>(&ctx, "stop_instance", &json!({"instance_id": "vm-404"}))
    {
        Err(Error::Remote {
            class,
            module,
            message,
            ..
        }) => {
            println!("stop_instance vm-404 -> remote {module}.{class}: {message}")
        }
        other => println!("stop_instance vm-404 -> unexpected {other:?}"),
    }
    println!(
        "can_send_version(6.3) = {}",
        compute.can_send_version("6.3")
    );
    match on_host.prepare().version("6.3").call::<_, InstanceState>(
        &ctx,
        "start_instance",
        &json!({"instance_id": "vm-2"}),
    ) {
        Err(e @ Error::VersionCap { .. }) => {
            println!("version 6.3 call      -> refused before sending: {e}")
        }
        other => println!("version 6.3 call      -> unexpected {other:?}"),
    }

    if args.iter().any(|a| a == "--shutdown-agent") {
        on_host.cast(&ctx, "shutdown", &())?;
        println!("asked the agent on {host} to shut down");
    }
    Ok(())
}
