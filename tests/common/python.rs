//! Python oslo.messaging peers (`tests/interop/peer.py`) run from the virtualenv that
//! `scripts/ensure-oslo-venv` makes (`scripts/test` runs it), driven over stdin/stdout with one
//! JSON object per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

/// The virtualenv's interpreter (`WARREN_OSLO_PYTHON` overrides it).
pub fn python() -> String {
    let path = std::env::var("WARREN_OSLO_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/oslo-venv/bin/python").to_string()
    });
    assert!(
        std::path::Path::new(&path).exists(),
        "no Python with oslo.messaging at {path}: run scripts/ensure-oslo-venv (scripts/test does)"
    );
    path
}

/// A running Python peer.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Lines read while waiting for something else.
    held: Vec<Value>,
    next_id: u64,
}

impl Peer {
    /// Starts `peer.py <mode> --url .. --exchange .. --topic .. <extra>`; for servers and
    /// listeners, waits until it reports it is ready.
    pub fn start(mode: &str, url: &str, exchange: &str, topic: &str, extra: &[&str]) -> Peer {
        Peer::start_with_env(mode, url, exchange, topic, extra, &[])
    }

    /// [`Peer::start`] with more environment variables for the Python process (say
    /// `OSLO_LOCK_PATH`, the default of oslo's `[oslo_concurrency] lock_path`).
    pub fn start_with_env(
        mode: &str,
        url: &str,
        exchange: &str,
        topic: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Peer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/peer.py");
        // oslo names its RabbitMQ driver `rabbit`; `amqp://` is warren's alias only. A reply to
        // a caller that already left is retried for 1 s, not 60, so peers stop promptly.
        let url = url.replacen("amqp://", "rabbit://", 1);
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}kombu_missing_consumer_retry_timeout=1");
        let url = url.as_str();
        let mut child = Command::new(python())
            .arg(script)
            .arg(mode)
            .args(["--url", url, "--exchange", exchange, "--topic", topic])
            .args(extra)
            .env("PYTHONWARNINGS", "ignore")
            // A process group of its own: oslo's queue manager reads the start time of the
            // group's leader, which must be alive (whatever started the tests may not be).
            .process_group(0)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python peer starts");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = crossbeam_channel::unbounded();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if tx.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        let mut peer = Peer {
            child,
            stdin,
            lines,
            held: Vec::new(),
            next_id: 1,
        };
        if mode == "rpc-server" || mode == "listen" {
            peer.expect(|v| v["event"] == "ready", Duration::from_secs(30));
        }
        peer
    }

    /// The next line matching `wanted` (other lines are kept for later).
    pub fn expect(&mut self, wanted: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        if let Some(i) = self.held.iter().position(&wanted) {
            return self.held.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(value) if wanted(&value) => return value,
                Ok(value) => self.held.push(value),
                Err(_) => panic!(
                    "the Python peer said nothing expected within {timeout:?}; held: {:?}",
                    self.held
                ),
            }
        }
    }

    /// `n` events named `event`.
    pub fn events(&mut self, event: &str, n: usize, timeout: Duration) -> Vec<Value> {
        (0..n)
            .map(|_| self.expect(|v| v["event"] == event, timeout))
            .collect()
    }

    /// Asserts no event named `event` arrives within `window`.
    pub fn quiet(&mut self, event: &str, window: Duration) {
        assert!(
            !self.held.iter().any(|v| v["event"] == event),
            "unexpected {event}: {:?}",
            self.held
        );
        let deadline = Instant::now() + window;
        while let Ok(value) = self.lines.recv_deadline(deadline) {
            assert!(value["event"] != event, "unexpected {event}: {value}");
            self.held.push(value);
        }
    }

    /// Sends a request (an `id` is added) and waits for the answer with that id.
    pub fn request(&mut self, mut request: Value, timeout: Duration) -> Value {
        let id = self.send(&mut request);
        self.expect(|v| v["id"] == id, timeout)
    }

    /// Sends a request without waiting; returns its id (see [`Peer::answer`]).
    pub fn send(&mut self, request: &mut Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{request}").expect("write to the Python peer");
        stdin.flush().expect("flush");
        id
    }

    /// The answer to request `id`.
    pub fn answer(&mut self, id: u64, timeout: Duration) -> Value {
        self.expect(|v| v["id"] == id, timeout)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing stdin asks the peer to stop (servers stop, wait and clean up).
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
