//! Where a consumer's channel comes from: a connection of its own (oslo's layout: a reply
//! connection, one listen connection per server), or, with `single_connection`, the
//! transport's send connection, shared with the [`Publisher`].
//!
//! One connection per process halves the connections and their I/O threads: a server's
//! replies and acks then leave through the thread that brought its requests in, and a
//! caller's replies arrive on the connection its request left by. The cost is RabbitMQ's flow
//! control: a connection blocked for publishing (a memory or disk alarm) stops its consumers
//! too. Recovery stays the one path of [`Connection::establish`]: a consumer whose session
//! ended opens its next channel through the publisher, which drops a dead connection when
//! that fails and reconnects (failing over as usual).

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::Channel;

use crate::error::Result;

use super::connection::{AbortHandle, Connection, HostCycle, RetryPolicy, Watchdog};
use super::publisher::Publisher;

/// A consumer's hold on a connection for one session.
pub(crate) enum Link {
    /// A connection of its own.
    Own(Box<Connection>),
    /// The transport's send connection, as it was when this session started.
    Shared {
        publisher: Arc<Publisher>,
        /// The send connection's generation (bumped when it is dropped); set by the first
        /// channel opened, so that a session keeps to one connection.
        generation: Option<u64>,
        /// `host:port`, once known.
        address: String,
    },
}

impl Link {
    /// Connects for a session: a new connection of its own (`shared: None`), or the
    /// transport's send connection, connecting it if needed; within `policy`, pausing with
    /// `pause` as [`Connection::establish`] does.
    pub fn establish(
        shared: Option<&Arc<Publisher>>,
        connect: impl FnOnce(RetryPolicy, &mut dyn FnMut(Duration) -> bool) -> Result<Connection>,
        policy: RetryPolicy,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Result<Link> {
        match shared {
            None => connect(policy, pause).map(|c| Link::Own(Box::new(c))),
            Some(publisher) => {
                publisher.connect(policy, pause)?;
                Ok(Link::Shared {
                    publisher: publisher.clone(),
                    generation: None,
                    address: publisher.address().unwrap_or_default(),
                })
            }
        }
    }

    /// `host:port` of the broker.
    pub fn address(&self) -> &str {
        match self {
            Link::Own(connection) => connection.address(),
            Link::Shared { address, .. } => address,
        }
    }

    /// Opens a channel (on the shared connection: on the one of this session's generation).
    pub fn open_channel(&mut self) -> Result<Channel> {
        match self {
            Link::Own(connection) => connection.open_channel(),
            Link::Shared {
                publisher,
                generation,
                address,
            } => {
                let (channel, opened_on, at) = publisher.open_consumer_channel(*generation)?;
                *generation = Some(opened_on);
                *address = at;
                Ok(channel)
            }
        }
    }

    /// The session lost its channel or connection: an own connection is closed and the next
    /// one starts with the next host. The shared one is left to the publisher: if it is dead,
    /// opening the next session's channel fails and drops it (then the publisher reconnects);
    /// if only this consumer's channel was lost (its queue deleted, say), the others keep it.
    pub fn abandon(self, hosts: &HostCycle) {
        if let Link::Own(connection) = self {
            connection.abandon(hosts);
        }
    }

    /// The session ended cleanly: an own connection is closed; the shared one stays for the
    /// publisher and the other consumers.
    pub fn close(self) {
        if let Link::Own(connection) = self {
            connection.close();
        }
    }

    /// [`close`](Self::close), shutting the socket down if the broker has not answered by
    /// `deadline`.
    pub fn close_by(self, deadline: Instant) {
        if let Link::Own(connection) = self {
            connection.close_by(deadline);
        }
    }

    /// Bounds a teardown (a cancel, a queue's delete, a channel's close) by `deadline`: past
    /// it, the socket of this session's connection is shut down, which ends every wait on it.
    /// `None` if there is nothing to bound (see [`abort_handle`](Self::abort_handle)).
    pub fn watchdog(&self, deadline: Instant, what: &'static str) -> Option<Watchdog> {
        self.abort_handle()
            .map(|abort| abort.watchdog(deadline, what))
    }

    /// What shuts down the socket of this session's connection; `None` if the shared
    /// connection is gone already (waits on it fail at once), or this session opened no
    /// channel on it yet.
    pub fn abort_handle(&self) -> Option<AbortHandle> {
        match self {
            Link::Own(connection) => Some(connection.abort_handle().clone()),
            Link::Shared {
                publisher,
                generation,
                ..
            } => generation.and_then(|g| publisher.abort_handle(g)),
        }
    }
}
