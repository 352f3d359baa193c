//! Exchanges, queues and bindings, declared exactly as oslo.messaging 18.3.1 declares them.
//!
//! RabbitMQ refuses (406 PRECONDITION_FAILED) a re-declaration with other flags or arguments,
//! so warren must use oslo's, option for option (`_get_queue_arguments` and the consumers of
//! `impl_rabbit.py`):
//!
//! | entity | durable | auto-delete | arguments |
//! |---|---|---|---|
//! | control exchange (topic) | `amqp_durable_queues` or `rabbit_quorum_queue` | `amqp_auto_delete` | — |
//! | `<topic>_fanout` exchange | `rabbit_transient_quorum_queue` or `rabbit_stream_fanout` | yes | — |
//! | server and notification queues | as the control exchange | `amqp_auto_delete` | ha, quorum |
//! | reply and per-server fanout queues | `rabbit_transient_quorum_queue` | no | ha, transient quorum, `x-expires` |
//! | stream fanout queue `<topic>_fanout` | yes | no | `x-queue-type: stream`, `x-max-age: "<ttl>s"` |
//!
//! ha: `x-ha-policy: all` with `rabbit_ha_queues`; quorum: `x-queue-type: quorum` plus
//! `x-delivery-limit`, `x-max-in-memory-length`, `x-max-in-memory-bytes` when not 0. Integers
//! are written as py-amqp writes them: a signed 32-bit int when they fit, else 64-bit.
//! A 406 is explained: the error names the option that matches what the broker has.

use amiquip::{
    AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use crate::driver::{ExchangeKind, QueueLifetime, QueuePlan};
use crate::error::{Error, Result};
use crate::options::TransportOptions;

use super::connection::amqp_error;

/// Declares the topic (control) exchange `name`.
pub(crate) fn declare_topic_exchange(
    channel: &Channel,
    name: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let flags = (
        options.durable_queues || options.quorum_queues,
        options.auto_delete,
    );
    declare_exchange(channel, ExchangeType::Topic, name, flags, address)
}

/// Declares a fanout exchange (`<topic>_fanout`): auto-delete, durable only with transient
/// quorum queues or stream fanout.
pub(crate) fn declare_fanout_exchange(
    channel: &Channel,
    name: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let durable = options.transient_quorum_queues || options.stream_fanout;
    declare_exchange(
        channel,
        ExchangeType::Fanout,
        name,
        (durable, true),
        address,
    )
}

/// Declares a planned queue with the flags and arguments of its lifetime, the exchanges it is
/// bound to, and its bindings.
pub(crate) fn declare_planned_queue(
    channel: &Channel,
    plan: &QueuePlan,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    for binding in &plan.bindings {
        match binding.kind {
            ExchangeKind::Topic => {
                declare_topic_exchange(channel, &binding.exchange, options, address)?
            }
            ExchangeKind::Fanout => {
                declare_fanout_exchange(channel, &binding.exchange, options, address)?
            }
        }
    }
    match plan.lifetime {
        QueueLifetime::Shared => declare_shared_queue(channel, &plan.name, options, address)?,
        QueueLifetime::Transient => declare_transient_queue(channel, &plan.name, options, address)?,
        QueueLifetime::Stream => declare_queue(
            channel,
            &plan.name,
            (true, false),
            stream_arguments(options),
            address,
        )?,
        // Dead letters outlive a broker restart; with quorum queues they are replicated too
        // (a classic queue on a node that is down would keep the server from consuming).
        QueueLifetime::DeadLetter => declare_queue(
            channel,
            &plan.name,
            (true, false),
            dead_letter_arguments(options),
            address,
        )?,
    }
    for binding in &plan.bindings {
        bind(
            channel,
            &plan.name,
            &binding.exchange,
            &binding.routing_key,
            address,
        )?;
    }
    Ok(())
}

/// Declares a server or notification queue: durable and auto-delete as the control exchange,
/// ha and quorum arguments, never `x-expires`.
pub(crate) fn declare_shared_queue(
    channel: &Channel,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let flags = (
        options.durable_queues || options.quorum_queues,
        options.auto_delete,
    );
    declare_queue(channel, queue, flags, shared_arguments(options), address)
}

/// Declares a reply or per-server fanout queue: durable only as a transient quorum queue, not
/// exclusive, not auto-delete, with `x-expires` unless the TTL is zero.
pub(crate) fn declare_transient_queue(
    channel: &Channel,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    declare_queue(
        channel,
        queue,
        (options.transient_quorum_queues, false),
        transient_arguments(options),
        address,
    )
}

/// `(durable, auto_delete)`.
type Flags = (bool, bool);

fn declare_exchange(
    channel: &Channel,
    kind: ExchangeType,
    name: &str,
    (durable, auto_delete): Flags,
    address: &str,
) -> Result<()> {
    let options = ExchangeDeclareOptions {
        durable,
        auto_delete,
        internal: false,
        arguments: FieldTable::new(),
    };
    channel
        .exchange_declare(kind, name, options)
        .map(drop)
        .map_err(|e| explain(amqp_error(e, address), "exchange", name))
}

/// Queues are never exclusive: oslo's are shared or outlive their connection.
fn declare_queue(
    channel: &Channel,
    queue: &str,
    (durable, auto_delete): Flags,
    arguments: FieldTable,
    address: &str,
) -> Result<()> {
    let options = QueueDeclareOptions {
        durable,
        exclusive: false,
        auto_delete,
        arguments,
    };
    channel
        .queue_declare(queue, options)
        .map(drop)
        .map_err(|e| explain(amqp_error(e, address), "queue", queue))
}

pub(crate) fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    address: &str,
) -> Result<()> {
    channel
        .queue_bind(queue, exchange, key, FieldTable::new())
        .map_err(|e| amqp_error(e, address))
}

/// py-amqp's integer encoding: a signed 32-bit int when it fits, else a 64-bit one.
pub(crate) fn integer(value: i64) -> AmqpValue {
    match i32::try_from(value) {
        Ok(small) if small != i32::MIN => AmqpValue::LongInt(small),
        _ => AmqpValue::LongLongInt(value),
    }
}

/// oslo's `_get_queue_arguments` without the TTL and stream parts: ha, then quorum.
fn base_arguments(options: &TransportOptions, quorum: bool) -> FieldTable {
    let mut arguments = FieldTable::new();
    if options.ha_queues {
        arguments.insert("x-ha-policy".into(), AmqpValue::LongString("all".into()));
    }
    if quorum {
        arguments.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
        for (key, value) in [
            ("x-delivery-limit", options.quorum_delivery_limit),
            ("x-max-in-memory-length", options.quorum_max_memory_length),
            ("x-max-in-memory-bytes", options.quorum_max_memory_bytes),
        ] {
            if value != 0 {
                arguments.insert(key.into(), integer(value));
            }
        }
    }
    arguments
}

/// Arguments of server and notification queues.
pub(crate) fn shared_arguments(options: &TransportOptions) -> FieldTable {
    base_arguments(options, options.quorum_queues)
}

/// Arguments of reply and per-server fanout queues: `{"x-expires": ttl_ms}` and the
/// transient quorum arguments.
pub(crate) fn transient_arguments(options: &TransportOptions) -> FieldTable {
    let mut arguments = base_arguments(options, options.transient_quorum_queues);
    let ttl_ms = options.transient_queues_ttl.as_millis();
    if ttl_ms > 0 {
        // validate() bounds the TTL to i32 milliseconds.
        arguments.insert(
            "x-expires".into(),
            integer(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
        );
    }
    arguments
}

/// Arguments of warren's dead-letter queue: a quorum queue when server queues are.
pub(crate) fn dead_letter_arguments(options: &TransportOptions) -> FieldTable {
    let mut arguments = FieldTable::new();
    if options.quorum_queues {
        arguments.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
    }
    arguments
}

/// Arguments of the stream fanout queue: only the type and the age (oslo replaces the rest).
pub(crate) fn stream_arguments(options: &TransportOptions) -> FieldTable {
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-queue-type".into(),
        AmqpValue::LongString("stream".into()),
    );
    let ttl = options.transient_queues_ttl.as_secs();
    if ttl > 0 {
        arguments.insert("x-max-age".into(), AmqpValue::LongString(format!("{ttl}s")));
    }
    arguments
}

/// A 406 on a declaration, explained: which argument differs and the option that matches what
/// the broker has ("queue `compute` is a quorum queue on the broker: set
/// rabbit_quorum_queue=true").
fn explain(error: Error, what: &str, name: &str) -> Error {
    let Error::Refused { code: 406, text } = error else {
        return error;
    };
    let current = |arg: &str| {
        text.contains(&format!("inequivalent arg '{arg}'"))
            .then(|| text.rsplit_once("current is the value ").map(|(_, v)| v))
            .flatten()
    };
    let hint = if let Some(value) = current("x-queue-type") {
        if value.starts_with("'quorum'") {
            format!("{what} `{name}` is a quorum queue on the broker: set rabbit_quorum_queue=true (server and notification queues) or rabbit_transient_quorum_queue=true (reply and fanout queues)")
        } else if value.starts_with("'stream'") {
            format!("{what} `{name}` is a stream on the broker: set rabbit_stream_fanout=true")
        } else {
            format!("{what} `{name}` has another queue type on the broker: check rabbit_quorum_queue, rabbit_transient_quorum_queue and rabbit_stream_fanout")
        }
    } else if text.contains("received none but current is the value 'quorum'") {
        format!("{what} `{name}` is a quorum queue on the broker: set rabbit_quorum_queue=true or rabbit_transient_quorum_queue=true")
    } else if text.contains("inequivalent arg 'durable'") {
        format!("{what} `{name}` has another durability on the broker: match amqp_durable_queues (and the quorum options) to the deployment")
    } else if text.contains("inequivalent arg 'auto_delete'") {
        format!("{what} `{name}` has another auto-delete flag on the broker: match amqp_auto_delete to the deployment")
    } else if text.contains("inequivalent arg 'x-expires'") {
        format!("{what} `{name}` has another x-expires on the broker: match rabbit_transient_queues_ttl to the deployment")
    } else if text.contains("inequivalent arg 'x-delivery-limit'") {
        format!("{what} `{name}`: match rabbit_quorum_delivery_limit to the deployment")
    } else if text.contains("inequivalent arg 'x-max-in-memory") {
        format!("{what} `{name}`: match rabbit_quorum_max_memory_length / _bytes to the deployment")
    } else if text.contains("inequivalent arg 'x-ha-policy'") {
        format!("{what} `{name}`: match rabbit_ha_queues to the deployment")
    } else {
        return Error::Refused { code: 406, text };
    };
    Error::Refused {
        code: 406,
        text: format!("{hint} ({text})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn with(pairs: &[(&str, &str)]) -> TransportOptions {
        let mut options = TransportOptions::default();
        for (k, v) in pairs {
            options.apply(k, v).unwrap();
        }
        options.validate().unwrap();
        options
    }

    fn table(pairs: &[(&str, AmqpValue)]) -> FieldTable {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    /// What oslo 18.3.1 declared with `rabbit_quorum_queue`, `rabbit_transient_quorum_queue`,
    /// `rabbit_stream_fanout`, prefetch 10, delivery limit 5 (reference §3.7, observed).
    #[test]
    fn quorum_and_stream_arguments_match_oslos_declarations() {
        let options = with(&[
            ("rabbit_quorum_queue", "true"),
            ("rabbit_transient_quorum_queue", "true"),
            ("rabbit_stream_fanout", "true"),
            ("rabbit_qos_prefetch_count", "10"),
            ("rabbit_quorum_delivery_limit", "5"),
        ]);
        let quorum = AmqpValue::LongString("quorum".into());
        assert_eq!(
            shared_arguments(&options),
            table(&[
                ("x-queue-type", quorum.clone()),
                ("x-delivery-limit", AmqpValue::LongInt(5))
            ])
        );
        assert_eq!(
            transient_arguments(&options),
            table(&[
                ("x-queue-type", quorum),
                ("x-delivery-limit", AmqpValue::LongInt(5)),
                ("x-expires", AmqpValue::LongInt(1_800_000))
            ])
        );
        assert_eq!(
            stream_arguments(&options),
            table(&[
                ("x-queue-type", AmqpValue::LongString("stream".into())),
                ("x-max-age", AmqpValue::LongString("1800s".into()))
            ])
        );
    }

    #[test]
    fn the_dead_letter_queue_is_a_quorum_queue_when_server_queues_are() {
        assert!(dead_letter_arguments(&TransportOptions::default()).is_empty());
        assert_eq!(
            dead_letter_arguments(&with(&[("rabbit_quorum_queue", "true")])),
            table(&[("x-queue-type", AmqpValue::LongString("quorum".into()))])
        );
    }

    #[test]
    fn memory_limits_and_ha_follow_py_amqp_types() {
        let options = with(&[
            ("rabbit_quorum_queue", "true"),
            ("rabbit_quorum_max_memory_length", "100"),
            ("rabbit_quorum_max_memory_bytes", "8589934592"),
        ]);
        assert_eq!(
            shared_arguments(&options),
            table(&[
                ("x-queue-type", AmqpValue::LongString("quorum".into())),
                ("x-max-in-memory-length", AmqpValue::LongInt(100)),
                ("x-max-in-memory-bytes", AmqpValue::LongLongInt(1 << 33)),
            ])
        );
        // Transient queues stay classic without rabbit_transient_quorum_queue.
        assert_eq!(
            transient_arguments(&options),
            table(&[("x-expires", AmqpValue::LongInt(1_800_000))])
        );
        let ha = with(&[("rabbit_ha_queues", "true")]);
        assert_eq!(
            shared_arguments(&ha),
            table(&[("x-ha-policy", AmqpValue::LongString("all".into()))])
        );
        assert_eq!(
            integer(i64::from(i32::MIN)),
            AmqpValue::LongLongInt(i64::from(i32::MIN))
        );
    }

    #[test]
    fn a_406_names_the_option_that_matches_the_broker() {
        let refused = |text: &str| Error::Refused {
            code: 406,
            text: text.into(),
        };
        let quorum = explain(
            refused("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'compute' in vhost '/': received none but current is the value 'quorum' of type 'longstr'"),
            "queue",
            "compute",
        );
        let text = quorum.to_string();
        assert!(
            text.contains(
                "queue `compute` is a quorum queue on the broker: set rabbit_quorum_queue=true"
            ),
            "{text}"
        );
        assert!(
            text.contains("PRECONDITION_FAILED"),
            "the broker's words are kept: {text}"
        );
        let durable = explain(
            refused("PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'nova' in vhost '/': received 'false' but current is 'true'"),
            "exchange",
            "nova",
        );
        assert!(
            durable.to_string().contains("amqp_durable_queues"),
            "{durable}"
        );
        let other = explain(refused("something else"), "queue", "q");
        assert_eq!(other.to_string(), refused("something else").to_string());
        let not_found = Error::Refused {
            code: 404,
            text: "NOT_FOUND".into(),
        };
        assert_eq!(
            explain(not_found, "queue", "q").to_string(),
            "the broker refused the operation (404): NOT_FOUND"
        );
    }

    #[test]
    fn transient_queues_expire_after_ttl_in_milliseconds() {
        let options = TransportOptions::default();
        let args = transient_arguments(&options);
        assert_eq!(args.get("x-expires"), Some(&AmqpValue::LongInt(1_800_000)));
        let none = TransportOptions {
            transient_queues_ttl: Duration::ZERO,
            ..TransportOptions::default()
        };
        assert!(transient_arguments(&none).is_empty());
    }
}
