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
            Err(RecvTimeoutError::Timeout) => {}
        }
        // After every command too, not only when waiting for one timed out: commands of other
        // calls arriving faster than they are handled would otherwise hold keep-alives back.
        send_due(transport, &mut active);
    }
}

/// Sends the keep-alives that are due and schedules each call's next one; a call whose
/// keep-alive could not be delivered gets no more.
fn send_due(transport: &Transport, active: &mut HashMap<u64, Active>) {
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
                debug!(
                    "call-monitor keep-alive for {} failed ({e}); no more for this call",
                    call.caller.msg_id
                );
                active.remove(&id);
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

    const INTERVAL: Duration = Duration::from_millis(100);

    /// A transport on its own in-process broker, a tap on it, and a reply queue that exists.
    fn broker(name: &str) -> (Transport, crate::MemoryTap, String) {
        let transport = Transport::new(&format!("memory://unit-call-monitor-{name}/")).unwrap();
        let tap = transport.memory_tap().unwrap();
        let reply_q = transport
            .driver()
            .reply_queue(&SendOptions::default())
            .unwrap();
        (transport, tap, reply_q)
    }

    /// A monitor on [`broker`]'s transport, the tap, and the reply queue.
    fn monitored(name: &str) -> (CallMonitor, crate::MemoryTap, String) {
        let (transport, tap, reply_q) = broker(name);
        (CallMonitor::start(transport).unwrap(), tap, reply_q)
    }

    fn caller(reply_q: &str) -> Caller {
        Caller {
            codec: Codec::Json,
            msg_id: "m1".into(),
            reply_q: reply_q.into(),
        }
    }

    /// When each keep-alive reached the tap, from `since`: those that come `within`, at most
    /// `most`.
    fn keep_alives(
        tap: &crate::MemoryTap,
        since: Instant,
        within: Duration,
        most: usize,
    ) -> Vec<Duration> {
        let deadline = Instant::now() + within;
        let mut at = Vec::new();
        while at.len() < most {
            let Some(message) =
                tap.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                break;
            };
            let fields = message.message().unwrap();
            assert_eq!(
                fields["ending"], false,
                "a keep-alive does not end the call"
            );
            assert_eq!(fields["_msg_id"], "m1");
            assert!(fields.get("result").is_none_or(serde_json::Value::is_null));
            at.push(since.elapsed());
        }
        at
    }

    #[test]
    fn keep_alives_come_every_interval_until_the_watch_ends() {
        let (monitor, tap, reply_q) = monitored("every");
        let started = Instant::now();
        let watch = monitor.watch(caller(&reply_q), INTERVAL);
        // Three keep-alives, however late a starved thread makes them (a run at nice 19 beside
        // stress-ng once saw one in 5.5 intervals), but never early: the k-th is sent at least
        // k intervals after the watch began.
        let at = keep_alives(&tap, started, Duration::from_secs(10), 3);
        assert_eq!(at.len(), 3, "keep-alives keep coming: {at:?}");
        for (k, sent) in (1..).zip(&at) {
            assert!(*sent >= k * INTERVAL, "keep-alive {k} came early: {at:?}");
        }
        drop(watch);
        // Whatever was published before the watch ended is in the tap already: left out, so
        // that a test thread starved here does not count it. One may have been due as the
        // watch ended; then none.
        tap.drain();
        let after = keep_alives(&tap, started, 4 * INTERVAL, usize::MAX);
        assert!(
            after.len() <= 1,
            "keep-alives after the watch ended: {after:?}"
        );
    }

    #[test]
    fn a_keep_alive_nobody_can_receive_ends_that_calls_keep_alives_only() {
        let (monitor, tap, reply_q) = monitored("gone");
        let gone = monitor.watch(caller("reply_nobody"), INTERVAL);
        let started = Instant::now();
        let kept = monitor.watch(caller(&reply_q), INTERVAL);
        // Until the kept call's third keep-alive, however late a starved thread makes it: by
        // then a gone call still watched would have had its second and third too.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut to_gone, mut to_kept) = (0, 0);
        while to_kept < 3 {
            let Some(message) =
                tap.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                break;
            };
            if message.routing_key == "reply_nobody" {
                assert!(
                    message.mandatory,
                    "only a mandatory keep-alive can find the caller gone"
                );
                assert!(message.queues.is_empty());
                to_gone += 1;
            } else {
                to_kept += 1;
            }
        }
        assert_eq!(to_gone, 1, "tried once, then no more");
        assert_eq!(
            to_kept,
            3,
            "the other call's keep-alives go on ({to_kept} in {:?})",
            started.elapsed()
        );
        drop((gone, kept));
    }

    #[test]
    fn keep_alives_to_a_direct_reply_to_address_are_not_mandatory() {
        let (monitor, tap, _) = monitored("direct");
        let watch = monitor.watch(caller(&format!("{DIRECT_REPLY_TO}.g1")), INTERVAL);
        let message = tap.recv_timeout(10 * INTERVAL).expect("a keep-alive");
        assert!(!message.mandatory);
        drop(watch);
    }

    /// A backlog of other calls' commands does not hold a due keep-alive back: the monitor
    /// sends what is due after every command, not only when waiting for one timed out. Here
    /// the watched call ends at the end of the backlog, so a monitor that sent keep-alives
    /// only when the command channel stayed empty would send it none.
    #[test]
    fn a_backlog_of_commands_does_not_hold_keep_alives_back() {
        let (transport, tap, reply_q) = broker("backlog");
        let (commands, received) = crossbeam_channel::unbounded();
        let send = |command| commands.send(command).unwrap();
        send(Command::Watch {
            id: 1,
            caller: caller(&reply_q),
            interval: Duration::from_millis(1),
        });
        // Handling these takes far longer than a millisecond (tens of nanoseconds each at the
        // least; a slow or loaded machine only takes longer): the keep-alive falls due among
        // them.
        for other in 2..200_002 {
            send(Command::Done(other));
        }
        send(Command::Done(1));
        drop(commands);
        run(&transport, &received);
        let message = tap
            .try_recv()
            .expect("a keep-alive while the backlog was handled");
        assert_eq!(message.message().unwrap()["_msg_id"], "m1");
    }

    #[test]
    fn stopping_the_monitor_ends_its_thread_and_its_keep_alives() {
        let (mut monitor, tap, reply_q) = monitored("stop");
        std::mem::forget(monitor.watch(caller(&reply_q), INTERVAL));
        tap.recv_timeout(10 * INTERVAL).expect("a keep-alive");
        assert!(monitor.thread.is_some(), "running");
        monitor.stop();
        assert!(monitor.thread.is_none(), "joined");
        tap.drain();
        assert_eq!(
            tap.recv_timeout(3 * INTERVAL),
            None,
            "no keep-alive after stop"
        );
    }
}
