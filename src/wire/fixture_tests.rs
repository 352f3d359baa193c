//! The JSON codec against real oslo.messaging 18.3.1 captures (`tests/fixtures/oslo-wire/`):
//! every captured message decodes to what oslo meant, and re-encoding the decoded fields gives
//! back the captured bytes exactly.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::context::RequestContext;
use crate::wire::envelope::{
    ArgsOf, CallFields, Reply, ReplyHeader, Request, RequestHeader, ResultOf,
};
use crate::wire::failure::Failure;
use crate::wire::{Codec, Document};

/// One captured message.
pub(crate) struct Captured {
    pub file: String,
    pub role: String,
    pub exchange: String,
    pub routing_key: String,
    pub properties: Map<String, Value>,
    pub body: String,
    pub inner: Map<String, Value>,
    /// What the case sent (`target`, `topics`...), from the case file's `options`.
    pub options: Value,
}

/// Every message of every case file.
pub(crate) fn captured_messages() -> Vec<Captured> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oslo-wire");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("topology.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "fixtures missing in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture"))
                .expect("fixture JSON");
        for m in case["messages"].as_array().expect("messages") {
            let body = m["body"].as_str().expect("body").to_string();
            let inner = match m["decoded"]["oslo_message_json"].as_object() {
                Some(inner) => inner.clone(),
                None => serde_json::from_str(&body).expect("v1 body is the message"),
            };
            out.push(Captured {
                file: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                role: m["role"].as_str().expect("role").to_string(),
                exchange: m["method"]["exchange"]
                    .as_str()
                    .expect("exchange")
                    .to_string(),
                routing_key: m["method"]["routing_key"]
                    .as_str()
                    .expect("routing_key")
                    .to_string(),
                properties: m["properties"].as_object().expect("properties").clone(),
                body,
                inner,
                options: case["options"].clone(),
            });
        }
    }
    out
}

fn open(c: &Captured) -> Document {
    let content_type = c.properties["content_type"].as_str();
    Document::open(content_type, c.body.clone().into_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", c.file))
}

fn str_field<'a>(inner: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    inner.get(key).and_then(Value::as_str)
}

#[test]
fn requests_decode_and_reencode_byte_for_byte() {
    let mut seen = 0;
    for c in captured_messages()
        .iter()
        .filter(|c| c.role.starts_with("rpc_c"))
    {
        let doc = open(c);
        assert_eq!(doc.codec, Codec::Json);
        let header: RequestHeader = doc.decode().unwrap_or_else(|e| panic!("{}: {e}", c.file));
        assert_eq!(
            header.method,
            str_field(&c.inner, "method").unwrap_or_default(),
            "{}",
            c.file
        );
        assert_eq!(
            header.namespace.as_deref(),
            str_field(&c.inner, "namespace")
        );
        assert_eq!(header.version.as_deref(), str_field(&c.inner, "version"));
        assert_eq!(header.msg_id.as_deref(), str_field(&c.inner, "_msg_id"));
        assert_eq!(header.reply_q.as_deref(), str_field(&c.inner, "_reply_q"));
        assert_eq!(
            header.unique_id.as_deref(),
            str_field(&c.inner, "_unique_id")
        );
        assert_eq!(
            header.timeout,
            c.inner.get("_timeout").cloned().unwrap_or(Value::Null)
        );
        let expected_context: Map<String, Value> = c
            .inner
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("_context_")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        assert_eq!(
            header.context,
            RequestContext::from(expected_context),
            "{}",
            c.file
        );
        let args = doc.decode::<ArgsOf<Value>>().expect("args").0;
        assert_eq!(args, c.inner["args"], "{}", c.file);

        let reencoded = Codec::Json
            .encode(&Request {
                method: &header.method,
                args: &args,
                namespace: header.namespace.as_deref(),
                version: header.version.as_deref(),
                call: header.msg_id.as_deref().map(|msg_id| CallFields {
                    msg_id,
                    reply_q: header.reply_q.as_deref().unwrap_or_default(),
                    monitor_timeout: header.timeout.as_u64(),
                }),
                unique_id: header.unique_id.as_deref().unwrap_or_default(),
                context: &header.context,
            })
            .expect("encode");
        assert_eq!(
            String::from_utf8(reencoded).expect("ascii"),
            c.body,
            "{}",
            c.file
        );
        seen += 1;
    }
    assert!(seen >= 9, "only {seen} requests checked");
}

#[test]
fn replies_decode_and_reencode_byte_for_byte() {
    let mut failures = 0;
    let mut heartbeats = 0;
    for c in captured_messages()
        .iter()
        .filter(|c| c.role.starts_with("rpc_reply"))
    {
        let doc = open(c);
        let header: ReplyHeader = doc.decode().unwrap_or_else(|e| panic!("{}: {e}", c.file));
        assert_eq!(Some(header.msg_id.as_str()), str_field(&c.inner, "_msg_id"));
        assert_eq!(header.ending, c.inner["ending"].as_bool().expect("ending"));
        let result = doc.decode::<ResultOf<Value>>().expect("result").0;
        assert_eq!(result, c.inner["result"]);
        assert_eq!(header.has_result, !result.is_null());
        if c.role == "rpc_reply_heartbeat" {
            assert!(!header.ending && header.failure.is_none() && !header.has_result);
            heartbeats += 1;
        }
        let failure = header
            .failure
            .as_deref()
            .map(|f| Failure::from_wire(f).expect("failure"));
        if let Some(failure) = &failure {
            let expected: Value =
                serde_json::from_str(str_field(&c.inner, "failure").expect("failure string"))
                    .expect("json");
            assert_eq!(failure.class(), expected["class"]);
            assert_eq!(failure.module(), expected["module"]);
            assert_eq!(failure.message(), expected["message"]);
            assert_eq!(
                failure.traceback().len(),
                expected["tb"].as_array().expect("tb").len()
            );
            assert_eq!(Value::from(failure.args().to_vec()), expected["args"]);
            failures += 1;
        }
        let wire_failure = failure.as_ref().map(Failure::to_wire);
        let reencoded = Codec::Json
            .encode(&Reply {
                result: (!result.is_null()).then_some(&result as &dyn erased_serde::Serialize),
                failure: wire_failure.as_deref(),
                ending: header.ending,
                msg_id: &header.msg_id,
                unique_id: str_field(&c.inner, "_unique_id").expect("unique id"),
            })
            .expect("encode");
        assert_eq!(
            String::from_utf8(reencoded).expect("ascii"),
            c.body,
            "{}",
            c.file
        );
    }
    assert_eq!(
        failures, 4,
        "ValueError, KeyError, NoSuchMethod, UnsupportedVersion"
    );
    assert_eq!(heartbeats, 2);
}

#[test]
fn failures_map_to_remote_errors() {
    let c = captured_messages()
        .into_iter()
        .find(|c| c.file.starts_with("case5a") && c.role == "rpc_reply")
        .expect("case 5a");
    let header: ReplyHeader = open(&c).decode().expect("header");
    let error = Failure::from_wire(&header.failure.expect("failure"))
        .expect("parse")
        .into_error();
    match error {
        crate::Error::Remote {
            class,
            module,
            message,
            traceback,
            details,
        } => {
            assert_eq!(
                (class.as_str(), module.as_str(), message.as_str()),
                ("ValueError", "builtins", "bad value")
            );
            assert_eq!(
                traceback.last().map(String::as_str),
                Some("ValueError: bad value\n")
            );
            assert_eq!(details.args, vec![Value::from("bad value")]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn notifications_open_with_and_without_envelope() {
    let control_exchange = crate::options::TransportOptions::default().control_exchange;
    let mut seen = 0;
    for c in captured_messages()
        .iter()
        .filter(|c| c.role == "notification")
    {
        let doc = open(c);
        let message: Map<String, Value> =
            doc.decode().unwrap_or_else(|e| panic!("{}: {e}", c.file));
        assert_eq!(message, c.inner, "{}", c.file);
        // oslo sends the priority in upper case, and routes by its lower-case name.
        let priority = str_field(&message, "priority").expect("a priority");
        assert_eq!(priority, "INFO", "{}", c.file);
        assert_eq!(Some(priority), c.options["priority"].as_str(), "{}", c.file);
        let parsed: crate::notify::Priority = priority.parse().expect("a known priority");
        let topic = c.options["topics"][0].as_str().expect("a topic");
        assert_eq!(
            c.routing_key,
            format!("{topic}.{}", parsed.as_str()),
            "{}",
            c.file
        );
        assert_eq!(c.exchange, control_exchange, "{}", c.file);
        seen += 1;
    }
    assert_eq!(seen, 3);
}

/// Where warren would publish what oslo did, from what each case asked for (its target), and
/// for replies the `_reply_q` of the case's request: the same exchange and routing key.
#[test]
fn routes_match_the_captures() {
    use crate::driver::Route;
    use crate::target::Target;
    let control_exchange = crate::options::TransportOptions::default().control_exchange;
    let messages = captured_messages();
    let mut checked = 0;
    for c in &messages {
        let asked = &c.options["target"];
        let mut target = Target::new(asked["topic"].as_str().unwrap_or_default());
        if let Some(server) = asked["server"].as_str() {
            target = target.with_server(server);
        }
        let routing_key = target.routing_key();
        let request = || {
            messages
                .iter()
                .find(|r| r.file == c.file && r.role == "rpc_call_request")
                .unwrap_or_else(|| panic!("{}: no request for the reply", c.file))
        };
        let route = match c.role.as_str() {
            "rpc_cast_fanout" => {
                assert_eq!(asked["fanout"], true, "{}", c.file);
                Route::Fanout {
                    topic: target.topic.as_deref().unwrap_or_default(),
                }
            }
            "rpc_reply" | "rpc_reply_heartbeat" => {
                let request = request();
                assert_eq!(
                    str_field(&c.inner, "_msg_id"),
                    str_field(&request.inner, "_msg_id"),
                    "{}",
                    c.file
                );
                Route::Direct {
                    queue: str_field(&request.inner, "_reply_q").expect("a _reply_q"),
                }
            }
            "rpc_call_request" | "rpc_cast" => Route::Topic {
                exchange: &control_exchange,
                routing_key: routing_key
                    .as_deref()
                    .unwrap_or_else(|e| panic!("{}: {e}", c.file)),
            },
            _ => continue,
        };
        assert_eq!(
            route.exchange_and_key(),
            (c.exchange.clone(), c.routing_key.clone()),
            "{}",
            c.file
        );
        checked += 1;
    }
    assert_eq!(checked, 17, "9 requests, 6 replies, 2 keep-alives");
}

#[test]
fn notifications_decode_and_reencode_byte_for_byte() {
    use crate::wire::notification::{NotificationIn, NotificationOut};
    let mut seen = 0;
    for c in captured_messages()
        .iter()
        .filter(|c| c.role == "notification")
    {
        let n: NotificationIn = open(c)
            .decode()
            .unwrap_or_else(|e| panic!("{}: {e}", c.file));
        assert_eq!(
            Some(n.message_id.as_str()),
            str_field(&c.inner, "message_id")
        );
        assert_eq!(
            Some(n.publisher_id.as_str()),
            str_field(&c.inner, "publisher_id")
        );
        assert_eq!(
            Some(n.event_type.as_str()),
            str_field(&c.inner, "event_type")
        );
        assert_eq!(Some(n.priority.as_str()), str_field(&c.inner, "priority"));
        assert_eq!(n.payload, c.inner["payload"]);
        assert_eq!(Some(n.timestamp.as_str()), str_field(&c.inner, "timestamp"));
        let out = NotificationOut {
            message_id: &n.message_id,
            publisher_id: &n.publisher_id,
            event_type: &n.event_type,
            priority: &n.priority,
            payload: &n.payload,
            timestamp: &n.timestamp,
            unique_id: n.unique_id.as_deref().unwrap_or_default(),
            context: &n.context,
        };
        let body = if c.file.starts_with("extra_notification_v1") {
            crate::wire::oslo_json::to_python_json(&out)
                .expect("encode")
                .into_bytes()
        } else {
            Codec::Json.encode(&out).expect("encode")
        };
        assert_eq!(
            String::from_utf8(body).expect("ascii"),
            c.body,
            "{}",
            c.file
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "v2, v1, v2 with a RequestContext");
}
