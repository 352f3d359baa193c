//! The poll thread of a server's listener, shared by every driver (oslo's
//! `PollStyleListenerAdapter` running `AMQPListener.poll`).
//!
//! The thread owns the driver's consumers. One `select` waits on all of them at once, on the
//! ack/reject operations workers hand back, on control messages (stop, close), and on room in
//! the server's bounded incoming queue. Deliveries are moved into that queue; operations are
//! executed by the driver on the thread that owns the channel. With ack on hand-off (oslo's
//! ack-before-dispatch), the thread acknowledges a delivery only when a worker is free to take
//! it at once ([`IdleWorkers`]), then queues it for that worker; deliveries for which no
//! worker is free wait here, unacknowledged, until one goes idle and wakes the thread. Idle
//! polls time out on a [`DecayingTimer`] (1 ms doubling to 5 s).
//!
//! Lifecycle: `stop()` cancels the consumers; what they had already delivered is still handed
//! to the workers, then the incoming queue is closed so the workers finish. `close()` (after
//! the workers are done) executes the remaining operations and ends the thread, which then
//! cleans up its driver resources.
//!
//! Sessions: the loop outlives the channel it reads. When a session's channel or connection
//! is lost, its deliveries can no longer be acknowledged (the broker redelivers them), so they
//! are dropped and later acks for them fail; the driver reconnects and starts a new session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, error, warn};

use crate::driver::timer::DecayingTimer;
use crate::driver::{
    spawn_when_ready, AckKind, AckOp, Acker, IdleWorkers, Incoming, Listener, RawMessage, Screen,
};
use crate::error::{Error, Result};
use crate::wire::envelope::OpenedRequest;

/// Deliveries held by the thread while the incoming queue is full; beyond this it stops
/// reading its consumers (prefetch then stops the broker).
const PENDING_MAX: usize = 256;
/// Deliveries taken at once when several have arrived together.
const TAKE_READY_MAX: usize = 64;
/// How long `stop()` waits for the thread to cancel its consumers.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests from the server to its poll thread.
pub(crate) enum Control {
    /// Cancel the consumers; answer when done.
    Stop(Sender<()>),
    /// Finish: flush operations and return.
    Close,
}

/// What a driver's consumers tell the loop about one received item.
pub(crate) enum Accepted {
    /// A delivery for the workers, with its tag.
    Deliver(u64, RawMessage),
    /// Nothing to hand over (an expired message, a client-side cancel notice).
    Skip,
    /// The consumers' channel or connection is gone.
    Lost(String),
}

/// A driver's consumers, as the poll loop sees them.
pub(crate) trait Consumers {
    /// What the consumers' receivers carry.
    type Item;
    /// The receivers to wait on.
    fn receivers(&self) -> &[Receiver<Self::Item>];
    /// Takes one item received from `receivers()[source]` (keeping what is needed to settle
    /// it later).
    fn accept(&mut self, source: usize, item: Self::Item) -> Accepted;
    /// Acks or rejects delivery `tag` on the owning channel.
    fn settle(&mut self, tag: u64, kind: AckKind) -> Result<()>;
    /// Acks deliveries `tags` (in one frame where the protocol allows); the outcome for each.
    fn ack_all(&mut self, tags: &[u64]) -> Vec<Result<()>> {
        tags.iter()
            .map(|tag| self.settle(*tag, AckKind::Ack))
            .collect()
    }
    /// Cancels the consumers; returns items they had already received, with their source.
    fn cancel(&mut self) -> Vec<(usize, Self::Item)>;
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Closed on request: clean shutdown.
    Closed,
    /// The server side went away without a close.
    Abandoned,
    /// The consumers' channel or connection is gone; the driver reconnects.
    Lost(String),
}

/// Handle on a running poll thread; the server's [`Listener`].
pub(crate) struct PollThread {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    consuming: Arc<AtomicBool>,
}

impl PollThread {
    /// Spawns a poll thread running `body(poll, control, ready)`: `body` must send `Ok(())`
    /// on `ready` once it consumes (or the error that stopped it), then run `poll`'s sessions.
    /// Returns when `ready` was answered.
    ///
    /// With `ack_on_handoff`, each delivery is acknowledged as a worker takes it
    /// ([`ListenSpec::ack_on_handoff`](crate::driver::ListenSpec::ack_on_handoff)).
    pub fn spawn<F>(
        name: String,
        incoming: Sender<Incoming>,
        ack_on_handoff: Option<Screen>,
        body: F,
    ) -> Result<PollThread>
    where
        F: FnOnce(PollLoop, Receiver<Control>, Sender<Result<()>>) + Send + 'static,
    {
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let consuming = Arc::new(AtomicBool::new(false));
        let poll = PollLoop::new(incoming, consuming.clone(), ack_on_handoff);
        let thread = spawn_when_ready(name, move |ready| body(poll, control_rx, ready))?;
        Ok(PollThread {
            control: control_tx,
            thread: Some(thread),
            consuming,
        })
    }

    fn shutdown(&mut self) {
        let _ = self.control.send(Control::Close);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the listener thread panicked");
            }
        }
    }
}

impl Listener for PollThread {
    fn stop(&mut self) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self.control.send(Control::Stop(done_tx)).is_ok()
            && done_rx.recv_timeout(STOP_TIMEOUT).is_err()
        {
            warn!("listener did not confirm it stopped consuming within {STOP_TIMEOUT:?}");
        }
    }

    fn close(mut self: Box<Self>) {
        self.shutdown();
    }

    fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Acquire)
    }
}

impl Drop for PollThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What one `select` produced.
enum Event<T> {
    Op(AckOp),
    Control(Option<Control>),
    /// A delivery was handed to a worker (without ack on hand-off).
    Handed,
    WorkersGone,
    Item(usize, T),
    ConsumerGone,
    Idle,
}

/// A delivery waiting for a worker.
struct Pending {
    incoming: Incoming,
    /// Its delivery tag, acknowledged as it is handed over with ack on hand-off.
    tag: u64,
}

/// The loop itself, kept across sessions (one per channel) so that the incoming queue, the
/// deliveries waiting for it and the stop state survive a reconnection. See the
/// [module documentation](self).
pub(crate) struct PollLoop {
    incoming: Option<Sender<Incoming>>,
    ops_tx: Sender<AckOp>,
    ops_rx: Receiver<AckOp>,
    pending: VecDeque<Pending>,
    /// With a screen: read each delivery before handing it over and acknowledge it on hand-off.
    ack_on_handoff: Option<Screen>,
    /// The current session is reading its consumers.
    consuming: bool,
    /// `stop()` was asked: no more consuming, in this session or any later one.
    stopped: bool,
    /// The channel generation; operations for deliveries of another one are dropped.
    generation: u64,
    timer: DecayingTimer,
    /// Mirrors `consuming` for the server's health check.
    health: Arc<AtomicBool>,
}

impl PollLoop {
    fn new(
        incoming: Sender<Incoming>,
        health: Arc<AtomicBool>,
        ack_on_handoff: Option<Screen>,
    ) -> Self {
        let (ops_tx, ops_rx) = crossbeam_channel::unbounded();
        PollLoop {
            incoming: Some(incoming),
            ops_tx,
            ops_rx,
            pending: VecDeque::new(),
            ack_on_handoff,
            consuming: false,
            stopped: false,
            generation: 0,
            timer: DecayingTimer::until(None),
            health,
        }
    }

    fn set_consuming(&mut self, consuming: bool) {
        self.consuming = consuming;
        self.health.store(consuming, Ordering::Release);
    }

    /// `stop()` was asked: the driver must not consume again.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Runs one session on freshly consuming `consumers` until it is closed or lost.
    pub fn run_session<C: Consumers>(
        &mut self,
        consumers: &mut C,
        control: &Receiver<Control>,
    ) -> SessionEnd {
        self.generation += 1;
        self.set_consuming(!self.stopped);
        if self.stopped {
            consumers.cancel();
        }
        loop {
            self.close_incoming_when_done();
            self.hand_to_idle_workers(consumers);
            match self.next_event(Some(&*consumers), control) {
                Event::Op(op) => self.execute(Some(&mut *consumers), op),
                Event::Control(Some(Control::Stop(done))) => {
                    self.stop_consuming(consumers);
                    let _ = done.send(());
                }
                Event::Control(Some(Control::Close)) => {
                    self.stop_consuming(consumers);
                    while let Ok(op) = self.ops_rx.try_recv() {
                        self.execute(Some(&mut *consumers), op);
                    }
                    return SessionEnd::Closed;
                }
                Event::Control(None) => {
                    self.stop_consuming(consumers);
                    return SessionEnd::Abandoned;
                }
                Event::Handed | Event::Idle => {}
                Event::WorkersGone => self.workers_gone(),
                Event::Item(source, item) => {
                    if let Err(why) = self.accept(consumers, source, item) {
                        return self.lose(why);
                    }
                    // What else is already there goes over (and is acknowledged) with it.
                    if let Err(why) = self.take_ready(consumers) {
                        return self.lose(why);
                    }
                }
                Event::ConsumerGone => return self.lose("the connection is gone".into()),
            }
        }
    }

    /// Between sessions: waits up to `pause` while answering operations (they fail: their
    /// channel is gone) and obeying stop; `Some(end)` if closed meanwhile.
    pub fn wait_offline(
        &mut self,
        control: &Receiver<Control>,
        pause: Duration,
    ) -> Option<SessionEnd> {
        let deadline = Instant::now() + pause;
        loop {
            self.close_incoming_when_done();
            let mut select = Select::new();
            let ops_index = select.recv(&self.ops_rx);
            let control_index = select.recv(control);
            let Ok(operation) = select.select_deadline(deadline) else {
                return None;
            };
            if operation.index() == ops_index {
                if let Ok(op) = operation.recv(&self.ops_rx) {
                    self.execute::<NoConsumers>(None, op);
                }
            } else if operation.index() == control_index {
                match operation.recv(control) {
                    Ok(Control::Stop(done)) => {
                        self.stopped = true;
                        let _ = done.send(());
                    }
                    Ok(Control::Close) => return Some(SessionEnd::Closed),
                    Err(_) => return Some(SessionEnd::Abandoned),
                }
            }
        }
    }

    fn close_incoming_when_done(&mut self) {
        if self.stopped && self.pending.is_empty() && self.incoming.take().is_some() {
            debug!("listener handed over its last delivery; closing the incoming queue");
        }
    }

    fn next_event<C: Consumers>(
        &mut self,
        consumers: Option<&C>,
        control: &Receiver<Control>,
    ) -> Event<C::Item> {
        let mut select = Select::new();
        let ops_index = select.recv(&self.ops_rx);
        let control_index = select.recv(control);
        // Without ack on hand-off a delivery goes to the queue when there is room; with it,
        // when a worker going idle says so.
        let (send_index, wake_index) = match (
            &self.incoming,
            self.pending.is_empty(),
            &self.ack_on_handoff,
        ) {
            (Some(tx), false, None) => (Some(select.send(tx)), None),
            (Some(_), false, Some(screen)) => (None, Some(select.recv(screen.idle.wakes()))),
            _ => (None, None),
        };
        let mut first_consumer = usize::MAX;
        let readable = consumers.filter(|_| self.consuming && self.pending.len() < PENDING_MAX);
        if let Some(consumers) = readable {
            for receiver in consumers.receivers() {
                first_consumer = first_consumer.min(select.recv(receiver));
            }
        }
        let operation =
            match select.select_timeout(self.timer.next_timeout().unwrap_or(DecayingTimer::MAX)) {
                Ok(operation) => operation,
                Err(_) => {
                    self.timer.idle();
                    return Event::Idle;
                }
            };
        self.timer.activity();
        let index = operation.index();
        if index == ops_index {
            operation.recv(&self.ops_rx).map_or(Event::Idle, Event::Op)
        } else if index == control_index {
            Event::Control(operation.recv(control).ok())
        } else if let Some(screen) = self
            .ack_on_handoff
            .as_ref()
            .filter(|_| Some(index) == wake_index)
        {
            // A worker went idle: the next turn of the loop hands it a delivery.
            let _ = operation.recv(screen.idle.wakes());
            Event::Idle
        } else if Some(index) == send_index {
            let (Some(tx), Some(item)) = (&self.incoming, self.pending.pop_front()) else {
                return Event::Idle;
            };
            match operation.send(tx, item.incoming) {
                Ok(()) => Event::Handed,
                // Not acked: the broker redelivers it.
                Err(_) => Event::WorkersGone,
            }
        } else {
            let source = index - first_consumer;
            match readable {
                Some(consumers) => operation
                    .recv(&consumers.receivers()[source])
                    .map_or(Event::ConsumerGone, |item| Event::Item(source, item)),
                None => Event::Idle,
            }
        }
    }

    /// Takes one item a consumer received; `Err` when it says the channel is gone.
    fn accept<C: Consumers>(
        &mut self,
        consumers: &mut C,
        source: usize,
        item: C::Item,
    ) -> std::result::Result<(), String> {
        match consumers.accept(source, item) {
            Accepted::Deliver(tag, message) => self.take(consumers, tag, message),
            Accepted::Skip => {}
            Accepted::Lost(why) => return Err(why),
        }
        Ok(())
    }

    /// Takes what the consumers have already received, without waiting (at most
    /// [`TAKE_READY_MAX`] items, and never past [`PENDING_MAX`] waiting deliveries), so that
    /// deliveries arriving together are handed over, and acknowledged, together.
    fn take_ready<C: Consumers>(&mut self, consumers: &mut C) -> std::result::Result<(), String> {
        let mut taken = 0;
        while self.consuming && taken < TAKE_READY_MAX && self.pending.len() < PENDING_MAX {
            let mut found = None;
            for (source, receiver) in consumers.receivers().iter().enumerate() {
                match receiver.try_recv() {
                    Ok(item) => {
                        found = Some((source, item));
                        break;
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => {}
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        return Err("the connection is gone".into())
                    }
                }
            }
            let Some((source, item)) = found else {
                return Ok(());
            };
            self.accept(consumers, source, item)?;
            taken += 1;
        }
        Ok(())
    }

    /// Screens a delivery (when acknowledging on hand-off) and queues it for a worker; one the
    /// screen cannot read is rejected without requeue at once.
    fn take<C: Consumers>(&mut self, consumers: &mut C, tag: u64, mut message: RawMessage) {
        let opened = match self.ack_on_handoff.as_ref().map(|s| s.read(&mut message)) {
            Some(Err(reason)) => {
                warn!(
                    "rejecting an unreadable message on {:?} (queue {:?}): {}",
                    message.routing_key,
                    message.queue,
                    crate::wire::limits::clip(&reason)
                );
                if let Err(e) = consumers.settle(tag, AckKind::Reject { requeue: false }) {
                    warn!("could not reject delivery {tag}: {e}");
                }
                return;
            }
            Some(Ok(opened)) => Some(opened),
            None => None,
        };
        self.hand_over(tag, message, opened);
    }

    fn hand_over(&mut self, tag: u64, message: RawMessage, opened: Option<Box<OpenedRequest>>) {
        let ops = self.ops_tx.clone();
        let acker = match self.ack_on_handoff {
            Some(_) => Acker::acked_on_handoff(tag, self.generation, ops),
            None => Acker::new(tag, self.generation, ops),
        };
        self.pending.push_back(Pending {
            incoming: Incoming {
                message,
                acker,
                opened,
            },
            tag,
        });
    }

    /// With ack on hand-off: acknowledges waiting deliveries (together, with one `multiple`
    /// ack where the broker allows) and queues them, one per free worker; deliveries whose ack
    /// fails are skipped (the broker redelivers them). When no worker is free, asks the next
    /// one going idle to wake the thread.
    fn hand_to_idle_workers<C: Consumers>(&mut self, consumers: &mut C) {
        // Called on every turn of the loop: nothing to do (the common case) costs nothing.
        // (A worker may still wake the thread once after `lose()` dropped what waited.)
        if self.pending.is_empty() || self.incoming.is_none() {
            return;
        }
        let Some(idle) = self.ack_on_handoff.as_ref().map(|s| s.idle.clone()) else {
            return;
        };
        let mut batch = Vec::new();
        while !self.pending.is_empty() && Self::claim(&idle) {
            if let Some(item) = self.pending.pop_front() {
                batch.push(item);
            }
        }
        if self.pending.is_empty() {
            idle.set_wanted(false);
        }
        if batch.is_empty() {
            return;
        }
        let tags: Vec<u64> = batch.iter().map(|item| item.tag).collect();
        let outcomes = consumers.ack_all(&tags);
        for (item, outcome) in batch.into_iter().zip(outcomes) {
            if let Err(e) = outcome {
                idle.unclaim();
                warn!(
                    "could not acknowledge delivery {} on hand-off; skipping it (the broker redelivers it): {e}",
                    item.tag
                );
                continue;
            }
            // Waits at most until a claimed worker, already idle, reaches its `recv`.
            let handed = match &self.incoming {
                Some(tx) => tx.send(item.incoming).is_ok(),
                None => false,
            };
            if !handed {
                idle.unclaim();
                self.workers_gone();
                return;
            }
        }
    }

    /// Claims a free worker; if none is, announces that the thread waits for one and tries
    /// once more (a worker that went idle meanwhile saw no announcement).
    fn claim(idle: &IdleWorkers) -> bool {
        if idle.claim() {
            return true;
        }
        idle.set_wanted(true);
        idle.claim()
    }

    fn workers_gone(&mut self) {
        warn!(
            "the server's workers are gone; dropping {} deliveries",
            self.pending.len()
        );
        self.pending.clear();
        self.incoming = None;
    }

    fn execute<C: Consumers>(&mut self, consumers: Option<&mut C>, op: AckOp) {
        let result = match consumers {
            Some(consumers) if op.generation == self.generation => {
                consumers.settle(op.tag, op.kind)
            }
            _ => Err(Error::Connection {
                host: String::new(),
                source: "the delivery's channel is closed".into(),
            }),
        };
        match (op.done, result) {
            (Some(done), result) => {
                let _ = done.send(result);
            }
            (None, Err(e)) => warn!("could not {:?} delivery {}: {e}", op.kind, op.tag),
            (None, Ok(())) => {}
        }
    }

    /// Cancels the consumers and keeps what they had already delivered, to hand it over.
    fn stop_consuming<C: Consumers>(&mut self, consumers: &mut C) {
        self.stopped = true;
        if !self.consuming {
            return;
        }
        self.set_consuming(false);
        for (source, item) in consumers.cancel() {
            if let Accepted::Deliver(tag, message) = consumers.accept(source, item) {
                self.take(consumers, tag, message);
            }
        }
        debug!(
            "stopped consuming; {} deliveries left to hand over",
            self.pending.len()
        );
    }

    /// The session's channel is gone: nothing more arrives from it, and nothing it delivered
    /// can be acknowledged any more (the broker will redeliver it).
    fn lose(&mut self, why: String) -> SessionEnd {
        self.set_consuming(false);
        self.generation += 1;
        let dropped = self.pending.len();
        self.pending.clear();
        if dropped > 0 {
            debug!("dropped {dropped} deliveries of the lost channel; the broker redelivers them");
        }
        SessionEnd::Lost(why)
    }
}

/// The consumers of no session (between sessions).
struct NoConsumers;

impl Consumers for NoConsumers {
    type Item = ();
    fn receivers(&self) -> &[Receiver<()>] {
        &[]
    }
    fn accept(&mut self, _: usize, _: ()) -> Accepted {
        Accepted::Skip
    }
    fn settle(&mut self, _: u64, _: AckKind) -> Result<()> {
        Err(Error::Closed)
    }
    fn cancel(&mut self) -> Vec<(usize, ())> {
        Vec::new()
    }
}
