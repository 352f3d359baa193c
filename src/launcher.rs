//! Running servers as a service (oslo.service's role for oslo.messaging servers): see
//! [`Launcher`].

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};

use crate::clock;
use crate::error::{Error, Result};
use crate::notify::NotificationListener;
use crate::server::RpcServer;
use crate::transport::Transport;

/// How often readiness is checked while the services connect.
const READY_POLL: Duration = Duration::from_millis(50);

/// Something the [`Launcher`] runs: started, stopped, waited for.
///
/// Implemented by [`RpcServer`] and [`NotificationListener`]; implement it to run your own
/// threads under the same lifecycle.
///
/// ```
/// use std::sync::mpsc::{self, RecvTimeoutError, Sender};
/// use std::sync::Mutex;
/// use std::thread::JoinHandle;
/// use std::time::Duration;
/// use warren::{Launcher, Service, Shutdown};
///
/// /// Sweeps expired entries every 10 ms on its own thread.
/// #[derive(Default)]
/// struct Sweeper {
///     stop: Mutex<Option<Sender<()>>>,
///     thread: Mutex<Option<JoinHandle<()>>>,
/// }
///
/// impl Service for Sweeper {
///     fn name(&self) -> String {
///         "sweeper".into()
///     }
///     fn start(&self) -> warren::Result<()> {
///         let (stop, stopped) = mpsc::channel::<()>();
///         let tick = Duration::from_millis(10);
///         let thread = std::thread::spawn(move || {
///             while stopped.recv_timeout(tick) == Err(RecvTimeoutError::Timeout) {
///                 // sweep
///             }
///         });
///         *self.stop.lock().unwrap() = Some(stop);
///         *self.thread.lock().unwrap() = Some(thread);
///         Ok(())
///     }
///     fn stop(&self) {
///         self.stop.lock().unwrap().take(); // the thread sees the channel close
///     }
///     fn wait(&self) {
///         if let Some(thread) = self.thread.lock().unwrap().take() {
///             thread.join().unwrap();
///         }
///     }
///     fn is_consuming(&self) -> bool {
///         self.stop.lock().unwrap().is_some()
///     }
/// }
///
/// let launcher = Launcher::new().service(Sweeper::default()).handle_signals(false);
/// let stopper = launcher.shutdown_handle();
/// // Shuts down as soon as it is ready; a daemon would serve until SIGTERM.
/// let outcome = launcher.on_ready(move || stopper.shutdown()).run()?;
/// assert_eq!(outcome, Shutdown::Drained);
/// # Ok::<(), warren::Error>(())
/// ```
pub trait Service: Send + Sync {
    /// A name for the logs.
    fn name(&self) -> String;
    /// Starts serving; returns once it consumes (or fails).
    fn start(&self) -> Result<()>;
    /// Stops taking new work.
    fn stop(&self);
    /// Waits until the work already taken is done.
    fn wait(&self);
    /// `true` while connected and consuming (readiness).
    fn is_consuming(&self) -> bool;
}

impl Service for RpcServer {
    fn name(&self) -> String {
        format!("RPC server {}", self.queue_name())
    }
    fn start(&self) -> Result<()> {
        RpcServer::start(self)
    }
    fn stop(&self) {
        RpcServer::stop(self)
    }
    fn wait(&self) {
        RpcServer::wait(self)
    }
    fn is_consuming(&self) -> bool {
        RpcServer::is_consuming(self)
    }
}

impl Service for NotificationListener {
    fn name(&self) -> String {
        format!("notification listener {}", self.queues().join(","))
    }
    fn start(&self) -> Result<()> {
        NotificationListener::start(self)
    }
    fn stop(&self) {
        NotificationListener::stop(self)
    }
    fn wait(&self) {
        NotificationListener::wait(self)
    }
    fn is_consuming(&self) -> bool {
        NotificationListener::is_consuming(self)
    }
}

/// How a [`Launcher`] ended.
///
/// ```
/// use warren::{Launcher, Shutdown};
///
/// let launcher = Launcher::new().handle_signals(false);
/// launcher.shutdown_handle().shutdown(); // requested before it even runs
/// let outcome = launcher.run()?;
/// assert_eq!(outcome, Shutdown::Drained);
/// // A daemon's `main` ends with `std::process::exit(outcome.exit_code())`.
/// assert_eq!(outcome.exit_code(), 0);
/// assert_eq!(Shutdown::DrainTimedOut.exit_code(), 1);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shutdown {
    /// Every message taken before the shutdown was handled: a clean stop.
    Drained,
    /// The drain deadline passed with messages still being handled; they were abandoned.
    DrainTimedOut,
    /// A second signal (or [`ShutdownHandle::shutdown`]) cut the drain short.
    Forced,
}

impl Shutdown {
    /// A process exit code: 0 drained, 1 otherwise (what an init system logs).
    pub fn exit_code(self) -> i32 {
        match self {
            Shutdown::Drained => 0,
            Shutdown::DrainTimedOut | Shutdown::Forced => 1,
        }
    }
}

/// Asks a running [`Launcher`] to shut down, as SIGTERM does; a second call during the drain
/// stops it at once. Cheap to clone.
///
/// Here an RPC method shuts its own service down:
///
/// ```
/// use std::sync::mpsc;
/// use warren::{
///     Endpoint, Failure, Launcher, NoArgs, RequestContext, RpcClient, RpcServer, Shutdown, Target,
///     Transport,
/// };
///
/// let transport = Transport::new("memory://doc-shutdown-handle/")?;
/// let launcher = Launcher::new().handle_signals(false);
/// let handle = launcher.shutdown_handle();
/// let admin = Endpoint::new().method("shutdown", move |_: &RequestContext, _: NoArgs| {
///     handle.shutdown();
///     Ok::<_, Failure>(())
/// });
/// let server = RpcServer::builder(&transport, Target::new("admin").with_server("host-1"))
///     .endpoint(admin)
///     .build()?;
/// let (ready_tx, ready) = mpsc::channel();
/// let launcher = launcher.service(server).on_ready(move || ready_tx.send(()).unwrap());
/// let run = std::thread::spawn(move || launcher.run());
///
/// ready.recv().unwrap(); // the server consumes
/// let client = RpcClient::new(&transport, Target::new("admin"));
/// client.cast(&RequestContext::new(), "shutdown", &NoArgs {})?;
/// assert_eq!(run.join().unwrap()?, Shutdown::Drained);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Sender<()>);

impl ShutdownHandle {
    /// Requests the shutdown (or, during the drain, ends it).
    pub fn shutdown(&self) {
        let _ = self.0.send(());
    }
}

/// Runs servers as a service (oslo.service's role for oslo.messaging servers): starts them,
/// serves until SIGTERM or SIGINT, then drains and reports how the drain went.
///
/// [`Launcher::run`] starts every [`Service`] (an [`RpcServer`] or a
/// [`NotificationListener`]), announces readiness once every one consumes (a callback, a file
/// touched for an init system or a container probe), and waits for a signal or a
/// [`ShutdownHandle`]. Then it stops consuming everywhere, gives the messages already taken the
/// drain deadline to finish, closes the transports it was given, and returns a [`Shutdown`]
/// saying whether the drain completed. A second signal (or handle call) during the drain stops
/// waiting at once.
///
/// ```
/// use std::time::Duration;
/// use warren::{
///     Endpoint, Failure, Launcher, NoArgs, RequestContext, RpcServer, Shutdown, Target, Transport,
/// };
///
/// let transport = Transport::new("memory://doc-launcher/")?;
/// let server = RpcServer::builder(&transport, Target::new("compute").with_server("host-1"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| {
///         Ok::<_, Failure>("pong")
///     }))
///     .build()?;
/// let launcher = Launcher::new()
///     .service(server)
///     .transport(&transport)
///     .drain_timeout(Duration::from_secs(30))
///     .handle_signals(false); // a daemon keeps the default: SIGTERM and SIGINT
/// let stopper = launcher.shutdown_handle();
/// let run = std::thread::spawn(move || launcher.run());
/// stopper.shutdown(); // what SIGTERM does
/// assert_eq!(run.join().unwrap()?, Shutdown::Drained);
/// # Ok::<(), warren::Error>(())
/// ```
pub struct Launcher {
    /// What is started and drained, in order.
    services: Vec<Box<dyn Service>>,
    /// How long messages already taken may run once the shutdown begins.
    drain_timeout: Duration,
    /// Touched once every service consumes, removed when the shutdown begins.
    ready_file: Option<PathBuf>,
    /// Called once every service consumes.
    on_ready: Option<Box<dyn FnOnce() + Send>>,
    /// Closed at the end, once drained (a closed transport deletes its reply queue).
    transports: Vec<Transport>,
    /// Whether SIGTERM and SIGINT request the shutdown.
    signals: bool,
    /// Shutdown requests, from handles and signals.
    requests: (Sender<()>, Receiver<()>),
}

impl Default for Launcher {
    fn default() -> Self {
        Launcher::new()
    }
}

impl Launcher {
    /// A launcher with no service, a 60 s drain (oslo.service's `graceful_shutdown_timeout`)
    /// and SIGTERM / SIGINT handling on.
    pub fn new() -> Launcher {
        Launcher {
            services: Vec::new(),
            drain_timeout: Duration::from_secs(60),
            ready_file: None,
            on_ready: None,
            transports: Vec::new(),
            signals: true,
            requests: crossbeam_channel::unbounded(),
        }
    }

    /// Adds a service (started in the order added).
    pub fn service(mut self, service: impl Service + 'static) -> Launcher {
        self.services.push(Box::new(service));
        self
    }

    /// How long the messages already taken may run once the shutdown begins (default 60 s;
    /// `Duration::MAX`: until they are done).
    pub fn drain_timeout(mut self, timeout: Duration) -> Launcher {
        self.drain_timeout = timeout;
        self
    }

    /// A file touched once every service consumes and removed when the shutdown begins (a
    /// readiness probe for an init system or a container).
    pub fn ready_file(mut self, path: impl Into<PathBuf>) -> Launcher {
        self.ready_file = Some(path.into());
        self
    }

    /// Called once every service consumes (e.g. `sd_notify("READY=1")`).
    pub fn on_ready(mut self, callback: impl FnOnce() + Send + 'static) -> Launcher {
        self.on_ready = Some(Box::new(callback));
        self
    }

    /// A transport to close once the services are drained.
    pub fn transport(mut self, transport: &Transport) -> Launcher {
        self.transports.push(transport.clone());
        self
    }

    /// Whether SIGTERM and SIGINT request the shutdown (default `true`). Tests and embedders
    /// with their own signal handling use a [`ShutdownHandle`] instead.
    pub fn handle_signals(mut self, handle: bool) -> Launcher {
        self.signals = handle;
        self
    }

    /// A handle that requests the shutdown from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.requests.0.clone())
    }

    /// Starts the services, serves until a shutdown is requested, drains, closes the
    /// transports. Fails (after stopping what it started) if a service cannot start.
    pub fn run(self) -> Result<Shutdown> {
        let Launcher {
            services,
            drain_timeout,
            ready_file,
            on_ready,
            transports,
            signals,
            requests: (requests_tx, requests),
        } = self;
        let _signals = if signals {
            Some(SignalForwarder::start(requests_tx)?)
        } else {
            None
        };
        for (index, service) in services.iter().enumerate() {
            if let Err(e) = service.start() {
                warn!("{} could not start: {e}", service.name());
                for started in services[..index].iter().rev() {
                    started.stop();
                    started.wait();
                }
                return Err(e);
            }
            info!("{} started", service.name());
        }
        if announce_ready(&services, &requests, ready_file.as_ref(), on_ready) {
            info!("every service consumes; serving until SIGTERM or SIGINT");
            let _ = requests.recv();
        }
        if let Some(path) = &ready_file {
            let _ = std::fs::remove_file(path);
        }
        info!(
            "shutting down: no new messages; {:.0}s for the ones taken",
            drain_timeout.as_secs_f64()
        );
        for service in &services {
            service.stop();
        }
        let outcome = drain(services, drain_timeout, &requests);
        match outcome {
            Shutdown::Drained => {
                for transport in &transports {
                    transport.close();
                }
                info!("drained; stopped cleanly");
            }
            Shutdown::DrainTimedOut => warn!(
                "the drain did not complete within {:.0}s; abandoning the messages still running",
                drain_timeout.as_secs_f64()
            ),
            Shutdown::Forced => warn!("second shutdown request: stopping without draining"),
        }
        Ok(outcome)
    }
}

/// Waits until every service consumes, then touches the file and calls the callback; `false`
/// if a shutdown was requested first.
fn announce_ready(
    services: &[Box<dyn Service>],
    requests: &Receiver<()>,
    ready_file: Option<&PathBuf>,
    on_ready: Option<Box<dyn FnOnce() + Send>>,
) -> bool {
    while !services.iter().all(|s| s.is_consuming()) {
        if requests.recv_timeout(READY_POLL).is_ok() {
            return false;
        }
    }
    if let Some(path) = ready_file {
        if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
            warn!("cannot write the ready file {}: {e}", path.display());
        }
    }
    if let Some(callback) = on_ready {
        callback();
    }
    true
}

/// Waits for the services to finish what they took, within `timeout`, unless another
/// shutdown request comes. Services still running are handed to a thread that finishes
/// dropping them, so the caller is never held.
fn drain(services: Vec<Box<dyn Service>>, timeout: Duration, requests: &Receiver<()>) -> Shutdown {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let drainer = thread::Builder::new()
        .name("warren-drain".into())
        .spawn(move || {
            for service in &services {
                service.wait();
            }
            let _ = done_tx.send(());
        });
    let drainer = match drainer {
        Ok(drainer) => drainer,
        Err(e) => {
            warn!("cannot spawn the drain thread ({e}); not waiting");
            return Shutdown::DrainTimedOut;
        }
    };
    let deadline = clock::after(Instant::now(), timeout);
    crossbeam_channel::select! {
        recv(done) -> _ => {
            let _ = drainer.join();
            Shutdown::Drained
        }
        recv(requests) -> _ => Shutdown::Forced,
        default(deadline.saturating_duration_since(Instant::now())) => Shutdown::DrainTimedOut,
    }
}

/// SIGTERM and SIGINT, forwarded as shutdown requests by a thread that ends with this.
struct SignalForwarder {
    handle: signal_hook::iterator::Handle,
    thread: Option<thread::JoinHandle<()>>,
}

impl SignalForwarder {
    fn start(requests: Sender<()>) -> Result<SignalForwarder> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .map_err(|e| Error::server_state(format!("cannot handle SIGTERM/SIGINT: {e}")))?;
        let handle = signals.handle();
        let thread = thread::Builder::new()
            .name("warren-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    info!("received signal {signal}");
                    let _ = requests.send(());
                }
            })
            .map_err(|e| Error::server_state(format!("cannot spawn the signal thread: {e}")))?;
        Ok(SignalForwarder {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_timeout_of_duration_max_waits_for_the_services() {
        let (_requests_tx, requests) = crossbeam_channel::unbounded();
        let shutdown = drain(Vec::new(), Duration::MAX, &requests);
        assert!(matches!(shutdown, Shutdown::Drained));
    }
}
