//! # warren
//!
//! Synchronous, blocking RPC over RabbitMQ with thread pools, modelled on OpenStack's
//! oslo.messaging and wire-compatible with it. No async runtime: plain threads, channels and
//! blocking calls.
//!
//! The layers are oslo's: a [`Transport`] (URL + options + driver) carries messages;
//! an [`RpcClient`] sends calls and casts to a [`Target`]; an [`RpcServer`] consumes a
//! target's queues with a poll thread and runs requests on a worker pool through a
//! [`Dispatcher`] of [`Endpoint`]s.
//!
//! ```
//! use serde::Deserialize;
//! use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
//!
//! #[derive(Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! // `memory://` runs everything in-process; use `rabbit://user:pass@host:5672/` for RabbitMQ.
//! let transport = Transport::new("memory://crate-doc/")?;
//! let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
//!     .endpoint(Endpoint::new().method("add", |_: &RequestContext, x: Add| Ok::<_, Failure>(x.a + x.b)))
//!     .build()?;
//! server.start()?;
//!
//! let client = RpcClient::new(&transport, Target::new("calc"));
//! let sum: i64 = client.call(&RequestContext::new(), "add", &serde_json::json!({"a": 2, "b": 3}))?;
//! assert_eq!(sum, 5);
//!
//! server.stop();
//! server.wait();
//! # Ok::<(), warren::Error>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod context;
mod dispatcher;
mod driver;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod id;
mod launcher;
mod notify;
mod options;
mod server;
mod target;
mod transport;
mod url;
mod version;
mod wire;

/// Compiles the README's Rust example with the doc tests, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;

pub use client::{PendingCall, RpcClient};
pub use context::RequestContext;
pub use dispatcher::{AccessPolicy, Dispatcher, Endpoint, NoArgs};
pub use error::{BoxError, Error, RemoteDetails, Result};
pub use launcher::{Launcher, Service, Shutdown, ShutdownHandle};
pub use notify::{
    Notification, NotificationEndpoint, NotificationFilter, NotificationFormat,
    NotificationListener, NotificationListenerBuilder, NotificationMetadata, NotificationResult,
    Notifier, Priority,
};
pub use options::{
    FailoverStrategy, LoginMethod, TlsOptions, TlsVersion, TransportOptions, IGNORED_OPTION_NAMES,
    OPTION_NAMES,
};
pub use server::{AckMode, RpcServer, RpcServerBuilder};
pub use target::Target;
pub use transport::{Transport, TransportBuilder};
pub use url::{Host, Scheme, TransportUrl};
pub use version::Version;
pub use wire::failure::Failure;
pub use wire::Codec;

#[cfg(test)]
mod tests {
    #[test]
    fn handles_are_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<crate::Transport>();
        shareable::<crate::RpcClient>();
        shareable::<crate::RpcServer>();
        shareable::<crate::Endpoint>();
        shareable::<crate::Error>();
    }
}
