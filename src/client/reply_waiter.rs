//! oslo's `ReplyWaiter`: routes each reply arriving on the transport's reply queue to the
//! call waiting for its `_msg_id`.
//!
//! A call registers its `_msg_id` before publishing and gets a [`Waiting`] guard holding the
//! receiving end; the reply thread decodes each reply's header, finds the waiting call and
//! hands it the reply. The map is sharded so concurrent callers rarely meet on a lock, and a
//! guard unregisters on drop, so a timed-out or failed call leaves nothing behind. Replies
//! for nobody (late, or after a timeout) are logged at debug and dropped.

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use parking_lot::Mutex;

use crate::driver::RawMessage;
use crate::wire::envelope::ReplyHeader;
use crate::wire::Document;

const SHARDS: usize = 16;

/// A reply for a waiting call.
pub(crate) struct ReplyEvent {
    pub header: ReplyHeader,
    pub doc: Document,
}

pub(crate) struct ReplyWaiter {
    shards: Vec<Mutex<HashMap<String, Sender<ReplyEvent>>>>,
}

impl ReplyWaiter {
    pub fn new() -> ReplyWaiter {
        ReplyWaiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, msg_id: &str) -> &Mutex<HashMap<String, Sender<ReplyEvent>>> {
        // FNV-1a: msg ids are random hex, any spread will do.
        let hash = msg_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    /// Registers a call; replies to `msg_id` go to the returned guard until it is dropped.
    pub fn register(self: &Arc<Self>, msg_id: &str) -> Waiting {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.shard(msg_id).lock().insert(msg_id.to_string(), tx);
        Waiting {
            waiter: self.clone(),
            msg_id: msg_id.to_string(),
            replies: rx,
        }
    }

    /// Number of calls waiting (for tests and diagnostics).
    pub fn waiting(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Routes one message from the reply queue.
    pub fn deliver(&self, message: RawMessage) {
        let doc = match Document::open(message.content_type.as_deref(), message.body) {
            Ok(doc) => doc,
            Err(reason) => {
                warn!(
                    "dropping an unreadable reply: {}",
                    crate::wire::limits::clip(&reason)
                );
                return;
            }
        };
        let header: ReplyHeader = match doc.decode() {
            Ok(header) => header,
            Err(e) => {
                warn!(
                    "dropping an unreadable reply: {}",
                    crate::wire::limits::clip(&e.to_string())
                );
                return;
            }
        };
        let sender = self
            .shard(&header.msg_id)
            .lock()
            .get(&header.msg_id)
            .cloned();
        match sender {
            Some(sender) => {
                let msg_id = header.msg_id.clone();
                if sender.send(ReplyEvent { header, doc }).is_err() {
                    debug!("the call waiting for msg_id {msg_id} just gave up; reply dropped");
                }
            }
            None => debug!(
                "No calling threads waiting for msg_id : {}",
                crate::wire::limits::preview(&header.msg_id)
            ),
        }
    }
}

/// A registered call; unregisters when dropped.
pub(crate) struct Waiting {
    waiter: Arc<ReplyWaiter>,
    msg_id: String,
    pub replies: Receiver<ReplyEvent>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiter.shard(&self.msg_id).lock().remove(&self.msg_id);
    }
}
