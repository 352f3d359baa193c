//! The fields of requests and replies: oslo's message envelope (`method`, `args`,
//! `namespace`, `version`, `_msg_id`, `_reply_q`, `_timeout`, `_unique_id`, `_context_*`;
//! replies `result`, `failure`, `ending`, `_msg_id`, `_unique_id`).
//!
//! Encoding writes the keys in oslo's order, so the JSON codec reproduces oslo's bytes.
//! Decoding is done in two passes over the same document: a header pass that skips the
//! payload (`args` / `result`), and a typed pass that reads only the payload into the
//! handler's argument type or the caller's result type.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, IgnoredAny, IntoDeserializer, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::context::RequestContext;
use crate::wire::{limits, Document, KeyStr};

/// Prefix of context keys on the wire.
pub(crate) const CONTEXT_PREFIX: &str = "_context_";

/// A request (call or cast) ready to be encoded.
pub(crate) struct Request<'a, A: ?Sized> {
    pub method: &'a str,
    pub args: &'a A,
    pub namespace: Option<&'a str>,
    pub version: Option<&'a str>,
    /// Present for calls only.
    pub call: Option<CallFields<'a>>,
    pub unique_id: &'a str,
    pub context: &'a RequestContext,
}

/// The fields only a call carries.
pub(crate) struct CallFields<'a> {
    pub msg_id: &'a str,
    pub reply_q: &'a str,
    /// Call-monitor timeout in seconds (`_timeout`), `null` when unset.
    pub monitor_timeout: Option<u64>,
}

impl<A: Serialize + ?Sized> Serialize for Request<'_, A> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = 3
            + usize::from(self.namespace.is_some())
            + usize::from(self.version.is_some())
            + if self.call.is_some() { 3 } else { 0 }
            + self.context.len();
        let mut map = serializer.serialize_map(Some(len))?;
        map.serialize_entry("method", self.method)?;
        map.serialize_entry("args", &ArgsMap(self.args))?;
        if let Some(namespace) = self.namespace {
            map.serialize_entry("namespace", namespace)?;
        }
        if let Some(version) = self.version {
            map.serialize_entry("version", version)?;
        }
        if let Some(call) = &self.call {
            map.serialize_entry("_msg_id", call.msg_id)?;
            map.serialize_entry("_reply_q", call.reply_q)?;
            map.serialize_entry("_timeout", &call.monitor_timeout)?;
        }
        map.serialize_entry("_unique_id", self.unique_id)?;
        for (key, value) in self.context.iter() {
            map.serialize_entry(&ContextKey(key), value)?;
        }
        map.end()
    }
}

/// Serializes call arguments; `()` (no arguments) becomes `{}` as oslo expects a dict.
struct ArgsMap<'a, A: ?Sized>(&'a A);

impl<A: Serialize + ?Sized> Serialize for ArgsMap<'_, A> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(UnitAsEmptyMap(serializer))
    }
}

/// A serializer adapter that turns a top-level `()` into an empty map and forwards the rest.
struct UnitAsEmptyMap<S>(S);

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(self, $($arg: $ty),*) -> $ret { self.0.$name($($arg),*) })*
    };
}

impl<S: Serializer> Serializer for UnitAsEmptyMap<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = S::SerializeSeq;
    type SerializeTuple = S::SerializeTuple;
    type SerializeTupleStruct = S::SerializeTupleStruct;
    type SerializeTupleVariant = S::SerializeTupleVariant;
    type SerializeMap = S::SerializeMap;
    type SerializeStruct = S::SerializeStruct;
    type SerializeStructVariant = S::SerializeStructVariant;

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_map(Some(0))?.end()
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<S::Ok, S::Error> {
        self.0.serialize_map(Some(0))?.end()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(value)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, value)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0
            .serialize_newtype_variant(name, index, variant, value)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    forward! {
        serialize_bool(v: bool) -> Result<S::Ok, S::Error>;
        serialize_i8(v: i8) -> Result<S::Ok, S::Error>;
        serialize_i16(v: i16) -> Result<S::Ok, S::Error>;
        serialize_i32(v: i32) -> Result<S::Ok, S::Error>;
        serialize_i64(v: i64) -> Result<S::Ok, S::Error>;
        serialize_i128(v: i128) -> Result<S::Ok, S::Error>;
        serialize_u8(v: u8) -> Result<S::Ok, S::Error>;
        serialize_u16(v: u16) -> Result<S::Ok, S::Error>;
        serialize_u32(v: u32) -> Result<S::Ok, S::Error>;
        serialize_u64(v: u64) -> Result<S::Ok, S::Error>;
        serialize_u128(v: u128) -> Result<S::Ok, S::Error>;
        serialize_f32(v: f32) -> Result<S::Ok, S::Error>;
        serialize_f64(v: f64) -> Result<S::Ok, S::Error>;
        serialize_char(v: char) -> Result<S::Ok, S::Error>;
        serialize_str(v: &str) -> Result<S::Ok, S::Error>;
        serialize_bytes(v: &[u8]) -> Result<S::Ok, S::Error>;
        serialize_none() -> Result<S::Ok, S::Error>;
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str) -> Result<S::Ok, S::Error>;
        serialize_seq(len: Option<usize>) -> Result<S::SerializeSeq, S::Error>;
        serialize_tuple(len: usize) -> Result<S::SerializeTuple, S::Error>;
        serialize_tuple_struct(name: &'static str, len: usize) -> Result<S::SerializeTupleStruct, S::Error>;
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Result<S::SerializeTupleVariant, S::Error>;
        serialize_map(len: Option<usize>) -> Result<S::SerializeMap, S::Error>;
        serialize_struct(name: &'static str, len: usize) -> Result<S::SerializeStruct, S::Error>;
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Result<S::SerializeStructVariant, S::Error>;
    }
}

/// Serializes as `_context_<key>`.
struct ContextKey<'a>(&'a str);

impl Serialize for ContextKey<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{CONTEXT_PREFIX}{}", self.0))
    }
}

/// Everything of a request but its arguments.
#[derive(Debug, Default)]
pub(crate) struct RequestHeader {
    pub method: String,
    pub namespace: Option<String>,
    pub version: Option<String>,
    pub msg_id: Option<String>,
    pub reply_q: Option<String>,
    /// `_timeout` as sent: the caller's call-monitor timeout in seconds, or `null`.
    pub timeout: Value,
    pub unique_id: Option<String>,
    pub context: RequestContext,
}

impl RequestHeader {
    /// How often the caller wants keep-alives: its call-monitor timeout (`_timeout`), if any.
    pub fn monitor_timeout(&self) -> Option<Duration> {
        self.timeout
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
            .map(Duration::from_secs_f64)
    }
}

impl RequestHeader {
    /// Refuses what warren could not safely keep, log or write back: a method name or ids over
    /// [`MAX_ID_LEN`](limits::MAX_ID_LEN) bytes or with control characters (ids are kept in the
    /// duplicate window and the reply), and a `_reply_q` that is empty or not an AMQP short
    /// string.
    pub fn check(&self) -> Result<(), String> {
        limits::check_id("method", &self.method)?;
        if let Some(msg_id) = &self.msg_id {
            limits::check_id("_msg_id", msg_id)?;
        }
        if let Some(reply_q) = &self.reply_q {
            limits::check_short_string("_reply_q", reply_q)?;
            if reply_q.is_empty() {
                return Err("empty _reply_q".into());
            }
        }
        if let Some(unique_id) = &self.unique_id {
            limits::check_id("_unique_id", unique_id)?;
        }
        Ok(())
    }
}

/// A received request whose body was opened and whose header was read and checked: what the
/// poll thread hands a worker when it screens deliveries before acknowledging them.
#[derive(Debug)]
pub(crate) struct OpenedRequest {
    pub doc: Document,
    pub header: RequestHeader,
    /// Size of the body as received, in bytes.
    pub size: usize,
}

impl OpenedRequest {
    /// Opens `body` (content type, envelope) and reads its header; the error says why the
    /// message cannot be read at all (such messages are rejected without requeue).
    pub fn open(content_type: Option<&str>, body: Vec<u8>) -> Result<OpenedRequest, String> {
        let size = body.len();
        let doc = Document::open(content_type, body)?;
        let header = doc.decode::<RequestHeader>().map_err(|e| e.to_string())?;
        header.check()?;
        Ok(OpenedRequest { doc, header, size })
    }
}

impl<'de> Deserialize<'de> for RequestHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RequestHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request map")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RequestHeader, M::Error> {
                let mut header = RequestHeader::default();
                let mut method = None;
                while let Some(KeyStr(key)) = map.next_key()? {
                    match key.as_ref() {
                        "method" => method = Some(map.next_value::<String>()?),
                        "namespace" => header.namespace = map.next_value()?,
                        "version" => header.version = map.next_value()?,
                        "_msg_id" => header.msg_id = map.next_value()?,
                        "_reply_q" => header.reply_q = map.next_value()?,
                        "_timeout" => header.timeout = map.next_value()?,
                        "_unique_id" => header.unique_id = map.next_value()?,
                        other => match other.strip_prefix(CONTEXT_PREFIX) {
                            Some(name) => {
                                let name = name.to_string();
                                header.context.insert(name, map.next_value::<Value>()?);
                            }
                            None => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        },
                    }
                }
                header.method = method.ok_or_else(|| de::Error::missing_field("method"))?;
                Ok(header)
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// Reads one field of a message map into `T`, skipping the others; a missing field reads as
/// `default_from` (an empty map for `args`, `null` for `result`).
pub(crate) struct FieldOf<T, F: FieldName>(pub T, PhantomData<F>);

/// Names the field [`FieldOf`] extracts.
pub(crate) trait FieldName {
    const NAME: &'static str;
    /// Deserializes `T` when the field is absent.
    fn absent<'de, T: Deserialize<'de>, E: de::Error>() -> Result<T, E>;
}

/// The `args` field; oslo's default is `{}`.
pub(crate) struct ArgsField;
impl FieldName for ArgsField {
    const NAME: &'static str = "args";
    fn absent<'de, T: Deserialize<'de>, E: de::Error>() -> Result<T, E> {
        let empty =
            serde::de::value::MapDeserializer::<_, E>::new(std::iter::empty::<(String, String)>());
        T::deserialize(empty)
    }
}

/// The `result` field; absent reads as `null`.
pub(crate) struct ResultField;
impl FieldName for ResultField {
    const NAME: &'static str = "result";
    fn absent<'de, T: Deserialize<'de>, E: de::Error>() -> Result<T, E> {
        T::deserialize(().into_deserializer())
    }
}

impl<'de, T: Deserialize<'de>, F: FieldName> Deserialize<'de> for FieldOf<T, F> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor<T, F>(PhantomData<(T, F)>);
        impl<'de, T: Deserialize<'de>, F: FieldName> Visitor<'de> for FieldVisitor<T, F> {
            type Value = FieldOf<T, F>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message map")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut value = None;
                while let Some(KeyStr(key)) = map.next_key()? {
                    if key == F::NAME && value.is_none() {
                        value = Some(map.next_value::<T>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                match value {
                    Some(v) => Ok(FieldOf(v, PhantomData)),
                    None => F::absent().map(|v| FieldOf(v, PhantomData)),
                }
            }
        }
        deserializer.deserialize_map(FieldVisitor(PhantomData))
    }
}

/// The arguments of a request, as the handler's type.
pub(crate) type ArgsOf<A> = FieldOf<A, ArgsField>;
/// The result of a reply, as the caller's type.
pub(crate) type ResultOf<R> = FieldOf<R, ResultField>;

/// A reply ready to be encoded: `result`, `failure`, `ending`, `_msg_id`, `_unique_id`.
pub(crate) struct Reply<'a> {
    pub result: Option<&'a (dyn erased_serde::Serialize + 'a)>,
    /// The failure, already as oslo's JSON string.
    pub failure: Option<&'a str>,
    pub ending: bool,
    pub msg_id: &'a str,
    pub unique_id: &'a str,
}

impl Serialize for Reply<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("result", &self.result)?;
        map.serialize_entry("failure", &self.failure)?;
        map.serialize_entry("ending", &self.ending)?;
        map.serialize_entry("_msg_id", self.msg_id)?;
        map.serialize_entry("_unique_id", self.unique_id)?;
        map.end()
    }
}

/// Everything of a reply but its result.
#[derive(Debug)]
pub(crate) struct ReplyHeader {
    pub msg_id: String,
    /// oslo's `ending` (absent means `false`).
    pub ending: bool,
    pub failure: Option<String>,
    /// `true` when `result` is present and not `null`.
    pub has_result: bool,
}

impl<'de> Deserialize<'de> for ReplyHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = ReplyHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a reply map")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<ReplyHeader, M::Error> {
                let mut msg_id = None;
                let mut header = ReplyHeader {
                    msg_id: String::new(),
                    ending: false,
                    failure: None,
                    has_result: false,
                };
                while let Some(KeyStr(key)) = map.next_key()? {
                    match key.as_ref() {
                        "_msg_id" => msg_id = Some(map.next_value::<String>()?),
                        "ending" => {
                            header.ending = map.next_value::<Option<bool>>()?.unwrap_or(false)
                        }
                        "failure" => header.failure = map.next_value()?,
                        "result" => {
                            header.has_result = map.next_value::<Option<IgnoredAny>>()?.is_some()
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                header.msg_id = msg_id.ok_or_else(|| de::Error::missing_field("_msg_id"))?;
                Ok(header)
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Codec, Document};
    use serde_json::{json, Map};

    #[test]
    fn a_monitor_timeout_is_a_positive_number_of_seconds_below_a_billion() {
        let header = |timeout: Value| RequestHeader {
            timeout,
            ..RequestHeader::default()
        };
        let s = Duration::from_secs_f64;
        assert_eq!(header(json!(4)).monitor_timeout(), Some(s(4.0)));
        assert_eq!(header(json!(0.5)).monitor_timeout(), Some(s(0.5)));
        assert_eq!(
            header(json!(999_999_999)).monitor_timeout(),
            Some(s(999_999_999.0))
        );
        for refused in [
            json!(0),
            json!(-1),
            json!(-0.5),
            json!(1e9),
            json!(1e300),
            json!("4"),
            Value::Null,
        ] {
            assert_eq!(header(refused.clone()).monitor_timeout(), None, "{refused}");
        }
    }

    fn opened(fields: &Value) -> Result<OpenedRequest, String> {
        let body = Codec::MsgPack.encode(fields).unwrap();
        OpenedRequest::open(Some(Codec::MsgPack.content_type()), body)
    }

    #[test]
    fn a_request_header_is_checked_before_it_is_kept() {
        let call = json!({"method": "m", "args": {}, "_msg_id": "a", "_reply_q": "reply_a",
                          "_unique_id": "u", "_timeout": null});
        let taken = opened(&call).unwrap();
        assert_eq!(taken.header.reply_q.as_deref(), Some("reply_a"));
        let long = "x".repeat(limits::MAX_ID_LEN + 1);
        let cases = [
            ("method", json!(long.as_str()), "method"),
            ("_msg_id", json!(long.as_str()), "_msg_id"),
            ("_unique_id", json!("u\u{7}"), "_unique_id"),
            ("_reply_q", json!("r".repeat(256)), "_reply_q"),
            ("_reply_q", json!(""), "empty _reply_q"),
        ];
        for (field, value, says) in cases {
            let mut bad = call.clone();
            bad[field] = value;
            let err = opened(&bad).expect_err(field);
            assert!(err.contains(says), "{field}: {err}");
        }
    }

    #[test]
    fn a_message_that_is_not_a_map_is_refused_as_such() {
        let err = opened(&json!(["method", "m"])).expect_err("an array");
        assert!(err.contains("expected a request map"), "{err}");
        let body = Codec::MsgPack.encode(&json!(["result", 1])).unwrap();
        let doc = Document::open(Some(Codec::MsgPack.content_type()), body).unwrap();
        let err = doc
            .decode::<ReplyHeader>()
            .expect_err("an array")
            .to_string();
        assert!(err.contains("expected a reply map"), "{err}");
        let err = doc
            .decode::<FieldOf<Value, ResultField>>()
            .err()
            .expect("an array is refused")
            .to_string();
        assert!(err.contains("expected a message map"), "{err}");
    }

    /// The arguments are serialized by the codec's own serializer: a type that looks at
    /// `is_human_readable` (an IP address) is text in JSON and bytes in MessagePack.
    #[test]
    fn arguments_keep_the_codecs_human_readable_choice() {
        let ip = std::net::Ipv4Addr::new(10, 0, 0, 1);
        let context = RequestContext::new();
        let request = Request {
            method: "m",
            args: &ip,
            namespace: None,
            version: None,
            call: None,
            unique_id: "u",
            context: &context,
        };
        let args = |codec: Codec| -> Value {
            let body = codec.encode(&request).unwrap();
            let doc = Document::open(Some(codec.content_type()), body).unwrap();
            let mut fields: Map<String, Value> = doc.decode().unwrap();
            fields.remove("args").unwrap()
        };
        assert_eq!(args(Codec::Json), json!("10.0.0.1"));
        assert_eq!(args(Codec::MsgPack), json!([10, 0, 0, 1]));
    }
}
