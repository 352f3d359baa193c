//! What goes on the wire: codecs, oslo's JSON format, MessagePack, message fields, failures.
//!
//! A received body is first *opened* into a [`Document`] (content type checked, oslo envelope
//! removed), then decoded in passes (see [`envelope`]).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

pub(crate) mod envelope;
pub(crate) mod failure;
#[cfg(test)]
pub(crate) mod fixture_tests;
pub(crate) mod limits;
pub(crate) mod msgpack;
pub(crate) mod notification;
pub(crate) mod oslo_json;

/// How message bodies are encoded.
///
/// Servers read both codecs (detected by `content_type`) and reply in the request's codec;
/// a transport's codec only decides what it sends.
///
/// ```
/// use warren::{Codec, Transport};
///
/// // oslo's JSON, to talk to Python services (the `codec` URL option, or the builder's).
/// let transport = Transport::new("memory://doc-codec/?codec=json")?;
/// assert_eq!(transport.options().codec, Codec::Json);
///
/// assert_eq!("msgpack".parse::<Codec>()?, Codec::MsgPack);
/// assert_eq!(Codec::MsgPack.content_type(), "application/msgpack");
/// assert_eq!(Codec::from_content_type("application/json; charset=utf-8"), Some(Codec::Json));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// oslo.messaging's format: JSON inside a `{"oslo.version": "2.0", "oslo.message": ...}`
    /// envelope, `application/json`. Use it to talk to Python services.
    Json,
    /// The same fields as one MessagePack map, `application/msgpack`. Smaller and faster; the
    /// default for Rust-to-Rust traffic.
    MsgPack,
}

impl Codec {
    /// The AMQP `content_type` of bodies in this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::MsgPack => "application/msgpack",
        }
    }

    /// The AMQP `content_encoding` of bodies in this codec (kombu's values).
    pub fn content_encoding(self) -> &'static str {
        match self {
            Codec::Json => "utf-8",
            Codec::MsgPack => "binary",
        }
    }

    /// The codec of a received `content_type`, if warren reads it.
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/json" => Some(Codec::Json),
            "application/msgpack" | "application/x-msgpack" => Some(Codec::MsgPack),
            _ => None,
        }
    }

    /// Encodes a whole message body.
    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        match self {
            Codec::Json => {
                // The message JSON is only an intermediate (it is embedded, escaped, in the
                // envelope): write it into this thread's reused buffer.
                thread_local! {
                    static INNER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                let encode = |inner: &mut Vec<u8>| {
                    inner.clear();
                    oslo_json::write_python_json(inner, value).map_err(Error::encode)?;
                    oslo_json::wrap_envelope(inner).map_err(Error::encode)
                };
                INNER.with(|buffer| match buffer.try_borrow_mut() {
                    Ok(mut inner) => {
                        let body = encode(&mut inner);
                        if inner.capacity() > REUSED_BUFFER_MAX {
                            *inner = Vec::new();
                        }
                        body
                    }
                    // Re-entered from a Serialize impl: use a fresh buffer.
                    Err(_) => encode(&mut Vec::new()),
                })
            }
            Codec::MsgPack => msgpack::to_vec(value).map_err(Error::encode),
        }
    }
}

/// A thread keeps its encoding buffer up to this size between messages.
const REUSED_BUFFER_MAX: usize = 1 << 20;

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        })
    }
}

impl FromStr for Codec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Codec> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Codec::Json),
            "msgpack" => Ok(Codec::MsgPack),
            _ => Err(Error::invalid_option(
                "codec",
                format!("{s:?} is not json or msgpack"),
            )),
        }
    }
}

/// An opened message: the codec and the bytes of the message map (for JSON, the text inside
/// the envelope).
#[derive(Debug, Clone)]
pub(crate) struct Document {
    pub codec: Codec,
    pub bytes: Vec<u8>,
}

/// Why a document did not decode, with the path of the offending field (`args.count`).
#[derive(Debug, Clone)]
pub(crate) struct DecodeError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl Document {
    /// Checks the content type and removes the oslo envelope. The error says why the message
    /// cannot be read at all (such messages are rejected without requeue).
    pub fn open(
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> std::result::Result<Document, String> {
        let content_type = content_type.ok_or("no content_type")?;
        let codec = Codec::from_content_type(content_type)
            .ok_or_else(|| format!("unsupported content_type {content_type:?}"))?;
        let bytes = match codec {
            Codec::Json => oslo_json::unwrap_envelope(body)?,
            Codec::MsgPack => body,
        };
        Ok(Document { codec, bytes })
    }

    /// A body carrying this message again: oslo's envelope around it for JSON, the same bytes
    /// for MessagePack.
    pub fn reencode(&self) -> Result<Vec<u8>> {
        match self.codec {
            Codec::Json => oslo_json::wrap_envelope(&self.bytes).map_err(Error::encode),
            Codec::MsgPack => Ok(self.bytes.clone()),
        }
    }

    /// Decodes `T` from the message map.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> std::result::Result<T, DecodeError> {
        fn split<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> DecodeError {
            let mut message = e.inner().to_string();
            // serde_json appends the position in the (inner) JSON text: noise for the caller.
            if let Some(at) = message.rfind(" at line ") {
                message.truncate(at);
            }
            DecodeError {
                path: e.path().to_string(),
                message,
            }
        }
        match self.codec {
            Codec::Json => {
                let mut de = serde_json::Deserializer::from_slice(&self.bytes);
                let value = serde_path_to_error::deserialize(&mut de).map_err(split)?;
                de.end().map_err(|e| DecodeError {
                    path: String::new(),
                    message: e.to_string(),
                })?;
                Ok(value)
            }
            Codec::MsgPack => msgpack::from_slice(&self.bytes).map_err(split),
        }
    }
}

/// A map key, borrowed from the input when possible.
pub(crate) struct KeyStr<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for KeyStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(KeyStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(KeyStr(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Self::Value, E> {
                Ok(KeyStr(Cow::Owned(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<Self::Value, E> {
                std::str::from_utf8(v)
                    .map(|s| KeyStr(Cow::Owned(s.to_string())))
                    .map_err(|_| E::custom("map key is not UTF-8"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_and_decode_errors_display_as_users_write_them() {
        assert_eq!(Codec::Json.to_string(), "json");
        assert_eq!(Codec::MsgPack.to_string(), "msgpack");
        for codec in [Codec::Json, Codec::MsgPack] {
            assert_eq!(codec.to_string().parse::<Codec>().unwrap(), codec);
        }
        let error = |path: &str| {
            DecodeError {
                path: path.into(),
                message: "invalid type".into(),
            }
            .to_string()
        };
        assert_eq!(error(""), "invalid type");
        assert_eq!(error("."), "invalid type");
        assert_eq!(error("args.count"), "args.count: invalid type");
    }
}
