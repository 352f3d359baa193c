//! (7) Fifty reconnects in a row leak no thread, channel, consumer or connection.
//!
//! Alone in its binary, so no other test's threads or connections blur the counts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::proxy::Proxy;
use common::{
    broker_url, consumers_with_prefix, rabbitmqctl_json, settled_thread_count, threads_back_to,
    until_served, Bus,
};
use warren::Codec;

#[test]
fn fifty_reconnects_in_a_row_leak_nothing() {
    let proxy = Proxy::start("127.0.0.1:5672");
    let url = format!(
        "{}?heartbeat_timeout_threshold=2&kombu_reconnect_splay=0.05&rabbit_retry_interval=0.1&rabbit_retry_backoff=0.1&rabbit_interval_max=0.5",
        proxy.url(&broker_url())
    );
    let mut bus = Bus::through(&url, &broker_url());
    bus.start_server("s1", 4);
    let client = bus.client(Codec::MsgPack);
    until_served(&client, Duration::from_secs(5));
    let baseline = settled_thread_count();
    for _ in 0..50 {
        proxy.cut_all();
        until_served(&client, Duration::from_secs(5));
    }
    // The threads of the cut connections exit (stragglers included): no more than before.
    threads_back_to(baseline, "threads after 50 reconnects");

    // Broker side: of every connection this proxy ever carried, only the live ones remain:
    // the server's listen and send (replies) connections, the client's reply and send ones.
    // (Eventually: a spare send connection of two threads reconnecting at once is closed by
    // the one that lost the race, and the proxy sees its end a moment later.)
    common::eventually(
        "four connections through the proxy",
        Duration::from_secs(10),
        || proxy.open_connections() == 4,
    );
    let ours: HashSet<u16> = proxy.upstream_ports().into_iter().collect();
    assert!(
        ours.len() > 150,
        "every cut made each connection reconnect: {}",
        ours.len()
    );
    common::eventually(
        "closed connections leave the broker",
        Duration::from_secs(10),
        || {
            let connections = rabbitmqctl_json(&["list_connections", "peer_port", "channels"]);
            let live: Vec<_> = connections
                .iter()
                .filter(|c| {
                    c["peer_port"]
                        .as_u64()
                        .is_some_and(|p| ours.contains(&(p as u16)))
                })
                .collect();
            let channels: u64 = live.iter().filter_map(|c| c["channels"].as_u64()).sum();
            live.len() == 4 && channels <= 6
        },
    );
    assert_eq!(
        consumers_with_prefix(&bus.topic).len(),
        3,
        "one consumer per server queue"
    );
}
