//! Typed transport options, settable from the URL query or from Rust.
//!
//! URL query keys use oslo.messaging's option names where oslo has the option, so a
//! `transport_url` from a nova.conf keeps working; `codec` is warren's own.
//!
//! | query key | meaning | default |
//! |---|---|---|
//! | `control_exchange` | exchange used when a target names none | `openstack` |
//! | `heartbeat_timeout_threshold` | AMQP heartbeat in seconds (0 disables) | `60` |
//! | `rpc_response_timeout` | default call timeout in seconds (decimals allowed) | `60` |
//! | `rabbit_qos_prefetch_count` | unacknowledged deliveries per consumer (0 = unbounded) | `64` |
//! | `executor_thread_pool_size` | worker threads per server | `16` |
//! | `codec` | `msgpack` or `json` (oslo wire format) for what this transport sends | `msgpack` |
//! | `rabbit_transient_queues_ttl` | `x-expires` of reply and fanout queues in seconds (0 = none) | `1800` |
//! | `amqp_durable_queues` | durable topic exchange and server queues | `false` |
//! | `amqp_auto_delete` | auto-delete topic exchange and server queues | `false` |
//! | `rabbit_retry_interval` | pause after the first failed pass over the hosts, seconds | `1` |
//! | `rabbit_retry_backoff` | added to the pause after each further failed pass, seconds | `2` |
//! | `rabbit_interval_max` | longest pause between passes, seconds | `30` |
//! | `kombu_reconnect_splay` | random extra pause (0 to this), seconds: real jitter | `1` |
//! | `kombu_failover_strategy` | `round-robin` (from the first host) or `shuffle` | `round-robin` |
//! | `kombu_missing_consumer_retry_timeout` | how long a reply to a missing reply queue is retried, seconds | `60` |
//! | `max_message_size` | largest message body sent or accepted, bytes | `16777216` (16 MiB) |
//!
//! Booleans accept `true/false`, `yes/no`, `on/off`, `1/0` (any case), as oslo.config does.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::wire::Codec;

/// Every option a transport understands, with its value.
///
/// Build one with [`TransportBuilder`](crate::TransportBuilder); read it back with
/// [`Transport::options`](crate::Transport::options).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TransportOptions {
    /// Exchange used when a [`Target`](crate::Target) has no exchange (oslo's `control_exchange`).
    pub control_exchange: String,
    /// AMQP heartbeat interval proposed to the broker; zero disables heartbeats.
    pub heartbeat: Duration,
    /// Default timeout of a call (oslo's `rpc_response_timeout`).
    pub rpc_response_timeout: Duration,
    /// `basic.qos` prefetch per consumer: how many unacknowledged deliveries the broker may push
    /// to one consumer. Zero means unbounded (oslo's default, a known memory hazard).
    pub prefetch_count: u16,
    /// Worker threads of each [`RpcServer`](crate::RpcServer).
    pub workers: usize,
    /// Codec of the messages this transport sends. Servers read both codecs and reply in the
    /// request's codec.
    pub codec: Codec,
    /// `x-expires` of reply and fanout queues; zero declares them without `x-expires`.
    pub transient_queues_ttl: Duration,
    /// Declare the topic exchange and the server queues durable (oslo's `amqp_durable_queues`).
    pub durable_queues: bool,
    /// Declare the topic exchange and the server queues auto-delete (oslo's `amqp_auto_delete`).
    pub auto_delete: bool,
    /// Pause after the first failed pass over the hosts (kombu's `interval_start`).
    pub retry_interval: Duration,
    /// Added to the pause after each further failed pass (kombu's `interval_step`).
    pub retry_backoff: Duration,
    /// Longest pause between passes (kombu's `interval_max`).
    pub interval_max: Duration,
    /// Every pause gets a random extra of 0 to this, so that many clients losing the same broker
    /// do not reconnect in lockstep. (oslo's option of this name only changes a log line.)
    pub reconnect_splay: Duration,
    /// Which host to try next after a connection failure.
    pub failover_strategy: FailoverStrategy,
    /// How long a server retries a reply whose reply queue does not exist (every 250 ms); after
    /// that the queue is remembered as gone for a minute and replies to it are dropped.
    pub missing_consumer_retry_timeout: Duration,
    /// Largest message body, in bytes, this transport sends (a larger one fails with
    /// [`Error::Encode`](crate::Error::Encode) before anything is published) or serves (a larger
    /// request gets a `MessageTooLarge` failure reply if it is a call, and is dropped if it is
    /// a cast). warren's own option; the default is RabbitMQ 4.x's `max_message_size`, the
    /// broker's own bound on what reaches warren at all.
    pub max_message_size: usize,
}

/// How a transport moves between the hosts of its URL after a connection failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailoverStrategy {
    /// Try the hosts in URL order, starting with the first, going on from the one that failed.
    RoundRobin,
    /// Try the hosts in a new random order on every pass.
    Shuffle,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            control_exchange: "openstack".into(),
            heartbeat: Duration::from_secs(60),
            rpc_response_timeout: Duration::from_secs(60),
            prefetch_count: 64,
            workers: 16,
            codec: Codec::MsgPack,
            transient_queues_ttl: Duration::from_secs(1800),
            durable_queues: false,
            auto_delete: false,
            retry_interval: Duration::from_secs(1),
            retry_backoff: Duration::from_secs(2),
            interval_max: Duration::from_secs(30),
            reconnect_splay: Duration::from_secs(1),
            failover_strategy: FailoverStrategy::RoundRobin,
            missing_consumer_retry_timeout: Duration::from_secs(60),
            max_message_size: crate::wire::limits::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// The URL query keys [`TransportOptions::apply`] accepts.
pub const OPTION_NAMES: &[&str] = &[
    "control_exchange",
    "heartbeat_timeout_threshold",
    "rpc_response_timeout",
    "rabbit_qos_prefetch_count",
    "executor_thread_pool_size",
    "codec",
    "rabbit_transient_queues_ttl",
    "amqp_durable_queues",
    "amqp_auto_delete",
    "rabbit_retry_interval",
    "rabbit_retry_backoff",
    "rabbit_interval_max",
    "kombu_reconnect_splay",
    "kombu_failover_strategy",
    "kombu_missing_consumer_retry_timeout",
    "max_message_size",
];

impl TransportOptions {
    /// Sets one option from its URL query form, validating the value.
    ///
    /// ```
    /// use warren::TransportOptions;
    ///
    /// let mut options = TransportOptions::default();
    /// options.apply("rabbit_qos_prefetch_count", "10")?;
    /// assert_eq!(options.prefetch_count, 10);
    /// assert!(options.apply("rabbit_qos_prefetch_count", "lots").is_err());
    /// assert!(options.apply("no_such_option", "1").is_err());
    /// # Ok::<(), warren::Error>(())
    /// ```
    pub fn apply(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "control_exchange" => {
                if value.is_empty() {
                    return Err(Error::invalid_option(name, "must not be empty"));
                }
                self.control_exchange = value.to_string();
            }
            "heartbeat_timeout_threshold" => {
                self.heartbeat = Duration::from_secs(u64::from(parse_int::<u16>(name, value)?));
            }
            "rpc_response_timeout" => self.rpc_response_timeout = parse_seconds(name, value)?,
            "rabbit_qos_prefetch_count" => self.prefetch_count = parse_int(name, value)?,
            "executor_thread_pool_size" => {
                let workers: usize = parse_int(name, value)?;
                if workers == 0 {
                    return Err(Error::invalid_option(name, "must be at least 1"));
                }
                self.workers = workers;
            }
            "codec" => self.codec = value.parse()?,
            "rabbit_transient_queues_ttl" => {
                self.transient_queues_ttl =
                    Duration::from_secs(u64::from(parse_int::<u32>(name, value)?));
            }
            "amqp_durable_queues" => self.durable_queues = parse_bool(name, value)?,
            "amqp_auto_delete" => self.auto_delete = parse_bool(name, value)?,
            "rabbit_retry_interval" => self.retry_interval = parse_seconds_or_zero(name, value)?,
            "rabbit_retry_backoff" => self.retry_backoff = parse_seconds_or_zero(name, value)?,
            "rabbit_interval_max" => self.interval_max = parse_seconds_or_zero(name, value)?,
            "kombu_reconnect_splay" => self.reconnect_splay = parse_seconds_or_zero(name, value)?,
            "kombu_failover_strategy" => {
                self.failover_strategy = match value.trim() {
                    "round-robin" => FailoverStrategy::RoundRobin,
                    "shuffle" => FailoverStrategy::Shuffle,
                    _ => {
                        return Err(Error::invalid_option(
                            name,
                            format!("{value:?} is not round-robin or shuffle"),
                        ))
                    }
                }
            }
            "kombu_missing_consumer_retry_timeout" => {
                self.missing_consumer_retry_timeout = parse_seconds_or_zero(name, value)?
            }
            "max_message_size" => {
                let size: usize = parse_int(name, value)?;
                if size == 0 {
                    return Err(Error::invalid_option(name, "must be at least 1"));
                }
                self.max_message_size = size;
            }
            _ => {
                return Err(Error::invalid_option(
                    name,
                    format!("unknown option (known: {})", OPTION_NAMES.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// Checks values that are valid one by one but not together, and values set from Rust.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            return Err(Error::invalid_option(
                "executor_thread_pool_size",
                "must be at least 1",
            ));
        }
        if self.rpc_response_timeout.is_zero() {
            return Err(Error::invalid_option(
                "rpc_response_timeout",
                "must be positive",
            ));
        }
        if self.control_exchange.is_empty() {
            return Err(Error::invalid_option(
                "control_exchange",
                "must not be empty",
            ));
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(Error::invalid_option(
                "heartbeat_timeout_threshold",
                "at most 65535 seconds",
            ));
        }
        if self.max_message_size == 0 {
            return Err(Error::invalid_option(
                "max_message_size",
                "must be at least 1",
            ));
        }
        if self.transient_queues_ttl.as_millis() > i32::MAX as u128 {
            return Err(Error::invalid_option(
                "rabbit_transient_queues_ttl",
                "too large for x-expires",
            ));
        }
        Ok(())
    }
}

fn parse_int<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| {
        Error::invalid_option(
            name,
            format!("{value:?} is not a valid non-negative integer in range"),
        )
    })
}

fn parse_seconds(name: &str, value: &str) -> Result<Duration> {
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(Error::invalid_option(
            name,
            format!("{value:?} is not a positive number of seconds"),
        )),
    }
}

fn parse_seconds_or_zero(name: &str, value: &str) -> Result<Duration> {
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..1e9).contains(&secs) => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(Error::invalid_option(
            name,
            format!("{value:?} is not a number of seconds"),
        )),
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(Error::invalid_option(
            name,
            format!("{value:?} is not a boolean"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_option_is_accepted() {
        let samples = [
            ("control_exchange", "nova"),
            ("heartbeat_timeout_threshold", "0"),
            ("rpc_response_timeout", "0.5"),
            ("rabbit_qos_prefetch_count", "0"),
            ("executor_thread_pool_size", "3"),
            ("codec", "json"),
            ("rabbit_transient_queues_ttl", "0"),
            ("amqp_durable_queues", "Yes"),
            ("amqp_auto_delete", "off"),
            ("rabbit_retry_interval", "0.5"),
            ("rabbit_retry_backoff", "0"),
            ("rabbit_interval_max", "4"),
            ("kombu_reconnect_splay", "0.1"),
            ("kombu_failover_strategy", "shuffle"),
            ("kombu_missing_consumer_retry_timeout", "3"),
            ("max_message_size", "1024"),
        ];
        assert_eq!(samples.len(), OPTION_NAMES.len());
        let mut o = TransportOptions::default();
        for (k, v) in samples {
            o.apply(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(o.control_exchange, "nova");
        assert_eq!(o.heartbeat, Duration::ZERO);
        assert_eq!(o.rpc_response_timeout, Duration::from_millis(500));
        assert_eq!(o.prefetch_count, 0);
        assert_eq!(o.workers, 3);
        assert_eq!(o.codec, Codec::Json);
        assert_eq!(o.transient_queues_ttl, Duration::ZERO);
        assert!(o.durable_queues);
        assert!(!o.auto_delete);
        assert_eq!(o.retry_interval, Duration::from_millis(500));
        assert_eq!(o.retry_backoff, Duration::ZERO);
        assert_eq!(o.interval_max, Duration::from_secs(4));
        assert_eq!(o.reconnect_splay, Duration::from_millis(100));
        assert_eq!(o.failover_strategy, FailoverStrategy::Shuffle);
        assert_eq!(o.missing_consumer_retry_timeout, Duration::from_secs(3));
        assert_eq!(o.max_message_size, 1024);
        o.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_option() {
        let mut o = TransportOptions::default();
        for (k, v) in [
            ("heartbeat_timeout_threshold", "-1"),
            ("heartbeat_timeout_threshold", "70000"),
            ("rpc_response_timeout", "0"),
            ("rpc_response_timeout", "soon"),
            ("executor_thread_pool_size", "0"),
            ("codec", "xml"),
            ("amqp_durable_queues", "maybe"),
            ("kombu_failover_strategy", "random"),
            ("rabbit_retry_interval", "-1"),
            ("max_message_size", "0"),
            ("ssl", "true"),
        ] {
            let err = o.apply(k, v).unwrap_err();
            assert!(err.to_string().contains(k) || k == "codec", "{k}: {err}");
            assert!(matches!(err, Error::InvalidOption { .. }), "{k}: {err:?}");
        }
        assert_eq!(
            o,
            TransportOptions::default(),
            "failed applies change nothing"
        );
    }
}
