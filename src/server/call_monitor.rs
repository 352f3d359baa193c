//! Call monitoring (oslo's `call_monitor_timeout`): while a handler runs a call whose caller
//! sent `_timeout: N` (N ≥ 2), the server sends a keep-alive reply (`ending: false`, no result,
//! no failure) every N/2 seconds, so the caller's monitor timer keeps restarting and a long
//! call is told apart from a lost one.
//!
//! One thread per running server keeps every active call's schedule (oslo starts a watchdog
//! thread per call). A keep-alive that cannot be delivered (the reply queue is gone) ends that
//! call's keep-alives, as in oslo.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, warn};

use crate::driver::{Outgoing, Route, SendOptions, DIRECT_REPLY_TO};
use crate::error::{Error, Result};
use crate::transport::Transport;
use crate::wire::envelope::Reply;
use crate::wire::Codec;

/// How long a keep-alive may take to be confirmed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The keep-alive interval for a caller's `_timeout` (oslo: `int(timeout) / 2`, ignored when
/// under a second).
pub(crate) fn keep_alive_interval(monitor_timeout: Duration) -> Option<Duration> {
    let interval = Duration::from_secs(monitor_timeout.as_secs()) / 2;
    (interval >= Duration::from_secs(1)).then_some(interval)
}

/// Where a call's keep-alives go.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub codec: Codec,
    pub msg_id: String,
    pub reply_q: String,
}

enum Command {
    Watch {
        id: u64,
        caller: Caller,
        interval: Duration,
    },
    Done(u64),
}

/// The monitor thread of a running server.
pub(crate) struct CallMonitor {
    commands: Option<Sender<Command>>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl CallMonitor {
    pub fn start(transport: Transport) -> Result<CallMonitor> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = thread::Builder::new()
            .name("warren-call-monitor".into())
            .spawn(move || run(&transport, &rx))
            .map_err(|e| {
                Error::server_state(format!("cannot spawn the call-monitor thread: {e}"))
            })?;
        Ok(CallMonitor {
            commands: Some(tx),
            next_id: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    /// Sends keep-alives to `caller` every `interval` until the returned guard is dropped.
    pub fn watch(&self, caller: Caller, interval: Duration) -> Watch<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(commands) = &self.commands {
            let _ = commands.send(Command::Watch {
                id,
                caller,
                interval,
            });
        }
        Watch { monitor: self, id }
    }

    /// Stops the thread and joins it.
    pub fn stop(&mut self) {
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the call-monitor thread panicked");
            }
        }
    }
}

impl Drop for CallMonitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keep-alives of one call; they stop when this is dropped.
pub(crate) struct Watch<'a> {
    monitor: &'a CallMonitor,
    id: u64,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(commands) = &self.monitor.commands {
            let _ = commands.send(Command::Done(self.id));
        }
    }
}

struct Active {
    caller: Caller,
    interval: Duration,
    due: Instant,
}

fn run(transport: &Transport, commands: &Receiver<Command>) {
    let mut active: HashMap<u64, Active> = HashMap::new();
    loop {
        let next_due = active.values().map(|a| a.due).min();
        let command = match next_due {
            Some(due) => commands.recv_deadline(due),
            None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match command {
            Ok(Command::Watch {
                id,
                caller,
                interval,
            }) => {
                let due = Instant::now() + interval;
                active.insert(
                    id,
                    Active {
                        caller,
                        interval,
                        due,
                    },
                );
            }
            Ok(Command::Done(id)) => {
                active.remove(&id);
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let due: Vec<u64> = active
                    .iter()
                    .filter(|(_, a)| a.due <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    let Some(call) = active.get_mut(&id) else {
                        continue;
                    };
                    match keep_alive(transport, &call.caller) {
                        Ok(()) => call.due = Instant::now() + call.interval,
                        Err(e) => {
                            debug!("call-monitor keep-alive for {} failed ({e}); no more for this call", call.caller.msg_id);
                            active.remove(&id);
                        }
                    }
                }
            }
        }
    }
}

fn keep_alive(transport: &Transport, caller: &Caller) -> Result<()> {
    let unique_id = crate::id::new_id();
    let body = caller.codec.encode(&Reply {
        result: None,
        failure: None,
        ending: false,
        msg_id: &caller.msg_id,
        unique_id: &unique_id,
    })?;
    let outgoing = Outgoing {
        route: Route::Direct {
            queue: &caller.reply_q,
        },
        body: &body,
        codec: caller.codec,
        expiration: None,
        // RabbitMQ 3.10 returns every mandatory publish to a direct reply-to address as
        // unroutable, delivered or not: there, a gone caller cannot be detected.
        mandatory: !caller.reply_q.starts_with(DIRECT_REPLY_TO),
        redelivery: None,
        declare_queue: None,
    };
    let options = SendOptions {
        deadline: Some(Instant::now() + SEND_TIMEOUT),
        retry: Some(0),
        unconfirmed: false,
    };
    transport.send(&outgoing, &options).inspect_err(|e| {
        if !matches!(e, Error::Undeliverable { .. }) {
            warn!(
                "could not send a call-monitor keep-alive to {}: {e}",
                caller.reply_q
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_oslo() {
        let s = Duration::from_secs;
        assert_eq!(keep_alive_interval(s(2)), Some(s(1)));
        assert_eq!(keep_alive_interval(s(5)), Some(Duration::from_millis(2500)));
        assert_eq!(
            keep_alive_interval(Duration::from_millis(3900)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(keep_alive_interval(Duration::from_millis(1999)), None);
        assert_eq!(keep_alive_interval(Duration::ZERO), None);
    }
}
