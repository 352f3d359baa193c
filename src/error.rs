//! The one error type of warren.
//!
//! Every fallible operation returns [`Result<T>`](crate::Result), whose error is [`Error`]. Each
//! variant documents when it happens; its `Display` is one line that never contains a password.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A boxed error used as the `source` of wrapped failures.
///
/// Downcast it to reach the underlying error:
///
/// ```
/// use std::io;
/// use warren::{BoxError, Error};
///
/// let source: BoxError = Box::new(io::Error::from(io::ErrorKind::ConnectionRefused));
/// let err = Error::Connection { host: "rabbit1:5672".into(), source };
///
/// if let Error::Connection { source, .. } = &err {
///     let io = source.downcast_ref::<io::Error>().expect("an I/O error");
///     assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
/// }
/// ```
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// `Result` with warren's [`Error`].
///
/// The error type defaults to [`Error`] and can be given, like `std::result::Result`'s.
///
/// ```
/// use warren::{Result, Transport};
///
/// fn connect(url: &str) -> Result<Transport> {
///     Transport::new(url)
/// }
///
/// assert!(connect("memory://doc-result/").is_ok());
/// assert!(connect("ftp://files.example.com/").is_err());
///
/// let port: Result<u16, std::num::ParseIntError> = "5672".parse();
/// assert_eq!(port, Ok(5672));
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in warren.
///
/// Match on the variant to decide what to do; new variants may be added, so keep a `_` arm.
///
/// ```
/// use warren::Error;
///
/// fn describe(err: &Error) -> &'static str {
///     match err {
///         Error::Timeout { .. } => "nobody answered in time",
///         Error::Remote { class, .. } if class == "NoSuchMethod" => "the server has no such method",
///         Error::Remote { .. } => "the remote method failed",
///         Error::Connection { .. } => "the broker is unreachable",
///         _ => "something else",
///     }
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A transport URL could not be parsed (unknown scheme, bad port, bad percent-encoding...).
    /// `url` is shown with its passwords replaced by `***`.
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A transport option (URL query key or builder value) is unknown or has a bad value.
    InvalidOption {
        /// The option's name, e.g. `rabbit_qos_prefetch_count`.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A [`Target`](crate::Target) cannot be used for the requested operation: no topic, a
    /// `call` to a fanout target, a server target without a server name...
    InvalidTarget {
        /// What is wrong with it.
        reason: String,
    },

    /// A version string is not `X.Y` or `X.Y.Z` with integer parts.
    InvalidVersion {
        /// The offending string.
        version: String,
    },

    /// The client's `version_cap` does not allow sending a message with this version
    /// (oslo's `RPCVersionCapError`). Nothing was sent.
    VersionCap {
        /// The version the message asked for.
        version: String,
        /// The client's cap.
        cap: String,
    },

    /// A call got no reply within its timeout (oslo's `MessagingTimeout`), or a publish was not
    /// confirmed by the broker before the deadline.
    Timeout {
        /// The `_msg_id` of the call (the `_unique_id` for a cast).
        msg_id: String,
        /// The remote method.
        method: String,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// The remote method failed: the server sent back a failure (a handler error, a panic,
    /// `NoSuchMethod`, `UnsupportedVersion`, bad arguments...). The fields are oslo's failure
    /// fields, so a Python server's exceptions arrive here too.
    Remote {
        /// Exception class name, e.g. `ValueError`, `NoSuchMethod`, `InstanceNotFound`.
        class: String,
        /// Module of the class, e.g. `builtins`, `oslo_messaging.rpc.dispatcher`.
        module: String,
        /// The error message.
        message: String,
        /// Remote traceback lines (may be empty).
        traceback: Vec<String>,
        /// The exception's positional and keyword arguments.
        details: Box<RemoteDetails>,
    },

    /// The broker could not be reached, refused the login, or the connection was lost.
    Connection {
        /// `host:port` (never credentials).
        host: String,
        /// The underlying cause.
        source: BoxError,
    },

    /// The broker refused the login: wrong user name or password, a login method it does not
    /// offer (`EXTERNAL` without its plugin), or no access to the virtual host. Permanent:
    /// reported after one pass over the hosts, not retried until the timeout.
    Authentication {
        /// `host:port` (never credentials).
        host: String,
        /// What the broker said, and what to check.
        reason: String,
    },

    /// The TLS connection could not be set up: the broker's certificate is not trusted by the
    /// CA (`ssl_ca_file`), does not name the host, or has expired; or one side speaks TLS and
    /// the other plain AMQP (wrong port or scheme). Permanent, like [`Error::Authentication`].
    Tls {
        /// `host:port`.
        host: String,
        /// What failed, as the TLS library says it.
        reason: String,
    },

    /// The broker refused an operation on a channel, e.g. `406 PRECONDITION_FAILED` when a queue
    /// already exists with other arguments, or `404 NOT_FOUND`.
    Refused {
        /// The AMQP reply code (404, 406, 403...).
        code: u16,
        /// The broker's reply text.
        text: String,
    },

    /// The broker did not accept a message (a publisher-confirm `nack`), or delivery could not
    /// be completed after the allowed retries.
    DeliveryFailure {
        /// `host:port` of the broker (never credentials).
        host: String,
        /// What happened.
        reason: String,
    },

    /// A message published with `mandatory` could not be routed to any queue (for instance a
    /// reply whose reply queue no longer exists).
    Undeliverable {
        /// The exchange it was published to (`""` is the default exchange).
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },

    /// Arguments, a result or a context could not be serialized.
    Encode {
        /// The serializer's error.
        source: BoxError,
    },

    /// A message, a reply or a result could not be decoded (malformed body, unexpected type,
    /// unknown content type, unsupported envelope version).
    Decode {
        /// What could not be decoded and why.
        reason: String,
    },

    /// An [`RpcServer`](crate::RpcServer) method was called in a state that does not allow it
    /// (e.g. `start()` after `wait()` returned is allowed, but `start()` twice is not).
    ServerState {
        /// What went wrong.
        reason: String,
    },

    /// The transport was closed; nothing can be sent or received through it any more.
    Closed,
}

/// Positional and keyword arguments of a remote exception (oslo's `args` and `kwargs`).
///
/// What the server's [`Failure`](crate::Failure) carried, in [`Error::Remote`]'s `details`:
///
/// ```
/// use serde::Deserialize;
/// use serde_json::json;
/// use warren::{Endpoint, Error, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// #[derive(Deserialize)]
/// struct Get { id: String }
///
/// let transport = Transport::new("memory://doc-remote-details/")?;
/// let endpoint = Endpoint::new().method("get", |_: &RequestContext, a: Get| -> Result<(), Failure> {
///     let message = format!("Instance {} could not be found.", a.id);
///     let kwargs = [("instance_id".to_string(), json!(a.id))].into_iter().collect();
///     Err(Failure::new("InstanceNotFound", "nova.exception", message).with_kwargs(kwargs))
/// });
/// let server = RpcServer::builder(&transport, Target::new("compute").with_server("host-1"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
///
/// let client = RpcClient::new(&transport, Target::new("compute"));
/// match client.call::<_, ()>(&RequestContext::new(), "get", &json!({"id": "vm-1"})) {
///     Err(Error::Remote { class, details, .. }) => {
///         assert_eq!(class, "InstanceNotFound");
///         assert_eq!(details.args, [json!("Instance vm-1 could not be found.")]);
///         assert_eq!(details.kwargs["instance_id"], "vm-1");
///     }
///     other => panic!("expected a remote failure, got {other:?}"),
/// }
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteDetails {
    /// Positional arguments (`exc.args` in Python).
    pub args: Vec<serde_json::Value>,
    /// Keyword arguments (`exc.kwargs` for nova-style exceptions).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Error {
    /// `true` if this is a remote failure of the given exception class.
    ///
    /// ```
    /// # use warren::Error;
    /// # fn check(err: Error) {
    /// if err.is_remote("NoSuchMethod") { /* ... */ }
    /// # }
    /// ```
    pub fn is_remote(&self, class_name: &str) -> bool {
        matches!(self, Error::Remote { class, .. } if class == class_name)
    }

    /// `true` for failures that retrying cannot change (a refused login or virtual host, a
    /// TLS verification failure): connection attempts stop after one pass over the hosts.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Authentication { .. } | Error::Tls { .. })
    }

    pub(crate) fn decode(reason: impl fmt::Display) -> Error {
        Error::Decode {
            reason: reason.to_string(),
        }
    }

    pub(crate) fn encode(source: impl Into<BoxError>) -> Error {
        Error::Encode {
            source: source.into(),
        }
    }

    pub(crate) fn invalid_target(reason: impl Into<String>) -> Error {
        Error::InvalidTarget {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_option(name: &str, reason: impl Into<String>) -> Error {
        Error::InvalidOption {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn server_state(reason: impl Into<String>) -> Error {
        Error::ServerState {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl { url, reason } => write!(f, "invalid transport URL {url}: {reason}"),
            Error::InvalidOption { name, reason } => {
                write!(f, "invalid transport option `{name}`: {reason}")
            }
            Error::InvalidTarget { reason } => write!(f, "invalid target: {reason}"),
            Error::InvalidVersion { version } => {
                write!(f, "invalid version {version:?}: expected X.Y or X.Y.Z")
            }
            Error::VersionCap { version, cap } => write!(
                f,
                "requested message version {version} is incompatible with the version cap {cap}"
            ),
            Error::Timeout {
                msg_id,
                method,
                timeout,
            } => write!(
                f,
                "timed out after {:.3}s waiting for a reply to message ID {msg_id} (method {method})",
                timeout.as_secs_f64()
            ),
            Error::Remote { class, message, .. } => write!(f, "remote error: {class}: {message}"),
            Error::Connection { host, source } => {
                write!(f, "connection to AMQP server on {host} failed: {source}")
            }
            Error::Authentication { host, reason } => {
                write!(f, "login to AMQP server on {host} refused: {reason}")
            }
            Error::Tls { host, reason } => {
                write!(f, "TLS connection to AMQP server on {host} failed: {reason}")
            }
            Error::Refused { code, text } => write!(f, "the broker refused the operation ({code}): {text}"),
            Error::DeliveryFailure { host, reason } => {
                write!(f, "delivery to AMQP server on {host} failed: {reason}")
            }
            Error::Undeliverable {
                exchange,
                routing_key,
            } => write!(
                f,
                "message to exchange {exchange:?} with routing key {routing_key:?} could not be routed to any queue"
            ),
            Error::Encode { source } => write!(f, "could not encode message: {source}"),
            Error::Decode { reason } => write!(f, "could not decode message: {reason}"),
            Error::ServerState { reason } => write!(f, "server: {reason}"),
            Error::Closed => write!(f, "the transport is closed"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Connection { source, .. } | Error::Encode { source } => Some(source.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_stays_small() {
        // Keeps `Result<T>` cheap to move around; boxed details make this possible.
        assert!(
            std::mem::size_of::<Error>() <= 128,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn display_is_one_line() {
        let err = Error::Timeout {
            msg_id: "abc".into(),
            method: "echo".into(),
            timeout: Duration::from_millis(1500),
        };
        let text = err.to_string();
        assert_eq!(
            text,
            "timed out after 1.500s waiting for a reply to message ID abc (method echo)"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn is_remote_matches_class() {
        let err = Error::Remote {
            class: "NoSuchMethod".into(),
            module: "oslo_messaging.rpc.dispatcher".into(),
            message: "Endpoint does not support RPC method x".into(),
            traceback: vec![],
            details: Box::default(),
        };
        assert!(err.is_remote("NoSuchMethod"));
        assert!(!err.is_remote("ValueError"));
    }
}
