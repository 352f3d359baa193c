//! Where a message goes (client side) or what a server listens to (server side).

use crate::error::{Error, Result};

/// oslo.messaging's `Target`: exchange, topic, server, fanout, namespace and version.
///
/// * `exchange`: `None` means the transport's `control_exchange`.
/// * `topic`: required to send; servers consume the queue `<topic>` (shared, round-robin).
/// * `server`: client side, send to `<topic>.<server>` only; server side, the server's name.
/// * `fanout`: client side, cast to every server listening on the topic.
/// * `namespace`: the interface name sent with the request (omitted when `None`).
/// * `version`: client side, the minimum version the server must implement (`"X.Y"`).
///
/// ```
/// use warren::Target;
///
/// let to_host = Target::new("compute").with_server("host-1").with_version("4.0");
/// assert_eq!(to_host.routing_key().unwrap(), "compute.host-1");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Target {
    /// Exchange; `None` means the transport's control exchange.
    pub exchange: Option<String>,
    /// Topic.
    pub topic: Option<String>,
    /// Server name.
    pub server: Option<String>,
    /// Cast to all servers of the topic.
    pub fanout: bool,
    /// Interface namespace.
    pub namespace: Option<String>,
    /// Requested (client) version, `"X.Y"` or `"X.Y.Z"`.
    pub version: Option<String>,
}

impl Target {
    /// A target for `topic`.
    pub fn new(topic: impl Into<String>) -> Target {
        Target {
            topic: Some(topic.into()),
            ..Target::default()
        }
    }

    /// Sets the exchange.
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Target {
        self.exchange = Some(exchange.into());
        self
    }

    /// Sets the server name.
    pub fn with_server(mut self, server: impl Into<String>) -> Target {
        self.server = Some(server.into());
        self
    }

    /// Sets or clears fanout.
    pub fn with_fanout(mut self, fanout: bool) -> Target {
        self.fanout = fanout;
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Target {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Target {
        self.version = Some(version.into());
        self
    }

    /// The topic, or [`Error::InvalidTarget`] if there is none (or it is empty).
    pub fn require_topic(&self) -> Result<&str> {
        match self.topic.as_deref() {
            Some(t) if !t.is_empty() => Ok(t),
            _ => Err(Error::invalid_target("a topic is required")),
        }
    }

    /// The routing key a call or cast uses: `<topic>` or `<topic>.<server>`.
    pub fn routing_key(&self) -> Result<String> {
        let topic = self.require_topic()?;
        Ok(match self.server.as_deref() {
            Some(server) if !server.is_empty() => format!("{topic}.{server}"),
            _ => topic.to_string(),
        })
    }
}
