//! The poll thread of a server's listener, shared by every driver (oslo's
//! `PollStyleListenerAdapter` running `AMQPListener.poll`).
//!
//! The thread owns the driver's consumers. One `select` waits on all of them at once, on the
//! ack/reject operations workers hand back, on control messages (stop, close), and on room in
//! the server's bounded incoming queue. Deliveries are moved into that queue; operations are
//! executed by the driver on the thread that owns the channel. Idle polls time out on a
//! [`DecayingTimer`] (1 ms doubling to 5 s).
//!
//! Lifecycle: `stop()` cancels the consumers; what they had already delivered is still handed
//! to the workers, then the incoming queue is closed so the workers finish. `close()` (after
//! the workers are done) executes the remaining operations and ends the thread, which then
//! cleans up its driver resources.

use std::collections::VecDeque;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, Sender};
use log::{debug, error, warn};

use crate::driver::timer::DecayingTimer;
use crate::driver::{spawn_when_ready, AckKind, AckOp, Acker, Incoming, Listener, RawMessage};
use crate::error::{Error, Result};

/// Deliveries held by the thread while the incoming queue is full; beyond this it stops
/// reading its consumers (prefetch then stops the broker).
const PENDING_MAX: usize = 256;
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
    /// Takes one received item (keeping what is needed to settle it later).
    fn accept(&mut self, item: Self::Item) -> Accepted;
    /// Acks or rejects delivery `tag` on the owning channel.
    fn settle(&mut self, tag: u64, kind: AckKind) -> Result<()>;
    /// Cancels the consumers; returns items they had already received.
    fn cancel(&mut self) -> Vec<Self::Item>;
    /// Where the consumers are (for messages), e.g. `host:port`.
    fn location(&self) -> &str;
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Closed on request: clean shutdown.
    Closed,
    /// The server side went away without a close.
    Abandoned,
}

/// Handle on a running poll thread; the server's [`Listener`].
pub(crate) struct PollThread {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl PollThread {
    /// Spawns a poll thread running `body(control, ready)`. `body` must send `Ok(())` on
    /// `ready` once it consumes (or the error that stopped it), then run a [`PollLoop`].
    /// Returns when `ready` was answered.
    pub fn spawn<F>(name: String, body: F) -> Result<PollThread>
    where
        F: FnOnce(Receiver<Control>, Sender<Result<()>>) + Send + 'static,
    {
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let thread = spawn_when_ready(name, move |ready| body(control_rx, ready))?;
        Ok(PollThread {
            control: control_tx,
            thread: Some(thread),
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
    Handed,
    WorkersGone,
    Item(T),
    ConsumerGone,
    Idle,
}

/// The loop itself. See the [module documentation](self).
pub(crate) struct PollLoop<C: Consumers> {
    consumers: C,
    incoming: Option<Sender<Incoming>>,
    ops_tx: Sender<AckOp>,
    ops_rx: Receiver<AckOp>,
    pending: VecDeque<Incoming>,
    consuming: bool,
    /// Bumped when the consumers are lost, so stale operations are dropped.
    generation: u64,
    timer: DecayingTimer,
}

impl<C: Consumers> PollLoop<C> {
    pub fn new(consumers: C, incoming: Sender<Incoming>) -> Self {
        let (ops_tx, ops_rx) = crossbeam_channel::unbounded();
        PollLoop {
            consumers,
            incoming: Some(incoming),
            ops_tx,
            ops_rx,
            pending: VecDeque::new(),
            consuming: true,
            generation: 1,
            timer: DecayingTimer::until(None),
        }
    }

    /// Runs until closed; returns the consumers for the driver's clean-up.
    pub fn run(mut self, control: &Receiver<Control>) -> (Outcome, C) {
        loop {
            if !self.consuming && self.pending.is_empty() && self.incoming.take().is_some() {
                debug!("listener handed over its last delivery; closing the incoming queue");
            }
            match self.next_event(control) {
                Event::Op(op) => self.execute(op),
                Event::Control(Some(Control::Stop(done))) => {
                    self.stop_consuming();
                    let _ = done.send(());
                }
                Event::Control(Some(Control::Close)) => {
                    self.stop_consuming();
                    while let Ok(op) = self.ops_rx.try_recv() {
                        self.execute(op);
                    }
                    return (Outcome::Closed, self.consumers);
                }
                Event::Control(None) => {
                    self.stop_consuming();
                    return (Outcome::Abandoned, self.consumers);
                }
                Event::Handed | Event::Idle => {}
                Event::WorkersGone => {
                    warn!(
                        "the server's workers are gone; dropping {} deliveries",
                        self.pending.len()
                    );
                    self.pending.clear();
                    self.incoming = None;
                }
                Event::Item(item) => self.accept(item),
                Event::ConsumerGone => self.lost("consumer channel closed"),
            }
        }
    }

    fn next_event(&mut self, control: &Receiver<Control>) -> Event<C::Item> {
        let mut select = Select::new();
        let ops_index = select.recv(&self.ops_rx);
        let control_index = select.recv(control);
        let send_index = match (&self.incoming, self.pending.is_empty()) {
            (Some(tx), false) => Some(select.send(tx)),
            _ => None,
        };
        let mut first_consumer = usize::MAX;
        if self.consuming && self.pending.len() < PENDING_MAX {
            for receiver in self.consumers.receivers() {
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
        } else if Some(index) == send_index {
            let (Some(tx), Some(item)) = (&self.incoming, self.pending.pop_front()) else {
                return Event::Idle;
            };
            match operation.send(tx, item) {
                Ok(()) => Event::Handed,
                Err(_) => Event::WorkersGone,
            }
        } else {
            let receiver = &self.consumers.receivers()[index - first_consumer];
            operation
                .recv(receiver)
                .map_or(Event::ConsumerGone, Event::Item)
        }
    }

    fn accept(&mut self, item: C::Item) {
        match self.consumers.accept(item) {
            Accepted::Deliver(tag, message) => self.pending.push_back(Incoming {
                message,
                acker: Acker::new(tag, self.generation, self.ops_tx.clone()),
            }),
            Accepted::Skip => {}
            Accepted::Lost(why) => self.lost(&why),
        }
    }

    fn execute(&mut self, op: AckOp) {
        let result = if op.generation == self.generation {
            self.consumers.settle(op.tag, op.kind)
        } else {
            Err(Error::Connection {
                host: self.consumers.location().to_string(),
                source: "the delivery's channel is closed".into(),
            })
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
    fn stop_consuming(&mut self) {
        if !self.consuming {
            return;
        }
        self.consuming = false;
        for item in self.consumers.cancel() {
            self.accept(item);
        }
        debug!(
            "stopped consuming; {} deliveries left to hand over",
            self.pending.len()
        );
    }

    /// The channel or connection is gone: nothing more will arrive, and nothing it delivered
    /// can be acknowledged any more.
    fn lost(&mut self, why: &str) {
        if !self.consuming {
            return;
        }
        error!(
            "listener lost its channel on {}: {why}",
            self.consumers.location()
        );
        self.consuming = false;
        self.generation += 1;
        self.pending.clear();
    }
}
