//! The send connection's watchdog (oslo's heartbeat thread).
//!
//! AMQP heartbeats themselves run on amiquip's I/O thread: it sends them and declares the
//! connection dead after two heartbeat intervals without a byte from the broker (a blackholed
//! connection), so a busy application never misses one. What amiquip does not do is tell
//! anybody: an idle connection dies silently. This thread watches the send connection's
//! liveness receiver (disconnected when the I/O thread ends) and, when the connection dies
//! while idle, drops it and reconnects right away, so the next publish finds a live
//! connection. It also passes the broker's `connection.blocked` / `unblocked` (resource alarms)
//! on to the publisher, and logs each once: publishes wait while blocked, bounded by their
//! deadline.
//!
//! Consuming connections (a server's listener, the reply consumer) notice a death through
//! their consumers and reconnect on their own threads.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use amiquip::ConnectionBlockedNotification;
use crossbeam_channel::{Receiver, Select, Sender};
use log::{error, info, warn};

use crate::error::{Error, Result};

use super::connection::{Backoff, RetryPolicy};
use super::publisher::{Publisher, Watch};

/// A running watchdog.
pub(crate) struct Heartbeat {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts watching the connections `publisher` announces on `watch`.
    pub fn start(
        publisher: Arc<Publisher>,
        watch: Receiver<Watch>,
        backoff: Backoff,
    ) -> Result<Heartbeat> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let thread = thread::Builder::new()
            .name("warren-heartbeat".into())
            .spawn(move || run(&publisher, &watch, &stop_rx, &backoff))
            .map_err(|e| Error::server_state(format!("cannot spawn the heartbeat thread: {e}")))?;
        Ok(Heartbeat {
            stop: stop_tx,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop (interrupting a reconnect in progress) without waiting for it.
    pub fn tell_to_stop(&self) {
        // Full: it has been told already.
        let _ = self.stop.try_send(());
    }

    /// Stops the thread (interrupting a reconnect in progress) and joins it.
    pub fn stop(&mut self) {
        self.tell_to_stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the heartbeat thread panicked");
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Event {
    Stop,
    Watch(Watch),
    Notice(ConnectionBlockedNotification),
    Died,
}

fn run(publisher: &Publisher, watch: &Receiver<Watch>, stop: &Receiver<()>, backoff: &Backoff) {
    let mut current: Option<Watch> = None;
    loop {
        let event = {
            let mut select = Select::new();
            let stop_index = select.recv(stop);
            let watch_index = select.recv(watch);
            if let Some((_, liveness)) = &current {
                select.recv(liveness);
            }
            let operation = select.select();
            match operation.index() {
                i if i == stop_index => {
                    let _ = operation.recv(stop);
                    Event::Stop
                }
                i if i == watch_index => match operation.recv(watch) {
                    Ok(w) => Event::Watch(w),
                    Err(_) => Event::Stop,
                },
                _ => match current
                    .as_ref()
                    .map(|(_, liveness)| operation.recv(liveness))
                {
                    Some(Ok(notice)) => Event::Notice(notice),
                    _ => Event::Died,
                },
            }
        };
        match event {
            Event::Stop => return,
            Event::Watch(w) => current = Some(w),
            // Logged after the publisher is told: once the log says so, publishes wait.
            Event::Notice(ConnectionBlockedNotification::Blocked(reason)) => {
                if let Some((generation, _)) = &current {
                    publisher.set_blocked(*generation, Some(reason.clone()));
                }
                warn!("the broker blocked the send connection ({reason}); publishes wait until it unblocks, each within its timeout");
            }
            Event::Notice(ConnectionBlockedNotification::Unblocked) => {
                if let Some((generation, _)) = &current {
                    publisher.set_blocked(*generation, None);
                }
                info!("the broker unblocked the send connection");
            }
            Event::Died => {
                let Some((generation, _)) = current.take() else {
                    continue;
                };
                if publisher.reset_connection(generation) {
                    warn!("the send connection died while idle; reconnecting");
                    let pause = backoff.first_pause();
                    if stop.recv_timeout(pause).is_ok() {
                        return;
                    }
                    // A stop received during the reconnect's pauses ends the reconnect and,
                    // since it was taken from the channel, the thread too.
                    let mut stopped = false;
                    let mut wait = |pause: Duration| {
                        stopped = stop.recv_timeout(pause).is_ok();
                        !stopped
                    };
                    match publisher.connect(RetryPolicy::default(), &mut wait) {
                        Ok(()) | Err(Error::Closed) => {}
                        Err(e) => warn!("could not reconnect the send connection: {e}"),
                    }
                    if stopped {
                        return;
                    }
                }
            }
        }
    }
}
