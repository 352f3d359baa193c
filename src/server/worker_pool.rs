//! The worker pool: N threads taking deliveries from a listener's bounded incoming queue and
//! handing each to the service's [`Handler`] (RPC dispatch, notification dispatch).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Receiver;
use log::error;

use crate::driver::{IdleWorkers, Incoming};
use crate::error::{Error, Result};

/// What a worker does with one delivery: decode it, settle it (ack, reject, requeue), run it.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, incoming: Incoming);
}

/// Starts `count` workers; they exit when the incoming queue is closed and drained. With
/// `idle` (the listener acknowledges on hand-off), each worker says when it waits for work.
pub(crate) fn spawn(
    handler: Arc<dyn Handler>,
    incoming: Receiver<Incoming>,
    count: usize,
    idle: Option<Arc<IdleWorkers>>,
) -> Result<Vec<JoinHandle<()>>> {
    if let Some(idle) = &idle {
        idle.reset();
    }
    (0..count)
        .map(|i| {
            let handler = handler.clone();
            let incoming = incoming.clone();
            let idle = idle.clone();
            thread::Builder::new()
                .name(format!("warren-worker-{i}"))
                .spawn(move || loop {
                    if let Some(idle) = &idle {
                        idle.worker_idle();
                    }
                    let Ok(message) = incoming.recv() else {
                        break;
                    };
                    // Handler panics are already failures; this keeps the worker alive
                    // through a panic anywhere else (a result's Serialize impl, say).
                    if catch_unwind(AssertUnwindSafe(|| handler.handle(message))).is_err() {
                        error!("a message's processing panicked; the worker carries on");
                    }
                })
                .map_err(|e| Error::server_state(format!("cannot spawn worker thread: {e}")))
        })
        .collect()
}
