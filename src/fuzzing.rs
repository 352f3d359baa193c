//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Not a public API.
//!
//! Each function takes raw bytes as they could arrive from a peer on the broker and drives
//! the crate's own decoders the way the receiving code does (the RPC server's worker, the
//! client's reply thread, the notification listener, `Transport::builder(url).build()`).
//! None of them may panic, whatever the input; a few also assert invariants that warren
//! relies on (what it writes, it can read back).
//!
//! Inputs of the targets that take a content type start with one selector byte (see
//! [`split_content_type`]); the rest is the message body.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::dispatcher::{Dispatcher, Endpoint, NoArgs};
use crate::notify::{Notification, NotificationFilter, NotificationMetadata, Priority};
use crate::options::TransportOptions;
use crate::server::dedup::{self, RecentIds};
use crate::url::TransportUrl;
use crate::version::Version;
use crate::wire::envelope::{ArgsOf, Reply, ReplyHeader, RequestHeader, ResultOf};
use crate::wire::failure::Failure;
use crate::wire::notification::NotificationIn;
use crate::wire::{oslo_json, Codec, Document};
use crate::{AccessPolicy, RequestContext};

/// The `content_type`s a fuzz input can select with its first byte: the two codecs, their
/// variants, and ones warren must refuse.
const CONTENT_TYPES: [Option<&str>; 8] = [
    Some("application/json"),
    Some("application/msgpack"),
    Some("application/json; charset=utf-8"),
    Some("application/x-msgpack"),
    Some("application/json"),
    Some("application/msgpack"),
    Some("text/plain"),
    None,
];

/// Splits a fuzz input into `(content_type, body)`: the first byte selects the content type
/// (`0` JSON, `1` MessagePack, ...; taken modulo 8), the rest is the body.
pub fn split_content_type(data: &[u8]) -> (Option<&'static str>, &[u8]) {
    match data.split_first() {
        Some((selector, body)) => (CONTENT_TYPES[usize::from(*selector) % 8], body),
        None => (None, data),
    }
}

/// A request's arguments as a typed handler would take them.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct TypedArgs {
    name: String,
    count: u32,
    ratio: Option<f64>,
    tags: Vec<String>,
    flags: BTreeMap<String, bool>,
    inner: Option<Inner>,
    kind: Kind,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Inner {
    id: i64,
    data: Value,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
enum Kind {
    Small,
    Large { size: u64 },
    Named(String),
}

/// `add(a, b)`.
#[derive(Debug, Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

/// A dispatcher like an application's: a default endpoint and a namespaced, versioned one.
fn dispatcher() -> &'static Dispatcher {
    static DISPATCHER: OnceLock<Dispatcher> = OnceLock::new();
    DISPATCHER.get_or_init(|| {
        let default = Endpoint::new()
            .method("echo", |_: &RequestContext, args: Value| {
                Ok::<_, Failure>(args)
            })
            .method("add", |_: &RequestContext, x: AddArgs| {
                x.a.checked_add(x.b).ok_or(Failure::new(
                    "OverflowError",
                    "builtins",
                    "sum out of range",
                ))
            })
            .method("ping", |_: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>("pong")
            })
            .method("typed", |_: &RequestContext, args: TypedArgs| {
                Ok::<_, Failure>(args.tags.len() as u64 + u64::from(args.count))
            })
            .method("context", |ctx: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>(ctx.clone())
            })
            .method("fail", |_: &RequestContext, args: Value| {
                Err::<(), _>(
                    Failure::new("ValueError", "builtins", "bad value")
                        .with_args(vec![args.clone()])
                        .with_kwargs(args.as_object().cloned().unwrap_or_default()),
                )
            });
        let namespaced = Endpoint::new()
            .namespace("ns")
            .legacy_namespace("old_ns")
            .version(Version::new(1, 3))
            .method("echo_args", |_: &RequestContext, args: Value| {
                Ok::<_, Failure>(args)
            });
        Dispatcher::new(vec![default, namespaced], AccessPolicy::Default)
    })
}

/// A server's recent `_unique_id`s, shared by all inputs as a running server's are.
fn recent() -> &'static Mutex<RecentIds> {
    static RECENT: OnceLock<Mutex<RecentIds>> = OnceLock::new();
    RECENT.get_or_init(|| Mutex::new(RecentIds::new(16)))
}

/// Opening a document, sending it again (`reencode`, the server's requeue path) and opening
/// that must give the same message.
fn assert_reencode_stable(doc: &Document) {
    // Finding F1 (fuzz/README.md) broke this for JSON 1.0 bodies with invalid UTF-8.
    let body = doc
        .reencode()
        .expect("an opened document can always be re-encoded");
    let again = Document::open(Some(doc.codec.content_type()), body)
        .expect("a re-encoded document opens again");
    assert_eq!(again.codec, doc.codec);
    assert_eq!(again.bytes, doc.bytes, "re-encoding changed the message");
}

/// Every way warren reads a message map; results are dropped.
fn decode_all(doc: &Document) {
    let _ = doc.decode::<RequestHeader>();
    let _ = doc.decode::<ReplyHeader>();
    let _ = doc.decode::<NotificationIn>();
    let _ = doc.decode::<Value>();
    let _ = doc.decode::<ArgsOf<Value>>();
    let _ = doc.decode::<ArgsOf<TypedArgs>>();
    let _ = doc.decode::<ResultOf<Value>>();
    let _ = doc.decode::<ResultOf<Vec<String>>>();
}

/// A JSON body as the server, the reply thread and the listener open it: content type
/// `application/json`, the oslo envelope (`{"oslo.version": "2.0", "oslo.message": "..."}`,
/// or a bare 1.0 message) removed, then the message decoded every way warren reads one.
pub fn oslo_envelope(body: &[u8]) {
    let _ = oslo_json::unwrap_envelope(body.to_vec());
    if let Ok(doc) = Document::open(Some("application/json"), body.to_vec()) {
        assert_reencode_stable(&doc);
        decode_all(&doc);
    }
}

/// A MessagePack body (`application/msgpack`), decoded every way warren reads a message.
pub fn msgpack_message(body: &[u8]) {
    if let Ok(doc) = Document::open(Some("application/msgpack"), body.to_vec()) {
        assert_reencode_stable(&doc);
        decode_all(&doc);
    }
}

/// A request (call or cast) as the RPC server's worker handles it: open, header, duplicate
/// check, context, dispatch to typed handlers, and the reply in the request's codec. Asserts
/// that the reply warren writes is one that warren's client reads.
///
/// The input starts with the content-type selector of [`split_content_type`].
pub fn request(data: &[u8]) {
    let (content_type, body) = split_content_type(data);
    let Ok(doc) = Document::open(content_type, body.to_vec()) else {
        return;
    };
    let Ok(header) = doc.decode::<RequestHeader>() else {
        return;
    };
    if let Some(unique_id) = &header.unique_id {
        if !dedup::record(recent(), unique_id) {
            return;
        }
    }
    let _ = header.monitor_timeout();
    let mut context = header.context.clone();
    context.insert("client_timeout", header.timeout.clone());
    let outcome = dispatcher().dispatch(&header, &context, &doc);

    // The reply, written as the server writes it, must be read by the client.
    let msg_id = header.msg_id.as_deref().unwrap_or("fuzz-msg-id");
    let failure = outcome.as_ref().err().map(Failure::to_wire);
    let reply = Reply {
        result: outcome
            .as_ref()
            .ok()
            .map(|r| r.as_ref() as &dyn erased_serde::Serialize),
        failure: failure.as_deref(),
        ending: true,
        msg_id,
        unique_id: "fuzz-unique-id",
    };
    let Ok(reply_body) = doc.codec.encode(&reply) else {
        return;
    };
    let reply_doc = Document::open(Some(doc.codec.content_type()), reply_body)
        .expect("warren's own reply opens");
    let reply_header = reply_doc
        .decode::<ReplyHeader>()
        .expect("warren's own reply header decodes");
    assert_eq!(reply_header.msg_id, msg_id);
    assert!(reply_header.ending);
    match (&outcome, &reply_header.failure) {
        (Err(sent), Some(text)) => {
            let read = Failure::from_wire(text).expect("warren's own failure parses");
            assert_eq!(read.class(), sent.class());
            assert_eq!(read.module(), sent.module());
            assert_eq!(read.message(), sent.message());
        }
        (Ok(_), None) => {
            reply_doc
                .decode::<ResultOf<Value>>()
                .expect("warren's own result decodes");
        }
        (sent, read) => panic!(
            "reply does not match the outcome: sent {}, read failure {read:?}",
            if sent.is_ok() {
                "a result"
            } else {
                "a failure"
            }
        ),
    }

    // A cast handled under AckMode::AfterHandling may be re-sent to its queue.
    if header.msg_id.is_none() {
        assert_reencode_stable(&doc);
    }
}

/// A message on a reply queue as the client's reply thread routes it and the waiting call
/// reads it: header, then the failure (oslo's JSON string) or the result in several types.
/// The whole body is also parsed as a failure string.
///
/// The input starts with the content-type selector of [`split_content_type`].
pub fn reply(data: &[u8]) {
    let (content_type, body) = split_content_type(data);
    failure(&String::from_utf8_lossy(body));
    let Ok(doc) = Document::open(content_type, body.to_vec()) else {
        return;
    };
    let Ok(header) = doc.decode::<ReplyHeader>() else {
        return;
    };
    if let Some(text) = &header.failure {
        failure(text);
        return;
    }
    if header.ending || header.has_result {
        let _ = doc.decode::<ResultOf<Value>>();
        let _ = doc.decode::<ResultOf<i64>>();
        let _ = doc.decode::<ResultOf<Option<String>>>();
        let _ = doc.decode::<ResultOf<Vec<String>>>();
        let _ = doc.decode::<ResultOf<BTreeMap<String, f64>>>();
        let _ = doc.decode::<ResultOf<TypedArgs>>();
        let _ = doc.decode::<ResultOf<()>>();
    }
}

/// A reply's `failure` string as the waiting call turns it into an error, which the CLI
/// prints. What parses must survive warren's own encoding (the server relays failures).
pub fn failure(text: &str) {
    let Ok(parsed) = Failure::from_wire(text) else {
        return;
    };
    let _ = parsed.to_string();
    let wire = parsed.to_wire();
    let again = Failure::from_wire(&wire).expect("warren's own failure string parses");
    assert_eq!(again.class(), parsed.class());
    assert_eq!(again.module(), parsed.module());
    assert_eq!(again.message(), parsed.message());
    assert_eq!(again.traceback(), parsed.traceback());
    assert_eq!(again.args().len(), parsed.args().len());
    assert_eq!(again.kwargs().len(), parsed.kwargs().len());
    let _ = parsed.into_error().to_string();
}

/// A filter like an application's: every kind of rule.
fn notification_filter() -> &'static NotificationFilter {
    static FILTER: OnceLock<NotificationFilter> = OnceLock::new();
    FILTER.get_or_init(|| {
        NotificationFilter::new()
            .event_type(r"compute\.instance\..*")
            .and_then(|f| f.publisher_id("compute|network"))
            .and_then(|f| f.context("project_id", "fixture-.*"))
            .and_then(|f| f.metadata("timestamp", r"\d{4}-"))
            .expect("the fuzz filter is valid")
    })
}

/// A message on a notification queue as the listener handles it: open, decode, priority,
/// duplicate check, filter, payload as the handler's type.
///
/// The input starts with the content-type selector of [`split_content_type`].
pub fn notification(data: &[u8]) {
    let (content_type, body) = split_content_type(data);
    let Ok(doc) = Document::open(content_type, body.to_vec()) else {
        return;
    };
    let Ok(received) = doc.decode::<NotificationIn>() else {
        return;
    };
    let Ok(priority) = received.priority.parse::<Priority>() else {
        return;
    };
    let _ = priority.wire_name();
    if let Some(unique_id) = &received.unique_id {
        dedup::record(recent(), unique_id);
    }
    let notification = Notification {
        priority,
        ctxt: received.context,
        publisher_id: received.publisher_id,
        event_type: received.event_type,
        payload: received.payload,
        metadata: NotificationMetadata {
            message_id: received.message_id,
            timestamp: received.timestamp,
        },
    };
    let _ = notification_filter().matches(&notification);
    let _ = notification.payload_as::<Value>();
    let _ = notification.payload_as::<TypedArgs>();
    let _ = notification.payload_as::<BTreeMap<String, String>>();
}

/// A transport URL as `Transport::builder(url).build()` reads it before connecting: parse,
/// apply the query options, validate; then everything that shows the URL.
pub fn url(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let url = match TransportUrl::parse(&text) {
        Ok(url) => url,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = url.to_string();
    let _ = format!("{url:?}");
    let _ = url.memory_key();
    let _ = url.virtual_host();
    for host in url.effective_hosts() {
        let _ = (host.address(), host.login_username(), host.login_password());
        let _ = format!("{host} {host:?}");
    }
    let mut options = TransportOptions::default();
    for (name, value) in url.query() {
        if let Err(e) = options.apply(name, value) {
            let _ = e.to_string();
            return;
        }
    }
    if let Err(e) = options.validate() {
        let _ = e.to_string();
    }
}

/// Builds a JSON value from fuzz bytes, for the encode/decode round trip.
struct ValueBuilder<'a> {
    data: &'a [u8],
}

impl ValueBuilder<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes8(&mut self) -> [u8; 8] {
        let mut out = [0u8; 8];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    /// A string of ASCII (controls, quotes, backslashes included), BMP and astral characters.
    fn string(&mut self) -> String {
        let len = usize::from(self.byte() % 24);
        let mut out = String::with_capacity(len);
        for _ in 0..len {
            let b = self.byte();
            if b < 0x80 {
                out.push(char::from(b));
            } else {
                let code = (u32::from(b & 0x7f) << 16 | u32::from(self.byte()) << 8)
                    | u32::from(self.byte());
                // Surrogates are not chars: skip them.
                if let Some(c) = char::from_u32(code % 0x11_0000) {
                    out.push(c);
                }
            }
        }
        out
    }

    fn value(&mut self, depth: usize) -> Value {
        let tag = self.byte();
        let kinds = if depth >= 24 { 8 } else { 10 };
        match tag % kinds {
            0 => Value::Null,
            1 => Value::Bool(tag & 0x80 != 0),
            2 => Value::from(i64::from_le_bytes(self.bytes8())),
            3 => Value::from(u64::from_le_bytes(self.bytes8())),
            4 => Value::from(i64::from(self.byte() as i8)),
            // Non-finite floats are not JSON values (serde_json makes them null): skip them.
            5 | 6 => Number::from_f64(f64::from_le_bytes(self.bytes8()))
                .map_or(Value::Null, Value::Number),
            7 => Value::String(self.string()),
            8 => {
                let len = usize::from(self.byte() % 8);
                Value::Array((0..len).map(|_| self.value(depth + 1)).collect())
            }
            _ => {
                let len = usize::from(self.byte() % 8);
                let mut map = Map::new();
                for _ in 0..len {
                    let key = self.string();
                    let value = self.value(depth + 1);
                    map.insert(key, value);
                }
                Value::Object(map)
            }
        }
    }
}

/// Every float in `value`.
fn floats(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(n) if n.is_f64() => out.extend(n.as_f64()),
        Value::Array(items) => items.iter().for_each(|v| floats(v, out)),
        Value::Object(map) => map.values().for_each(|v| floats(v, out)),
        _ => {}
    }
}

/// The round trip of a JSON value built from the input through warren's writers and readers:
/// Python-exact JSON (`oslo_json::write_python_json`: ASCII only, Python's float `repr`),
/// the whole JSON codec (envelope included) and the MessagePack codec. Each must give the
/// value back.
pub fn json_roundtrip(data: &[u8]) {
    let value = ValueBuilder { data }.value(0);

    let mut found = Vec::new();
    floats(&value, &mut found);
    for f in found {
        let repr = oslo_json::python_float_repr(f);
        assert_eq!(repr.parse::<f64>().ok(), Some(f), "repr({f:e}) = {repr}");
    }

    let mut text = Vec::new();
    oslo_json::write_python_json(&mut text, &value).expect("a JSON value serializes");
    assert!(text.is_ascii(), "ensure_ascii output has non-ASCII bytes");
    // Exact, floats included (finding F2 in fuzz/README.md: they were not).
    let back: Value = serde_json::from_slice(&text).expect("warren's JSON parses");
    assert_eq!(
        back,
        value,
        "python JSON round trip of {}",
        String::from_utf8_lossy(&text)
    );

    for codec in [Codec::Json, Codec::MsgPack] {
        let body = codec.encode(&value).expect("a JSON value encodes");
        let doc = Document::open(Some(codec.content_type()), body).expect("warren's body opens");
        let back = doc
            .decode::<Value>()
            .unwrap_or_else(|e| panic!("{codec} body does not decode: {e}"));
        assert_eq!(back, value, "{codec} round trip");
    }
}
