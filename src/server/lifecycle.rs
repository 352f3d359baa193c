//! `start`, `stop` and `wait` of a consuming service (an RPC server, a notification listener),
//! oslo's `MessageHandlingServer`: a listener (poll thread) feeding a worker pool through a
//! bounded queue.
//!
//! The methods may be called from different threads. `stop` returns once nothing new is
//! taken; `wait` waits for `stop` (from any thread), lets the workers finish what was taken,
//! then closes the listener: afterwards no thread, consumer, channel or connection of the
//! service remains. A stopped service can be started again.

use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error};
use parking_lot::{Condvar, Mutex};

use crate::driver::{ListenSpec, Listener};
use crate::error::{Error, Result};
use crate::server::worker_pool::{self, Handler};
use crate::transport::Transport;

enum State {
    Idle,
    Running(Box<Running>),
    Stopped(Box<Running>),
    Waiting,
}

struct Running {
    listener: Box<dyn Listener>,
    workers: Vec<JoinHandle<()>>,
    /// Dropped once the workers are joined (it may own threads of its own).
    handler: Arc<dyn Handler>,
}

pub(crate) struct Lifecycle {
    label: String,
    state: Mutex<State>,
    changed: Condvar,
}

impl Lifecycle {
    pub fn new(label: String) -> Lifecycle {
        Lifecycle {
            label,
            state: Mutex::new(State::Idle),
            changed: Condvar::new(),
        }
    }

    /// Starts the workers, then the listener of `spec`; `handler` is made only when actually
    /// starting. Starting a running service does nothing; a stopped one must be waited first.
    pub fn start(
        &self,
        transport: &Transport,
        spec: &ListenSpec,
        workers: usize,
        handler: impl FnOnce() -> Result<Arc<dyn Handler>>,
    ) -> Result<()> {
        let mut state = self.state.lock();
        while matches!(*state, State::Waiting) {
            self.changed.wait(&mut state);
        }
        match &*state {
            State::Running(_) => return Ok(()),
            State::Stopped(_) => {
                return Err(Error::server_state(format!(
                    "{} was stopped; call wait() before starting it again",
                    self.label
                )))
            }
            State::Idle | State::Waiting => {}
        }
        let handler = handler()?;
        // With ack on hand-off the queue is a rendezvous (the listener claims an idle worker,
        // acknowledges, and hands the delivery straight to it); without, one per worker.
        let capacity = if spec.ack_on_handoff.is_some() {
            0
        } else {
            workers
        };
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let idle = spec
            .ack_on_handoff
            .as_ref()
            .map(|screen| screen.idle.clone());
        let threads = worker_pool::spawn(handler.clone(), rx, workers, idle)?;
        let listener = match spec
            .check_names()
            .and_then(|()| transport.driver().listen(spec, tx))
        {
            Ok(listener) => listener,
            Err(e) => {
                // The workers exit: the only sender is gone.
                for worker in threads {
                    let _ = worker.join();
                }
                return Err(e);
            }
        };
        *state = State::Running(Box::new(Running {
            listener,
            workers: threads,
            handler,
        }));
        self.changed.notify_all();
        debug!("{} started", self.label);
        Ok(())
    }

    /// Stops consuming; `false` if it was not running.
    pub fn stop(&self) -> bool {
        let mut state = self.state.lock();
        if !matches!(*state, State::Running(_)) {
            return false;
        }
        if let State::Running(mut running) = std::mem::replace(&mut *state, State::Idle) {
            running.listener.stop();
            *state = State::Stopped(running);
            self.changed.notify_all();
        }
        true
    }

    /// Waits for a stop, then for the workers, then closes the listener.
    pub fn wait(&self) {
        let running = {
            let mut state = self.state.lock();
            loop {
                match std::mem::replace(&mut *state, State::Idle) {
                    State::Stopped(running) => {
                        *state = State::Waiting;
                        break running;
                    }
                    State::Running(running) => {
                        *state = State::Running(running);
                        self.changed.wait(&mut state);
                    }
                    State::Waiting => {
                        *state = State::Waiting;
                        self.changed.wait(&mut state);
                    }
                    State::Idle => return,
                }
            }
        };
        let Running {
            listener,
            workers,
            handler,
        } = *running;
        for worker in workers {
            if worker.join().is_err() {
                error!("a worker of {} panicked", self.label);
            }
        }
        drop(handler);
        listener.close();
        *self.state.lock() = State::Idle;
        self.changed.notify_all();
        debug!("{} finished", self.label);
    }

    pub fn is_running(&self) -> bool {
        matches!(*self.state.lock(), State::Running(_))
    }

    pub fn is_consuming(&self) -> bool {
        match &*self.state.lock() {
            State::Running(running) => running.listener.is_consuming(),
            _ => false,
        }
    }
}
