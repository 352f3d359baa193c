//! # warren
//!
//! Synchronous, blocking RPC over RabbitMQ with thread pools, modelled on OpenStack's
//! oslo.messaging and wire-compatible with it. No async runtime: plain threads, channels and
//! blocking calls.
//!
//! The layers are oslo's: a [`Transport`] (URL + options + driver) carries messages;
//! an [`RpcClient`] sends calls and casts to a [`Target`]; an [`RpcServer`] consumes a
//! target's queues with a poll thread and runs requests on a worker pool through a
//! [`Dispatcher`] of [`Endpoint`]s. A [`Notifier`] and a [`NotificationListener`] do the same
//! for oslo's notifications; a [`Launcher`] runs several servers as one service.
//!
//! ## Two ways to write a service
//!
//! Typed, with [`service!`]: the API is declared once as a trait and the macro generates the
//! server's endpoint and a typed client (see [`service!`] for a complete example and
//! [`mod@service`] for what it generates). Untyped: methods registered by name on an
//! [`Endpoint`], arguments and results as any `serde` type:
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
//!
//! ## Threading model
//!
//! Every thread is a plain OS thread; every call blocks its caller, never past its timeout.
//!
//! ```text
//!  caller threads (any number)                       one RpcServer
//!  ───────────────────────────                       ────────────────────────────────────────
//!  RpcClient::call ──publish──▶ send connection      listen connection (amiquip I/O thread)
//!        │          (pool of confirm channels;              │ deliveries
//!        │           heartbeat thread revives it)           ▼
//!        │                                           poll thread: screens, acks as it hands
//!        │ waits on its own slot and on the                 │ over to an idle worker
//!        │ reply consumer (routes by _msg_id)               ▼
//!        ◀──consume── reply_<uuid> queue ◀────────── N worker threads: dispatch to the endpoint,
//!  (reply thread: reads it while no caller waits,        reply (call-monitor thread: keep-alives,
//!   reconnects it)                                       reply-retry thread: missing reply queues)
//! ```
//!
//! With `single_connection`, a transport's listeners and reply consumer share its send
//! connection; with `direct_reply_to`, a call waits for its reply on the channel it was
//! published on (RabbitMQ's `amq.rabbitmq.reply-to`), and no reply queue is declared.
//!
//! When a connection dies, the one recovery path (`driver/rabbit/connection.rs`) opens a new
//! one (failing over across the URL's hosts with kombu's backoff), a new channel, and declares
//! the consumers again; calls in flight keep waiting within their own deadline.
//!
//! ## Layout
//!
//! The modules follow oslo's layering, transport → driver → listener → server → dispatcher →
//! endpoints: `wire/` (codecs: oslo's JSON byte for byte, msgpack), `driver/` (`memory.rs`,
//! and `rabbit/`: connection, link, heartbeat, listener, publisher, reply, topology), `server/`
//! (poll loop, worker pool, ack, dedup), `client/` (calls, casts, reply waiter), `notify/`,
//! `dispatcher.rs`, `service.rs` (the typed layer over the last two).
//!
//! ## Cargo features
//!
//! - `cli`: the `warren` command-line tool and its dependencies (clap, env_logger); a library
//!   user needs none of them.
//! - `metrics`: [`observe::MetricsObserver`](crate::observe), recording calls, latencies and
//!   reconnects through the `metrics` crate facade.
//! - `fuzzing`: entry points for the fuzz targets in `fuzz/` (not a public API).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod clock;
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
pub mod observe;
mod options;
mod server;
pub mod service;
mod target;
#[cfg(test)]
mod test_support;
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
pub use driver::memory::{MemoryTap, TappedMessage};
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
