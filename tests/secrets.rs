//! The broker password never appears in any log line (at `trace`, from warren and from
//! amiquip), error or `Debug` output: on connection success, authentication failure,
//! reconnection, and in CLI runs. Its own test binary, because it installs the process's
//! logger.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{broker_url, rabbitmqctl, rabbitmqctl_cleanup, unique, Bus};
use serde_json::{json, Value};
use warren::{Codec, RequestContext, RpcClient, Target, Transport};

/// A broker user with a distinctive password, deleted when dropped.
struct User {
    name: String,
    password: String,
}

impl User {
    fn create() -> User {
        let name = unique("secret_user");
        // Characters that need percent-encoding in a URL, too.
        let password = format!("Pw-{}-s3cr3t/?#@", &unique("p")[3..]);
        rabbitmqctl(&["add_user", &name, &password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        User { name, password }
    }

    fn url(&self, password: &str) -> String {
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let base = broker_url();
        let host = base
            .rsplit('@')
            .next()
            .expect("the test URL has credentials");
        format!("amqp://{}:{encoded}@{host}", self.name)
    }

    /// The parts of the password a leak could show: the whole, encoded or not, and its
    /// distinctive middle.
    fn needles(&self) -> Vec<String> {
        vec![
            self.password.clone(),
            self.password[3..self.password.len() - 4].to_string(),
        ]
    }

    /// Force-closes this user's connections, as an operator or a failover does.
    fn close_connections(&self) {
        let open = || {
            common::rabbitmqctl_json(&["list_connections", "user"])
                .iter()
                .filter(|c| c["user"] == self.name.as_str())
                .count()
        };
        assert!(open() > 0, "the user has connections to close");
        rabbitmqctl(&[
            "close_all_user_connections",
            &self.name,
            "test: forced close",
        ]);
    }
}

impl Drop for User {
    fn drop(&mut self) {
        rabbitmqctl_cleanup(&["delete_user", &self.name]);
    }
}

fn assert_clean(what: &str, text: &str, user: &User) {
    for needle in user.needles() {
        assert!(
            !text.contains(&needle),
            "{what} shows the password ({needle:?}):\n{text}"
        );
    }
}

#[test]
fn the_password_never_appears_in_logs_errors_or_cli_output() {
    common::logs::capture_logs();
    let user = User::create();
    let good_url = user.url(&user.password);
    let fast = "heartbeat_timeout_threshold=1&rabbit_retry_interval=0.2&kombu_reconnect_splay=0";

    // Connection success: a server and a client, calls both ways.
    let mut bus = Bus::new(&format!("{good_url}?{fast}"));
    bus.start_server("s1", 2);
    let transport = bus.transport(Codec::Json);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let echo: Value = client
        .call(&RequestContext::new(), "echo", &json!({"a": 1}))
        .unwrap();
    assert_eq!(echo, json!({"a": 1}));
    assert_clean("Debug of the transport", &format!("{transport:?}"), &user);

    // Reconnection: the broker closes every connection of the user; service resumes.
    user.close_connections();
    let echo: Value = client
        .clone()
        .timeout(Duration::from_secs(20))
        .call(&RequestContext::new(), "echo", &json!({"b": 2}))
        .unwrap();
    assert_eq!(echo, json!({"b": 2}));

    // Authentication failure: the error and its Debug, and the logs of every retry.
    let wrong =
        Transport::new(&format!("{}?{fast}", user.url("Wrong-Pw-but-also-secret"))).unwrap();
    let err = RpcClient::new(&wrong, Target::new("nobody"))
        .timeout(Duration::from_secs(2))
        .retry(1)
        .call::<_, Value>(&RequestContext::new(), "echo", &json!({}))
        .expect_err("refused login");
    assert_clean("an authentication error", &format!("{err} {err:?}"), &user);
    assert!(!format!("{err} {err:?}").contains("Wrong-Pw"), "{err:?}");
    drop(bus);

    // CLI runs at trace: a call, a cast, a call nobody answers, a bad URL.
    let cli_url = format!("{good_url}?control_exchange={}", unique("exchange"));
    let runs: [&[&str]; 3] = [
        &[
            "call",
            "--topic",
            "nobody_here",
            "--timeout",
            "1",
            "echo",
            "{}",
        ],
        &["cast", "--topic", "nobody_here", "echo", "{}"],
        &[
            "--url",
            "amqp://u:pa/ss?#@127.0.0.1:notaport/",
            "call",
            "--topic",
            "t",
            "m",
        ],
    ];
    for args in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .env("WARREN_URL", &cli_url)
            .env("RUST_LOG", "trace")
            .args(args)
            .output()
            .expect("warren runs");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean(&format!("warren {args:?}"), &text, &user);
        assert!(!text.contains("pa/ss"), "{text}");
    }
    // amiquip's handshake (where the password used to show) was captured: the capture is real.
    let lines = common::logs::captured();
    assert!(
        lines.contains("sending handshake StartOk"),
        "amiquip's handshake was captured"
    );
    assert_clean("the log", &lines, &user);
}
