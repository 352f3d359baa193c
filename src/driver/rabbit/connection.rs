//! One AMQP connection to one of the URL's hosts: the single place where warren opens
//! sockets, logs in, and classifies amiquip's errors.
//!
//! Every connection is opened on a socket warren configures itself: `TCP_NODELAY` (without
//! it amiquip request/reply runs at ~23 calls/s because of Nagle + delayed ACK), a bounded TCP
//! connect timeout, then the AMQP handshake through amiquip's `insecure_open_stream`.
//! Hosts are tried in turn, starting after the last host that worked or failed, so a dead
//! first host does not stop the transport from using the second.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amiquip::{Auth, Channel, ConnectionOptions, ConnectionTuning};
use log::{debug, info, warn};

use crate::error::{BoxError, Error, Result};
use crate::options::TransportOptions;
use crate::url::{Host, TransportUrl};

/// Upper bound of a TCP connect + AMQP handshake when the caller has no deadline.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The hosts of a URL and which one to try next (round-robin failover).
#[derive(Debug)]
pub(crate) struct HostCycle {
    hosts: Vec<Host>,
    next: AtomicUsize,
}

impl HostCycle {
    pub fn new(url: &TransportUrl) -> HostCycle {
        HostCycle {
            hosts: url.effective_hosts(),
            next: AtomicUsize::new(0),
        }
    }

    /// The hosts in the order to try them now.
    fn rotation(&self) -> impl Iterator<Item = (usize, &Host)> {
        let start = self.next.load(Ordering::Relaxed) % self.hosts.len();
        (0..self.hosts.len()).map(move |i| {
            let index = (start + i) % self.hosts.len();
            (index, &self.hosts[index])
        })
    }

    fn succeeded(&self, index: usize) {
        self.next.store(index, Ordering::Relaxed);
    }

    fn failed(&self, index: usize) {
        self.next.store(index + 1, Ordering::Relaxed);
    }
}

/// An open AMQP connection and the host it reached.
pub(crate) struct Connection {
    inner: amiquip::Connection,
    address: String,
    role: &'static str,
}

impl Connection {
    /// Opens a connection for `role` ("send", "reply", "listen"), trying every host once.
    pub fn open(
        hosts: &HostCycle,
        url: &TransportUrl,
        options: &TransportOptions,
        role: &'static str,
        deadline: Option<Instant>,
    ) -> Result<Connection> {
        let mut last_error = None;
        for (index, host) in hosts.rotation() {
            let timeout = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(DEFAULT_CONNECT_TIMEOUT),
                None => DEFAULT_CONNECT_TIMEOUT,
            };
            if timeout.is_zero() {
                break;
            }
            match open_host(host, url.virtual_host(), options, role, timeout) {
                Ok(inner) => {
                    hosts.succeeded(index);
                    info!("connected to AMQP server on {} ({role})", host.address());
                    return Ok(Connection {
                        inner,
                        address: host.address(),
                        role,
                    });
                }
                Err(e) => {
                    hosts.failed(index);
                    warn!(
                        "AMQP server on {} is unreachable ({role}): {e}",
                        host.address()
                    );
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Connection {
            host: hosts
                .hosts
                .iter()
                .map(Host::address)
                .collect::<Vec<_>>()
                .join(","),
            source: "deadline passed before a connection could be attempted".into(),
        }))
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

    /// Closes the connection and joins amiquip's I/O thread.
    pub fn close(self) {
        let Connection {
            inner,
            address,
            role,
        } = self;
        match inner.close() {
            Ok(()) => debug!("closed connection to {address} ({role})"),
            Err(e) => debug!("closing connection to {address} ({role}): {e}"),
        }
    }
}

fn open_host(
    host: &Host,
    virtual_host: &str,
    options: &TransportOptions,
    role: &'static str,
    timeout: Duration,
) -> Result<amiquip::Connection> {
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
    let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| fail(Box::new(e)))?;
    let handshake = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let connection_options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: host.login_username().to_string(),
            password: host.login_password().to_string(),
        })
        .virtual_host(virtual_host)
        .heartbeat(u16::try_from(options.heartbeat.as_secs()).unwrap_or(u16::MAX))
        .connection_timeout(Some(handshake))
        .information(Some(format!(
            "warren {} ({role}, pid {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        )));
    amiquip::Connection::insecure_open_stream(
        stream,
        connection_options,
        ConnectionTuning::default(),
    )
    .map_err(|e| amqp_error(e, &host.address()))
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
