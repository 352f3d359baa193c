//! TLS against private RabbitMQ nodes with a TLS listener, certificates made at test time with
//! the openssl CLI (`common::tls::Pki`):
//! * the right CA connects, and servers and clients serve calls and casts over TLS (`amqps://`
//!   and oslo's `ssl=true` alike), by host name or by IP address (both in the certificate);
//! * a wrong CA (or none: the system's roots), a wrong host name, an expired certificate, a
//!   TLS version below `ssl_version`, plain AMQP to the TLS port and TLS to the plain port each
//!   fail with `Error::Tls` after one pass over the hosts: within 5 s with a 30 s timeout;
//! * a client certificate logs in with `rabbit_login_method=EXTERNAL`; a missing, foreign or
//!   unknown one is refused fast; a wrong password is `Error::Authentication`, fast (RabbitMQ
//!   holds a refused login's socket for 3 s: "fast" is under 5 s, not milliseconds);
//! * on failover, a host that fails its TLS verification is skipped for one that passes;
//! * the `warren` CLI over TLS: a call is served; the wrong CA exits 4 at once;
//! * the password never shows in an error's `Display`/`Debug`, in this process's log records
//!   (at trace) or in the CLI's output (`RUST_LOG=trace`).
//!
//! One node serves every test of this file that runs while another holds it (a node start
//! costs seconds): `shared_node` hands out an `Arc`, the node stops when the last holder is
//! done (panics included) and a later test starts a fresh one; every test holds it, so that
//! with parallel tests one node usually serves the whole file. The expired-certificate case
//! needs a node of its own (one certificate per listener), started and stopped by that test.
//! Its own test binary, because it installs the process's logger.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::node::{free_port, NodeConfig, RabbitNode};
use common::tls::Pki;
use common::{ctx, unique, with_query, Bus};
use serde_json::{json, Value};
use warren::{Codec, Error, RequestContext, RpcClient, Target, Transport};

/// How long a permanent failure may take (one pass over the hosts), against a 30 s timeout.
const FAST: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Nodes.

/// A private node with a TLS listener, its certificates and a PLAIN user with a distinctive
/// password, plus the EXTERNAL user named by the client certificate's CN.
struct TlsNode {
    // Dropped in this order: the node stops before its certificates are deleted.
    node: RabbitNode,
    pki: Pki,
    tls_port: u16,
    user: String,
    password: String,
}

impl TlsNode {
    /// Starts a node whose TLS listener serves `cert` (`server` or `expired`), with `extra`
    /// lines of `rabbitmq.conf`.
    fn start(label: &str, cert: &str, extra: &str) -> TlsNode {
        let pki = Pki::generate(label);
        let tls_port = free_port();
        let started = Instant::now();
        let node = RabbitNode::start_with(
            label,
            NodeConfig {
                config: format!("{}{extra}", pki.rabbitmq_conf(tls_port, cert)),
                plugins: vec!["rabbitmq_auth_mechanism_ssl".into()],
                wait_for_ports: vec![tls_port],
            },
        );
        eprintln!(
            "node {} (TLS {tls_port}, plain {}, certificate {cert}) started in {:.1?}",
            node.name,
            node.port,
            started.elapsed()
        );
        let user = format!("wt_tls_user_{label}");
        let password = format!("Tls-Pw-{}-Zq", &unique("p")[5..]);
        node.ctl(&["add_user", &user, &password]);
        node.ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
        // The EXTERNAL user has no password at all: only its certificate logs it in.
        let unused = unique("unused");
        node.ctl(&["add_user", &pki.client_user, &unused]);
        node.ctl(&["clear_password", &pki.client_user]);
        node.ctl(&[
            "set_permissions",
            "-p",
            "/",
            &pki.client_user,
            ".*",
            ".*",
            ".*",
        ]);
        TlsNode {
            node,
            pki,
            tls_port,
            user,
            password,
        }
    }

    /// `amqps://<user>:<password>@<host>:<TLS port>/?ssl_ca_file=<the CA>`.
    fn url(&self, host: &str) -> String {
        self.url_with(host, &self.password, "ca.pem")
    }

    /// Like [`url`](Self::url) with another password and CA file (`""`: no `ssl_ca_file`).
    fn url_with(&self, host: &str, password: &str, ca: &str) -> String {
        let query = if ca.is_empty() {
            String::new()
        } else {
            format!("?ssl_ca_file={}", self.pki.path(ca))
        };
        format!(
            "amqps://{}:{password}@{host}:{}/{query}",
            self.user, self.tls_port
        )
    }

    /// An EXTERNAL login with the client certificate `cert` (`client`, `stranger`,
    /// `nobody`; `""`: none). No credentials in the URL.
    fn external_url(&self, cert: &str) -> String {
        let mut url = format!(
            "amqps://localhost:{}/?ssl_ca_file={}&rabbit_login_method=EXTERNAL",
            self.tls_port,
            self.pki.path("ca.pem")
        );
        if !cert.is_empty() {
            url.push_str(&format!(
                "&ssl_cert_file={}&ssl_key_file={}",
                self.pki.path(&format!("{cert}.pem")),
                self.pki.path(&format!("{cert}.key"))
            ));
        }
        url
    }

    /// Where tests clean up: guest over the plain port (loopback).
    fn admin_url(&self) -> String {
        self.node.url()
    }

    /// What a leak of the password would show: all of it, or its random middle.
    fn needles(&self) -> Vec<String> {
        vec![
            self.password.clone(),
            self.password[7..self.password.len() - 3].to_string(),
        ]
    }

    /// Fails if `text` shows the password.
    fn assert_clean(&self, what: &str, text: &str) {
        for needle in self.needles() {
            assert!(
                !text.contains(&needle),
                "{what} shows the password ({needle:?}):\n{text}"
            );
        }
    }

    /// Fails if a log record of this process so far shows the password.
    fn assert_logs_clean(&self) {
        let lines = common::logs::captured();
        self.assert_clean("the log", &lines);
    }

    /// `rabbitmqctl list_connections user ssl ssl_protocol auth_mechanism` for `user`.
    fn connections_of(&self, user: &str) -> Vec<Value> {
        self.node
            .ctl_json(&[
                "list_connections",
                "user",
                "ssl",
                "ssl_protocol",
                "auth_mechanism",
            ])
            .into_iter()
            .filter(|c| c["user"] == user)
            .collect()
    }
}

/// The node of this file's tests: the one a running test holds, or a new one.
fn shared_node() -> Arc<TlsNode> {
    static SHARED: Mutex<Weak<TlsNode>> = Mutex::new(Weak::new());
    static GENERATION: AtomicUsize = AtomicUsize::new(0);
    common::logs::capture_logs();
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(node) = slot.upgrade() {
        return node;
    }
    // A fresh name: the previous node may still be stopping in the thread that dropped it.
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    let node = Arc::new(TlsNode::start(&format!("tls{generation}"), "server", ""));
    *slot = Arc::downgrade(&node);
    node
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A call and a cast through `url` to a topic nobody serves, each with a 30 s timeout: both
/// must fail within [`FAST`], with the same kind of error, whose `Display` and `Debug` do not
/// show the password. Returns the call's error.
fn fails_fast(node: &TlsNode, url: &str) -> Error {
    let transport = Transport::new(url).expect("a valid URL");
    let client =
        RpcClient::new(&transport, Target::new(unique("nobody").as_str())).timeout(CALL_TIMEOUT);
    let started = Instant::now();
    let error = client
        .call::<_, Value>(&ctx(), "echo", &json!({}))
        .expect_err("the call must fail");
    let call_took = started.elapsed();
    let started = Instant::now();
    let cast_error = client
        .cast(&ctx(), "record", &json!({}))
        .expect_err("the cast must fail");
    let cast_took = started.elapsed();
    eprintln!(
        "call failed in {call_took:.1?}: {error}\n  cast failed in {cast_took:.1?}: {cast_error}"
    );
    assert!(
        call_took < FAST,
        "the call failed only after {call_took:?}: {error}"
    );
    assert!(
        cast_took < FAST,
        "the cast failed only after {cast_took:?}: {cast_error}"
    );
    assert_eq!(
        std::mem::discriminant(&error),
        std::mem::discriminant(&cast_error),
        "call: {error:?}, cast: {cast_error:?}"
    );
    for e in [&error, &cast_error] {
        node.assert_clean("an error's Display", &e.to_string());
        node.assert_clean("an error's Debug", &format!("{e:?}"));
    }
    error
}

/// Fails unless `error` is `Error::Tls` for `host`; returns its reason.
fn expect_tls(error: &Error, host: &str) -> String {
    match error {
        Error::Tls { host: h, reason } => {
            assert_eq!(h, host, "{error}");
            assert!(
                error.to_string().contains("TLS"),
                "the message does not say TLS: {error}"
            );
            reason.clone()
        }
        other => panic!("expected Error::Tls for {host}, got {other:?}"),
    }
}

fn expect_authentication(error: &Error, host: &str) -> String {
    match error {
        Error::Authentication { host: h, reason } => {
            assert_eq!(h, host, "{error}");
            reason.clone()
        }
        other => panic!("expected Error::Authentication for {host}, got {other:?}"),
    }
}

/// Serves `add` and a cast of `record` through a server and a client on `url` (a bus whose
/// clean-up goes to `admin_url`); returns them, still connected.
fn serves_call_and_cast(url: &str, admin_url: &str) -> (Bus, RpcClient) {
    let mut bus = Bus::through(url, admin_url);
    bus.start_server("s1", 2);
    let client = bus.client(Codec::Json).timeout(CALL_TIMEOUT);
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 40, "b": 2}))
        .expect("a call over TLS");
    assert_eq!(sum, 42);
    client
        .cast(&ctx(), "record", &json!({"over": "tls"}))
        .expect("a cast over TLS");
    let events = bus.expect_events(1, Duration::from_secs(10));
    assert_eq!(events[0].method, "record");
    assert_eq!(events[0].value, json!({"over": "tls"}));
    (bus, client)
}

// ---------------------------------------------------------------------------------------------
// 1. The right CA.

#[test]
fn right_ca_serves_calls_and_casts_over_tls() {
    let node = shared_node();
    let (bus, _client) = serves_call_and_cast(&node.url("localhost"), &node.admin_url());

    // oslo's spelling: rabbit:// with ssl=true, a minimum version and PLAIN named, to the IP
    // address in the certificate; it reaches the bus's server (another transport).
    let oslo_url = format!(
        "rabbit://{}:{}@127.0.0.1:{}/?ssl=true&ssl_ca_file={}&ssl_version=TLSv1_2&rabbit_login_method=PLAIN&control_exchange={}",
        node.user,
        node.password,
        node.tls_port,
        node.pki.path("ca.pem"),
        bus.exchange
    );
    let transport = Transport::new(&oslo_url).expect("oslo's TLS options");
    assert!(transport.options().tls.enabled);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str())).timeout(CALL_TIMEOUT);
    let who: String = client
        .call(&ctx(), "whoami", &())
        .expect("a call over TLS to 127.0.0.1");
    assert_eq!(who, "s1");

    // The server's, the bus client's and this client's connections: all TLS.
    let connections = node.connections_of(&node.user);
    eprintln!("connections: {connections:?}");
    assert!(connections.len() >= 3, "{connections:?}");
    for c in &connections {
        assert_eq!(c["ssl"], json!(true), "a plain connection: {c}");
    }
    drop(bus);
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. The wrong CA.

#[test]
fn wrong_ca_fails_fast_with_a_tls_error() {
    let node = shared_node();
    let host = format!("localhost:{}", node.tls_port);
    let error = fails_fast(
        &node,
        &node.url_with("localhost", &node.password, "other-ca.pem"),
    );
    let reason = expect_tls(&error, &host);
    eprintln!("wrong CA: {reason}");

    // No ssl_ca_file: the system's roots, which do not know the test CA either.
    let error = fails_fast(&node, &node.url_with("localhost", &node.password, ""));
    let reason = expect_tls(&error, &host);
    eprintln!("system roots: {reason}");
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 3. The wrong host name.

#[test]
fn wrong_host_name_fails_fast_with_a_tls_error() {
    let node = shared_node();
    // 127.0.0.2 is this machine too, but not in the certificate (DNS:localhost, IP:127.0.0.1).
    let error = fails_fast(&node, &node.url("127.0.0.2"));
    let reason = expect_tls(&error, &format!("127.0.0.2:{}", node.tls_port));
    eprintln!("wrong host name: {reason}");
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 4. An expired certificate (and ssl_version honoured), on a node of its own.

#[test]
fn expired_certificate_fails_fast_with_a_tls_error() {
    // Held, not used: keeps the shared node up for the tests that run alongside this one.
    let _shared = shared_node();
    // Its certificate is valid for the names and signed by the right CA, but expired in 2020.
    // The node speaks TLS 1.2 only, so that `ssl_version=TLSv1_3` is refused too.
    let node = TlsNode::start("tlsexp", "expired", "ssl_options.versions.1 = tlsv1.2\n");
    let host = format!("localhost:{}", node.tls_port);
    let error = fails_fast(&node, &node.url("localhost"));
    let reason = expect_tls(&error, &host);
    eprintln!("expired: {reason}");
    assert!(
        reason.to_lowercase().contains("expired"),
        "the reason does not say the certificate expired: {reason}"
    );

    // ssl_version is the lowest version accepted: this node's TLS 1.2 is too low for TLSv1_3,
    // and the handshake fails before any certificate is looked at.
    let error = fails_fast(
        &node,
        &with_query(&node.url("localhost"), "ssl_version=TLSv1_3"),
    );
    let reason = expect_tls(&error, &host);
    eprintln!("TLS 1.3 required of a TLS 1.2 broker: {reason}");
    assert!(
        !reason.to_lowercase().contains("expired"),
        "ssl_version=TLSv1_3 was not applied: {reason}"
    );
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 5. Plain AMQP and TLS on each other's ports.

#[test]
fn plain_amqp_to_the_tls_port_fails_fast_with_a_tls_error() {
    let node = shared_node();
    let plain_to_tls = format!(
        "amqp://{}:{}@localhost:{}/",
        node.user, node.password, node.tls_port
    );
    let error = fails_fast(&node, &plain_to_tls);
    expect_tls(&error, &format!("localhost:{}", node.tls_port));
    eprintln!("plain AMQP to the TLS port: {error}");
    node.assert_logs_clean();
}

#[test]
fn tls_to_the_plain_port_fails_fast_with_a_tls_error() {
    let node = shared_node();
    let tls_to_plain = format!(
        "amqps://{}:{}@localhost:{}/?ssl_ca_file={}",
        node.user,
        node.password,
        node.node.port,
        node.pki.path("ca.pem")
    );
    let error = fails_fast(&node, &tls_to_plain);
    expect_tls(&error, &format!("localhost:{}", node.node.port));
    eprintln!("TLS to the plain port: {error}");
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 6. Client certificates and EXTERNAL login; refused logins.

#[test]
fn client_certificate_with_external_login_serves_calls() {
    let node = shared_node();
    let (bus, _client) = serves_call_and_cast(&node.external_url("client"), &node.admin_url());
    // The server's and the client's connections: TLS, logged in as the certificate's CN.
    let connections = node.connections_of(&node.pki.client_user);
    eprintln!("connections: {connections:?}");
    assert!(connections.len() >= 2, "{connections:?}");
    for c in &connections {
        assert_eq!(c["ssl"], json!(true), "{c}");
        assert_eq!(c["auth_mechanism"], json!("EXTERNAL"), "{c}");
    }
    drop(bus);
    node.assert_logs_clean();
}

#[test]
fn wrong_password_fails_fast_with_an_authentication_error() {
    let node = shared_node();
    let error = fails_fast(&node, &node.url_with("localhost", "Wrong-Pw-Zq", "ca.pem"));
    let reason = expect_authentication(&error, &format!("localhost:{}", node.tls_port));
    eprintln!("wrong password: {reason}");
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains("Wrong-Pw-Zq"), "{text}");
    }
    node.assert_logs_clean();
}

#[test]
fn external_login_of_an_unknown_user_fails_fast_with_an_authentication_error() {
    let node = shared_node();
    // A certificate the broker trusts, for a CN it has no user for.
    let error = fails_fast(&node, &node.external_url("nobody"));
    let reason = expect_authentication(&error, &format!("localhost:{}", node.tls_port));
    eprintln!("EXTERNAL, unknown user: {reason}");
    node.assert_logs_clean();
}

#[test]
fn external_login_without_a_client_certificate_is_refused() {
    let node = shared_node();
    // Refused when the transport is built (warren knows it cannot work), or by the broker
    // (which does not offer EXTERNAL without a certificate), fast.
    match Transport::new(&node.external_url("")) {
        Err(Error::InvalidOption { name, reason }) => {
            assert_eq!(name, "rabbit_login_method", "{reason}");
            eprintln!("EXTERNAL, no certificate, refused when built: {reason}");
        }
        Err(other) => panic!("EXTERNAL without a certificate: {other:?}"),
        Ok(_) => {
            let error = fails_fast(&node, &node.external_url(""));
            assert!(
                matches!(error, Error::Authentication { .. } | Error::Tls { .. }),
                "EXTERNAL without a certificate: {error:?}"
            );
            eprintln!("EXTERNAL, no certificate: {error}");
        }
    }
    node.assert_logs_clean();
}

#[test]
fn client_certificate_of_another_ca_fails_fast() {
    let node = shared_node();
    // The broker (verify_peer) refuses it; with TLS 1.3 it says so after the client's side of
    // the handshake is done, as an alert on the first read or a reset on the first write.
    let error = fails_fast(&node, &node.external_url("stranger"));
    assert!(
        matches!(error, Error::Authentication { .. } | Error::Tls { .. }),
        "EXTERNAL, foreign certificate: {error:?}"
    );
    eprintln!("EXTERNAL, foreign certificate: {error}");
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// Failover: verification is per host.

#[test]
fn failover_skips_a_host_that_fails_verification() {
    let node = shared_node();
    let (user, password, port) = (&node.user, &node.password, node.tls_port);
    let ca = node.pki.path("ca.pem");
    // The first host fails its host-name check, the second passes: one pass connects.
    let url = format!(
        "amqps://{user}:{password}@127.0.0.2:{port},{user}:{password}@localhost:{port}/?ssl_ca_file={ca}"
    );
    let started = Instant::now();
    let (bus, _client) = serves_call_and_cast(&url, &node.admin_url());
    drop(bus);
    eprintln!(
        "failover past a bad host name served in {:.1?}",
        started.elapsed()
    );

    // Every host fails permanently (host name, then password): one pass, then the error.
    let url = format!(
        "amqps://{user}:{password}@127.0.0.2:{port},{user}:Wrong-Pw-Zq@localhost:{port}/?ssl_ca_file={ca}"
    );
    let error = fails_fast(&node, &url);
    assert!(
        matches!(error, Error::Authentication { .. } | Error::Tls { .. }),
        "{error:?}"
    );
    eprintln!("every host refused: {error}");
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// Certificate files are checked when the transport is built.

#[test]
fn missing_certificate_files_are_invalid_options() {
    let node = shared_node();
    let pki = &node.pki;
    let base = format!("amqps://localhost:{}/", node.tls_port);
    let good = |option: &str| match option {
        "ssl_ca_file" => pki.path("ca.pem"),
        "ssl_cert_file" => pki.path("client.pem"),
        _ => pki.path("client.key"),
    };
    let options = ["ssl_ca_file", "ssl_cert_file", "ssl_key_file"];
    let all_good = options
        .iter()
        .map(|o| format!("{o}={}", good(o)))
        .collect::<Vec<_>>()
        .join("&");
    Transport::new(&format!("{base}?{all_good}")).expect("every file exists");
    for missing in options {
        let query = options
            .iter()
            .map(|o| {
                if *o == missing {
                    format!("{o}=/nonexistent/warren-tls/{o}.pem")
                } else {
                    format!("{o}={}", good(o))
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        match Transport::new(&format!("{base}?{query}")) {
            Err(Error::InvalidOption { name, reason }) => {
                assert_eq!(name, missing, "{reason}");
                eprintln!("{missing}: {reason}");
            }
            Err(other) => panic!("{missing}: expected InvalidOption, got {other:?}"),
            Ok(_) => panic!("{missing}: a missing file was accepted"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The CLI.

fn warren(url: &str, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_URL", url)
        .env("RUST_LOG", "trace")
        .args(args)
        .output()
        .expect("warren runs");
    (output, started.elapsed())
}

#[test]
fn cli_calls_over_tls_and_exits_4_at_once_on_tls_and_login_failures() {
    let node = shared_node();
    let mut bus = Bus::through(&node.url("localhost"), &node.admin_url());
    bus.start_server("s1", 2);
    let check_clean = |what: &str, output: &Output| {
        node.assert_clean(
            &format!("{what} stdout"),
            &String::from_utf8_lossy(&output.stdout),
        );
        node.assert_clean(
            &format!("{what} stderr"),
            &String::from_utf8_lossy(&output.stderr),
        );
    };
    let stderr_tail = |output: &Output| {
        let text = String::from_utf8_lossy(&output.stderr).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    };

    let url = with_query(
        &node.url("localhost"),
        &format!("control_exchange={}", bus.exchange),
    );
    let args = [
        "call",
        "--topic",
        &bus.topic,
        "--timeout",
        "30",
        "add",
        r#"{"a": 40, "b": 2}"#,
    ];
    let (ok, took) = warren(&url, &args);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr_tail(&ok));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "42");
    eprintln!("CLI call over TLS in {took:.1?}");
    check_clean("a call", &ok);

    let wrong_ca = with_query(
        &node.url_with("localhost", &node.password, "other-ca.pem"),
        &format!("control_exchange={}", bus.exchange),
    );
    let (failed, took) = warren(&wrong_ca, &args);
    assert_eq!(failed.status.code(), Some(4), "{}", stderr_tail(&failed));
    assert!(
        took < FAST,
        "the CLI took {took:?} to fail: {}",
        stderr_tail(&failed)
    );
    let last = stderr_tail(&failed);
    assert!(last.contains("TLS"), "{last}");
    eprintln!(
        "CLI, wrong CA, exit 4 in {took:.1?}: {}",
        last.lines().last().unwrap_or("")
    );
    check_clean("a TLS failure", &failed);

    let wrong_password = with_query(
        &node.url_with("localhost", "Wrong-Pw-Zq", "ca.pem"),
        &format!("control_exchange={}", bus.exchange),
    );
    let (refused, took) = warren(&wrong_password, &args);
    assert_eq!(refused.status.code(), Some(4), "{}", stderr_tail(&refused));
    assert!(
        took < FAST,
        "the CLI took {took:?} to fail: {}",
        stderr_tail(&refused)
    );
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !output.contains("Wrong-Pw-Zq"),
        "the wrong password shows:\n{output}"
    );
    eprintln!(
        "CLI, wrong password, exit 4 in {took:.1?}: {}",
        stderr_tail(&refused).lines().last().unwrap_or("")
    );
    check_clean("a refused login", &refused);
    node.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// 8. Live interoperability with Python oslo.messaging over TLS, under the production set.

/// oslo's recommended production options (its admin guide), as a `transport_url` query: the
/// same for warren and for oslo.
const PRODUCTION: &str = "rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true\
&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10&use_queue_manager=true";

/// This machine's host name: the default `hostname` of oslo (`socket.gethostname()`) and of
/// warren, part of the queue manager's names and counter files.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_string()
}

/// What the interop test leaves on the shared node and on this machine, removed when dropped
/// (after the Python peers, declared later, have stopped): the Rust servers and transports,
/// every queue and exchange named after the test's topic, exchange or processnames, the user,
/// the queue manager's counter files and the Python peers' lock directory.
struct TlsInterop {
    node: Arc<TlsNode>,
    user: String,
    password: String,
    host: String,
    topic: String,
    exchange: String,
    /// `py-tls-<tag>` and `rs-tls-<tag>`.
    processnames: [String; 2],
    lock_dir: std::path::PathBuf,
    events_tx: crossbeam_channel::Sender<common::Event>,
    events: crossbeam_channel::Receiver<common::Event>,
    servers: Vec<(warren::RpcServer, Transport)>,
    transports: Vec<Transport>,
}

impl TlsInterop {
    /// A user of its own with a password (never guest), a topic, an exchange and a lock
    /// directory.
    fn new(node: Arc<TlsNode>) -> TlsInterop {
        let tag = &unique("i")[5..];
        let user = format!("wt_tls_interop_{tag}");
        let password = format!("Interop-Pw-{tag}-Zq");
        node.node.ctl(&["add_user", &user, &password]);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let interop = TlsInterop {
            user,
            password,
            host: host_name(),
            topic: unique("topic"),
            exchange: unique("exchange"),
            processnames: [format!("py-tls-{tag}"), format!("rs-tls-{tag}")],
            lock_dir: std::env::temp_dir().join(format!("wt_tls_interop_{tag}_locks")),
            events_tx,
            events,
            servers: Vec::new(),
            transports: Vec::new(),
            node,
        };
        interop.node.node.ctl(&[
            "set_permissions",
            "-p",
            "/",
            &interop.user,
            ".*",
            ".*",
            ".*",
        ]);
        std::fs::create_dir_all(&interop.lock_dir).expect("lock directory");
        interop
    }

    /// oslo's spelling: `rabbit://` with `ssl=true`, the CA (one host: oslo checks its name).
    fn python_url(&self) -> String {
        format!(
            "rabbit://{}:{}@localhost:{}/?ssl=true&ssl_ca_file={}&{PRODUCTION}&processname={}",
            self.user,
            self.password,
            self.node.tls_port,
            self.node.pki.path("ca.pem"),
            self.processnames[0]
        )
    }

    /// warren's spelling of the same: `amqps://`.
    fn rust_url(&self) -> String {
        format!(
            "amqps://{}:{}@localhost:{}/?ssl_ca_file={}&{PRODUCTION}&processname={}",
            self.user,
            self.password,
            self.node.tls_port,
            self.node.pki.path("ca.pem"),
            self.processnames[1]
        )
    }

    fn transport(&self) -> Transport {
        Transport::builder(&self.rust_url())
            .control_exchange(self.exchange.as_str())
            .codec(Codec::Json)
            .build()
            .expect("a TLS transport with the production options")
    }

    /// A Python peer (`rpc-server` named `server`, or `rpc-client` with `server` empty).
    fn python(&self, mode: &str, server: &str) -> common::python::Peer {
        let lock_path = self.lock_dir.to_str().expect("UTF-8 temp dir");
        let extra: Vec<&str> = if server.is_empty() {
            Vec::new()
        } else {
            vec!["--server", server]
        };
        common::python::Peer::start_with_env(
            mode,
            &self.python_url(),
            &self.exchange,
            &self.topic,
            &extra,
            &[("OSLO_LOCK_PATH", lock_path)],
        )
    }

    /// Starts Rust server `name`: the standard test endpoints plus `count`, the method of
    /// Python's test servers that casts go to; handlers report to `self.events`.
    fn start_rust_server(&mut self, name: &str) {
        let transport = self.transport();
        let mut builder = warren::RpcServer::builder(
            &transport,
            Target::new(self.topic.as_str()).with_server(name),
        )
        .workers(2);
        for endpoint in common::endpoints(name, self.events_tx.clone()) {
            builder = builder.endpoint(endpoint);
        }
        let (server_name, events) = (name.to_string(), self.events_tx.clone());
        builder = builder.endpoint(
            warren::Endpoint::new()
                .version(warren::Version::new(1, 0))
                .method("count", move |_: &RequestContext, args: Value| {
                    let _ = events.send(common::Event {
                        server: server_name.clone(),
                        method: "count".into(),
                        value: args["n"].clone(),
                        at: std::time::Instant::now(),
                    });
                    Ok::<_, warren::Failure>(())
                }),
        );
        let server = builder.build().expect("server");
        server
            .start()
            .unwrap_or_else(|e| panic!("the Rust server starts over TLS: {e}"));
        self.servers.push((server, transport));
    }

    /// A Rust client (JSON, to talk to Python) with a transport of its own.
    fn rust_client(&mut self) -> RpcClient {
        let transport = self.transport();
        let client =
            RpcClient::new(&transport, Target::new(self.topic.as_str())).timeout(CALL_TIMEOUT);
        self.transports.push(transport);
        client
    }

    fn rust_events(&self, n: usize) -> Vec<common::Event> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        (0..n)
            .map(|i| {
                self.events
                    .recv_deadline(deadline)
                    .unwrap_or_else(|_| panic!("expected {n} events from the Rust server, got {i}"))
            })
            .collect()
    }

    fn rust_quiet(&self, window: Duration) {
        if let Ok(event) = self.events.recv_timeout(window) {
            panic!("unexpected event from the Rust server: {event:?}");
        }
    }

    /// Whether `name` (a queue or an exchange) is one of this test's.
    fn owns(&self, name: &str) -> bool {
        name.contains(&self.topic)
            || name.contains(&self.exchange)
            || self.processnames.iter().any(|p| name.contains(p.as_str()))
    }

    /// This test's queues: name → type.
    fn queues(&self) -> std::collections::BTreeMap<String, String> {
        self.node
            .node
            .ctl_json(&["list_queues", "name", "type"])
            .into_iter()
            .filter_map(|q| {
                let name = q["name"].as_str()?.to_string();
                let kind = q["type"].as_str().unwrap_or("?").to_string();
                self.owns(&name).then_some((name, kind))
            })
            .collect()
    }
}

impl Drop for TlsInterop {
    fn drop(&mut self) {
        for (server, _) in &self.servers {
            server.stop();
        }
        for (server, transport) in &self.servers {
            server.wait();
            transport.close();
        }
        for transport in &self.transports {
            transport.close();
        }
        // Quorum queues and the stream are durable, and the Python client cannot delete its
        // reply queue (its clean-up connection is plain AMQP to the TLS port): all go here,
        // through guest on the plain port.
        let names = |kind: &str| -> Vec<String> {
            let output = Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node.node.name, kind, "name"])
                .args(["--formatter", "json"])
                .output();
            let listed: Vec<Value> = output
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or_default();
            listed
                .iter()
                .filter_map(|q| q["name"].as_str())
                .filter(|name| self.owns(name))
                .map(str::to_string)
                .collect()
        };
        let (queues, exchanges) = (names("list_queues"), names("list_exchanges"));
        common::delete_on_broker(&self.node.admin_url(), &queues, &exchanges);
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node.node.name, "delete_user", &self.user])
            .output();
        for processname in &self.processnames {
            let _ = std::fs::remove_file(format!("/dev/shm/{}_{processname}_qmanager", self.host));
        }
        let _ = std::fs::remove_dir_all(&self.lock_dir);
    }
}

fn py_call(peer: &mut common::python::Peer, method: &str, args: Value, more: Value) -> Value {
    let mut request =
        json!({"op": "call", "method": method, "args": args, "ctxt": {"user_id": "py-tls"}});
    if let (Some(request), Some(more)) = (request.as_object_mut(), more.as_object()) {
        request.extend(more.clone());
    }
    peer.request(request, CALL_TIMEOUT)
}

#[test]
fn python_and_rust_interoperate_over_tls_with_the_production_set() {
    let started = Instant::now();
    let node = shared_node();
    eprintln!("node ready in {:.1?}", started.elapsed());
    // Declared before the Python peers: dropped after them.
    let mut interop = TlsInterop::new(Arc::clone(&node));

    let phase = Instant::now();
    let mut py_server = interop.python("rpc-server", "py");
    eprintln!(
        "Python rpc-server ready over TLS in {:.1?}",
        phase.elapsed()
    );
    let phase = Instant::now();
    interop.start_rust_server("rs");
    let client = interop.rust_client();
    eprintln!(
        "Rust server and client ready over TLS in {:.1?}",
        phase.elapsed()
    );

    // Rust client → Python server: calls and casts.
    let phase = Instant::now();
    let args = json!({"s": "h\u{e9}llo \u{1F512}", "n": [1, 2.5, null], "nested": {"tls": true}});
    let echoed: Value = client
        .prepare()
        .server("py")
        .call(&ctx(), "echo", &args)
        .expect("a call from Rust to Python over TLS");
    assert_eq!(echoed, args);
    let who: String = client
        .prepare()
        .server("py")
        .call(&ctx(), "whoami", &())
        .expect("a call from Rust to Python over TLS");
    assert_eq!(who, "py");
    let reply_queue = interop
        .transports
        .last()
        .and_then(Transport::reply_queue_name)
        .expect("the client's reply queue");
    let stable = format!("reply_{}:{}:", interop.host, interop.processnames[1]);
    assert!(
        reply_queue.starts_with(&stable),
        "not the queue manager's name ({stable}<n>): {reply_queue}"
    );
    for n in 0..5 {
        client
            .prepare()
            .server("py")
            .cast(&ctx(), "count", &json!({"n": n}))
            .expect("a cast from Rust to Python over TLS");
    }
    let mut seen: Vec<i64> = py_server
        .events("cast", 5, CALL_TIMEOUT)
        .iter()
        .map(|e| e["n"].as_i64().expect("n"))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..5).collect::<Vec<_>>(), "no loss, no duplicate");
    py_server.quiet("cast", Duration::from_millis(300));
    interop.rust_quiet(Duration::from_millis(100));

    // Both servers share the quorum topic queue: calls without a server reach both.
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let who: String = client
            .call(&ctx(), "whoami", &())
            .expect("a call to the shared topic queue");
        served.insert(who);
    }
    assert_eq!(
        served,
        ["py", "rs"].iter().map(|s| s.to_string()).collect(),
        "the shared topic queue"
    );
    eprintln!("Rust → Python calls and casts in {:.1?}", phase.elapsed());

    // A fanout cast from Rust reaches both servers through the topic's stream, once each.
    let phase = Instant::now();
    client
        .prepare()
        .fanout(true)
        .cast(&ctx(), "count", &json!({"n": 1000}))
        .expect("a fanout cast over TLS");
    let fanned = py_server.events("cast", 1, CALL_TIMEOUT);
    assert_eq!(
        (fanned[0]["n"].clone(), fanned[0]["server"].clone()),
        (json!(1000), json!("py"))
    );
    let fanned = interop.rust_events(1);
    assert_eq!(
        (
            fanned[0].server.as_str(),
            fanned[0].method.as_str(),
            &fanned[0].value
        ),
        ("rs", "count", &json!(1000))
    );
    py_server.quiet("cast", Duration::from_millis(300));
    interop.rust_quiet(Duration::from_millis(100));
    eprintln!("Rust fanout cast in {:.1?}", phase.elapsed());

    // Python client → Rust server: calls; and a fanout cast from Python.
    let phase = Instant::now();
    let mut py_client = interop.python("rpc-client", "");
    let who = py_call(&mut py_client, "whoami", json!({}), json!({"server": "rs"}));
    assert_eq!(who["result"], "rs", "{who}");
    let sum = py_call(
        &mut py_client,
        "add",
        json!({"a": 40, "b": 2}),
        json!({"server": "rs"}),
    );
    assert_eq!(sum["result"], 42, "{sum}");
    let args = json!({"s": "h\u{e9}llo \u{2603}", "i": -3, "f": 0.1, "nested": {"a": [1, {}]}});
    let echoed = py_call(
        &mut py_client,
        "echo",
        args.clone(),
        json!({"server": "rs"}),
    );
    assert_eq!(echoed["result"], args, "{echoed}");
    let failed = py_call(
        &mut py_client,
        "fail",
        json!({"class": "ValueError", "module": "builtins", "message": "bad over tls"}),
        json!({"server": "rs"}),
    );
    assert_eq!(failed["error"]["type"], "ValueError", "{failed}");
    assert_eq!(interop.rust_events(1)[0].method, "fail");
    let sent = py_call(
        &mut py_client,
        "record",
        json!({"from": "python"}),
        json!({"op": "cast", "server": "rs"}),
    );
    assert_eq!(sent["result"], Value::Null, "{sent}");
    let recorded = interop.rust_events(1);
    assert_eq!(
        (recorded[0].method.as_str(), &recorded[0].value),
        ("record", &json!({"from": "python"}))
    );
    eprintln!("Python → Rust calls and cast in {:.1?}", phase.elapsed());
    let sent = py_call(
        &mut py_client,
        "count",
        json!({"n": 2000}),
        json!({"op": "cast", "fanout": true}),
    );
    assert_eq!(sent["result"], Value::Null, "{sent}");
    let fanned = py_server.events("cast", 1, CALL_TIMEOUT);
    assert_eq!(fanned[0]["n"], 2000);
    let fanned = interop.rust_events(1);
    assert_eq!(
        (fanned[0].server.as_str(), &fanned[0].value),
        ("rs", &json!(2000))
    );
    py_server.quiet("cast", Duration::from_millis(300));
    interop.rust_quiet(Duration::from_millis(100));

    // The production declarations: quorum topic queues and reply queues, one fanout stream.
    let queues = interop.queues();
    eprintln!("queues: {queues:?}");
    let topic = &interop.topic;
    for queue in [
        topic.clone(),
        format!("{topic}.py"),
        format!("{topic}.rs"),
        reply_queue,
    ] {
        assert_eq!(
            queues.get(&queue).map(String::as_str),
            Some("quorum"),
            "{queue}: {queues:?}"
        );
    }
    assert_eq!(
        queues.get(&format!("{topic}_fanout")).map(String::as_str),
        Some("stream"),
        "{queues:?}"
    );
    let python_reply = format!("reply_{}:{}:", interop.host, interop.processnames[0]);
    assert!(
        queues
            .iter()
            .any(|(name, kind)| name.starts_with(&python_reply) && kind == "quorum"),
        "the Python client's reply queue ({python_reply}<n>): {queues:?}"
    );

    // Every connection of the test's user is TLS: the Python peers' (py-amqp) and warren's
    // (amiquip) alike.
    let connections: Vec<Value> = node
        .node
        .ctl_json(&[
            "list_connections",
            "user",
            "ssl",
            "ssl_protocol",
            "peer_port",
            "client_properties",
        ])
        .into_iter()
        .filter(|c| c["user"] == interop.user.as_str())
        .collect();
    let product = |c: &Value| {
        let properties = c["client_properties"].to_string();
        if properties.contains("py-amqp") {
            "py-amqp"
        } else if properties.contains("amiquip") {
            "amiquip"
        } else {
            "?"
        }
    };
    for c in &connections {
        eprintln!(
            "connection from port {}: {} ssl={} {}",
            c["peer_port"],
            product(c),
            c["ssl"],
            c["ssl_protocol"]
        );
        assert_eq!(c["ssl"], json!(true), "a plain connection: {c}");
        assert!(
            c["ssl_protocol"]
                .as_str()
                .is_some_and(|p| p.starts_with("tlsv1.")),
            "no TLS protocol: {c}"
        );
    }
    let count = |name: &str| connections.iter().filter(|c| product(c) == name).count();
    assert!(
        count("py-amqp") >= 2,
        "the Python server and client: {connections:?}"
    );
    assert!(
        count("amiquip") >= 2,
        "the Rust server and client: {connections:?}"
    );

    // The Python peers stop side by side (each takes up to oslo's 5 s poll interval; the
    // client's reply queue is deleted by the clean-up); no password in this process's log.
    let phase = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || drop(py_client));
        s.spawn(move || drop(py_server));
    });
    eprintln!("Python peers stopped in {:.1?}", phase.elapsed());
    let lines = common::logs::captured();
    assert!(
        !lines.contains(&interop.password),
        "the log shows the interop password"
    );
    node.assert_logs_clean();
    drop(interop);
    eprintln!("total {:.1?}", started.elapsed());
}
