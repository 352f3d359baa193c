//! The `warren` binary against a server running in this test process.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{broker_url, Bus};
use serde_json::{json, Value};

fn warren(bus: &Bus, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .env(
            "WARREN_URL",
            format!("{}?control_exchange={}", bus.url, bus.exchange),
        )
        .args(args)
        .output()
        .expect("warren runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn call_prints_the_result_as_json() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 2);
    bus.start_server("s2", 2);
    for codec in ["json", "msgpack"] {
        let out = warren(
            &bus,
            &[
                "call",
                "--topic",
                &bus.topic,
                "--codec",
                codec,
                "add",
                r#"{"a": 40, "b": 2}"#,
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "42");
    }
    let out = warren(
        &bus,
        &[
            "call",
            "--topic",
            &bus.topic,
            "--server",
            "s2",
            "--version",
            "1.2",
            "--context",
            r#"{"user_id": "cli"}"#,
            "context",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ctx: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(ctx["user_id"], "cli");
    let out = warren(
        &bus,
        &["call", "--topic", &bus.topic, "--server", "s2", "whoami"],
    );
    assert_eq!(stdout(&out), r#""s2""#);
    let out = warren(
        &bus,
        &[
            "call",
            "--topic",
            &bus.topic,
            "--namespace",
            "admin",
            "--version",
            "2.0",
            "reset",
        ],
    );
    assert!(
        stdout(&out).starts_with(r#""reset by s"#),
        "{}",
        stdout(&out)
    );
}

#[test]
fn cast_and_fanout_cast() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    bus.start_server("s2", 1);
    let out = warren(
        &bus,
        &[
            "cast",
            "--topic",
            &bus.topic,
            "record",
            r#"{"via": "cast"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        bus.expect_events(1, Duration::from_secs(10))[0].value,
        json!({"via": "cast"})
    );
    let out = warren(
        &bus,
        &[
            "cast",
            "--topic",
            &bus.topic,
            "--fanout",
            "record",
            r#"{"via": "fanout"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut servers: Vec<String> = bus
        .expect_events(2, Duration::from_secs(10))
        .into_iter()
        .map(|e| e.server)
        .collect();
    servers.sort();
    assert_eq!(servers, ["s1", "s2"]);
}

#[test]
fn exit_codes() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let topic = bus.topic.clone();

    let remote = warren(&bus, &["call", "--topic", &topic, "nope"]);
    assert_eq!(remote.status.code(), Some(1));
    assert_eq!(
        stderr(&remote),
        "Remote error: NoSuchMethod: Endpoint does not support RPC method nope"
    );

    // Bad input warren itself detects: exit 2 and one line.
    for bad in [
        vec!["call", "--topic", &topic, "add", "[1, 2]"],
        vec!["call", "--topic", &topic, "add", "{not json"],
        vec!["call", "--topic", &topic, "--context", "42", "add"],
        vec!["call", "--topic", &topic, "--version", "one", "add"],
        vec!["call", "--topic", &topic, "--timeout", "0", "add"],
        vec!["--url", "http://nope/", "call", "--topic", &topic, "add"],
        vec![
            "--url",
            "amqp://h/?bogus_option=1",
            "call",
            "--topic",
            &topic,
            "add",
        ],
    ] {
        let out = warren(&bus, &bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{bad:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{bad:?}: {}",
            stderr(&out)
        );
    }
    // Usage errors found by the argument parser: exit 2, the error first, then usage help.
    for bad in [
        vec!["call", "add"],
        vec!["call", "--topic", &topic, "--codec", "xml", "add"],
        vec!["frobnicate"],
    ] {
        let out = warren(&bus, &bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{bad:?}: {}",
            stderr(&out)
        );
    }

    let timeout = warren(
        &bus,
        &[
            "call",
            "--topic",
            &common::unique("nobody"),
            "--timeout",
            "0.3",
            "echo",
        ],
    );
    assert_eq!(timeout.status.code(), Some(3), "{}", stderr(&timeout));
    assert!(
        stderr(&timeout).starts_with("error: timed out"),
        "{}",
        stderr(&timeout)
    );

    let unreachable = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_URL", "amqp://guest:sekrit-pw@127.0.0.1:1/")
        .args(["call", "--topic", &topic, "--timeout", "2", "echo"])
        .output()
        .unwrap();
    assert_eq!(
        unreachable.status.code(),
        Some(4),
        "{}",
        stderr(&unreachable)
    );
    let message = stderr(&unreachable);
    assert!(
        !message.contains("sekrit") && message.lines().count() == 1,
        "{message}"
    );

    // --url wins over WARREN_URL.
    let overridden = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_URL", "amqp://guest:guest@127.0.0.1:1/")
        .args([
            "--url",
            &format!("{}?control_exchange={}", bus.url, bus.exchange),
        ])
        .args(["call", "--topic", &topic, "whoami"])
        .output()
        .unwrap();
    assert_eq!(stdout(&overridden), r#""s1""#, "{}", stderr(&overridden));
}

#[test]
fn notify_and_listen() {
    let mut bus = Bus::new(&broker_url());
    for priority in [
        "audit", "debug", "info", "warn", "error", "critical", "sample",
    ] {
        bus.track_queue(format!("{}.{priority}", bus.topic));
    }
    let url = format!("{}?control_exchange={}", bus.url, bus.exchange);
    let listener = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--url",
            &url,
            "listen",
            "--topic",
            &bus.topic,
            "--priority",
            "info,error",
            "--count",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The notifier declares the queue, so these wait for the listener even if it is not up yet.
    let out = warren(
        &bus,
        &[
            "notify",
            "--topic",
            &bus.topic,
            "--publisher",
            "cli.test",
            "--event-type",
            "cli.event",
            "--context",
            r#"{"user_id": "u"}"#,
            r#"{"n": 1}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = warren(
        &bus,
        &[
            "notify",
            "--topic",
            &bus.topic,
            "--publisher",
            "cli.test",
            "--event-type",
            "cli.failure",
            "--priority",
            "error",
            "--format",
            "v1",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bad = warren(
        &bus,
        &[
            "notify",
            "--topic",
            &bus.topic,
            "--publisher",
            "p",
            "--event-type",
            "e",
            "--priority",
            "loud",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    let listened = listener.wait_with_output().unwrap();
    assert_eq!(listened.status.code(), Some(0));
    let mut lines: Vec<Value> = String::from_utf8_lossy(&listened.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|l| l["event_type"].as_str().map(str::to_string));
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (
            lines[0]["event_type"].as_str(),
            lines[0]["priority"].as_str()
        ),
        (Some("cli.event"), Some("info"))
    );
    assert_eq!(lines[0]["payload"], json!({"n": 1}));
    assert_eq!(lines[0]["ctxt"]["user_id"], "u");
    assert_eq!(lines[0]["publisher_id"], "cli.test");
    assert_eq!(
        (
            lines[1]["event_type"].as_str(),
            lines[1]["priority"].as_str()
        ),
        (Some("cli.failure"), Some("error"))
    );
    assert_eq!(lines[1]["payload"], json!({}));
}
