//! oslo's dispatch rules as one case table, `tests/fixtures/dispatch-rules.json` (the unit
//! tests of `src/dispatcher.rs` read it too), checked over the wire: a warren client against a
//! warren or a Python server, and a Python client against a warren server.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use warren::{Error, RpcClient};

use super::python::Peer;
use super::{oslo_ctx, remote};

/// The module of oslo's dispatcher errors.
pub const DISPATCHER_MODULE: &str = "oslo_messaging.rpc.dispatcher";

#[derive(Deserialize)]
struct Table {
    #[allow(dead_code)]
    about: Vec<String>,
    cases: Vec<Case>,
}

/// One request and what the standard endpoints answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The rule the case shows.
    pub rule: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    pub method: String,
    pub expect: Outcome,
    /// What the Python peer's server answers instead.
    #[serde(default)]
    pub python_server: Option<Outcome>,
    /// Clients refuse to send it.
    #[serde(default)]
    pub unsendable: bool,
}

/// A result, or a remote failure's class, module and message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Result {
        result: Value,
    },
    Error {
        error: String,
        #[serde(default = "dispatcher_module")]
        module: String,
        message: String,
    },
}

fn dispatcher_module() -> String {
    DISPATCHER_MODULE.to_string()
}

/// Which implementation serves the case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Warren,
    Python,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "namespace {:?}, version {:?}, method {} ({})",
            self.namespace, self.version, self.method, self.rule
        )
    }
}

impl Case {
    /// What `server`, named `name`, answers.
    pub fn expected(&self, server: Server, name: &str) -> Outcome {
        let outcome = match (server, &self.python_server) {
            (Server::Python, Some(python)) => python.clone(),
            _ => self.expect.clone(),
        };
        match outcome {
            Outcome::Result {
                result: Value::String(text),
            } => Outcome::Result {
                result: Value::String(text.replace("{server}", name)),
            },
            other => other,
        }
    }
}

/// Every case of the table.
pub fn cases() -> Vec<Case> {
    let table: Table = serde_json::from_str(include_str!("../fixtures/dispatch-rules.json"))
        .expect("tests/fixtures/dispatch-rules.json parses");
    assert!(!table.cases.is_empty());
    table.cases
}

/// Fails the test listing every broken case, if any.
#[track_caller]
fn report(broken: Vec<String>, of: usize, by: &str) {
    assert!(
        broken.is_empty(),
        "{by}: {} of {of} dispatch rules broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// Runs every case through `client` (a warren client) against the standard endpoints of
/// `server`, named `name`: results, and remote failures' class, module and message, exactly.
#[track_caller]
pub fn check_warren_client(client: &RpcClient, server: Server, name: &str) {
    let cases = cases();
    let mut broken = Vec::new();
    for case in &cases {
        let mut prepared = client.prepare();
        if let Some(namespace) = &case.namespace {
            prepared = prepared.namespace(namespace.as_str());
        }
        if let Some(version) = &case.version {
            prepared = prepared.version(version.as_str());
        }
        let result = prepared.call::<_, Value>(&oslo_ctx(), &case.method, &json!({}));
        if case.unsendable {
            match result {
                Err(Error::InvalidVersion { version })
                    if Some(&version) == case.version.as_ref() => {}
                other => broken.push(format!(
                    "{case}\n    expected the client to refuse it (InvalidVersion), got {other:?}"
                )),
            }
            continue;
        }
        let got = match result {
            Ok(result) => Outcome::Result { result },
            Err(error @ Error::Remote { .. }) => {
                let failure = remote::<Value>(Err(error));
                Outcome::Error {
                    error: failure.class,
                    module: failure.module,
                    message: failure.message,
                }
            }
            Err(other) => {
                broken.push(format!("{case}\n    not a remote failure: {other:?}"));
                continue;
            }
        };
        let expected = case.expected(server, name);
        if got != expected {
            broken.push(format!(
                "{case}\n    expected {expected:?}\n    got      {got:?}"
            ));
        }
    }
    report(
        broken,
        cases.len(),
        &format!("warren client, {server:?} server"),
    );
}

/// Runs every sendable case through a Python `rpc-client` peer against the standard endpoints
/// of the warren server `name`. oslo raises a failure of a module the client does not allow
/// as `RemoteError` (class in `exc_type`, message in `value`), one of `builtins` as that
/// exception, and one of an allowed module as `<class>_Remote` of module `<module>_Remote`,
/// whose text is the message and the (empty) traceback: `allows_dispatcher_module` says
/// whether the peer was started with `--allow oslo_messaging.rpc.dispatcher`.
#[track_caller]
pub fn check_oslo_client(
    peer: &mut Peer,
    name: &str,
    allows_dispatcher_module: bool,
    wait: Duration,
) {
    let cases = cases();
    let mut broken = Vec::new();
    for case in cases.iter().filter(|c| !c.unsendable) {
        let answer = peer.request(
            json!({"op": "call", "method": case.method, "args": {}, "ctxt": {"user_id": "py-user"},
                   "namespace": case.namespace, "version": case.version}),
            wait,
        );
        let fine = match case.expected(Server::Warren, name) {
            Outcome::Result { result } => answer.get("result") == Some(&result),
            Outcome::Error {
                error,
                module,
                message,
            } => {
                let raised = &answer["error"];
                let text = raised["str"].as_str().unwrap_or_default();
                if module == "builtins" {
                    raised["type"] == error.as_str() && text.starts_with(&message)
                } else if allows_dispatcher_module && module == DISPATCHER_MODULE {
                    raised["type"] == format!("{error}_Remote").as_str()
                        && raised["module"] == format!("{module}_Remote").as_str()
                        && text.lines().next() == Some(message.as_str())
                } else {
                    raised["type"] == "RemoteError"
                        && raised["exc_type"] == error.as_str()
                        && raised["value"] == message.as_str()
                }
            }
        };
        if !fine {
            broken.push(format!(
                "{case}\n    expected {:?}\n    got      {answer}",
                case.expected(Server::Warren, name)
            ));
        }
    }
    report(
        broken,
        cases.len(),
        &format!(
            "oslo client (dispatcher module allowed: {allows_dispatcher_module}), warren server"
        ),
    );
}
