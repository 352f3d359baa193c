//! The `warren` binary against a server running in this test process.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
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

/// `warren` with `input` on its standard input.
fn warren_with_stdin(bus: &Bus, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env(
            "WARREN_URL",
            format!("{}?control_exchange={}", bus.url, bus.exchange),
        )
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warren runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // Written from another thread: a large input must not deadlock against full pipes.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().expect("warren runs");
    writer.join().expect("stdin writer");
    output
}

/// Characters that must never reach a terminal raw (control including newlines, C1, bidi
/// overrides); callers strip the one final newline of an output first.
fn has_raw_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}'))
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

#[test]
fn a_timeout_expiring_anywhere_exits_3() {
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.info", bus.topic));
    let topic = bus.topic.clone();
    // So short that the deadline passes while connecting (before: exit 4, "the transport is
    // closed"), while waiting for the broker, or for the reply: always a timeout.
    for timeout in ["0.0001", "0.001", "0.002", "0.003", "0.005"] {
        let out = warren(
            &bus,
            &["call", "--topic", &topic, "--timeout", timeout, "echo"],
        );
        assert_eq!(out.status.code(), Some(3), "{timeout}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: timed out after "),
            "{timeout}: {}",
            stderr(&out)
        );
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        // A cast or a notification may make it in time; if not, it is a timeout too.
        for args in [
            vec!["cast", "--topic", &topic, "--timeout", timeout, "echo"],
            vec![
                "notify",
                "--topic",
                &topic,
                "--publisher",
                "p",
                "--event-type",
                "e",
                "--timeout",
                timeout,
            ],
        ] {
            let out = warren(&bus, &args);
            match out.status.code() {
                Some(0) => {}
                Some(3) => assert!(
                    stderr(&out).starts_with("error: timed out after "),
                    "{args:?}: {}",
                    stderr(&out)
                ),
                other => panic!("{args:?}: exit {other:?}: {}", stderr(&out)),
            }
        }
    }
}

#[test]
fn remote_text_is_escaped_for_the_terminal() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let topic = bus.topic.clone();
    let failure = json!({
        "class": "Evil\u{1b}[31m",
        "module": "m",
        "message": "one\ntwo\u{1b}[2J\u{1b}]0;pwned\u{7}\r\u{9b}6n\u{202e}end",
    });
    let out = warren(
        &bus,
        &["call", "--topic", &topic, "fail", &failure.to_string()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(!has_raw_control(err.trim_end_matches('\n')), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert_eq!(
        err.trim_end(),
        "Remote error: Evil\\u{1b}[31m: one\\ntwo\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\r\\u{9b}6n\\u{202e}end"
    );

    // A result on stdout: JSON with every such character escaped, meaning the same.
    let args = json!({"s\u{9b}": "\u{1b}[2J\u{7f}\u{85}\u{9b}6n\u{202e}\u{2028}\n"});
    let out = warren(
        &bus,
        &["call", "--topic", &topic, "echo", &args.to_string()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        !has_raw_control(text.trim_end_matches('\n')) && !text.contains('\u{2028}'),
        "{text:?}"
    );
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), args);
}

#[test]
fn listen_escapes_what_publishers_send() {
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.info", bus.topic));
    let url = format!("{}?control_exchange={}", bus.url, bus.exchange);
    let listener = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--url", &url, "listen", "--topic", &bus.topic, "--count", "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let payload = json!({"text": "\u{9b}2J\u{1b}[31m\u{202e}\u{85}"});
    let out = warren(
        &bus,
        &[
            "notify",
            "--topic",
            &bus.topic,
            "--publisher",
            "pub\u{9b}6n",
            "--event-type",
            "evil\u{202e}",
            &payload.to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listened = listener.wait_with_output().unwrap();
    assert_eq!(listened.status.code(), Some(0));
    let text = String::from_utf8(listened.stdout).unwrap();
    assert!(!has_raw_control(text.trim_end_matches('\n')), "{text:?}");
    let line: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(line["payload"], payload);
    assert_eq!(line["publisher_id"], "pub\u{9b}6n");
    assert_eq!(line["event_type"], "evil\u{202e}");
}

#[test]
fn arguments_from_files_and_stdin() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let topic = bus.topic.clone();
    let dir = std::env::temp_dir().join(common::unique("cli_args"));
    std::fs::create_dir_all(&dir).unwrap();

    // 1 MiB of arguments: over what one command-line argument may hold (128 KiB on Linux).
    let big = json!({"blob": "x".repeat(1 << 20), "n": 7});
    let big_file = dir.join("big.json");
    std::fs::write(&big_file, big.to_string()).unwrap();
    let at_big = format!("@{}", big_file.display());
    let out = warren(&bus, &["call", "--topic", &topic, "echo", &at_big]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), big);

    // `-`: standard input, for the arguments or the context (large too).
    let out = warren_with_stdin(
        &bus,
        &["call", "--topic", &topic, "echo", "-"],
        big.to_string().as_bytes(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), big);
    let out = warren_with_stdin(
        &bus,
        &["call", "--topic", &topic, "--context", "-", "context"],
        br#"{"user_id": "from-stdin"}"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["user_id"],
        "from-stdin"
    );
    let context_file = dir.join("context.json");
    std::fs::write(&context_file, r#"{"user_id": "from-file"}"#).unwrap();
    let at_context = format!("@{}", context_file.display());
    let out = warren_with_stdin(
        &bus,
        &[
            "call",
            "--topic",
            &topic,
            "--context",
            &at_context,
            "add",
            "-",
        ],
        br#"{"a": 40, "b": 2}"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");
    // A cast's arguments too.
    let out = warren_with_stdin(
        &bus,
        &["cast", "--topic", &topic, "record", "-"],
        br#"{"via": "stdin"}"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        bus.expect_events(1, Duration::from_secs(10))[0].value,
        json!({"via": "stdin"})
    );

    // Unreadable, empty, not UTF-8, stdin twice: exit 2 and one clear line.
    let missing = dir.join("missing.json");
    let at_missing = format!("@{}", missing.display());
    let not_utf8 = dir.join("latin1.json");
    std::fs::write(&not_utf8, b"{\"a\": \"\xe9\"}").unwrap();
    let at_not_utf8 = format!("@{}", not_utf8.display());
    let at_dir = format!("@{}", dir.display());
    for (bad, expected) in [
        (
            vec!["call", "--topic", &topic, "echo", &at_missing],
            "cannot read ARGS_JSON from file",
        ),
        (
            vec!["call", "--topic", &topic, "echo", &at_dir],
            "cannot read ARGS_JSON from file",
        ),
        (
            vec!["call", "--topic", &topic, "--context", &at_missing, "echo"],
            "cannot read --context from file",
        ),
        (
            vec!["call", "--topic", &topic, "echo", "@"],
            "must be followed by a file name",
        ),
        (
            vec!["call", "--topic", &topic, "echo", &at_not_utf8],
            "ARGS_JSON is not UTF-8",
        ),
        (
            vec!["call", "--topic", &topic, "--context", "-", "echo", "-"],
            "cannot both read standard input",
        ),
        (
            vec![
                "notify",
                "--publisher",
                "p",
                "--event-type",
                "e",
                &at_missing,
            ],
            "cannot read PAYLOAD_JSON from file",
        ),
    ] {
        let out = warren_with_stdin(&bus, &bad, b"{}");
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{bad:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: ") && stderr(&out).contains(expected),
            "{bad:?}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
