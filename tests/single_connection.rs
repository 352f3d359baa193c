//! One connection per transport (`single_connection=true`): the shared RPC scenarios again
//! with every transport in that layout, and the layout itself. (Its recovery from cut
//! connections: `resilience::calls_and_casts_survive_five_cuts_of_the_one_connection_per_transport`.)

mod common;

use common::proxy::Proxy;
use common::{broker_url, ctx, with_query, Bus};
use serde_json::json;
use warren::{Codec, RpcClient, Target};

/// `url` with `single_connection=true` added to its query.
fn single(url: &str) -> String {
    with_query(url, "single_connection=true")
}

fn single_url() -> String {
    single(&broker_url())
}

scenario_tests!(single_url());

#[test]
fn a_transport_serving_and_calling_opens_one_connection() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = single(&proxy.url(&broker_url()));
    let mut bus = Bus::through(&url, &broker_url());
    bus.start_server("s1", 2);
    let server_side = proxy.open_connections();
    assert_eq!(server_side, 1, "the server's transport: one connection");
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 2, "b": 40}))
        .unwrap();
    assert_eq!(sum, 42);
    assert!(transport.reply_queue_name().is_some());
    assert_eq!(
        proxy.open_connections(),
        2,
        "the calling transport: one connection for its request and its reply queue"
    );
}
