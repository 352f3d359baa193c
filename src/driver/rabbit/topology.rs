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
    channel
        .exchange_declare(
            ExchangeType::Topic,
            name,
            ExchangeDeclareOptions {
                durable: options.durable_queues,
                auto_delete: options.auto_delete,
                internal: false,
                arguments: FieldTable::new(),
            },
        )
        .map(drop)
        .map_err(|e| amqp_error(e, address))
}

/// Declares the fanout exchange of `topic`.
pub(crate) fn declare_fanout_exchange(channel: &Channel, topic: &str, address: &str) -> Result<()> {
    channel
        .exchange_declare(
            ExchangeType::Fanout,
            fanout_exchange(topic),
            ExchangeDeclareOptions {
                durable: false,
                auto_delete: true,
                internal: false,
                arguments: FieldTable::new(),
            },
        )
        .map(drop)
        .map_err(|e| amqp_error(e, address))
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
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: options.durable_queues,
                exclusive: false,
                auto_delete: options.auto_delete,
                arguments: FieldTable::new(),
            },
        )
        .map_err(|e| amqp_error(e, address))?;
    channel
        .queue_bind(queue, exchange, queue, FieldTable::new())
        .map_err(|e| amqp_error(e, address))
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
    channel
        .queue_bind(queue, fanout_exchange(topic), topic, FieldTable::new())
        .map_err(|e| amqp_error(e, address))
}

/// Declares a reply or fanout queue: non-durable, not exclusive, not auto-delete, with
/// `x-expires` unless the TTL is zero.
pub(crate) fn declare_transient_queue(
    channel: &Channel,
    queue: &str,
    options: &TransportOptions,
    address: &str,
) -> Result<()> {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: transient_arguments(options),
            },
        )
        .map(drop)
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
