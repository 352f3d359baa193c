//! oslo's `ReplyWaiter`: routes each reply arriving on the transport's reply queue to the
//! call waiting for its `_msg_id`.
//!
//! A call registers its `_msg_id` before publishing and gets a [`Waiting`] guard holding the
//! receiving end; whoever reads a reply from the reply queue decodes its header, finds the
//! waiting call and hands it the reply. The map is sharded so concurrent callers rarely meet
//! on a lock, and a guard unregisters on drop, so a timed-out or failed call leaves nothing
//! behind. Replies for nobody (late, or after a timeout) are logged at debug and dropped.
//!
//! Who reads the reply queue: a waiting caller itself, whenever the driver offers its
//! consumer's deliveries as a [`ReplyFeed`] (RabbitMQ does). Each waiting caller selects on
//! its own channel and on the feed; the one the feed wakes routes what it read, so a
//! sequential caller gets its reply straight from the connection's I/O thread, without a hop
//! through the reply thread (a leader/follower scheme in which any waiter may lead). While no
//! caller waits, the driver's reply thread reads the feed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use log::{debug, warn};
use parking_lot::{Mutex, RwLock};

use crate::driver::{DirectReplies, RawMessage, ReplyFeed, ReplyRouter};
use crate::wire::envelope::ReplyHeader;
use crate::wire::Document;

const SHARDS: usize = 16;
/// How often a caller with no feed to read (its consumer is reconnecting) looks for a new one.
const FEED_RECHECK: Duration = Duration::from_millis(50);

/// A reply for a waiting call.
pub(crate) struct ReplyEvent {
    pub header: ReplyHeader,
    pub doc: Document,
}

impl ReplyEvent {
    /// Opens a reply and reads its header; `None` (logged) when it cannot be read.
    fn read(message: RawMessage) -> Option<ReplyEvent> {
        let doc = match Document::open(message.content_type.as_deref(), message.body) {
            Ok(doc) => doc,
            Err(reason) => {
                warn!(
                    "dropping an unreadable reply: {}",
                    crate::wire::limits::clip(&reason)
                );
                return None;
            }
        };
        match doc.decode::<ReplyHeader>() {
            Ok(header) => Some(ReplyEvent { header, doc }),
            Err(e) => {
                warn!(
                    "dropping an unreadable reply: {}",
                    crate::wire::limits::clip(&e.to_string())
                );
                None
            }
        }
    }
}

/// Where a call's replies come from.
pub(crate) enum CallReplies {
    /// The transport's reply queue, through the [`ReplyWaiter`].
    Queue(Waiting),
    /// The call's own channel, with direct reply-to.
    Direct {
        /// Locked only by the call's one waiter; the lock makes a pending call `Sync`.
        replies: Mutex<Box<dyn DirectReplies>>,
        /// Counts the call among its transport's waiting calls.
        waiter: Arc<ReplyWaiter>,
    },
}

impl Drop for CallReplies {
    fn drop(&mut self) {
        if let CallReplies::Direct { waiter, .. } = self {
            waiter.direct_calls.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl CallReplies {
    /// The call's next reply (or call-monitor keep-alive); `Ok(None)` once `until` passed, an
    /// error when no reply can reach the call any more.
    pub fn next(&self, msg_id: &str, until: Instant) -> crate::error::Result<Option<ReplyEvent>> {
        let direct = match self {
            CallReplies::Queue(waiting) => return Ok(waiting.next(until)),
            CallReplies::Direct { replies, .. } => replies,
        };
        let mut direct = direct.lock();
        loop {
            let Some(message) = direct.next(until)? else {
                return Ok(None);
            };
            match ReplyEvent::read(message) {
                Some(event) if event.header.msg_id == msg_id => return Ok(Some(event)),
                Some(event) => debug!(
                    "dropping a late reply to msg_id {} on a direct reply-to channel",
                    crate::wire::limits::preview(&event.header.msg_id)
                ),
                None => {}
            }
        }
    }
}

pub(crate) struct ReplyWaiter {
    /// The waiting calls by `_msg_id`, sharded by its hash.
    shards: Vec<Mutex<HashMap<String, Sender<ReplyEvent>>>>,
    /// The reply consumer's deliveries, when its driver offers them to waiting callers.
    feed: RwLock<Option<Arc<dyn ReplyFeed>>>,
    /// Callers in a `select` on the feed now: while there are none, the reply thread reads it.
    readers: AtomicUsize,
    /// A feed was ever offered: a caller finding none (the consumer reconnects) looks again
    /// every [`FEED_RECHECK`] instead of waiting on its own channel alone.
    fed: AtomicBool,
    /// Calls waiting for a reply on their own channel (direct reply-to), counted for
    /// [`waiting`](Self::waiting).
    direct_calls: AtomicUsize,
}

impl ReplyWaiter {
    pub fn new() -> ReplyWaiter {
        ReplyWaiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            feed: RwLock::new(None),
            readers: AtomicUsize::new(0),
            fed: AtomicBool::new(false),
            direct_calls: AtomicUsize::new(0),
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
        let queued: usize = self.shards.iter().map(|s| s.lock().len()).sum();
        queued + self.direct_calls.load(Ordering::Acquire)
    }

    /// A call sent with direct reply-to, counted among the waiting calls until dropped.
    pub fn direct(self: &Arc<Self>, replies: Box<dyn DirectReplies>) -> CallReplies {
        self.direct_calls.fetch_add(1, Ordering::AcqRel);
        CallReplies::Direct {
            replies: Mutex::new(replies),
            waiter: self.clone(),
        }
    }

    /// The feed to read, if one is offered and its consumer still runs.
    fn live_feed(&self) -> Option<Arc<dyn ReplyFeed>> {
        self.feed.read().as_ref().filter(|f| f.is_live()).cloned()
    }

    /// The next reply for `waiting`, reading the feed meanwhile (and routing what it brings
    /// for other calls); `None` once `until` passed without one.
    pub fn next(&self, waiting: &Waiting, until: Instant) -> Option<ReplyEvent> {
        loop {
            // A select takes a ready operation before it looks at its deadline: without this,
            // a backlog of other calls' replies would keep a caller past its own deadline.
            if Instant::now() >= until {
                return waiting.replies.try_recv().ok();
            }
            let Some(feed) = self.live_feed() else {
                let recheck = self.fed.load(Ordering::Acquire);
                let wait_until = match recheck {
                    true => until.min(Instant::now() + FEED_RECHECK),
                    false => until,
                };
                match waiting.replies.recv_deadline(wait_until) {
                    Ok(event) => return Some(event),
                    Err(RecvTimeoutError::Timeout) if recheck && Instant::now() < until => continue,
                    Err(_) => return None,
                }
            };
            let mut select = Select::new();
            let own = select.recv(&waiting.replies);
            feed.register(&mut select);
            self.readers.fetch_add(1, Ordering::AcqRel);
            let chosen = select.select_deadline(until);
            self.readers.fetch_sub(1, Ordering::AcqRel);
            match chosen {
                Ok(operation) if operation.index() == own => {
                    return operation.recv(&waiting.replies).ok()
                }
                Ok(operation) => {
                    if let Some(message) = feed.complete(operation) {
                        self.deliver(message);
                    }
                }
                Err(_) => return waiting.replies.try_recv().ok(),
            }
        }
    }

    /// Routes one message from the reply queue.
    pub fn deliver(&self, message: RawMessage) {
        let Some(ReplyEvent { header, doc }) = ReplyEvent::read(message) else {
            return;
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

impl ReplyRouter for ReplyWaiter {
    fn deliver(&self, message: RawMessage) {
        ReplyWaiter::deliver(self, message);
    }

    fn offer(&self, feed: Option<Arc<dyn ReplyFeed>>) {
        if feed.is_some() {
            self.fed.store(true, Ordering::Release);
        }
        *self.feed.write() = feed;
    }

    fn feed_has_readers(&self) -> bool {
        self.readers.load(Ordering::Acquire) > 0
    }
}

/// A registered call; unregisters when dropped.
pub(crate) struct Waiting {
    waiter: Arc<ReplyWaiter>,
    msg_id: String,
    replies: Receiver<ReplyEvent>,
}

impl Waiting {
    /// The call's next reply (or call-monitor keep-alive); `None` once `until` passed.
    pub fn next(&self, until: Instant) -> Option<ReplyEvent> {
        self.waiter.next(self, until)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiter.shard(&self.msg_id).lock().remove(&self.msg_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::Reply;
    use crate::wire::Codec;
    use crossbeam_channel::SelectedOperation;
    use serde_json::Value;

    /// A reply consumer's feed: `Some` a reply, `None` the consumer gone.
    struct FakeFeed {
        deliveries: Receiver<Option<RawMessage>>,
        live: AtomicBool,
    }

    impl ReplyFeed for FakeFeed {
        fn register<'a>(&'a self, select: &mut Select<'a>) -> usize {
            select.recv(&self.deliveries)
        }

        fn complete(&self, operation: SelectedOperation<'_>) -> Option<RawMessage> {
            match operation.recv(&self.deliveries) {
                Ok(Some(message)) => Some(message),
                _ => {
                    self.live.store(false, Ordering::Release);
                    None
                }
            }
        }

        fn is_live(&self) -> bool {
            self.live.load(Ordering::Acquire)
        }
    }

    fn feed(waiter: &ReplyWaiter) -> Sender<Option<RawMessage>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        waiter.offer(Some(Arc::new(FakeFeed {
            deliveries: rx,
            live: AtomicBool::new(true),
        })));
        tx
    }

    fn reply(msg_id: &str, result: &str) -> RawMessage {
        let body = Codec::Json
            .encode(&Reply {
                result: Some(&result),
                failure: None,
                ending: true,
                msg_id,
                unique_id: "u",
            })
            .expect("encodes");
        RawMessage {
            body,
            content_type: Some(Codec::Json.content_type().into()),
            routing_key: String::new(),
            queue: String::new(),
            attempts: 0,
            reply_to: None,
        }
    }

    fn result(event: ReplyEvent) -> String {
        event.doc.decode::<Value>().expect("decodes")["result"]
            .as_str()
            .expect("a string result")
            .to_string()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn a_caller_reads_its_reply_from_the_feed_itself() {
        let waiter = Arc::new(ReplyWaiter::new());
        let feed = feed(&waiter);
        let waiting = waiter.register("a");
        feed.send(Some(reply("a", "mine"))).unwrap();
        assert_eq!(waiting.next(soon()).map(result).as_deref(), Some("mine"));
    }

    #[test]
    fn a_caller_routes_what_it_reads_for_another_call() {
        let waiter = Arc::new(ReplyWaiter::new());
        let feed = feed(&waiter);
        let (a, b) = (waiter.register("a"), waiter.register("b"));
        feed.send(Some(reply("b", "for b"))).unwrap();
        feed.send(Some(reply("a", "for a"))).unwrap();
        // `a` reads both: b's goes to b's channel, where b finds it without the feed.
        assert_eq!(a.next(soon()).map(result).as_deref(), Some("for a"));
        waiter.offer(None);
        let started = Instant::now();
        assert_eq!(b.next(soon()).map(result).as_deref(), Some("for b"));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_reply_for_nobody_is_dropped() {
        let waiter = Arc::new(ReplyWaiter::new());
        let feed = feed(&waiter);
        let a = waiter.register("a");
        feed.send(Some(reply("gone", "late"))).unwrap();
        feed.send(Some(reply("a", "mine"))).unwrap();
        assert_eq!(a.next(soon()).map(result).as_deref(), Some("mine"));
        assert_eq!(waiter.waiting(), 1);
    }

    #[test]
    fn the_wait_ends_at_its_deadline() {
        let waiter = Arc::new(ReplyWaiter::new());
        let _feed = feed(&waiter);
        let a = waiter.register("a");
        let started = Instant::now();
        assert!(a.next(started + Duration::from_millis(50)).is_none());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
    }

    #[test]
    fn a_backlog_of_other_replies_does_not_keep_a_caller_past_its_deadline() {
        let waiter = Arc::new(ReplyWaiter::new());
        let feed = feed(&waiter);
        let (a, _b) = (waiter.register("a"), waiter.register("b"));
        for _ in 0..3 {
            feed.send(Some(reply("b", "for b"))).unwrap();
        }
        assert!(a.next(Instant::now()).is_none());
        assert_eq!(feed.len(), 3, "read past the deadline");
        // Its own reply, already routed to it, is still taken at the deadline.
        waiter.deliver(reply("a", "mine"));
        assert_eq!(a.next(Instant::now()).map(result).as_deref(), Some("mine"));
    }

    #[test]
    fn a_caller_whose_feed_is_gone_still_gives_up_at_its_deadline() {
        let waiter = Arc::new(ReplyWaiter::new());
        let old = feed(&waiter);
        old.send(None).unwrap();
        let a = waiter.register("a");
        // Reads the loss, then waits on its own slot, looking for a new feed now and then.
        let started = Instant::now();
        assert!(a.next(started + Duration::from_millis(120)).is_none());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(120), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn a_lost_feed_is_left_and_the_next_one_is_found() {
        let waiter = Arc::new(ReplyWaiter::new());
        let old = feed(&waiter);
        let a = waiter.register("a");
        let reader = {
            let waiter = waiter.clone();
            let a = a;
            std::thread::spawn(move || {
                let got = a.next(soon()).map(result);
                drop(waiter);
                got
            })
        };
        // The consumer is gone: the caller stops reading that feed...
        old.send(None).unwrap();
        crate::test_support::eventually("the feed is left", || waiter.live_feed().is_none());
        // ...and reads the one offered after the reconnection.
        let new = feed(&waiter);
        new.send(Some(reply("a", "after"))).unwrap();
        assert_eq!(reader.join().unwrap().as_deref(), Some("after"));
    }

    /// A direct reply-to channel: what it received, then `Err` if `lost`.
    struct FakeChannel {
        received: std::collections::VecDeque<RawMessage>,
        lost: bool,
    }

    impl DirectReplies for FakeChannel {
        fn next(&mut self, _until: Instant) -> crate::error::Result<Option<RawMessage>> {
            match self.received.pop_front() {
                Some(message) => Ok(Some(message)),
                None if self.lost => Err(crate::error::Error::Closed),
                None => Ok(None),
            }
        }
    }

    fn direct_call(
        waiter: &Arc<ReplyWaiter>,
        received: Vec<RawMessage>,
        lost: bool,
    ) -> CallReplies {
        waiter.direct(Box::new(FakeChannel {
            received: received.into(),
            lost,
        }))
    }

    #[test]
    fn a_direct_call_skips_late_replies_to_earlier_calls_on_its_channel() {
        let waiter = Arc::new(ReplyWaiter::new());
        let call = direct_call(
            &waiter,
            vec![reply("earlier", "late"), reply("a", "mine")],
            false,
        );
        let got = call.next("a", soon()).expect("no error");
        assert_eq!(got.map(result).as_deref(), Some("mine"));
        assert!(call.next("a", soon()).expect("no error").is_none());
    }

    #[test]
    fn a_direct_call_counts_as_waiting_until_dropped() {
        let waiter = Arc::new(ReplyWaiter::new());
        let call = direct_call(&waiter, Vec::new(), false);
        let queued = waiter.register("q");
        assert_eq!(waiter.waiting(), 2);
        drop(call);
        assert_eq!(waiter.waiting(), 1);
        drop(queued);
        assert_eq!(waiter.waiting(), 0);
    }

    #[test]
    fn a_direct_call_whose_channel_is_gone_fails_at_once() {
        let waiter = Arc::new(ReplyWaiter::new());
        let call = direct_call(&waiter, vec![reply("earlier", "late")], true);
        assert!(call.next("a", soon()).is_err());
    }

    #[test]
    fn while_a_caller_reads_the_feed_it_counts_as_a_reader() {
        let waiter = Arc::new(ReplyWaiter::new());
        let feed = feed(&waiter);
        assert!(!waiter.feed_has_readers());
        let a = waiter.register("a");
        let reader = {
            let waiter = waiter.clone();
            std::thread::spawn(move || {
                let got = a.next(soon()).map(result);
                drop(waiter);
                got
            })
        };
        crate::test_support::eventually("a reader", || waiter.feed_has_readers());
        feed.send(Some(reply("a", "x"))).unwrap();
        assert_eq!(reader.join().unwrap().as_deref(), Some("x"));
        assert!(!waiter.feed_has_readers());
    }
}
