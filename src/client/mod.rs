//! The RPC client: `call` (blocking request/reply) and `cast` (fire and forget, confirmed
//! by the broker), oslo's `RPCClient` with `prepare()`.

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::RequestContext;
use crate::driver::{Outgoing, Route, SendOptions, DIRECT_REPLY_TO};
use crate::error::{Error, Result};
use crate::observe::{ClientRequest, Event, Hook, Outcome};
use crate::target::Target;
use crate::transport::Transport;
use crate::version::Version;
use crate::wire::envelope::{CallFields, Request, ResultOf};
use crate::wire::failure::Failure;

mod deadline;
pub(crate) mod reply_waiter;

use deadline::{CallDeadlines, Expired};

use reply_waiter::CallReplies;

/// `_timeout` is whole seconds on the wire (oslo sends what the caller gave, usually an int).
fn whole_seconds(monitor: Duration) -> u64 {
    monitor
        .as_secs()
        .saturating_add(u64::from(monitor.subsec_nanos() > 0))
}

/// Sends calls and casts to a [`Target`] (oslo's `RPCClient`).
///
/// Cheap to clone, `Send + Sync`, usable from many threads at once. `prepare()` returns a copy
/// whose setters override the target and the call options, as oslo's `prepare()` does:
///
/// ```no_run
/// use serde_json::json;
/// use warren::{RequestContext, RpcClient, Target, Transport};
///
/// let transport = Transport::new("rabbit://guest:guest@127.0.0.1:5672/")?;
/// let client = RpcClient::new(&transport, Target::new("compute"));
/// let ctx = RequestContext::new().with("user_id", "alice");
///
/// let state: String = client
///     .prepare()
///     .server("host-1")
///     .version("4.0")
///     .timeout(std::time::Duration::from_secs(10))
///     .call(&ctx, "start_instance", &json!({"instance_id": "i-1"}))?;
///
/// client.prepare().fanout(true).cast(&ctx, "refresh_cache", &json!({}))?;
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RpcClient {
    transport: Transport,
    target: Target,
    timeout: Option<Duration>,
    version_cap: Option<String>,
    retry: Option<u32>,
    at_least_once: bool,
    confirm: bool,
    call_monitor_timeout: Option<Duration>,
}

impl RpcClient {
    /// A client sending to `target` through `transport`.
    pub fn new(transport: &Transport, target: Target) -> RpcClient {
        RpcClient {
            transport: transport.clone(),
            target,
            timeout: None,
            version_cap: None,
            retry: None,
            at_least_once: false,
            confirm: true,
            call_monitor_timeout: None,
        }
    }

    /// A copy to override options on (oslo's `prepare()`); the original is unchanged.
    pub fn prepare(&self) -> RpcClient {
        self.clone()
    }

    /// Overrides the exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> RpcClient {
        self.target.exchange = Some(exchange.into());
        self
    }

    /// Overrides the topic.
    pub fn topic(mut self, topic: impl Into<String>) -> RpcClient {
        self.target.topic = Some(topic.into());
        self
    }

    /// Sends to one server (`<topic>.<server>`) only.
    pub fn server(mut self, server: impl Into<String>) -> RpcClient {
        self.target.server = Some(server.into());
        self
    }

    /// Casts to every server of the topic.
    pub fn fanout(mut self, fanout: bool) -> RpcClient {
        self.target.fanout = fanout;
        self
    }

    /// Overrides the namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> RpcClient {
        self.target.namespace = Some(namespace.into());
        self
    }

    /// Asks for at least this version (`"X.Y"`); checked when sending.
    pub fn version(mut self, version: impl Into<String>) -> RpcClient {
        self.target.version = Some(version.into());
        self
    }

    /// How long a call waits for its reply (default: the transport's `rpc_response_timeout`).
    /// Also bounds how long a cast waits for the broker. `Duration::MAX` waits as long as it
    /// takes (a deadline lies at most a century ahead).
    pub fn timeout(mut self, timeout: Duration) -> RpcClient {
        self.timeout = Some(timeout);
        self
    }

    /// Refuses to send messages whose version this cap cannot serve (oslo's `version_cap`).
    pub fn version_cap(mut self, cap: impl Into<String>) -> RpcClient {
        self.version_cap = Some(cap.into());
        self
    }

    /// How hard to try when the broker cannot be reached (oslo's `retry`): `retry` more passes
    /// over the URL's hosts after the first, with kombu's backoff between passes, then
    /// [`Error::DeliveryFailure`]; `0` fails after one pass. By default a call or cast keeps
    /// trying until its timeout.
    pub fn retry(mut self, retry: u32) -> RpcClient {
        self.retry = Some(retry);
        self
    }

    /// oslo's `TransportOptions(at_least_once=True)`: publish calls and casts as `mandatory`,
    /// so a message no queue can take fails at once with [`Error::Undeliverable`] instead of
    /// being dropped by the broker (a call would then only time out).
    pub fn at_least_once(mut self, at_least_once: bool) -> RpcClient {
        self.at_least_once = at_least_once;
        self
    }

    /// Whether a send waits for the broker's publisher confirm (default `true`, as oslo).
    ///
    /// With `false`, a cast returns as soon as its message is handed to the connection: several
    /// times the throughput, but a message the broker fails to take (it crashes, or nacks it)
    /// is lost without an error. A call's request is then not confirmed either; its reply
    /// still proves delivery, and a lost request shows as [`Error::Timeout`]. Ignored with
    /// [`at_least_once`](Self::at_least_once), which needs the confirm to detect returns.
    ///
    /// ```no_run
    /// # use warren::{RequestContext, RpcClient, Target, Transport};
    /// # let transport = Transport::new("rabbit://guest:guest@127.0.0.1:5672/")?;
    /// let metrics = RpcClient::new(&transport, Target::new("metrics")).confirm(false);
    /// metrics.cast(&RequestContext::new(), "record", &serde_json::json!({"cpu": 0.5}))?;
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn confirm(mut self, confirm: bool) -> RpcClient {
        self.confirm = confirm;
        self
    }

    /// oslo's call monitoring: the server sends a keep-alive every `monitor / 2` while the
    /// method runs (sent as `_timeout`, in whole seconds, at least 2 to take effect), and a call
    /// fails with [`Error::Timeout`] as soon as `monitor` passes without any message from the
    /// server, even if its overall timeout is longer. A long call keeps going as long as its
    /// server is alive; a lost one is noticed early.
    pub fn call_monitor_timeout(mut self, monitor: Duration) -> RpcClient {
        self.call_monitor_timeout = Some(monitor);
        self
    }

    /// The target messages go to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// oslo's `can_send_version`: `true` when there is no cap or the cap can serve `version`.
    ///
    /// ```
    /// # use warren::{RpcClient, Target, Transport};
    /// # let transport = Transport::new("memory://doc-can-send/")?;
    /// let client = RpcClient::new(&transport, Target::new("t")).version_cap("1.2");
    /// assert!(client.can_send_version("1.1"));
    /// assert!(!client.can_send_version("1.3"));
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn can_send_version(&self, version: &str) -> bool {
        match &self.version_cap {
            None => true,
            Some(cap) => match (Version::parse(cap), Version::parse(version)) {
                (Ok(cap), Ok(version)) => cap.can_serve(&version),
                _ => false,
            },
        }
    }

    /// Calls `method` with `args` (a struct or map of named arguments, or `&()` for none) and
    /// waits for its result, at most the timeout.
    ///
    /// Errors: [`Error::Timeout`] when no reply came in time, [`Error::Remote`] when the
    /// method failed remotely, [`Error::VersionCap`] / [`Error::InvalidTarget`] /
    /// [`Error::InvalidVersion`] before sending, [`Error::Connection`] when the broker is
    /// unreachable, [`Error::Decode`] when the result does not fit `R`.
    ///
    /// ```
    /// use serde::Deserialize;
    /// use serde_json::json;
    /// use warren::{Endpoint, Error, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
    ///
    /// #[derive(Deserialize)]
    /// struct Divide { a: i64, b: i64 }
    ///
    /// let transport = Transport::new("memory://doc-client-call/")?;
    /// let endpoint = Endpoint::new().method("divide", |_: &RequestContext, x: Divide| match x.b {
    ///     0 => Err(Failure::new("ZeroDivisionError", "builtins", "division by zero")),
    ///     b => Ok(x.a / b),
    /// });
    /// let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// server.start()?;
    ///
    /// let client = RpcClient::new(&transport, Target::new("calc"));
    /// let ctx = RequestContext::new();
    /// let quotient: i64 = client.call(&ctx, "divide", &json!({"a": 7, "b": 2}))?;
    /// assert_eq!(quotient, 3);
    /// match client.call::<_, i64>(&ctx, "divide", &json!({"a": 7, "b": 0})) {
    ///     Err(Error::Remote { class, message, .. }) => {
    ///         assert_eq!((class.as_str(), message.as_str()), ("ZeroDivisionError", "division by zero"))
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # server.stop();
    /// # server.wait();
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn call<A, R>(&self, ctx: &RequestContext, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.start_call(ctx, method, args)?.wait()
    }

    /// Sends a call and returns without waiting for its result: [`PendingCall::wait`] gets it.
    /// One thread can so have many calls outstanding (no thread per call), each still bound by
    /// its own timeout, which runs from here.
    ///
    /// ```no_run
    /// # use warren::{RequestContext, RpcClient, Target, Transport};
    /// # let transport = Transport::new("rabbit://guest:guest@127.0.0.1:5672/")?;
    /// let compute = RpcClient::new(&transport, Target::new("compute"));
    /// let ctx = RequestContext::new();
    /// let pending = ["host-1", "host-2", "host-3"]
    ///     .iter()
    ///     .map(|host| compute.prepare().server(*host).start_call::<_, String>(&ctx, "ping", &()))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// for call in pending {
    ///     println!("{}", call.wait()?);
    /// }
    /// # Ok::<(), warren::Error>(())
    /// ```
    ///
    /// Errors before sending are those of [`call`](Self::call).
    pub fn start_call<A, R>(
        &self,
        ctx: &RequestContext,
        method: &str,
        args: &A,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let hook = self.transport.hook();
        let Some(started) = hook.start() else {
            return self.send_call(ctx, method, args);
        };
        match self.send_call(ctx, method, args) {
            Ok(mut pending) => {
                pending.observed = Some(Box::new(Observed {
                    hook: hook.clone(),
                    started,
                    topic: self.target.topic.clone().unwrap_or_default(),
                    server: self.target.server.clone(),
                    namespace: self.target.namespace.clone(),
                }));
                Ok(pending)
            }
            Err(error) => {
                hook.emit(|| Event::CallFinished {
                    call: self.observed_request(method),
                    outcome: Outcome::of_error(&error),
                    duration: started.elapsed(),
                });
                Err(error)
            }
        }
    }

    /// What an observer is told about a call or cast of `method`.
    fn observed_request<'a>(&'a self, method: &'a str) -> ClientRequest<'a> {
        ClientRequest {
            topic: self.target.topic.as_deref().unwrap_or_default(),
            server: self.target.server.as_deref(),
            namespace: self.target.namespace.as_deref(),
            method,
            fanout: self.target.fanout,
        }
    }

    fn send_call<A, R>(
        &self,
        ctx: &RequestContext,
        method: &str,
        args: &A,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        if self.target.fanout {
            return Err(Error::invalid_target("a call cannot be used with fanout"));
        }
        let routing_key = self.target.routing_key()?;
        self.check_version()?;
        let timeout = self.effective_timeout();
        let deadline = deadline::deadline_of(timeout, Instant::now());
        let transport = &self.transport;
        let msg_id = crate::id::new_id();
        let unique_id = crate::id::new_id();
        let timed_out = || Error::Timeout {
            msg_id: msg_id.clone(),
            method: method.to_string(),
            timeout,
        };
        let codec = transport.options().codec;
        let encode = |reply_q: &str| {
            codec.encode(&Request {
                method,
                args,
                namespace: self.target.namespace.as_deref(),
                version: self.target.version.as_deref(),
                call: Some(CallFields {
                    msg_id: &msg_id,
                    reply_q,
                    monitor_timeout: self.call_monitor_timeout.map(whole_seconds),
                }),
                unique_id: &unique_id,
                context: ctx,
            })
        };
        let exchange = self.resolved_exchange();
        // Declared before `outgoing`, which borrows them.
        let (direct_body, body);
        let outgoing = |body| Outgoing {
            route: Route::Topic {
                exchange: &exchange,
                routing_key: &routing_key,
            },
            body,
            codec,
            // The request expires in its queue when the caller stops waiting for it, so a
            // server that comes up late never runs a call nobody waits for.
            expiration: Some(deadline::expiration(deadline, Instant::now())),
            mandatory: self.at_least_once,
            redelivery: None,
            declare_queue: None,
        };
        let pending = |replies| PendingCall {
            replies,
            msg_id: msg_id.clone(),
            method: method.to_string(),
            timeout,
            deadline,
            monitor: self.call_monitor_timeout,
            observed: None,
            result: PhantomData,
        };
        if transport.options().direct_reply_to {
            direct_body = encode(DIRECT_REPLY_TO)?;
            let sent =
                transport.send_direct_call(&outgoing(&direct_body), &self.send_options(deadline));
            match sent {
                Err(Error::Timeout { .. }) => return Err(timed_out()),
                Ok(Some(direct)) => return Ok(pending(transport.reply_waiter().direct(direct))),
                // Not sent: every channel is taken, or the driver has no direct reply-to.
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let reply_q = match transport.driver().reply_queue(&self.send_options(deadline)) {
            Err(Error::Timeout { .. }) => return Err(timed_out()),
            other => other?,
        };
        let waiting = transport.reply_waiter().register(&msg_id);
        body = encode(&reply_q)?;
        match transport.send(&outgoing(&body), &self.send_options(deadline)) {
            Err(Error::Timeout { .. }) => return Err(timed_out()),
            other => other?,
        }
        Ok(pending(CallReplies::Queue(waiting)))
    }

    /// Sends `method` with `args` without waiting for it to run; returns once the broker has
    /// the message. With `fanout(true)`, every server of the topic gets it.
    ///
    /// Errors: those of [`call`](Self::call) before sending, and [`Error::Timeout`] when the
    /// broker did not confirm the message in time.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use std::time::Duration;
    /// use serde::Deserialize;
    /// use serde_json::json;
    /// use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
    ///
    /// #[derive(Deserialize)]
    /// struct Log { line: String }
    ///
    /// let transport = Transport::new("memory://doc-client-cast/")?;
    /// let (tx, logged) = mpsc::channel();
    /// let endpoint = Endpoint::new().method("log", move |_: &RequestContext, args: Log| {
    ///     let _ = tx.send(args.line);
    ///     Ok::<_, Failure>(())
    /// });
    /// let server = RpcServer::builder(&transport, Target::new("logger").with_server("l-1"))
    ///     .endpoint(endpoint)
    ///     .build()?;
    /// server.start()?;
    ///
    /// let client = RpcClient::new(&transport, Target::new("logger"));
    /// client.cast(&RequestContext::new(), "log", &json!({"line": "disk 91% full"}))?; // returns at once
    /// assert_eq!(logged.recv_timeout(Duration::from_secs(5)).as_deref(), Ok("disk 91% full"));
    /// # server.stop();
    /// # server.wait();
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn cast<A>(&self, ctx: &RequestContext, method: &str, args: &A) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        let hook = self.transport.hook();
        let Some(started) = hook.start() else {
            return self.send_cast(ctx, method, args);
        };
        let result = self.send_cast(ctx, method, args);
        hook.emit(|| Event::CastSent {
            cast: self.observed_request(method),
            outcome: Outcome::of_client(&result),
            duration: started.elapsed(),
        });
        result
    }

    fn send_cast<A>(&self, ctx: &RequestContext, method: &str, args: &A) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        let topic = self.target.require_topic()?;
        let routing_key = self.target.routing_key()?;
        self.check_version()?;
        let timeout = self.effective_timeout();
        let deadline = deadline::deadline_of(timeout, Instant::now());
        let unique_id = crate::id::new_id();
        let codec = self.transport.options().codec;
        let body = codec.encode(&Request {
            method,
            args,
            namespace: self.target.namespace.as_deref(),
            version: self.target.version.as_deref(),
            call: None,
            unique_id: &unique_id,
            context: ctx,
        })?;
        let exchange = self.resolved_exchange();
        let route = if self.target.fanout {
            Route::Fanout { topic }
        } else {
            Route::Topic {
                exchange: &exchange,
                routing_key: &routing_key,
            }
        };
        let outgoing = Outgoing {
            route,
            body: &body,
            codec,
            expiration: None,
            mandatory: self.at_least_once,
            redelivery: None,
            declare_queue: None,
        };
        match self.transport.send(&outgoing, &self.send_options(deadline)) {
            Err(Error::Timeout { .. }) => Err(Error::Timeout {
                msg_id: unique_id,
                method: method.to_string(),
                timeout,
            }),
            other => other,
        }
    }

    fn effective_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(self.transport.options().rpc_response_timeout)
    }

    fn resolved_exchange(&self) -> String {
        self.target
            .exchange
            .clone()
            .unwrap_or_else(|| self.transport.options().control_exchange.clone())
    }

    fn send_options(&self, deadline: Instant) -> SendOptions {
        SendOptions {
            deadline: Some(deadline),
            retry: self.retry,
            unconfirmed: !self.confirm,
        }
    }

    /// The target's version must parse, and the cap must allow it.
    fn check_version(&self) -> Result<()> {
        let requested = self
            .target
            .version
            .as_deref()
            .map(Version::parse)
            .transpose()?;
        let Some(cap) = &self.version_cap else {
            return Ok(());
        };
        let cap_version = Version::parse(cap)?;
        let allowed = requested.as_ref().is_some_and(|v| cap_version.can_serve(v));
        if allowed {
            Ok(())
        } else {
            Err(Error::VersionCap {
                version: self
                    .target
                    .version
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
                cap: cap.clone(),
            })
        }
    }
}

/// A call sent by [`RpcClient::start_call`] whose result has not been taken yet. Dropping it
/// abandons the call (a late reply is then dropped).
///
/// Several calls in flight from one thread, their results taken in any order:
///
/// ```
/// use serde::Deserialize;
/// use serde_json::json;
/// use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// #[derive(Deserialize)]
/// struct Square { x: i64 }
///
/// let transport = Transport::new("memory://doc-pending-call/")?;
/// let square = |_: &RequestContext, args: Square| Ok::<_, Failure>(args.x * args.x);
/// let server = RpcServer::builder(&transport, Target::new("calc").with_server("calc-1"))
///     .endpoint(Endpoint::new().method("square", square))
///     .build()?;
/// server.start()?;
///
/// let client = RpcClient::new(&transport, Target::new("calc"));
/// let ctx = RequestContext::new();
/// let pending = (1..=3)
///     .map(|x| client.start_call::<_, i64>(&ctx, "square", &json!({"x": x})))
///     .collect::<Result<Vec<_>, _>>()?;
/// assert_eq!(pending[0].msg_id().len(), 32); // a uuid4 in hex, as oslo's
/// let squares = pending.into_iter().rev().map(|call| call.wait()).collect::<Result<Vec<_>, _>>()?;
/// assert_eq!(squares, [9, 4, 1]);
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[must_use = "a call's result (or its failure) is only seen through wait()"]
pub struct PendingCall<R> {
    /// Where its replies come from: the transport's reply queue, or its own channel.
    replies: CallReplies,
    msg_id: String,
    method: String,
    timeout: Duration,
    deadline: Instant,
    monitor: Option<Duration>,
    /// Set when the transport has an observer: what to tell it when the call ends.
    observed: Option<Box<Observed>>,
    result: PhantomData<fn() -> R>,
}

/// A pending call's start and target, for the transport's observer.
struct Observed {
    hook: Hook,
    started: Instant,
    topic: String,
    server: Option<String>,
    namespace: Option<String>,
}

impl<R> fmt::Debug for PendingCall<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingCall")
            .field("msg_id", &self.msg_id)
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<R: DeserializeOwned> PendingCall<R> {
    /// The call's `_msg_id`.
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// Waits for the result, until the call's deadline (its timeout counted from
    /// [`RpcClient::start_call`]). Errors as [`RpcClient::call`].
    pub fn wait(mut self) -> Result<R> {
        let Some(observed) = self.observed.take() else {
            return self.receive();
        };
        let result = self.receive();
        observed.hook.emit(|| Event::CallFinished {
            call: ClientRequest {
                topic: &observed.topic,
                server: observed.server.as_deref(),
                namespace: observed.namespace.as_deref(),
                method: &self.method,
                fanout: false,
            },
            outcome: Outcome::of_client(&result),
            duration: observed.started.elapsed(),
        });
        result
    }

    fn receive(&self) -> Result<R> {
        let timed_out = || Error::Timeout {
            msg_id: self.msg_id.clone(),
            method: self.method.clone(),
            timeout: self.timeout,
        };
        // A reply with a result but no `ending` (oslo's old two-message replies) is kept until
        // the final message arrives.
        let mut early_result = None;
        // With call monitoring, any message from the server (a keep-alive or the reply) must
        // come within the monitor timeout; the overall deadline holds regardless.
        let mut deadlines = CallDeadlines::new(self.deadline, self.monitor, Instant::now());
        loop {
            let Some(event) = self.replies.next(&self.msg_id, deadlines.wait_until())? else {
                return Err(match deadlines.expired(Instant::now()) {
                    Expired::Monitor(monitor) => Error::Timeout {
                        msg_id: self.msg_id.clone(),
                        method: self.method.clone(),
                        timeout: monitor,
                    },
                    Expired::Overall => timed_out(),
                });
            };
            deadlines.heard_from_server(Instant::now());
            if let Some(failure) = &event.header.failure {
                return Err(Failure::from_wire(failure)
                    .map_err(Error::decode)?
                    .into_error());
            }
            if event.header.ending {
                let doc = match (event.header.has_result, early_result) {
                    (false, Some(doc)) => doc,
                    _ => event.doc,
                };
                return doc
                    .decode::<ResultOf<R>>()
                    .map(|r| r.0)
                    .map_err(|e| Error::decode(format!("result of {}: {e}", self.method)));
            }
            if event.header.has_result {
                early_result = Some(event.doc);
            }
            // Otherwise a call-monitor keep-alive: keep waiting.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitor_timeout_travels_in_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
        assert_eq!(whole_seconds(Duration::from_millis(3001)), 4);
        assert_eq!(whole_seconds(Duration::from_millis(4999)), 5);
    }

    #[test]
    fn prepare_overrides_reach_the_target_and_the_send_options() {
        let transport = Transport::new("memory://client-unit/").unwrap();
        let client = RpcClient::new(&transport, Target::new("compute"));
        let prepared = client
            .prepare()
            .server("host-1")
            .namespace("ns")
            .version("1.2")
            .exchange("nova");
        let target = prepared.target();
        assert_eq!(target.topic.as_deref(), Some("compute"));
        assert_eq!(target.server.as_deref(), Some("host-1"));
        assert_eq!(target.namespace.as_deref(), Some("ns"));
        assert_eq!(target.version.as_deref(), Some("1.2"));
        assert_eq!(prepared.resolved_exchange(), "nova");
        assert_eq!(client.target().server, None, "the original is unchanged");
        assert_eq!(client.resolved_exchange(), "openstack");

        let deadline = Instant::now() + Duration::from_secs(7);
        let defaults = client.send_options(deadline);
        assert_eq!(defaults.deadline, Some(deadline));
        assert_eq!(defaults.retry, None);
        assert!(!defaults.unconfirmed, "confirmed by default, as oslo");
        let tuned = client
            .prepare()
            .retry(2)
            .confirm(false)
            .send_options(deadline);
        assert_eq!(tuned.retry, Some(2));
        assert!(tuned.unconfirmed);
    }

    #[test]
    fn a_pending_call_describes_itself_without_its_result() {
        let transport = Transport::new("memory://client-unit-debug/").unwrap();
        let client =
            RpcClient::new(&transport, Target::new("nobody")).timeout(Duration::from_millis(1500));
        let pending: PendingCall<u32> = client
            .start_call(&RequestContext::new(), "ping", &NoArgsMap {})
            .unwrap();
        let shown = format!("{pending:?}");
        assert!(shown.starts_with("PendingCall {"), "{shown}");
        assert!(
            shown.contains(&format!("msg_id: {:?}", pending.msg_id())),
            "{shown}"
        );
        assert!(shown.contains("method: \"ping\""), "{shown}");
        assert!(shown.contains("timeout: 1.5s"), "{shown}");
    }

    #[derive(Serialize)]
    struct NoArgsMap {}
}
