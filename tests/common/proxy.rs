//! A fault-injecting TCP proxy between warren and a broker: listens on 127.0.0.1 (an ephemeral
//! port), forwards each connection to the upstream broker, and on demand cuts every
//! connection, refuses new ones, blackholes traffic (sockets stay open, nothing flows), or
//! delays it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One proxied connection: the client side and the broker side.
struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    open: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    refuse: AtomicBool,
    blackhole: AtomicBool,
    delay_ms: AtomicU64,
    /// Like `delay_ms`, for chunks from the broker only.
    delay_to_clients_ms: AtomicU64,
    /// Chunks from the broker read and not yet forwarded (held by a delay).
    held_for_clients: AtomicU64,
    stop: AtomicBool,
    pairs: Mutex<Vec<Pair>>,
    upstream_ports: Mutex<Vec<u16>>,
    /// When each connection was accepted, refused ones included.
    attempts: Mutex<Vec<Instant>>,
    /// Chunks from clients the blackhole swallowed.
    swallowed_from_clients: AtomicU64,
    /// When each connection ended by itself (one side closed it), not by [`Proxy::cut_all`].
    ends: Mutex<Vec<Instant>>,
}

pub struct Proxy {
    port: u16,
    state: Arc<State>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(State::default());
        let acceptor_state = state.clone();
        let acceptor = thread::spawn(move || accept(&listener, upstream, &acceptor_state));
        Proxy {
            port,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// The proxy's address, `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `base` (a broker URL with one host) pointing at the proxy instead.
    pub fn url(&self, base: &str) -> String {
        let (scheme, rest) = base.split_once("://").expect("url");
        let (creds, after) = rest.rsplit_once('@').unwrap_or(("", rest));
        let path = after.find('/').map_or("/", |i| &after[i..]);
        let creds = if creds.is_empty() {
            String::new()
        } else {
            format!("{creds}@")
        };
        format!("{scheme}://{creds}{}{path}", self.address())
    }

    /// Closes every proxied connection now (both sides), as a network cut or a broker
    /// restart would.
    pub fn cut_all(&self) {
        for pair in self.state.pairs.lock().drain(..) {
            pair.open.store(false, Ordering::Release);
            let _ = pair.client.shutdown(Shutdown::Both);
            let _ = pair.upstream.shutdown(Shutdown::Both);
        }
    }

    /// New connections are accepted and closed at once (like a broker that is down).
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::Release);
    }

    /// Nothing flows in either direction, on existing and new connections; sockets stay open.
    pub fn blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Release);
    }

    /// Every chunk is held back this long before it is forwarded.
    pub fn delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Release);
    }

    /// Every chunk from the broker is held back this long before it is forwarded (what clients
    /// send goes through at once).
    pub fn delay_to_clients(&self, delay: Duration) {
        self.state
            .delay_to_clients_ms
            .store(delay.as_millis() as u64, Ordering::Release);
    }

    /// How many chunks from the broker are being held back now.
    pub fn held_for_clients(&self) -> u64 {
        self.state.held_for_clients.load(Ordering::Acquire)
    }

    /// Proxied connections still open.
    pub fn open_connections(&self) -> usize {
        let mut pairs = self.state.pairs.lock();
        pairs.retain(|p| p.open.load(Ordering::Acquire));
        pairs.len()
    }

    /// Local ports of every broker-side connection the proxy ever opened (to find them in
    /// `rabbitmqctl list_connections peer_port`).
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.state.upstream_ports.lock().clone()
    }

    /// When each connection attempt reached the proxy (accepted, refused ones included), in
    /// order.
    pub fn attempts(&self) -> Vec<Instant> {
        self.state.attempts.lock().clone()
    }

    /// When each connection ended by itself (a side closed it: a client that gave up on a
    /// connection whose heartbeats it missed, say), not by [`Proxy::cut_all`], in order.
    pub fn ends(&self) -> Vec<Instant> {
        self.state.ends.lock().clone()
    }

    /// How many chunks (reads) from clients the blackhole swallowed: that a client sent
    /// something while it was on.
    pub fn swallowed_from_clients(&self) -> u64 {
        self.state.swallowed_from_clients.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        // Wake the acceptor.
        let _ = TcpStream::connect(self.address());
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.cut_all();
    }
}

fn accept(listener: &TcpListener, upstream: SocketAddr, state: &Arc<State>) {
    for client in listener.incoming() {
        if state.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(client) = client else { continue };
        state.attempts.lock().push(Instant::now());
        if state.refuse.load(Ordering::Acquire) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream_stream) = TcpStream::connect(upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream_stream.set_nodelay(true);
        let upstream_port = upstream_stream.local_addr().map(|a| a.port()).unwrap_or(0);
        state.upstream_ports.lock().push(upstream_port);
        let open = Arc::new(AtomicBool::new(true));
        let (Ok(c1), Ok(c2), Ok(u1), Ok(u2)) = (
            client.try_clone(),
            client.try_clone(),
            upstream_stream.try_clone(),
            upstream_stream.try_clone(),
        ) else {
            continue;
        };
        state.pairs.lock().push(Pair {
            client,
            upstream: upstream_stream,
            open: open.clone(),
        });
        for (from, to, from_client) in [(c1, u1, true), (u2, c2, false)] {
            let state = state.clone();
            let open = open.clone();
            thread::spawn(move || pump(from, to, from_client, &state, &open));
        }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    from_client: bool,
    state: &State,
    open: &AtomicBool,
) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.blackhole.load(Ordering::Acquire) {
            if from_client {
                state.swallowed_from_clients.fetch_add(1, Ordering::AcqRel);
            }
            continue;
        }
        let mut delay = state.delay_ms.load(Ordering::Acquire);
        if !from_client {
            delay = delay.max(state.delay_to_clients_ms.load(Ordering::Acquire));
        }
        let held = !from_client && delay > 0;
        if held {
            state.held_for_clients.fetch_add(1, Ordering::AcqRel);
        }
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        let written = to.write_all(&buffer[..n]);
        if held {
            state.held_for_clients.fetch_sub(1, Ordering::AcqRel);
        }
        if written.is_err() {
            break;
        }
    }
    // A blackhole swallows the end of a connection too: the other side must find out by
    // itself (missed heartbeats).
    if !state.blackhole.load(Ordering::Acquire) {
        // The first of the pair's two pumps to see the end (a cut marked it already).
        if open.swap(false, Ordering::AcqRel) {
            state.ends.lock().push(Instant::now());
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}
