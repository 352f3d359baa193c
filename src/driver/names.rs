//! Every AMQP name warren writes is checked before it reaches a frame.
//!
//! Queue, exchange and routing-key names are AMQP short strings: at most 255 bytes. amiquip
//! writes a longer one into a malformed frame, the broker closes the connection, and a retrying
//! publisher would reconnect and resend in a loop. Names come from targets (topic, server,
//! exchange) and from peers (a request's `_reply_q`), so both drivers check here, once per
//! message or listener, and refuse with [`Error::InvalidTarget`].

use crate::driver::{ListenSpec, Outgoing, Route};
use crate::error::{Error, Result};
use crate::wire::limits::check_short_string;

impl Outgoing<'_> {
    /// `Ok` if every name this message is published with fits an AMQP frame.
    pub fn check_names(&self) -> Result<()> {
        let checked = match self.route {
            Route::Topic {
                exchange,
                routing_key,
            } => check_short_string("exchange name", exchange)
                .and_then(|()| check_short_string("routing key", routing_key)),
            Route::Fanout { topic } => check_short_string(
                "fanout exchange name",
                &crate::driver::fanout_exchange(topic),
            ),
            Route::Direct { queue } => check_short_string("queue name", queue),
        };
        checked
            .and_then(|()| {
                self.declare_queue
                    .map_or(Ok(()), |queue| check_short_string("queue name", queue))
            })
            .map_err(Error::invalid_target)
    }
}

impl ListenSpec {
    /// `Ok` if every queue, exchange and routing key the listener declares fits an AMQP frame.
    pub fn check_names(&self) -> Result<()> {
        for queue in &self.queues {
            check_short_string("queue name", &queue.name).map_err(Error::invalid_target)?;
            for binding in &queue.bindings {
                check_short_string("exchange name", &binding.exchange)
                    .and_then(|()| check_short_string("routing key", &binding.routing_key))
                    .map_err(Error::invalid_target)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Codec;

    fn outgoing(route: Route<'_>) -> Outgoing<'_> {
        Outgoing {
            route,
            body: b"",
            codec: Codec::MsgPack,
            expiration: None,
            mandatory: false,
            redelivery: None,
            declare_queue: None,
        }
    }

    #[test]
    fn every_name_of_a_message_is_checked() {
        let long = "x".repeat(256);
        let fits = "x".repeat(255);
        for route in [
            Route::Topic {
                exchange: &long,
                routing_key: "t",
            },
            Route::Topic {
                exchange: "e",
                routing_key: &long,
            },
            // `<topic>_fanout` is 7 bytes longer than the topic.
            Route::Fanout { topic: &fits[6..] },
            Route::Direct { queue: &long },
        ] {
            let err = outgoing(route).check_names().unwrap_err();
            assert!(
                matches!(err, Error::InvalidTarget { .. }),
                "{route:?}: {err}"
            );
            assert!(err.to_string().contains("at most 255"), "{err}");
        }
        assert!(outgoing(Route::Fanout { topic: &fits[7..] })
            .check_names()
            .is_ok());
        assert!(outgoing(Route::Direct { queue: &fits })
            .check_names()
            .is_ok());
        let mut declaring = outgoing(Route::Direct { queue: "q" });
        declaring.declare_queue = Some(&long);
        assert!(declaring.check_names().is_err());
    }

    #[test]
    fn every_name_of_a_listener_is_checked() {
        let fits = ListenSpec::rpc("openstack", "compute", "host-1", Some("compute_dlq"), None);
        assert!(fits.check_names().is_ok());
        // `<topic>.<server>` is over 255 bytes although each part fits.
        let joined = ListenSpec::rpc("openstack", &"t".repeat(200), &"s".repeat(60), None, None);
        assert!(joined.check_names().is_err());
        let exchange = ListenSpec::rpc(&"e".repeat(256), "compute", "host-1", None, None);
        assert!(exchange.check_names().is_err());
    }
}
