//! Exchanges, queues and bindings, declared exactly as oslo.messaging declares them.
//!
//! RabbitMQ refuses (406 PRECONDITION_FAILED) a re-declaration with other flags or arguments,
//! so warren must use oslo's: the control exchange is a non-auto-delete topic exchange,
//! durable only with `amqp_durable_queues`; server queues `<topic>` and `<topic>.<server>` and
//! notification queues `<topic>.<priority>` have the same durability and no arguments; the
//! fanout exchange `<topic>_fanout` is auto-delete and never durable; fanout and reply queues
//! carry `x-expires` (ms, as a signed 32-bit int, what py-amqp sends).

use amiquip::{
    AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use crate::driver::{ExchangeKind, QueueLifetime, QueuePlan};
use crate::error::Result;
use crate::options::TransportOptions;

use super::connection::amqp_error;

/// Declares the topic (control) exchange `name`.
pub(crate) fn declare_topic_exchange(
    channel: &Channel,
    name: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let flags = (options.durable_queues, options.auto_delete);
    declare_exchange(channel, ExchangeType::Topic, name, flags, address)
}

/// Declares a fanout exchange (`<topic>_fanout`): auto-delete, never durable.
pub(crate) fn declare_fanout_exchange(channel: &Channel, name: &str, address: &str) -> Result<()> {
    declare_exchange(channel, ExchangeType::Fanout, name, (false, true), address)
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
            ExchangeKind::Fanout => declare_fanout_exchange(channel, &binding.exchange, address)?,
        }
    }
    match plan.lifetime {
        QueueLifetime::Shared => declare_shared_queue(channel, &plan.name, options, address)?,
        QueueLifetime::Transient => declare_transient_queue(channel, &plan.name, options, address)?,
        // Dead letters outlive a broker restart.
        QueueLifetime::DeadLetter => declare_queue(
            channel,
            &plan.name,
            (true, false),
            FieldTable::new(),
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

/// Declares a server or notification queue: durable and auto-delete as the options say, no
/// arguments (never `x-expires`).
pub(crate) fn declare_shared_queue(
    channel: &Channel,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let flags = (options.durable_queues, options.auto_delete);
    declare_queue(channel, queue, flags, FieldTable::new(), address)
}

/// Declares a reply or fanout queue: non-durable, not exclusive, not auto-delete, with
/// `x-expires` unless the TTL is zero.
pub(crate) fn declare_transient_queue(
    channel: &Channel,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    declare_queue(
        channel,
        queue,
        (false, false),
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
        .map_err(|e| amqp_error(e, address))
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
        .map_err(|e| amqp_error(e, address))
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

/// `{"x-expires": ttl_ms}` or nothing.
pub(crate) fn transient_arguments(options: &TransportOptions) -> FieldTable {
    let mut arguments = FieldTable::new();
    let ttl_ms = options.transient_queues_ttl.as_millis();
    if ttl_ms > 0 {
        // validate() bounds the TTL to i32 milliseconds.
        arguments.insert(
            "x-expires".into(),
            AmqpValue::LongInt(i32::try_from(ttl_ms).unwrap_or(i32::MAX)),
        );
    }
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
