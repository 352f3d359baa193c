//! Connections to the URL's hosts: the one place where warren opens sockets, logs in, fails
//! over between hosts, backs off, and classifies amiquip's errors.
//!
//! Every owner of a connection (the publisher, the reply consumer, each server's listener)
//! obtains it through [`Connection::establish`], kombu's `ensure_connection`: passes over the
//! hosts (round-robin or shuffled), a pause after each failed pass (kombu's schedule,
//! 1 s, 3 s, 5 s... up to 30 s, plus real random jitter), `retry` bounding the passes
//! (`None`: until it works, `Some(0)`: one pass), a deadline bounding everything, and an
//! interruptible pause so a closing owner never waits out a backoff. A failure is logged once
//! per outage (warn), the recovery once (info).
//!
//! Sockets are configured by warren: `TCP_NODELAY` (without it amiquip request/reply runs at
//! ~23 calls/s because of Nagle + delayed ACK), a bounded TCP connect, then the AMQP handshake
//! through amiquip's `insecure_open_stream`. warren keeps a second handle on each socket, an
//! [`AbortHandle`]: shutting the socket down ends amiquip's I/O thread and with it every wait
//! on the connection. The waits for the broker's answers while closing or stopping (a
//! consumer's cancel, a queue's delete, a channel's or the connection's close) are bounded by a
//! [`Watchdog`] that does so when the answer is late (a broker that blocked the connection for
//! a resource alarm, or one that stopped answering), at twice the heartbeat (2 to 10 s). Not
//! covered: a consumer declaring its queues after a reconnect (a stop waits for it, bounded by
//! the heartbeat only).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use amiquip::{Auth, Channel, ConnectionBlockedNotification, ConnectionOptions, ConnectionTuning};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};

use crate::error::{BoxError, Error, Result};
use crate::observe::{ConnectionRole, ConnectionState, Event, Hook};
use crate::options::{FailoverStrategy, LoginMethod, TransportOptions};
use crate::url::{Host, TransportUrl};

/// Bounds of one host's TCP connect + AMQP handshake: twice the heartbeat, within these.
const CONNECT_TIMEOUT_MIN: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);

/// A uniformly distributed number in `[0, 1)`, from the standard library's random hash keys.
pub(crate) fn random_unit() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x5eed);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A random duration in `[0, max)`.
pub(crate) fn jitter(max: Duration) -> Duration {
    max.mul_f64(random_unit())
}

/// The hosts of a URL, which one to try next, and how to reach them (TLS or not).
pub(crate) struct HostCycle {
    hosts: Vec<Host>,
    strategy: FailoverStrategy,
    next: AtomicUsize,
    /// Set with TLS: one connector for every host (each host's name is checked as it is
    /// connected to).
    tls: Option<native_tls::TlsConnector>,
    /// The transport's observer, told when a connection opens, is lost or closes.
    hook: Hook,
    /// Per [`ConnectionRole`]: connections lost and not re-established yet, so that the next
    /// connection of that role is reported as a reconnection.
    lost: [AtomicUsize; 3],
}

impl std::fmt::Debug for HostCycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCycle")
            .field("hosts", &self.hosts)
            .field("strategy", &self.strategy)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl HostCycle {
    pub fn new(url: &TransportUrl, strategy: FailoverStrategy) -> HostCycle {
        HostCycle {
            hosts: url.effective_hosts(),
            strategy,
            next: AtomicUsize::new(0),
            tls: None,
            hook: Hook::default(),
            lost: Default::default(),
        }
    }

    /// Reports connection events to `hook`.
    pub fn with_hook(mut self, hook: Hook) -> HostCycle {
        self.hook = hook;
        self
    }

    /// A connection of `role` opened: reports it as a reconnection if one of that role was
    /// lost and not re-established yet.
    fn opened(&self, role: &'static str, address: &str) {
        if !self.hook.is_on() {
            return;
        }
        let role = ConnectionRole::from_name(role);
        let lost = &self.lost[role.index()];
        let reconnected = lost
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let state = if reconnected {
            ConnectionState::Reconnected
        } else {
            ConnectionState::Connected
        };
        self.hook.emit(|| Event::Connection {
            role,
            state,
            address,
        });
    }

    /// A connection of `role` was lost.
    fn lost(&self, role: &'static str, address: &str) {
        if !self.hook.is_on() {
            return;
        }
        let role = ConnectionRole::from_name(role);
        self.lost[role.index()].fetch_add(1, Ordering::AcqRel);
        self.hook.emit(|| Event::Connection {
            role,
            state: ConnectionState::Lost,
            address,
        });
    }

    /// Connects with TLS through `connector`.
    pub fn with_tls(mut self, connector: Option<native_tls::TlsConnector>) -> HostCycle {
        self.tls = connector;
        self
    }

    /// One pass over every host, in the order to try them now.
    fn pass(&self) -> Vec<(usize, &Host)> {
        let mut order: Vec<usize> = (0..self.hosts.len()).collect();
        match self.strategy {
            FailoverStrategy::RoundRobin => {
                let start = self.next.load(Ordering::Relaxed) % self.hosts.len();
                order.rotate_left(start);
            }
            FailoverStrategy::Shuffle => {
                for i in (1..order.len()).rev() {
                    let j = ((i + 1) as f64 * random_unit()) as usize;
                    order.swap(i, j.min(i));
                }
            }
        }
        order.into_iter().map(|i| (i, &self.hosts[i])).collect()
    }

    fn succeeded(&self, index: usize) {
        self.next.store(index, Ordering::Relaxed);
    }

    fn failed(&self, index: usize) {
        self.next.store(index + 1, Ordering::Relaxed);
    }

    fn len(&self) -> usize {
        self.hosts.len()
    }
}

/// kombu's reconnect schedule: after the n-th failed pass over the hosts, pause
/// `min(interval_max, retry_interval + (n - 1) × retry_backoff)`, plus a random
/// `0..reconnect_splay`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    interval: Duration,
    step: Duration,
    max: Duration,
    splay: Duration,
    failed_passes: u32,
}

impl Backoff {
    pub fn new(options: &TransportOptions) -> Backoff {
        Backoff {
            interval: options.retry_interval,
            step: options.retry_backoff,
            max: options.interval_max,
            splay: options.reconnect_splay,
            failed_passes: 0,
        }
    }

    /// The pause after one more failed pass.
    pub fn next_pause(&mut self) -> Duration {
        let base = self
            .interval
            .saturating_add(self.step.saturating_mul(self.failed_passes))
            .min(self.max);
        self.failed_passes = self.failed_passes.saturating_add(1);
        base + jitter(self.splay)
    }

    /// The pause before reconnecting after a connection was lost: only the jitter, so that
    /// every client of a restarted broker does not come back at the same instant.
    pub fn first_pause(&self) -> Duration {
        jitter(self.splay)
    }
}

/// How hard to try.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RetryPolicy {
    /// Passes over the hosts after the first (`None`: until it works).
    pub retry: Option<u32>,
    /// Give up at this instant.
    pub deadline: Option<Instant>,
}

/// An open AMQP connection and the host it reached.
pub(crate) struct Connection {
    inner: amiquip::Connection,
    address: String,
    /// Index of the host in the [`HostCycle`].
    host: usize,
    role: &'static str,
    liveness: Option<Receiver<ConnectionBlockedNotification>>,
    /// The transport's observer, told when this connection closes.
    hook: Hook,
    /// Shuts the socket down when the broker does not answer (a close, a teardown).
    abort: AbortHandle,
    /// The second handle on the socket that `abort` refers to (`None` if it could not be
    /// made). Owned here alone, so that handles kept past the connection's end do not keep its
    /// socket open.
    socket: Option<Arc<TcpStream>>,
}

/// A second handle on a connection's TCP socket: shutting it down, from any thread, ends
/// amiquip's I/O thread at once, and every wait on the connection (a channel's open or close,
/// a cancel, the connection's close) with a connection error. Cheap to clone; once the
/// [`Connection`] is gone it does nothing (and never keeps the socket open).
#[derive(Clone)]
pub(crate) struct AbortHandle {
    /// The connection's second handle on its socket (empty if it could not be made: then
    /// nothing bounds a wait but the heartbeat).
    socket: Weak<TcpStream>,
    /// `host:port`, for the log.
    address: String,
    role: &'static str,
    /// How long a polite close or teardown may wait for the broker: as long as connecting may
    /// take (twice the heartbeat, 2 to 10 s).
    patience: Duration,
}

impl AbortHandle {
    /// Shuts the socket down (see the type's documentation).
    pub fn abort(&self) {
        if let Some(socket) = self.socket.upgrade() {
            debug!(
                "shutting down the socket of the connection to {} ({})",
                self.address, self.role
            );
            // Fails only if the socket is already shut down or gone: nothing left to end.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Shuts the socket down at `deadline` unless the returned guard is dropped first: bounds
    /// `what` (for the log), a wait for the broker's answers.
    pub fn watchdog(&self, deadline: Instant, what: &'static str) -> Watchdog {
        if self.socket.strong_count() == 0 {
            // Nothing to shut down: the connection is gone, or its socket has no second handle.
            return Watchdog {
                disarm: None,
                thread: None,
            };
        }
        let (disarm, disarmed) = crossbeam_channel::bounded::<()>(0);
        let abort = self.clone();
        let thread = thread::Builder::new()
            .name("warren-watchdog".into())
            .spawn(move || {
                let left = deadline.saturating_duration_since(Instant::now());
                if disarmed.recv_timeout(left) == Err(RecvTimeoutError::Timeout) {
                    warn!(
                        "the broker on {} did not answer {what} ({}) in time; shutting the socket down",
                        abort.address, abort.role
                    );
                    abort.abort();
                }
            })
            // Without a watchdog the wait is only bounded by the heartbeat, as before.
            .map_err(|e| debug!("no watchdog for {what} on {}: {e}", self.address))
            .ok();
        Watchdog {
            disarm: Some(disarm),
            thread,
        }
    }
}

/// Shuts a socket down unless dropped in time ([`AbortHandle::watchdog`]); dropping it joins
/// its thread.
#[must_use = "dropping the watchdog disarms it at once"]
pub(crate) struct Watchdog {
    /// Dropped to disarm.
    disarm: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("a connection watchdog panicked");
            }
        }
    }
}

impl Connection {
    /// kombu's `ensure_connection`: connects for `role` ("send", "reply", "listen"), failing
    /// over between hosts and backing off as described in the [module documentation](self).
    /// `pause(d)` waits `d` between passes and returns `false` to give up (its owner closes).
    ///
    /// Fails with [`Error::DeliveryFailure`] (host, attempts, last cause) when `policy` is
    /// exhausted, with [`Error::Closed`] when `pause` gives up.
    pub fn establish(
        hosts: &HostCycle,
        url: &TransportUrl,
        options: &TransportOptions,
        role: &'static str,
        policy: RetryPolicy,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Result<Connection> {
        let mut backoff = Backoff::new(options);
        let mut attempts = 0_u32;
        let mut last: Option<(String, Error)> = None;
        for pass in 0_u32.. {
            // A pass where every host refused for good (login, vhost, TLS) ends the attempt of
            // a caller that waits (deadline or retry limit): retrying would only repeat it
            // until the deadline. A background reconnection (neither) keeps trying, with its
            // backoff: credentials or certificates may be fixed meanwhile.
            let mut permanent_in_pass = true;
            let mut tried_in_pass = false;
            for (index, host) in hosts.pass() {
                // Between hosts, without pausing: a closing transport or server ends the attempt
                // after the host being tried, not after the whole pass.
                if tried_in_pass && !pause(Duration::ZERO) {
                    return Err(Error::Closed);
                }
                let Some(timeout) = connect_timeout(options, policy.deadline) else {
                    break;
                };
                attempts += 1;
                tried_in_pass = true;
                match open_host(
                    host,
                    hosts.tls.as_ref(),
                    url.virtual_host(),
                    options,
                    role,
                    timeout,
                ) {
                    Ok((mut inner, socket)) => {
                        let socket = socket.map(Arc::new);
                        hosts.succeeded(index);
                        if attempts > 1 {
                            info!("reconnected to AMQP server on {} ({role}) after {attempts} attempts", host.address());
                        } else {
                            info!("connected to AMQP server on {} ({role})", host.address());
                        }
                        let liveness = inner.listen_for_connection_blocked().ok();
                        let address = host.address();
                        hosts.opened(role, &address);
                        return Ok(Connection {
                            inner,
                            address,
                            host: index,
                            role,
                            liveness,
                            hook: hosts.hook.clone(),
                            abort: AbortHandle {
                                socket: socket.as_ref().map_or_else(Weak::new, Arc::downgrade),
                                address: host.address(),
                                role,
                                patience: patience(options),
                            },
                            socket,
                        });
                    }
                    Err(e) => {
                        hosts.failed(index);
                        permanent_in_pass &= e.is_permanent();
                        if attempts == 1 {
                            warn!(
                                "AMQP server on {} is unreachable ({role}): {e}",
                                host.address()
                            );
                        } else {
                            debug!(
                                "AMQP server on {} still unreachable ({role}): {e}",
                                host.address()
                            );
                        }
                        last = Some((host.address(), e));
                    }
                }
            }
            let waited_for = policy.deadline.is_some() || policy.retry.is_some();
            if tried_in_pass && permanent_in_pass && waited_for {
                if let Some((_, cause)) = last {
                    warn!("giving up connecting ({role}): {cause}");
                    return Err(cause);
                }
            }
            let out_of_time = policy.deadline.is_some_and(|d| Instant::now() >= d);
            let cut_short = last.as_ref().is_some_and(|(_, e)| is_connect_timeout(e));
            if out_of_time && (last.is_none() || cut_short) {
                // The deadline passed before any host could be tried, or the last attempt timed
                // out with only what was left of it: a timeout, not a connection failure
                // (callers relabel it with their message and timeout).
                return Err(Error::Timeout {
                    msg_id: String::new(),
                    method: format!("connecting ({role})"),
                    timeout: Duration::ZERO,
                });
            }
            if policy.retry.is_some_and(|r| pass >= r) || out_of_time {
                let (host, cause) = last.unwrap_or_else(|| {
                    (
                        hosts
                            .hosts
                            .iter()
                            .map(Host::address)
                            .collect::<Vec<_>>()
                            .join(","),
                        Error::Closed,
                    )
                });
                return Err(Error::DeliveryFailure {
                    host,
                    reason: format!(
                        "unable to connect ({role}) after {attempts} attempts: {cause}"
                    ),
                });
            }
            let mut wait = backoff.next_pause();
            if let Some(deadline) = policy.deadline {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            if attempts as usize == hosts.len() {
                warn!(
                    "no AMQP server reachable ({role}); trying again in {:.1}s, then with growing pauses",
                    wait.as_secs_f64()
                );
            }
            if !pause(wait) {
                return Err(Error::Closed);
            }
        }
        Err(Error::Closed)
    }

    /// Opens a channel on this connection.
    pub fn open_channel(&mut self) -> Result<Channel> {
        self.inner
            .open_channel(None)
            .map_err(|e| amqp_error(e, &self.address))
    }

    /// `host:port` of the broker this connection reached.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The connection's `connection.blocked` notifications; disconnected when the connection
    /// dies (its I/O thread ends), which is how an idle dead connection is noticed.
    pub fn take_liveness(&mut self) -> Option<Receiver<ConnectionBlockedNotification>> {
        self.liveness.take()
    }

    /// Closes a connection that failed, and makes the next connection start with the next
    /// host (kombu's `maybe_switch_next`): a host that just died is the last one to retry.
    pub fn abandon(self, hosts: &HostCycle) {
        hosts.failed(self.host);
        hosts.lost(self.role, &self.address);
        let deadline = Instant::now() + self.abort.patience;
        self.shut(deadline);
    }

    /// Closes the connection and joins amiquip's I/O thread: politely, then, if the broker has
    /// not answered within twice the heartbeat (2 to 10 s), by shutting the socket down.
    pub fn close(self) {
        let deadline = Instant::now() + self.abort.patience;
        self.close_by(deadline);
    }

    /// [`close`](Self::close), shutting the socket down at `deadline` if the broker has not
    /// answered by then (one deadline for a whole teardown).
    pub fn close_by(self, deadline: Instant) {
        self.hook.emit(|| Event::Connection {
            role: ConnectionRole::from_name(self.role),
            state: ConnectionState::Closed,
            address: &self.address,
        });
        self.shut(deadline);
    }

    /// The handle that shuts this connection's socket down.
    pub fn abort_handle(&self) -> &AbortHandle {
        &self.abort
    }

    /// Shuts the socket down ([`AbortHandle::abort`]). For a connection the broker blocked (it
    /// reads nothing from it until the alarm clears): a close would otherwise wait for the
    /// alarm.
    pub fn abort(&self) {
        self.abort.abort();
    }

    /// Closes the connection (lost or closed: already reported): politely, then by shutting
    /// its socket down if the broker has not answered by `deadline`.
    fn shut(self, deadline: Instant) {
        let Connection {
            inner,
            address,
            role,
            abort,
            socket,
            ..
        } = self;
        let watchdog = abort.watchdog(deadline, "closing the connection");
        match inner.close() {
            Ok(()) => debug!("closed connection to {address} ({role})"),
            Err(e) => debug!("closing connection to {address} ({role}): {e}"),
        }
        drop(watchdog);
        // Last: the watchdog needed it.
        drop(socket);
    }
}

/// How long a close or a teardown may wait for the broker's answers before the socket is
/// shut down: as long as connecting to a host may take (twice the heartbeat, 2 to 10 s).
pub(crate) fn patience(options: &TransportOptions) -> Duration {
    connect_timeout(options, None).unwrap_or(CONNECT_TIMEOUT_MAX)
}

/// Time allowed to connect to one host: twice the heartbeat (2 to 10 s), within the deadline;
/// `None` once the deadline has passed.
fn connect_timeout(options: &TransportOptions, deadline: Option<Instant>) -> Option<Duration> {
    let by_heartbeat = if options.heartbeat.is_zero() {
        CONNECT_TIMEOUT_MAX
    } else {
        (options.heartbeat * 2).clamp(CONNECT_TIMEOUT_MIN, CONNECT_TIMEOUT_MAX)
    };
    match deadline {
        None => Some(by_heartbeat),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(by_heartbeat))
        }
    }
}

/// Connects to `host` and logs in within `timeout`; the connection and a second handle on its
/// socket (for [`Connection::abort`]).
fn open_host(
    host: &Host,
    tls: Option<&native_tls::TlsConnector>,
    virtual_host: &str,
    options: &TransportOptions,
    role: &'static str,
    timeout: Duration,
) -> Result<(amiquip::Connection, Option<TcpStream>)> {
    let fail = |source: BoxError| Error::Connection {
        host: host.address(),
        source,
    };
    let addrs: Vec<_> = (host.hostname.as_str(), host.port)
        .to_socket_addrs()
        .map_err(|e| fail(Box::new(e)))?
        .collect();
    let started = Instant::now();
    let mut stream = None;
    let mut last_error: Option<std::io::Error> = None;
    for addr in &addrs {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| {
        fail(match last_error {
            Some(e) => Box::new(e),
            None => "host name resolved to no address".into(),
        })
    })?;
    stream.set_nodelay(true).map_err(|e| fail(Box::new(e)))?;
    let socket = stream.try_clone().ok();
    let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| fail(Box::new(e)))?;
    let handshake = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let auth = match options.login_method {
        LoginMethod::Plain => Auth::Plain {
            username: host.login_username().to_string(),
            password: host.login_password().to_string(),
        },
        LoginMethod::External => Auth::External,
    };
    let connection_options = ConnectionOptions::default()
        .auth(auth)
        .virtual_host(virtual_host)
        .heartbeat(u16::try_from(options.heartbeat.as_secs()).unwrap_or(u16::MAX))
        .connection_timeout(Some(handshake))
        .information(Some(format!(
            "warren {} ({role}, pid {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        )));
    let opened = match tls {
        Some(connector) => amiquip::Connection::open_tls_stream(
            connector.clone(),
            &host.hostname,
            stream,
            connection_options,
            ConnectionTuning::default(),
        ),
        None => amiquip::Connection::insecure_open_stream(
            stream,
            connection_options,
            ConnectionTuning::default(),
        ),
    };
    opened
        .map(|connection| (connection, socket))
        .map_err(|e| connect_error(e, &host.address(), tls.is_some()))
}

/// `true` when connecting timed out (TCP or the AMQP handshake): near a deadline, the attempt
/// was only given what was left of it.
fn is_connect_timeout(error: &Error) -> bool {
    let Error::Connection { source, .. } = error else {
        return false;
    };
    match source.downcast_ref::<amiquip::Error>() {
        Some(amiquip::Error::ConnectionTimeout) => true,
        Some(_) => false,
        None => source
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
    }
}

/// Maps a failure to open a connection: refusals that retrying cannot change (login, vhost,
/// TLS verification, a peer that does not speak what we speak) get their own permanent
/// variants; the rest are [`Error::Connection`].
fn connect_error(error: amiquip::Error, address: &str, tls: bool) -> Error {
    let host = address.to_string();
    match error {
        amiquip::Error::InvalidCredentials => Error::Authentication {
            host,
            reason:
                "the broker refused the login (ACCESS_REFUSED): check the user name and password"
                    .into(),
        },
        amiquip::Error::UnsupportedAuthMechanism {
            available,
            requested,
        } => Error::Authentication {
            host,
            reason: format!(
                "the broker does not offer the {requested} login (it offers {available}); \
                 EXTERNAL needs the rabbitmq_auth_mechanism_ssl plugin"
            ),
        },
        amiquip::Error::ServerClosedConnection { code, message } if code == 530 || code == 403 => {
            Error::Authentication {
                host,
                reason: format!("the broker refused access ({code}): {message}"),
            }
        }
        amiquip::Error::TlsHandshake { source } => Error::Tls {
            host,
            reason: format!("TLS handshake failed: {source}"),
        },
        // TLS 1.3 finishes the client's side of the handshake before the broker checks the
        // client certificate: a refusal arrives as an alert on the first read, or as a reset
        // of the first write. (A reset at this point is taken as that refusal: a broker that
        // restarts refuses connections rather than resetting them.)
        amiquip::Error::IoErrorReadingSocket { source }
        | amiquip::Error::IoErrorWritingSocket { source }
            if tls
                && (source.to_string().contains("alert")
                    || source.kind() == std::io::ErrorKind::ConnectionReset) =>
        {
            Error::Tls {
                host,
                reason: format!(
                    "the broker ended the TLS session ({source}); does it trust the client certificate?"
                ),
            }
        }
        amiquip::Error::MalformedFrame if !tls => Error::Tls {
            host,
            reason:
                "the server did not answer in AMQP; is this a TLS port? Use amqps:// or ssl=true"
                    .into(),
        },
        other => amqp_error(other, address),
    }
}

/// Maps an amiquip error to warren's: channel-level refusals keep their AMQP code, everything
/// else is a connection failure of `address`.
pub(crate) fn amqp_error(error: amiquip::Error, address: &str) -> Error {
    match error {
        amiquip::Error::ServerClosedChannel { code, message, .. } => Error::Refused {
            code,
            text: message,
        },
        other => Error::Connection {
            host: address.to_string(),
            source: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(interval: u64, step: u64, max: u64, splay_ms: u64) -> TransportOptions {
        TransportOptions {
            retry_interval: Duration::from_secs(interval),
            retry_backoff: Duration::from_secs(step),
            interval_max: Duration::from_secs(max),
            reconnect_splay: Duration::from_millis(splay_ms),
            ..TransportOptions::default()
        }
    }

    #[test]
    fn backoff_follows_kombu_schedule() {
        let mut backoff = Backoff::new(&options(1, 2, 30, 0));
        let pauses: Vec<u64> = (0..18).map(|_| backoff.next_pause().as_secs()).collect();
        assert_eq!(
            pauses,
            [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 30, 30, 30]
        );
    }

    #[test]
    fn jitter_is_real_and_bounded() {
        let mut backoff = Backoff::new(&options(1, 0, 30, 500));
        let pauses: Vec<Duration> = (0..50).map(|_| backoff.next_pause()).collect();
        assert!(pauses
            .iter()
            .all(|p| *p >= Duration::from_secs(1) && *p < Duration::from_millis(1500)));
        let distinct: std::collections::BTreeSet<Duration> = pauses.into_iter().collect();
        assert!(distinct.len() > 40, "pauses differ: {}", distinct.len());
        let firsts: Vec<Duration> = (0..20).map(|_| backoff.first_pause()).collect();
        assert!(firsts.iter().all(|p| *p < Duration::from_millis(500)));
    }

    fn cycle(strategy: FailoverStrategy) -> HostCycle {
        let url = TransportUrl::parse("rabbit://a:1,b:2,c:3/").unwrap();
        HostCycle::new(&url, strategy)
    }

    fn names(pass: Vec<(usize, &Host)>) -> String {
        pass.into_iter().map(|(_, h)| h.hostname.as_str()).collect()
    }

    #[test]
    fn round_robin_starts_at_the_first_host_and_moves_past_failures() {
        let hosts = cycle(FailoverStrategy::RoundRobin);
        assert_eq!(names(hosts.pass()), "abc");
        hosts.failed(0);
        assert_eq!(names(hosts.pass()), "bca");
        hosts.succeeded(1);
        assert_eq!(names(hosts.pass()), "bca");
        hosts.failed(2);
        assert_eq!(names(hosts.pass()), "abc");
    }

    #[test]
    fn shuffle_tries_every_host_once_per_pass() {
        let hosts = cycle(FailoverStrategy::Shuffle);
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut pass: Vec<char> = names(hosts.pass()).chars().collect();
            orders.insert(pass.iter().collect::<String>());
            pass.sort_unstable();
            assert_eq!(pass, ['a', 'b', 'c']);
        }
        assert!(orders.len() > 3, "{orders:?}");
    }

    #[test]
    fn unreachable_hosts_exhaust_into_a_delivery_failure() {
        let url = TransportUrl::parse("amqp://u:secret@127.0.0.1:1,127.0.0.1:2/").unwrap();
        let options = options(0, 0, 0, 0);
        let hosts = HostCycle::new(&url, FailoverStrategy::RoundRobin);
        let mut pauses = 0;
        let policy = RetryPolicy {
            retry: Some(2),
            deadline: None,
        };
        let error = Connection::establish(&hosts, &url, &options, "send", policy, &mut |_| {
            pauses += 1;
            true
        })
        .err()
        .expect("nothing listens there");
        assert_eq!(
            pauses, 5,
            "a pause after each failed pass but the last (2), and a look for a stop between \
             the two hosts of each of the 3 passes"
        );
        match &error {
            Error::DeliveryFailure { host, reason } => {
                assert!(host.starts_with("127.0.0.1:"), "{host}");
                assert!(reason.contains("after 6 attempts"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{error} {error:?}").contains("secret"));
        let interrupted = Connection::establish(
            &hosts,
            &url,
            &options,
            "send",
            RetryPolicy::default(),
            &mut |_| false,
        );
        assert!(matches!(interrupted, Err(Error::Closed)));
    }

    /// A stop seen between two hosts ends the attempt there: a closing transport does not wait
    /// for every host's connect timeout.
    #[test]
    fn a_stop_between_hosts_ends_the_pass() {
        let url = TransportUrl::parse("amqp://u:secret@127.0.0.1:1,127.0.0.1:2/").unwrap();
        let options = options(0, 0, 0, 0);
        let hosts = HostCycle::new(&url, FailoverStrategy::RoundRobin);
        let mut asked = Vec::new();
        let stopped = Connection::establish(
            &hosts,
            &url,
            &options,
            "send",
            RetryPolicy::default(),
            &mut |pause| {
                asked.push(pause);
                false
            },
        );
        assert!(matches!(stopped, Err(Error::Closed)), "{:?}", stopped.err());
        assert_eq!(asked, [Duration::ZERO], "asked once, after the first host");
    }
}
