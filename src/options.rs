//! Typed transport options, settable from the URL query or from Rust: see
//! [`TransportOptions`].

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::wire::Codec;

/// Every option a transport understands, with its value.
///
/// Build one with [`TransportBuilder`](crate::TransportBuilder); read it back with
/// [`Transport::options`](crate::Transport::options).
///
/// URL query keys use oslo.messaging's option names where oslo has the option, so a
/// `transport_url` from a nova.conf keeps working; `codec` is warren's own.
///
/// | query key | meaning | default |
/// |---|---|---|
/// | `control_exchange` | exchange used when a target names none | `openstack` |
/// | `heartbeat_timeout_threshold` | AMQP heartbeat in seconds (0 disables) | `60` |
/// | `rpc_response_timeout` | default call timeout in seconds (decimals allowed) | `60` |
/// | `rabbit_qos_prefetch_count` | unacknowledged deliveries per consumer (0 = unbounded) | `64` |
/// | `executor_thread_pool_size` | worker threads per server | `16` |
/// | `codec` | `msgpack` or `json` (oslo wire format) for what this transport sends | `msgpack` |
/// | `rabbit_transient_queues_ttl` | `x-expires` of reply and fanout queues in seconds (0 = none) | `1800` |
/// | `amqp_durable_queues` | durable topic exchange and server queues | `false` |
/// | `amqp_auto_delete` | auto-delete topic exchange and server queues | `false` |
/// | `rabbit_retry_interval` | pause after the first failed pass over the hosts, seconds | `1` |
/// | `rabbit_retry_backoff` | added to the pause after each further failed pass, seconds | `2` |
/// | `rabbit_interval_max` | longest pause between passes, seconds | `30` |
/// | `kombu_reconnect_splay` | random extra pause (0 to this), seconds: real jitter | `1` |
/// | `kombu_failover_strategy` | `round-robin` (from the first host) or `shuffle` | `round-robin` |
/// | `kombu_missing_consumer_retry_timeout` | how long a reply to a missing reply queue is retried, seconds | `60` |
/// | `max_message_size` | largest message body sent or accepted, bytes | `16777216` (16 MiB) |
/// | `ssl` | TLS to the broker (also turned on by `amqps://`) | `false` |
/// | `ssl_ca_file` | PEM CA bundle the broker's certificate must chain to (system roots when unset) | unset |
/// | `ssl_cert_file` / `ssl_key_file` | PEM client certificate and its PKCS#8 key | unset |
/// | `ssl_version` | lowest TLS version: `TLSv1`, `TLSv1_1`, `TLSv1_2`, `TLSv1_3` (`SSLv23`: any) | any |
/// | `rabbit_login_method` | `PLAIN`, or `EXTERNAL` (the client certificate's identity) | `PLAIN` |
/// | `rabbit_quorum_queue` | server and notification queues are quorum queues (durable) | `false` |
/// | `rabbit_transient_quorum_queue` | reply and fanout queues are quorum queues (durable) | `false` |
/// | `rabbit_quorum_delivery_limit` | `x-delivery-limit` of quorum queues (0 = none) | `0` |
/// | `rabbit_quorum_max_memory_length` | `x-max-in-memory-length` of quorum queues (0 = none) | `0` |
/// | `rabbit_quorum_max_memory_bytes` | `x-max-in-memory-bytes` of quorum queues (0 = none) | `0` |
/// | `rabbit_ha_queues` | `x-ha-policy: all` on queues (ignored by RabbitMQ ≥ 3.0, declared for equivalence) | `false` |
/// | `rabbit_stream_fanout` | one stream `<topic>_fanout` per topic for fanout (needs prefetch > 0 and transient quorum) | `false` |
/// | `use_queue_manager` | stable reply / fanout queue names `<hostname>:<processname>:<n>` | `false` |
/// | `hostname`, `processname` | the queue manager's name parts | this host, `basename(argv[0])` |
/// | `single_connection` | one connection per transport: servers and the reply consumer share the send connection (warren's own) | `false` |
/// | `direct_reply_to` | calls get their replies through RabbitMQ's direct reply-to instead of the reply queue (warren servers only) | `false` |
///
/// Every other option of oslo.messaging 18.3.1's `[oslo_messaging_rabbit]` group (connection
/// pools, `heartbeat_rate`, `kombu_compression`...) is accepted, its value checked, with one
/// warning that it has no effect in warren: see [`IGNORED_OPTION_NAMES`].
///
/// Booleans accept `true/false`, `yes/no`, `on/off`, `1/0` (any case), as oslo.config does.
///
/// ```
/// use std::time::Duration;
/// use warren::{Codec, Transport, TransportOptions};
///
/// // A program's own defaults, which each URL's query may override:
/// let mut defaults = TransportOptions::default();
/// defaults.rpc_response_timeout = Duration::from_secs(10);
/// defaults.workers = 8;
///
/// let url = "memory://doc-transport-options/?executor_thread_pool_size=4";
/// let transport = Transport::builder(url).options(defaults).build()?;
/// let options = transport.options();
/// assert_eq!(options.rpc_response_timeout, Duration::from_secs(10));
/// assert_eq!(options.workers, 4); // the URL wins
/// assert_eq!(options.codec, Codec::MsgPack); // warren's default
/// # Ok::<(), warren::Error>(())
/// ```
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
    /// request gets a `MessageTooLarge` failure reply if it is a call, and is rejected if it is
    /// a cast). warren's own option; the default is RabbitMQ 4.x's `max_message_size`, the
    /// broker's own bound on what reaches warren at all.
    pub max_message_size: usize,
    /// TLS to the broker (oslo's `ssl*` options).
    pub tls: TlsOptions,
    /// How to log in (oslo's `rabbit_login_method`).
    pub login_method: LoginMethod,
    /// Server and notification queues are quorum queues, and with the control exchange durable
    /// (oslo's `rabbit_quorum_queue`).
    pub quorum_queues: bool,
    /// Reply and fanout queues are quorum queues, durable, and the fanout exchanges durable
    /// (oslo's `rabbit_transient_quorum_queue`).
    pub transient_quorum_queues: bool,
    /// `x-delivery-limit` of quorum queues when not 0 (`rabbit_quorum_delivery_limit`).
    pub quorum_delivery_limit: i64,
    /// `x-max-in-memory-length` of quorum queues when not 0 (`rabbit_quorum_max_memory_length`).
    pub quorum_max_memory_length: i64,
    /// `x-max-in-memory-bytes` of quorum queues when not 0 (`rabbit_quorum_max_memory_bytes`).
    pub quorum_max_memory_bytes: i64,
    /// Declare queues with `x-ha-policy: all` (`rabbit_ha_queues`). RabbitMQ has ignored the
    /// argument since 3.0, but a queue declared with it must be re-declared with it.
    pub ha_queues: bool,
    /// Fanout goes through one stream queue `<topic>_fanout` per topic, read by every server
    /// from its last offset (`rabbit_stream_fanout`).
    pub stream_fanout: bool,
    /// Stable reply and fanout queue names, `<hostname>:<processname>:<n>`, counted in
    /// `/dev/shm` across restarts as oslo does (`use_queue_manager`).
    pub queue_manager: bool,
    /// The queue manager's host part (`hostname`; default: this machine's host name).
    pub hostname: String,
    /// The queue manager's process part (`processname`; default: the program's file name).
    pub processname: String,
    /// Calls ask for their replies through RabbitMQ's direct reply-to
    /// (`amq.rabbitmq.reply-to`, `direct_reply_to`, warren's own): each call waits on the
    /// channel it was published on, and no reply queue is declared. Faster, and less work for
    /// the broker; only warren servers can answer such calls (oslo.messaging's cannot), and a
    /// reply is lost with the caller's channel (as with a reply queue, calls are at most
    /// once). Off: oslo's reply queue, one per transport.
    pub direct_reply_to: bool,
    /// One connection per transport (`single_connection`, warren's own): its servers'
    /// listeners and its reply consumer open their channels on the send connection instead of
    /// a connection each. Fewer connections and I/O threads, and a server's replies leave by
    /// the connection its requests came in by; but a connection the broker blocks for
    /// publishing (a resource alarm) then stops consuming too. Off: oslo's layout.
    pub single_connection: bool,
}

/// oslo.messaging 18.3.1 `[oslo_messaging_rabbit]` options warren accepts in a URL without
/// acting on them (one warning each when a transport is built), so that a deployment's
/// `transport_url` works unchanged. Their values are still checked.
pub const IGNORED_OPTION_NAMES: &[&str] = &[
    "rpc_conn_pool_size",
    "conn_pool_min_size",
    "conn_pool_ttl",
    "ssl_enforce_hostname_verification",
    "ssl_enforce_fips_mode",
    "kombu_reconnect_delay",
    "kombu_compression",
    "heartbeat_rate",
    "direct_mandatory_flag",
    "enable_cancel_on_failover",
];

/// Names oslo.messaging once had or that are easily mistyped, with the option to use instead.
const RENAMED: &[(&str, &str)] = &[
    (
        "rabbit_quroum_delivery_limit",
        "rabbit_quorum_delivery_limit",
    ),
    (
        "rabbit_quroum_max_memory_length",
        "rabbit_quorum_max_memory_length",
    ),
    (
        "rabbit_quroum_max_memory_bytes",
        "rabbit_quorum_max_memory_bytes",
    ),
    (
        "kombu_reconnect_timeout",
        "kombu_missing_consumer_retry_timeout",
    ),
    ("rabbit_use_ssl", "ssl"),
    ("kombu_ssl_version", "ssl_version"),
    ("kombu_ssl_keyfile", "ssl_key_file"),
    ("kombu_ssl_certfile", "ssl_cert_file"),
    ("kombu_ssl_ca_certs", "ssl_ca_file"),
    ("rpc_thread_pool_size", "executor_thread_pool_size"),
];

/// TLS settings (oslo's `ssl`, `ssl_ca_file`, `ssl_cert_file`, `ssl_key_file`, `ssl_version`).
///
/// The broker's certificate is verified against `ca_file` (the system's roots when unset) and
/// must name the host connected to (checked per host on failover). Files are read when the
/// transport is built: a missing or unreadable one is an [`Error::InvalidOption`].
///
/// ```
/// let transport = warren::Transport::new(
///     "amqps://nova:secret@rabbit1:5671/?ssl_version=TLSv1_2",
/// )?;
/// assert!(transport.options().tls.enabled);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// Connect with TLS (`ssl=true`, or an `amqps://` URL).
    pub enabled: bool,
    /// PEM file of the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (for brokers that ask for one, and `EXTERNAL`).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key, PKCS#8 (`BEGIN PRIVATE KEY`).
    pub key_file: Option<PathBuf>,
    /// The lowest protocol version accepted; `None` lets the TLS library choose.
    pub min_version: Option<TlsVersion>,
}

/// A TLS protocol version (`ssl_version`).
///
/// ```
/// use warren::{TlsVersion, TransportOptions};
///
/// let mut options = TransportOptions::default();
/// options.apply("ssl_version", "TLSv1_2")?;
/// assert_eq!(options.tls.min_version, Some(TlsVersion::Tls12));
/// assert!(TlsVersion::Tls12 < TlsVersion::Tls13);
///
/// options.apply("ssl_version", "SSLv23")?; // any version the TLS library accepts
/// assert_eq!(options.tls.min_version, None);
/// assert!(options.apply("ssl_version", "SSLv3").is_err());
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.0 (`TLSv1`; deprecated, RFC 8996).
    Tls10,
    /// TLS 1.1 (`TLSv1_1`; deprecated, RFC 8996).
    Tls11,
    /// TLS 1.2 (`TLSv1_2`).
    Tls12,
    /// TLS 1.3 (`TLSv1_3`).
    Tls13,
}

/// How a connection logs in to the broker (`rabbit_login_method`).
///
/// ```
/// use warren::{Error, LoginMethod, Transport};
///
/// let transport = Transport::new("rabbit://nova:secret@rabbit1:5672/")?;
/// assert_eq!(transport.options().login_method, LoginMethod::Plain);
///
/// // EXTERNAL logs in with the TLS client certificate, so it needs one.
/// let err = Transport::new("rabbit://rabbit1:5672/?rabbit_login_method=EXTERNAL").unwrap_err();
/// assert!(matches!(err, Error::InvalidOption { name, .. } if name == "rabbit_login_method"));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LoginMethod {
    /// User name and password from the URL (SASL PLAIN, enabled on every RabbitMQ).
    #[default]
    Plain,
    /// The identity of the TLS client certificate (SASL EXTERNAL; needs the broker's
    /// `rabbitmq_auth_mechanism_ssl` plugin and `ssl_cert_file` / `ssl_key_file`).
    External,
}

/// How a transport moves between the hosts of its URL after a connection failure
/// (`kombu_failover_strategy`).
///
/// ```
/// use warren::{FailoverStrategy, Transport};
///
/// let url = "rabbit://nova:secret@rabbit1,nova:secret@rabbit2/?kombu_failover_strategy=shuffle";
/// assert_eq!(Transport::new(url)?.options().failover_strategy, FailoverStrategy::Shuffle);
///
/// let transport = Transport::builder("rabbit://nova:secret@rabbit1,nova:secret@rabbit2/")
///     .failover_strategy(FailoverStrategy::RoundRobin) // the default
///     .build()?;
/// assert_eq!(transport.options().failover_strategy, FailoverStrategy::RoundRobin);
/// # Ok::<(), warren::Error>(())
/// ```
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
            tls: TlsOptions::default(),
            login_method: LoginMethod::Plain,
            quorum_queues: false,
            transient_quorum_queues: false,
            quorum_delivery_limit: 0,
            quorum_max_memory_length: 0,
            quorum_max_memory_bytes: 0,
            ha_queues: false,
            stream_fanout: false,
            queue_manager: false,
            hostname: local_hostname(),
            processname: process_name(),
            direct_reply_to: false,
            single_connection: false,
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
    "ssl",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_version",
    "rabbit_login_method",
    "rabbit_quorum_queue",
    "rabbit_transient_quorum_queue",
    "rabbit_quorum_delivery_limit",
    "rabbit_quorum_max_memory_length",
    "rabbit_quorum_max_memory_bytes",
    "rabbit_ha_queues",
    "rabbit_stream_fanout",
    "use_queue_manager",
    "direct_reply_to",
    "single_connection",
    "hostname",
    "processname",
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
            "ssl" => self.tls.enabled = parse_bool(name, value)?,
            "ssl_ca_file" => self.tls.ca_file = parse_path(value),
            "ssl_cert_file" => self.tls.cert_file = parse_path(value),
            "ssl_key_file" => self.tls.key_file = parse_path(value),
            "ssl_version" => {
                self.tls.min_version = match value.trim() {
                    "" | "SSLv23" | "TLS" => None,
                    "TLSv1" => Some(TlsVersion::Tls10),
                    "TLSv1_1" => Some(TlsVersion::Tls11),
                    "TLSv1_2" => Some(TlsVersion::Tls12),
                    "TLSv1_3" => Some(TlsVersion::Tls13),
                    "SSLv2" | "SSLv3" => {
                        return Err(Error::invalid_option(
                            name,
                            format!("{value} is broken and not supported; use TLSv1_2"),
                        ))
                    }
                    _ => {
                        return Err(Error::invalid_option(
                            name,
                            format!("{value:?} is not TLSv1, TLSv1_1, TLSv1_2, TLSv1_3 or SSLv23"),
                        ))
                    }
                }
            }
            "rabbit_login_method" => {
                self.login_method = match value.trim().to_ascii_uppercase().as_str() {
                    "PLAIN" => LoginMethod::Plain,
                    "EXTERNAL" => LoginMethod::External,
                    // oslo's default; RabbitMQ enables PLAIN beside it, with the same result.
                    "AMQPLAIN" => {
                        log::warn!("rabbit_login_method=AMQPLAIN: warren logs in with PLAIN, which RabbitMQ accepts alike");
                        LoginMethod::Plain
                    }
                    _ => {
                        return Err(Error::invalid_option(
                            name,
                            format!("{value:?} is not supported (PLAIN, AMQPLAIN or EXTERNAL)"),
                        ))
                    }
                }
            }
            "rabbit_quorum_queue" => self.quorum_queues = parse_bool(name, value)?,
            "rabbit_transient_quorum_queue" => {
                self.transient_quorum_queues = parse_bool(name, value)?
            }
            "rabbit_quorum_delivery_limit" => self.quorum_delivery_limit = parse_int(name, value)?,
            "rabbit_quorum_max_memory_length" => {
                self.quorum_max_memory_length = parse_int(name, value)?
            }
            "rabbit_quorum_max_memory_bytes" => {
                self.quorum_max_memory_bytes = parse_int(name, value)?
            }
            "rabbit_ha_queues" => self.ha_queues = parse_bool(name, value)?,
            "rabbit_stream_fanout" => self.stream_fanout = parse_bool(name, value)?,
            "use_queue_manager" => self.queue_manager = parse_bool(name, value)?,
            "direct_reply_to" => self.direct_reply_to = parse_bool(name, value)?,
            "single_connection" => self.single_connection = parse_bool(name, value)?,
            "hostname" | "processname" => {
                let part = value.trim();
                if part.is_empty() || part.contains(['/', '\0']) {
                    return Err(Error::invalid_option(
                        name,
                        "must be a non-empty name without `/`",
                    ));
                }
                if name == "hostname" {
                    self.hostname = part.to_string();
                } else {
                    self.processname = part.to_string();
                }
            }
            ignored if IGNORED_OPTION_NAMES.contains(&ignored) => check_ignored(name, value)?,
            _ => {
                let reason = match RENAMED.iter().find(|(old, _)| *old == name) {
                    Some((_, new)) => format!("unknown option; use `{new}`"),
                    None => format!("unknown option (known: {})", OPTION_NAMES.join(", ")),
                };
                return Err(Error::invalid_option(name, reason));
            }
        }
        Ok(())
    }

    /// Checks values that are valid one by one but not together, and values set from Rust.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            let missing = if self.tls.cert_file.is_some() {
                "ssl_key_file"
            } else {
                "ssl_cert_file"
            };
            return Err(Error::invalid_option(
                missing,
                "a client certificate needs both ssl_cert_file and ssl_key_file",
            ));
        }
        if self.ha_queues && (self.quorum_queues || self.transient_quorum_queues) {
            // oslo's RuntimeError, word for word.
            return Err(Error::invalid_option(
                "rabbit_ha_queues",
                "Configuration Error: rabbit_quorum_queue and rabbit_ha_queues both enabled, queue type is quorum or HA (mirrored) not both",
            ));
        }
        if self.stream_fanout && self.prefetch_count == 0 {
            return Err(Error::invalid_option(
                "rabbit_stream_fanout",
                "Configuration Error: rabbit_stream_fanout need rabbit_qos_prefetch_count to be set to a value greater than 0.",
            ));
        }
        if self.stream_fanout && !self.transient_quorum_queues {
            return Err(Error::invalid_option(
                "rabbit_stream_fanout",
                "Configuration Error: rabbit_stream_fanout need rabbit_transient_quorum_queue to be set to true.",
            ));
        }
        if self.quorum_queues && self.auto_delete {
            return Err(Error::invalid_option(
                "amqp_auto_delete",
                "RabbitMQ refuses auto-delete quorum queues: unset it with rabbit_quorum_queue",
            ));
        }
        if self.login_method == LoginMethod::External
            && !(self.tls.enabled && self.tls.cert_file.is_some())
        {
            return Err(Error::invalid_option(
                "rabbit_login_method",
                "EXTERNAL logs in with the TLS client certificate: it needs ssl=true (or amqps://), ssl_cert_file and ssl_key_file",
            ));
        }
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
        // What a URL cannot say (`parse_seconds` stops at 10^9 s) a program cannot set either:
        // these pauses and timeouts are added to the clock.
        for (name, value) in [
            ("rpc_response_timeout", self.rpc_response_timeout),
            ("rabbit_retry_interval", self.retry_interval),
            ("rabbit_retry_backoff", self.retry_backoff),
            ("rabbit_interval_max", self.interval_max),
            ("kombu_reconnect_splay", self.reconnect_splay),
            (
                "kombu_missing_consumer_retry_timeout",
                self.missing_consumer_retry_timeout,
            ),
        ] {
            if value >= MAX_SECONDS {
                return Err(Error::invalid_option(name, "must be under 10^9 seconds"));
            }
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
    value
        .trim()
        .parse()
        .map_err(|_| Error::invalid_option(name, format!("{value:?} is not an integer in range")))
}

/// Durations stop below this, from a URL (as oslo's options are seconds, a float) or from Rust.
const MAX_SECONDS: Duration = Duration::from_secs(1_000_000_000);

fn parse_seconds(name: &str, value: &str) -> Result<Duration> {
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < MAX_SECONDS.as_secs_f64() => {
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
        Ok(secs) if secs.is_finite() && (0.0..MAX_SECONDS.as_secs_f64()).contains(&secs) => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(Error::invalid_option(
            name,
            format!("{value:?} is not a number of seconds"),
        )),
    }
}

/// Checks the value of an option warren accepts without acting on it, as oslo types it.
fn check_ignored(name: &str, value: &str) -> Result<()> {
    match name {
        "rpc_conn_pool_size" | "conn_pool_min_size" | "conn_pool_ttl" | "heartbeat_rate" => {
            parse_int::<i64>(name, value).map(drop)
        }
        "kombu_reconnect_delay" => parse_seconds_or_zero(name, value).map(drop),
        "ssl_enforce_hostname_verification"
        | "ssl_enforce_fips_mode"
        | "direct_mandatory_flag"
        | "enable_cancel_on_failover" => parse_bool(name, value).map(drop),
        _ => Ok(()),
    }
}

/// This machine's host name (oslo's `socket.gethostname()`).
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The program's file name (oslo's `os.path.basename(sys.argv[0])`).
fn process_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "warren".into())
}

/// An empty path (oslo's default `''`) means none.
fn parse_path(value: &str) -> Option<PathBuf> {
    let value = value.trim();
    (!value.is_empty()).then(|| PathBuf::from(value))
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
            ("rabbit_qos_prefetch_count", "7"),
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
            ("ssl", "true"),
            ("ssl_ca_file", "/etc/ca.pem"),
            ("ssl_cert_file", "/etc/client.pem"),
            ("ssl_key_file", "/etc/client.key"),
            ("ssl_version", "TLSv1_2"),
            ("rabbit_login_method", "EXTERNAL"),
            ("rabbit_quorum_queue", "true"),
            ("rabbit_transient_quorum_queue", "1"),
            ("rabbit_quorum_delivery_limit", "5"),
            ("rabbit_quorum_max_memory_length", "10"),
            ("rabbit_quorum_max_memory_bytes", "8589934592"),
            ("rabbit_ha_queues", "false"),
            ("rabbit_stream_fanout", "true"),
            ("use_queue_manager", "true"),
            ("hostname", "nodeA"),
            ("processname", "nova-compute"),
            ("direct_reply_to", "yes"),
            ("single_connection", "on"),
        ];
        assert_eq!(samples.len(), OPTION_NAMES.len());
        let mut o = TransportOptions::default();
        for (k, v) in samples {
            o.apply(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(o.control_exchange, "nova");
        assert_eq!(o.heartbeat, Duration::ZERO);
        assert_eq!(o.rpc_response_timeout, Duration::from_millis(500));
        assert_eq!(o.prefetch_count, 7);
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
        assert!(o.tls.enabled);
        assert_eq!(
            o.tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            o.tls.cert_file.as_deref(),
            Some(std::path::Path::new("/etc/client.pem"))
        );
        assert_eq!(
            o.tls.key_file.as_deref(),
            Some(std::path::Path::new("/etc/client.key"))
        );
        assert_eq!(o.tls.min_version, Some(TlsVersion::Tls12));
        assert_eq!(o.login_method, LoginMethod::External);
        assert!(o.quorum_queues && o.transient_quorum_queues && o.stream_fanout);
        assert_eq!(o.quorum_delivery_limit, 5);
        assert_eq!(o.quorum_max_memory_length, 10);
        assert_eq!(o.quorum_max_memory_bytes, 1 << 33);
        assert!(!o.ha_queues);
        assert!(o.queue_manager);
        assert!(o.direct_reply_to && o.single_connection);
        assert_eq!(
            (o.hostname.as_str(), o.processname.as_str()),
            ("nodeA", "nova-compute")
        );
        o.validate().unwrap();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = TransportOptions::default();
        assert_eq!(d.control_exchange, "openstack");
        assert_eq!(d.heartbeat, Duration::from_secs(60));
        assert_eq!(d.rpc_response_timeout, Duration::from_secs(60));
        assert_eq!(d.prefetch_count, 64, "bounded, unlike oslo's unbounded 0");
        assert_eq!(d.workers, 16);
        assert_eq!(d.codec, Codec::MsgPack);
        assert_eq!(d.transient_queues_ttl, Duration::from_secs(1800));
        assert!(!d.durable_queues);
        assert!(!d.auto_delete);
        assert_eq!(d.retry_interval, Duration::from_secs(1));
        assert_eq!(d.retry_backoff, Duration::from_secs(2));
        assert_eq!(d.interval_max, Duration::from_secs(30));
        assert_eq!(d.reconnect_splay, Duration::from_secs(1));
        assert_eq!(d.failover_strategy, FailoverStrategy::RoundRobin);
        assert_eq!(d.missing_consumer_retry_timeout, Duration::from_secs(60));
        assert_eq!(d.max_message_size, 16 * 1024 * 1024);
        assert_eq!(d.tls, TlsOptions::default());
        assert!(!d.tls.enabled);
        assert_eq!(
            (&d.tls.ca_file, &d.tls.cert_file, &d.tls.key_file),
            (&None, &None, &None)
        );
        assert_eq!(d.tls.min_version, None);
        assert_eq!(d.login_method, LoginMethod::Plain);
        assert!(!d.quorum_queues && !d.transient_quorum_queues);
        assert_eq!(
            (
                d.quorum_delivery_limit,
                d.quorum_max_memory_length,
                d.quorum_max_memory_bytes
            ),
            (0, 0, 0)
        );
        assert!(!d.ha_queues && !d.stream_fanout && !d.queue_manager);
        assert_eq!(d.hostname, local_hostname());
        assert_eq!(d.processname, process_name());
        assert!(!d.hostname.is_empty() && !d.processname.is_empty());
        d.validate().unwrap();
    }

    /// The backticked names in a table cell.
    fn names_in(cell: &str) -> Vec<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    /// Checks that `key`'s default is the one `table` states: a value in backticks (applying
    /// it to the defaults changes nothing), or one of the words the tables use for "nothing".
    fn check_stated_default(table: &str, key: &str, stated: &str) {
        let d = TransportOptions::default();
        let word = stated.trim_end_matches('|').trim();
        let holds = match key {
            // "this host, `basename(argv[0])`" (and "off" in the README's queue-type row).
            "hostname" => d.hostname == local_hostname(),
            "processname" => d.processname == process_name(),
            _ => match word.split('`').nth(1) {
                Some(value) => {
                    let mut options = d.clone();
                    options
                        .apply(key, value)
                        .unwrap_or_else(|e| panic!("{table}: the default of {key}: {e}"));
                    assert_eq!(
                        options, d,
                        "{table}: the default of {key} ({value}) is not the code's"
                    );
                    true
                }
                None => match (key, word) {
                    ("ssl", "off") => !d.tls.enabled,
                    ("ssl_ca_file", "off" | "unset") => d.tls.ca_file.is_none(),
                    ("ssl_cert_file", "off" | "unset") => d.tls.cert_file.is_none(),
                    ("ssl_key_file", "off" | "unset") => d.tls.key_file.is_none(),
                    ("ssl_version", "off" | "any") => d.tls.min_version.is_none(),
                    ("rabbit_quorum_queue", "off") => !d.quorum_queues,
                    ("rabbit_transient_quorum_queue", "off") => !d.transient_quorum_queues,
                    ("rabbit_quorum_delivery_limit", "off") => d.quorum_delivery_limit == 0,
                    ("rabbit_quorum_max_memory_length", "off") => d.quorum_max_memory_length == 0,
                    ("rabbit_quorum_max_memory_bytes", "off") => d.quorum_max_memory_bytes == 0,
                    ("rabbit_ha_queues", "off") => !d.ha_queues,
                    ("rabbit_stream_fanout", "off") => !d.stream_fanout,
                    ("use_queue_manager", "off") => !d.queue_manager,
                    _ => panic!("{table}: no check for the default {word:?} of {key}"),
                },
            },
        };
        assert!(holds, "{table}: {key} is not {word:?} by default");
    }

    /// Checks a Markdown option table (rows given without any line prefix): every option it
    /// lists exists, every option is listed once, and every default it states is the code's.
    fn check_option_table<'a>(table: &str, rows: impl Iterator<Item = &'a str>) {
        let mut listed = Vec::new();
        let mut rows_seen = 0;
        for row in rows {
            let cells: Vec<&str> = row.split(" | ").collect();
            let keys = names_in(cells[0]);
            assert!(!keys.is_empty(), "{table}: a row without a key: {row}");
            let default = cells.last().expect("a default cell");
            for key in &keys {
                check_stated_default(table, key, default);
            }
            listed.extend(keys.iter().map(|k| k.to_string()));
            rows_seen += 1;
        }
        assert!(rows_seen >= 15, "{table}: only {rows_seen} rows read");
        let mut names: Vec<String> = OPTION_NAMES.iter().map(|n| n.to_string()).collect();
        listed.sort();
        names.sort();
        assert_eq!(listed, names, "{table} vs OPTION_NAMES");
    }

    /// The README's option table is the user's reference: every option it lists exists, every
    /// option exists in it, and each default it states is the code's.
    #[test]
    fn the_readme_option_table_matches_the_code() {
        let readme = include_str!("../README.md");
        let table = readme
            .split("| query key | builder | meaning | default |")
            .nth(1)
            .expect("the README's option table");
        let rows = table.lines().skip(2).take_while(|l| l.starts_with('|'));
        check_option_table("README", rows);
    }

    /// The same for the table of the rustdoc of this module's options (`//!` or `///` lines).
    #[test]
    fn the_rustdoc_option_table_matches_the_code() {
        let source = include_str!("options.rs");
        let header = "| query key | meaning | default |";
        let mut lines = source
            .lines()
            .skip_while(|l| !l.trim_end().ends_with(header));
        let prefix = lines
            .next()
            .and_then(|l| l.strip_suffix(header))
            .expect("the rustdoc's option table");
        assert!(prefix.trim_start().starts_with("//"), "{prefix:?}");
        let rows = lines
            .skip(1)
            .map_while(|l| l.strip_prefix(prefix))
            .take_while(|l| l.starts_with('|'));
        check_option_table("src/options.rs", rows);
    }

    #[test]
    fn oslo_options_warren_does_not_use_are_accepted() {
        let mut o = TransportOptions::default();
        for (k, v) in [
            ("rpc_conn_pool_size", "30"),
            ("conn_pool_min_size", "2"),
            ("conn_pool_ttl", "1200"),
            ("ssl_enforce_hostname_verification", "True"),
            ("ssl_enforce_fips_mode", "False"),
            ("kombu_reconnect_delay", "1.0"),
            ("kombu_compression", "gzip"),
            ("heartbeat_rate", "3"),
            ("direct_mandatory_flag", "True"),
            ("enable_cancel_on_failover", "false"),
            ("rabbit_login_method", "AMQPLAIN"),
        ] {
            o.apply(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(o, TransportOptions::default(), "they change nothing");
        assert_eq!(IGNORED_OPTION_NAMES.len(), 10);
    }

    #[test]
    fn renamed_options_point_to_their_new_name() {
        // Written out, not read from `RENAMED`: a name dropped from it must fail here.
        let renamed = [
            (
                "rabbit_quroum_delivery_limit",
                "rabbit_quorum_delivery_limit",
            ),
            (
                "rabbit_quroum_max_memory_length",
                "rabbit_quorum_max_memory_length",
            ),
            (
                "rabbit_quroum_max_memory_bytes",
                "rabbit_quorum_max_memory_bytes",
            ),
            (
                "kombu_reconnect_timeout",
                "kombu_missing_consumer_retry_timeout",
            ),
            ("rabbit_use_ssl", "ssl"),
            ("kombu_ssl_version", "ssl_version"),
            ("kombu_ssl_keyfile", "ssl_key_file"),
            ("kombu_ssl_certfile", "ssl_cert_file"),
            ("kombu_ssl_ca_certs", "ssl_ca_file"),
            ("rpc_thread_pool_size", "executor_thread_pool_size"),
        ];
        for (old, new) in renamed {
            let err = TransportOptions::default().apply(old, "1").unwrap_err();
            assert!(
                matches!(&err, Error::InvalidOption { name, .. } if name == old),
                "{err:?}"
            );
            assert!(err.to_string().contains(&format!("use `{new}`")), "{err}");
        }
    }

    #[test]
    fn combinations_oslo_refuses_are_refused_with_its_words() {
        let refused = |pairs: &[(&str, &str)]| {
            let mut o = TransportOptions::default();
            for (k, v) in pairs {
                o.apply(k, v).unwrap();
            }
            o.validate().unwrap_err().to_string()
        };
        assert!(
            refused(&[("rabbit_quorum_queue", "1"), ("rabbit_ha_queues", "1")])
                .contains("quorum or HA (mirrored) not both")
        );
        assert!(refused(&[
            ("rabbit_stream_fanout", "1"),
            ("rabbit_transient_quorum_queue", "1"),
            ("rabbit_qos_prefetch_count", "0")
        ])
        .contains("need rabbit_qos_prefetch_count"));
        assert!(refused(&[("rabbit_stream_fanout", "1")])
            .contains("need rabbit_transient_quorum_queue to be set to true"));
        assert!(refused(&[("rabbit_login_method", "EXTERNAL")]).contains("ssl_cert_file"));
        assert!(refused(&[("ssl_cert_file", "/c.pem")]).contains("ssl_key_file"));
        assert!(
            refused(&[("rabbit_quorum_queue", "1"), ("amqp_auto_delete", "1")])
                .contains("auto-delete")
        );
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
            ("ssl", "maybe"),
            ("ssl_version", "SSLv3"),
            ("ssl_version", "TLSv9"),
            ("rabbit_login_method", "RABBIT-CR-DEMO"),
            ("rabbit_quroum_delivery_limit", "5"),
            ("kombu_reconnect_timeout", "5"),
            ("rabbit_quorum_delivery_limit", "many"),
            ("hostname", ""),
            ("rpc_conn_pool_size", "lots"),
            ("no_such_option", "1"),
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

    #[test]
    fn ssl_version_names_map_to_minimum_tls_versions() {
        let min = |value: &str| {
            let mut options = TransportOptions::default();
            options
                .apply("ssl_version", value)
                .map(|_| options.tls.min_version)
        };
        for any in ["", "SSLv23", "TLS", " TLS "] {
            assert_eq!(min(any).unwrap(), None, "{any:?}");
        }
        assert_eq!(min("TLSv1").unwrap(), Some(TlsVersion::Tls10));
        assert_eq!(min("TLSv1_1").unwrap(), Some(TlsVersion::Tls11));
        assert_eq!(min("TLSv1_2").unwrap(), Some(TlsVersion::Tls12));
        assert_eq!(min("TLSv1_3").unwrap(), Some(TlsVersion::Tls13));
        for broken in ["SSLv2", "SSLv3"] {
            match min(broken) {
                Err(Error::InvalidOption { name, reason }) => {
                    assert_eq!(name, "ssl_version");
                    assert!(reason.contains("broken and not supported"), "{reason}");
                }
                other => panic!("{broken} accepted: {other:?}"),
            }
        }
        match min("TLSv9") {
            Err(Error::InvalidOption { reason, .. }) => {
                assert!(!reason.contains("broken"), "{reason}")
            }
            other => panic!("TLSv9 accepted: {other:?}"),
        }
    }

    #[test]
    fn validation_bounds_are_inclusive_where_amqp_allows_it() {
        let valid = |change: &dyn Fn(&mut TransportOptions)| {
            let mut options = TransportOptions::default();
            change(&mut options);
            options.validate()
        };
        // The AMQP heartbeat is a u16 of seconds.
        assert!(valid(&|o| o.heartbeat = Duration::from_secs(65_535)).is_ok());
        assert!(valid(&|o| o.heartbeat = Duration::from_secs(65_536)).is_err());
        // x-expires is a signed 32-bit count of milliseconds.
        let most = Duration::from_millis(i32::MAX as u64);
        assert!(valid(&|o| o.transient_queues_ttl = most).is_ok());
        assert!(valid(&|o| o.transient_queues_ttl = most + Duration::from_millis(1)).is_err());
        // Durations a URL can give can be set from Rust; longer ones would overflow the clock.
        let under = MAX_SECONDS - Duration::from_nanos(1);
        type Set = fn(&mut TransportOptions, Duration);
        let durations: [(&str, Set); 6] = [
            ("rpc_response_timeout", |o, d| o.rpc_response_timeout = d),
            ("rabbit_retry_interval", |o, d| o.retry_interval = d),
            ("rabbit_retry_backoff", |o, d| o.retry_backoff = d),
            ("rabbit_interval_max", |o, d| o.interval_max = d),
            ("kombu_reconnect_splay", |o, d| o.reconnect_splay = d),
            ("kombu_missing_consumer_retry_timeout", |o, d| {
                o.missing_consumer_retry_timeout = d
            }),
        ];
        for (name, set) in durations {
            assert!(valid(&|o| set(o, under)).is_ok(), "{name}");
            match valid(&|o| set(o, MAX_SECONDS)) {
                Err(Error::InvalidOption { name: refused, .. }) => assert_eq!(refused, name),
                other => panic!("{name} = 10^9 s: {other:?}"),
            }
            assert!(valid(&|o| set(o, Duration::MAX)).is_err(), "{name}");
        }
        // EXTERNAL needs TLS *and* a client certificate.
        let external = |tls: bool, cert: bool| {
            valid(&move |o: &mut TransportOptions| {
                o.login_method = LoginMethod::External;
                o.tls.enabled = tls;
                o.tls.cert_file = cert.then(|| PathBuf::from("/client.pem"));
                o.tls.key_file = cert.then(|| PathBuf::from("/client.key"));
            })
        };
        assert!(external(true, true).is_ok());
        assert!(external(true, false).is_err());
        assert!(external(false, true).is_err());
        assert!(external(false, false).is_err());
    }

    #[test]
    fn seconds_are_bounded_below_a_billion() {
        assert!(parse_seconds("t", "999999999").is_ok());
        assert!(parse_seconds("t", "1000000000").is_err());
        assert!(parse_seconds("t", "0").is_err());
        assert!(parse_seconds_or_zero("t", "0").is_ok());
        assert!(parse_seconds_or_zero("t", "1000000000").is_err());
    }

    #[test]
    fn ignored_options_are_still_type_checked_as_oslo_types_them() {
        let mut options = TransportOptions::default();
        assert!(options.apply("kombu_reconnect_delay", "1.5").is_ok());
        assert!(options.apply("kombu_reconnect_delay", "soon").is_err());
        assert!(options.apply("kombu_reconnect_delay", "-1").is_err());
        for flag in [
            "ssl_enforce_hostname_verification",
            "ssl_enforce_fips_mode",
            "direct_mandatory_flag",
            "enable_cancel_on_failover",
        ] {
            assert!(options.apply(flag, "true").is_ok(), "{flag}");
            assert!(options.apply(flag, "maybe").is_err(), "{flag}");
        }
        assert_eq!(
            options,
            TransportOptions::default(),
            "ignored: nothing changed"
        );
    }

    #[test]
    fn host_and_process_names_are_this_machine_and_program() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(local_hostname(), kernel.trim());
        // The unit-test binary is `warren-<hash>`; "warren" alone would be the fallback.
        let program = process_name();
        assert!(program.starts_with("warren-"), "{program}");
        assert!(!program.contains('/'), "{program}");
    }
}
