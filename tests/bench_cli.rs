//! `warren bench` against the real broker: the numbers it reports follow the bench contract,
//! the two roles meet across processes, and every queue it declares is gone afterwards.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{broker_url, consumers_with_prefix, eventually, rabbitmqctl_json, unique};
use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--url", &broker_url(), "bench", "--quiet"])
        .args(args)
        .output()
        .expect("warren bench runs")
}

/// The JSON object on the last stdout line.
fn report(output: &Output) -> Value {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last:?}"))
}

fn queues_named(prefix: &str) -> Vec<String> {
    rabbitmqctl_json(&["list_queues", "name"])
        .into_iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .filter(|name| name.starts_with(prefix))
        .collect()
}

fn assert_consistent(report: &Value, ok: u64) {
    assert_eq!(report["ok"], ok, "{report}");
    for kind in ["timeout", "remote", "delivery", "other"] {
        assert_eq!(report["errors"][kind], 0, "{kind}: {report}");
    }
    let per_second: u64 = report["per_second"]
        .as_array()
        .expect("per_second")
        .iter()
        .map(|n| n.as_u64().expect("count"))
        .sum();
    assert_eq!(per_second, ok, "per_second adds up to ok: {report}");
    assert!(report["throughput_per_s"].as_f64().expect("throughput") > 0.0);
    assert!(report["duration_s"].as_f64().expect("duration") > 0.0);
    let rss = report["rss_kib"].as_u64().expect("rss");
    assert!(rss > 1000 && rss < 200_000, "{rss}");
}

#[test]
fn calls_report_the_contract_fields_and_leave_no_queue() {
    let topic = unique("bench");
    let out = bench(&[
        "--count",
        "300",
        "--clients",
        "3",
        "--topic",
        &topic,
        "--json",
    ]);
    let report = report(&out);
    assert_consistent(&report, 300);
    assert_eq!(report["mode"], "call");
    assert_eq!(report["clients"], 3);
    assert_eq!(report["servers"], 1);
    assert_eq!(report["codec"], "msgpack");
    assert_eq!(report["payload"], 100);
    assert_eq!(report["confirm"], "on");
    let latency = &report["latency_us"];
    let (p50, p90, p99, max) = (
        latency["p50"].as_u64().expect("p50"),
        latency["p90"].as_u64().expect("p90"),
        latency["p99"].as_u64().expect("p99"),
        latency["max"].as_u64().expect("max"),
    );
    assert!(
        0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{latency}"
    );
    // The human summary comes first.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("warren call clients=3"), "{stdout}");
    assert_eq!(queues_named(&topic), Vec::<String>::new());
}

#[test]
fn casts_count_what_the_servers_handled() {
    let topic = unique("bench");
    let unconfirmed = report(&bench(&[
        "--mode",
        "cast",
        "--count",
        "500",
        "--confirm",
        "off",
        "--codec",
        "json",
        "--topic",
        &topic,
        "--json",
    ]));
    assert_consistent(&unconfirmed, 500);
    assert_eq!(unconfirmed["confirm"], "off");
    assert_eq!(unconfirmed["codec"], "json");
    // Fanout: every cast is handled by each of the servers.
    let fanout = report(&bench(&[
        "--mode",
        "fanout",
        "--servers",
        "2",
        "--count",
        "100",
        "--topic",
        &topic,
        "--json",
    ]));
    assert_consistent(&fanout, 200);
    assert_eq!(queues_named(&topic), Vec::<String>::new());
}

#[test]
fn server_and_client_roles_meet_across_processes() {
    let topic = unique("bench");
    let server = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--url", &broker_url(), "bench", "--quiet", "--json"])
        .args(["--role", "server", "--servers", "2", "--topic", &topic])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("server role");
    eventually("the bench servers consume", Duration::from_secs(20), || {
        consumers_with_prefix(&topic).len() >= 6
    });
    let client = report(&bench(&[
        "--role",
        "client",
        "--topic",
        &topic,
        "--count",
        "200",
        "--clients",
        "4",
        "--json",
    ]));
    assert_consistent(&client, 200);
    assert_eq!(client["servers"], 0);

    // SIGTERM ends the server role cleanly, with its own report.
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let served = report(&server.wait_with_output().expect("server exits"));
    assert_eq!(served["ok"], 200, "{served}");
    assert_eq!(served["clients"], 0);
    assert_eq!(queues_named(&topic), Vec::<String>::new());
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["--role", "client"][..],
        &["--clients", "0"][..],
        &["--count", "0"][..],
        &["--mode", "broadcast"][..],
        &["--duration", "-1"][..],
    ] {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
