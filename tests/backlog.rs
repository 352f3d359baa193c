//! Bounded memory on the real broker: a 100,000-message backlog waits in the broker, not in
//! the server's memory (prefetch bounds what the listener takes).
//!
//! Its own binary, so that no other test's allocations blur the count.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::gate::{cleanup, gated_server, Gate, OpenOnDrop};
use common::{broker_url, eventually, queue_count, unique};

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_backlog_of_100k_messages_stays_in_the_broker_not_in_the_server() {
    let url = broker_url();
    let topic = unique("backlog");
    let gate = Arc::new(Gate::default());
    let (server, _server_transport) = gated_server(&url, &topic, &gate);
    let _open_on_exit = OpenOnDrop(gate.clone());
    let before = rss_kib();

    // Another process publishes the backlog, so its buffers are not counted here.
    let published = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--url", &url, "bench", "--role", "client", "--mode", "cast"])
        .args([
            "--topic",
            &topic,
            "--count",
            "100000",
            "--confirm",
            "off",
            "--payload",
            "200",
        ])
        .args(["--quiet"])
        .output()
        .expect("warren bench");
    assert!(published.status.success(), "{published:?}");
    // The workers hold 4, the listener at most its prefetch (64 per consumer); the rest waits
    // in the broker.
    eventually(
        "the backlog is in the queue",
        Duration::from_secs(30),
        || queue_count(&topic, "messages_ready") >= 99_000,
    );
    // Whatever the listener takes, it has taken once the broker counts it as delivered.
    eventually(
        "the listener took its prefetch",
        Duration::from_secs(10),
        || queue_count(&topic, "messages_unacknowledged") >= 64,
    );
    let during = rss_kib();
    assert!(
        during < before + 4 * 1024,
        "RSS grew from {before} KiB to {during} KiB with the backlog waiting"
    );

    gate.open();
    eventually("the backlog is drained", Duration::from_secs(120), || {
        queue_count(&topic, "messages_ready") == 0
    });
    server.stop();
    server.wait();
    cleanup(&url, &topic);
}
