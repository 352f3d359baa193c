//! The `warren` binary against a server running in this test process.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{broker_url, Bus};
use serde_json::{json, Value};
use warren::{
    Codec, Endpoint, Failure as RemoteFailure, RequestContext, RpcServer, Target, Version,
};

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

/// `warren` run in `dir` on the bus's broker and exchange (unless `args` has its own `--url`).
fn warren_in(bus: &Bus, dir: &std::path::Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .env(
            "WARREN_URL",
            format!("{}?control_exchange={}", bus.url, bus.exchange),
        )
        .current_dir(dir)
        .args(args)
        .output()
        .expect("warren runs")
}

/// `line` split into words as a shell splits it, for the examples' subset of shell: words
/// separated by blanks, '...' or "..." quoting (no escapes inside), `#` starting a comment.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                let mut closed = false;
                for q in chars.by_ref() {
                    if q == c {
                        closed = true;
                        break;
                    }
                    w.push(q);
                }
                assert!(closed, "unbalanced quote in {line:?}");
            }
            '#' if word.is_none() => break,
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The worked examples at the end of `warren <sub> --help`: every line after `Examples:` that
/// starts with `warren`, as the words after `warren` (each checked to need no more shell than
/// [`shell_words`] does: no pipe, redirection, substitution or background job).
fn help_examples(sub: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(sub)
        .arg("--help")
        .output()
        .expect("warren runs");
    assert_eq!(out.status.code(), Some(0), "{sub:?}: {}", stderr(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    let (_, examples) = help
        .split_once("\nExamples:\n")
        .unwrap_or_else(|| panic!("no examples in `warren {sub:?} --help`:\n{help}"));
    examples
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("warren "))
        .map(|line| {
            let unquoted: String = line.split('\'').step_by(2).collect();
            assert!(
                !unquoted.contains(['|', '<', '>', '&', '$', '`', ';']),
                "not runnable as plain words: {line}"
            );
            shell_words(line)[1..].to_vec()
        })
        .collect()
}

/// What an example must be adapted to for this test: its own topic, exchange and pool queue
/// instead of the examples' (`compute`, `nova`, `audit-1`), its broker for any `--url` but
/// memory://, and its topic for `notify` and `listen` where the example uses the default.
struct Adapt<'a> {
    bus: &'a Bus,
    pool: String,
}

impl Adapt<'_> {
    fn args(&self, example: &[String]) -> Vec<String> {
        let bus = self.bus;
        let mut out: Vec<String> = Vec::new();
        let mut words = example.iter();
        while let Some(word) = words.next() {
            out.push(word.clone());
            let ours = match word.as_str() {
                "--topic" => bus.topic.clone(),
                "--exchange" => bus.exchange.clone(),
                "--pool" => self.pool.clone(),
                "--url" => format!("{}?control_exchange={}", bus.url, bus.exchange),
                _ => continue,
            };
            let theirs = words.next().expect("a flag's value");
            if word == "--url" && theirs.starts_with("memory://") {
                out.push(theirs.clone());
            } else {
                out.push(ours);
            }
        }
        let sub = out
            .iter()
            .position(|w| w == "notify" || w == "listen")
            .filter(|_| !out.iter().any(|w| w == "--topic"));
        if let Some(sub) = sub {
            out.splice(sub + 1..sub + 1, ["--topic".to_string(), bus.topic.clone()]);
        }
        out
    }
}

/// The subcommand and positional arguments of `call` / `cast` arguments (flags skipped: all
/// take a value but --fanout).
fn positionals(args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--fanout" {
            continue;
        }
        if word.starts_with("--") {
            words.next();
            continue;
        }
        out.push(word.as_str());
    }
    out
}

/// A request one of the compute-like servers saw.
#[derive(Debug)]
struct Seen {
    server: String,
    method: String,
    args: Value,
    user_id: Option<String>,
}

/// A server of the kind the help examples address (interface version 1.3): every method
/// reports what it saw and answers `{"instance_id", "state", "host"}`.
fn start_compute(bus: &mut Bus, name: &str, seen: crossbeam_channel::Sender<Seen>) -> RpcServer {
    let mut endpoint = Endpoint::new().version(Version::new(1, 3));
    for method in [
        "start_instance",
        "stop_instance",
        "list_instances",
        "reboot_instance",
        "refresh_cache",
    ] {
        let (server, seen) = (name.to_string(), seen.clone());
        endpoint = endpoint.method(method, move |ctx: &RequestContext, args: Value| {
            let state = if method == "stop_instance" {
                "stopped"
            } else {
                "running"
            };
            let reply =
                json!({"instance_id": args.get("instance_id"), "state": state, "host": server});
            let _ = seen.send(Seen {
                server: server.clone(),
                method: method.to_string(),
                args,
                user_id: ctx.get_str("user_id").map(str::to_string),
            });
            Ok::<_, RemoteFailure>(reply)
        });
    }
    let transport = bus.transport(Codec::MsgPack);
    let target = Target::new(bus.topic.as_str()).with_server(name);
    bus.track_queue(format!("{}.{name}", bus.topic));
    let server = RpcServer::builder(&transport, target)
        .endpoint(endpoint)
        .workers(2)
        .build()
        .expect("server");
    server.start().expect("server start");
    server
}

#[test]
fn call_and_cast_help_examples_work() {
    let mut bus = Bus::new(&broker_url());
    let (tx, seen) = crossbeam_channel::unbounded();
    let servers = [
        start_compute(&mut bus, "host-1", tx.clone()),
        start_compute(&mut bus, "host-2", tx),
    ];
    let dir = std::env::temp_dir().join(common::unique("cli_examples"));
    std::fs::create_dir_all(&dir).unwrap();
    let file_args = json!({"instance_id": "vm-1"});
    std::fs::write(dir.join("args.json"), file_args.to_string()).unwrap();
    let adapt = Adapt {
        bus: &bus,
        pool: common::unique("pool"),
    };

    let mut examples = help_examples(&[]);
    assert!(examples.len() >= 3, "{examples:?}");
    let call = help_examples(&["call"]);
    let cast = help_examples(&["cast"]);
    assert!(call.len() >= 5 && cast.len() >= 3, "{call:?} {cast:?}");
    examples.extend(call);
    examples.extend(cast);
    for example in &examples {
        let args = adapt.args(example);
        let out = warren_in(&bus, &dir, &args);
        assert_eq!(out.status.code(), Some(0), "{example:?}: {}", stderr(&out));
        if args.iter().any(|a| a == "--help") {
            assert!(stdout(&out).contains("Examples:"), "{example:?}");
            continue;
        }
        let positional = positionals(&args);
        let (sub, method, sent) = match positional[..] {
            [sub, method] => (sub, method, json!({})),
            [sub, method, "@args.json"] => (sub, method, file_args.clone()),
            [sub, method, inline] => (sub, method, serde_json::from_str(inline).unwrap()),
            _ => panic!("{example:?}: unexpected arguments {positional:?}"),
        };
        let has = |flag: &str, value: &str| args.windows(2).any(|w| w[0] == flag && w[1] == value);
        let fanout = args.iter().any(|a| a == "--fanout");
        let saw: Vec<Seen> = (0..if fanout { 2 } else { 1 })
            .map(|_| {
                seen.recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| panic!("{example:?}: no server saw it"))
            })
            .collect();
        for s in &saw {
            assert_eq!((s.method.as_str(), &s.args), (method, &sent), "{example:?}");
            if has("--server", "host-1") {
                assert_eq!(s.server, "host-1", "{example:?}");
            }
            if args.iter().any(|a| a == "--context") {
                assert_eq!(s.user_id.as_deref(), Some("admin"), "{example:?}");
            }
        }
        if fanout {
            let mut servers: Vec<&str> = saw.iter().map(|s| s.server.as_str()).collect();
            servers.sort();
            assert_eq!(servers, ["host-1", "host-2"], "{example:?}");
        }
        let printed = String::from_utf8(out.stdout.clone()).unwrap();
        if sub == "cast" {
            assert_eq!(printed, "", "{example:?}");
            continue;
        }
        assert_eq!(sub, "call", "{example:?}");
        let result: Value = serde_json::from_str(&printed).expect("one JSON document");
        assert_eq!(result["host"], saw[0].server.as_str(), "{example:?}");
        assert_eq!(result["instance_id"], sent["instance_id"], "{example:?}");
        let lines = printed.trim_end_matches('\n').lines().count();
        if has("--output", "pretty") {
            assert!(lines > 1, "{example:?}: {printed}");
        } else {
            assert_eq!(lines, 1, "{example:?}: {printed}");
        }
    }
    assert!(seen.try_recv().is_err(), "a request nobody expected");
    for server in &servers {
        server.stop();
        server.wait();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn notify_and_listen_help_examples_work() {
    let mut bus = Bus::new(&broker_url());
    let adapt = Adapt {
        bus: &bus,
        pool: common::unique("pool"),
    };
    let pool = adapt.pool.clone();
    let dir = std::env::temp_dir();
    let listen = help_examples(&["listen"]);
    let notify = help_examples(&["notify"]);
    assert!(
        listen.len() >= 2 && notify.len() >= 2,
        "{listen:?} {notify:?}"
    );
    // Every listen example ends by itself (--count), and starts before the notifications.
    let listeners: Vec<_> = listen
        .iter()
        .map(|example| {
            assert!(example.iter().any(|a| a == "--count"), "{example:?}");
            let child = Command::new(env!("CARGO_BIN_EXE_warren"))
                .env(
                    "WARREN_URL",
                    format!("{}?control_exchange={}", bus.url, bus.exchange),
                )
                .args(adapt.args(example))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (example, child)
        })
        .collect();
    let notify: Vec<Vec<String>> = notify.iter().map(|e| adapt.args(e)).collect();
    for args in &notify {
        let out = warren_in(&bus, &dir, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
    }
    // A pool listener gets only what is published once its queue exists: send the examples
    // again until every listener has had its count (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut running = listeners;
    let mut finished = Vec::new();
    while !running.is_empty() {
        std::thread::sleep(Duration::from_millis(300));
        let mut still = Vec::new();
        for (example, mut child) in running {
            if child.try_wait().unwrap().is_some() {
                finished.push((example, child.wait_with_output().unwrap()));
            } else if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{example:?} never ended");
            } else {
                still.push((example, child));
            }
        }
        running = still;
        if !running.is_empty() {
            for args in &notify {
                assert_eq!(warren_in(&bus, &dir, args).status.code(), Some(0));
            }
        }
    }
    bus.track_queue(pool);
    for (example, out) in finished {
        assert_eq!(out.status.code(), Some(0), "{example:?}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let documents: Vec<Value> = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{example:?}: {e}: {text}"));
        let count: usize = example[example.iter().position(|a| a == "--count").unwrap() + 1]
            .parse()
            .unwrap();
        assert_eq!(documents.len(), count, "{example:?}: {text}");
        let pretty = example.windows(2).any(|w| w == ["--output", "pretty"]);
        // json: one line per notification; pretty: indented, several lines each.
        let lines = text.trim_end_matches('\n').lines().count();
        if pretty {
            assert!(lines > 3 * count, "{example:?}: {text}");
        } else {
            assert_eq!(lines, count, "{example:?}: {text}");
        }
        let priorities = example
            .windows(2)
            .find(|w| w[0] == "--priority")
            .map(|w| w[1].split(',').collect::<Vec<_>>());
        for n in &documents {
            assert_eq!(n["publisher_id"], "compute.host-1", "{example:?}: {text}");
            assert!(
                n["event_type"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("compute.instance.create.")),
                "{example:?}: {text}"
            );
            if let Some(priorities) = &priorities {
                assert!(
                    priorities.contains(&n["priority"].as_str().unwrap()),
                    "{example:?}: {text}"
                );
            }
            if n["priority"] == "error" {
                assert_eq!(n["ctxt"]["user_id"], "admin", "{example:?}: {text}");
                assert_eq!(
                    n["payload"]["reason"], "no valid host",
                    "{example:?}: {text}"
                );
            }
        }
    }
}

#[test]
fn bench_help_examples_work() {
    let bus = Bus::new(&broker_url());
    let adapt = Adapt {
        bus: &bus,
        pool: common::unique("pool"),
    };
    let examples = help_examples(&["bench"]);
    assert!(
        examples
            .iter()
            .any(|e| e.iter().any(|a| a.starts_with("memory://"))),
        "{examples:?}"
    );
    for example in &examples {
        let out = warren_in(&bus, &std::env::temp_dir(), &adapt.args(example));
        assert_eq!(out.status.code(), Some(0), "{example:?}: {}", stderr(&out));
        if example.iter().any(|a| a == "--json") {
            let text = stdout(&out);
            let report: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            let count = example.windows(2).find(|w| w[0] == "--count");
            let expected = count.map_or(1, |w| w[1].parse::<u64>().unwrap());
            assert!(
                report["ok"].as_u64().unwrap() >= expected,
                "{example:?}: {text}"
            );
        }
    }
    // bench has its own report format: --output is refused, not ignored.
    let out = warren(
        &bus,
        &[
            "--output",
            "pretty",
            "bench",
            "--url",
            "memory://b/",
            "--count",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--json"), "{}", stderr(&out));
}

#[test]
fn output_json_and_pretty() {
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 1);
    let topic = bus.topic.clone();
    let args = json!({
        "name": "vm-1",
        "tags": ["a", "b"],
        "nested": {"evil": "\u{1b}[2J\u{9b}6n\u{202e}\u{85}\u{2028}\r\n\t", "n": 1.5, "none": null},
    });
    let args_text = args.to_string();
    let call = |output: &[&str]| {
        let mut argv = output.to_vec();
        argv.extend(["call", "--topic", &topic, "echo", &args_text]);
        let out = warren(&bus, &argv);
        assert_eq!(out.status.code(), Some(0), "{output:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // json, the default: one compact line, escaped for the terminal, the same value.
    let default = call(&[]);
    assert_eq!(call(&["--output", "json"]), default);
    assert!(default.ends_with('\n'), "{default:?}");
    let line = default.strip_suffix('\n').unwrap();
    assert!(!line.contains('\n') && !line.contains(": ") && !has_raw_control(line));
    assert!(!line.contains('\u{2028}'), "{line:?}");
    assert_eq!(serde_json::from_str::<Value>(line).unwrap(), args);
    assert!(
        line.starts_with(r#"{"name":"vm-1","tags":["a","b"],"nested":{"evil":""#),
        "{line}"
    );

    // pretty: indented over several lines, each free of raw control characters, same value;
    // the flag is global, so it goes before or after the subcommand.
    let pretty = call(&["--output", "pretty"]);
    let mut after = vec!["call", "--output", "pretty", "--topic", &topic, "echo"];
    after.push(&args_text);
    assert_eq!(stdout(&warren(&bus, &after)), pretty.trim_end());
    assert!(pretty.ends_with("}\n"), "{pretty:?}");
    let lines: Vec<&str> = pretty.trim_end_matches('\n').split('\n').collect();
    assert!(lines.len() > 8, "{pretty}");
    for line in &lines {
        assert!(
            !has_raw_control(line) && !line.contains('\u{2028}'),
            "{line:?}"
        );
    }
    assert_eq!(lines[..3], ["{", r#"  "name": "vm-1","#, r#"  "tags": ["#]);
    assert_eq!(serde_json::from_str::<Value>(&pretty).unwrap(), args);
    // A scalar is the same in both.
    for output in ["json", "pretty"] {
        let out = warren(
            &bus,
            &[
                "--output",
                output,
                "call",
                "--topic",
                &topic,
                "add",
                r#"{"a": 40, "b": 2}"#,
            ],
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{output}");
    }

    // Failures keep their exit code and one-line message in either format.
    for output in ["json", "pretty"] {
        let remote = warren(
            &bus,
            &["--output", output, "call", "--topic", &topic, "nope"],
        );
        assert_eq!(remote.status.code(), Some(1), "{}", stderr(&remote));
        assert_eq!(String::from_utf8_lossy(&remote.stdout), "");
        assert_eq!(
            stderr(&remote),
            "Remote error: NoSuchMethod: Endpoint does not support RPC method nope"
        );
        let nobody = common::unique("nobody");
        let timeout = warren(
            &bus,
            &[
                "--output",
                output,
                "call",
                "--topic",
                &nobody,
                "--timeout",
                "0.3",
                "echo",
            ],
        );
        assert_eq!(timeout.status.code(), Some(3), "{}", stderr(&timeout));
        assert_eq!(stderr(&timeout).lines().count(), 1);
    }
    let bad = warren(
        &bus,
        &["--output", "yaml", "call", "--topic", &topic, "echo"],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).starts_with("error: "), "{}", stderr(&bad));
}

#[test]
fn listen_output_formats_escape_what_publishers_send() {
    let mut bus = Bus::new(&broker_url());
    bus.track_queue(format!("{}.info", bus.topic));
    let url = format!("{}?control_exchange={}", bus.url, bus.exchange);
    let payload = json!({"text": "\u{9b}2J\u{1b}[31m\u{202e}\u{85}\n", "list": [1, 2]});
    for output in ["json", "pretty"] {
        // One after the other on the topic's shared queue, which the notifier declares: each
        // listener gets the one notification sent while it runs.
        let listener = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["--url", &url, "--output", output, "listen"])
            .args(["--topic", &bus.topic, "--count", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = warren(
            &bus,
            &[
                "notify",
                "--topic",
                &bus.topic,
                "--publisher",
                "pub\u{9b}6n",
                "--event-type",
                output,
                &payload.to_string(),
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let listened = listener.wait_with_output().unwrap();
        assert_eq!(listened.status.code(), Some(0));
        let text = String::from_utf8(listened.stdout).unwrap();
        let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
        for line in &lines {
            assert!(!has_raw_control(line), "{output}: {text:?}");
        }
        if output == "json" {
            assert_eq!(lines.len(), 1, "{text}");
        } else {
            assert!(lines.len() > 10, "{text}");
            assert_eq!(lines[..2], ["{", r#"  "priority": "info","#], "{text}");
        }
        let n: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(n["event_type"], output);
        assert_eq!(n["payload"], payload);
        assert_eq!(n["publisher_id"], "pub\u{9b}6n");
    }
}

#[test]
fn shell_completions() {
    let subcommands = ["call", "cast", "notify", "listen", "bench", "completions"];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.len() > 1000, "{shell}: {script}");
        for word in subcommands
            .iter()
            .chain(&["url", "output", "topic", "fanout"])
        {
            assert!(script.contains(word), "{shell}: no {word} in\n{script}");
        }
        // Checked by the shell itself where it is installed (bash always is here).
        let check = match shell {
            "bash" | "zsh" => Some(vec![shell, "-n"]),
            "fish" => Some(vec!["fish", "--no-execute"]),
            _ => None,
        };
        let Some(check) = check else { continue };
        let file = std::env::temp_dir().join(common::unique("completion"));
        std::fs::write(&file, &script).unwrap();
        match Command::new(check[0]).args(&check[1..]).arg(&file).output() {
            Ok(checked) => assert!(
                checked.status.success(),
                "{shell}: {}",
                String::from_utf8_lossy(&checked.stderr)
            ),
            Err(e) => assert!(shell != "bash", "bash: {e}"),
        }
        std::fs::remove_file(&file).unwrap();
    }
    // bash: completing `warren c` offers the subcommands, `warren call --` the flags.
    let complete = |line: &str| {
        let script = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["completions", "bash"])
            .output()
            .unwrap()
            .stdout;
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "{}\nCOMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
             _warren warren '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            String::from_utf8(script).unwrap(),
            words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(program)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let offered = complete("warren c");
    for sub in ["call", "cast", "completions"] {
        assert!(offered.lines().any(|l| l == sub), "{offered}");
    }
    let offered = complete("warren call --");
    for flag in ["--topic", "--server", "--url", "--output", "--context"] {
        assert!(offered.lines().any(|l| l == flag), "{offered}");
    }
    let offered = complete("warren --output ");
    let mut formats: Vec<&str> = offered.lines().collect();
    formats.sort();
    assert_eq!(formats, ["json", "pretty"], "{offered}");
    let bad = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}
