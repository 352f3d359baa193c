//! Exchanges, queues and bindings, declared exactly as oslo.messaging declares them.
//!
//! RabbitMQ refuses (406 PRECONDITION_FAILED) a re-declaration with other flags or arguments,
//! so warren must use oslo's: the control exchange is a non-auto-delete topic exchange,
//! durable only with `amqp_durable_queues`; server queues `<topic>` and `<topic>.<server>` have
//! the same durability and no arguments; the fanout exchange `<topic>_fanout` is auto-delete
//! and never durable; fanout and reply queues carry `x-expires` (ms, as a signed 32-bit int,
//! what py-amqp sends).

use amiquip::{
    AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use crate::driver::fanout_exchange;
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

/// Declares the fanout exchange of `topic`.
pub(crate) fn declare_fanout_exchange(channel: &Channel, topic: &str, address: &str) -> Result<()> {
    let name = fanout_exchange(topic);
    declare_exchange(channel, ExchangeType::Fanout, &name, (false, true), address)
}

/// Declares a server queue (`<topic>` or `<topic>.<server>`) bound to `exchange` under its
/// own name.
pub(crate) fn declare_server_queue(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    let flags = (options.durable_queues, options.auto_delete);
    declare_queue(channel, queue, flags, FieldTable::new(), address)?;
    bind(channel, queue, exchange, queue, address)
}

/// Declares a server's private fanout queue bound to `<topic>_fanout`.
pub(crate) fn declare_fanout_queue(
    channel: &Channel,
    topic: &str,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    declare_transient_queue(channel, queue, options, address)?;
    bind(channel, queue, &fanout_exchange(topic), topic, address)
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

/// Declares a dead-letter queue: durable (dead letters outlive a broker restart), no arguments.
pub(crate) fn declare_dead_letter_queue(
    channel: &Channel,
    queue: &str,
    address: &str,
) -> Result<()> {
    declare_queue(channel, queue, (true, false), FieldTable::new(), address)
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

fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str, address: &str) -> Result<()> {
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
