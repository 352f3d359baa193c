//! Nothing leaks: after `stop()` + `wait()` no thread of the server remains, and after the
//! transport is dropped no thread or broker connection of this process remains.
//!
//! One test per binary, so no other test's threads or connections blur the counts.

mod common;

use std::time::Duration;

use common::{
    broker_url, ctx, delete_on_broker, eventually, memory_url, rabbitmqctl_json,
    settled_thread_count, thread_count, threads_back_to, unique,
};
use serde_json::{json, Value};
use warren::{Endpoint, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};

fn our_connections() -> usize {
    let marker = format!("pid {})", std::process::id());
    rabbitmqctl_json(&["list_connections", "client_properties"])
        .iter()
        .filter(|c| c.to_string().contains(&marker))
        .count()
}

/// A started server whose `echo` returns its arguments.
fn echo_server(transport: &Transport, topic: &str, name: &str, workers: usize) -> RpcServer {
    let echo = Endpoint::new().method("echo", |_: &RequestContext, v: Value| Ok::<_, Failure>(v));
    let server = RpcServer::builder(transport, Target::new(topic).with_server(name))
        .endpoint(echo)
        .workers(workers)
        .build()
        .unwrap();
    server.start().unwrap();
    server
}

/// Serves, calls, casts, stops; checks threads after `wait()` and after dropping everything.
fn exercise(url: &str, rabbit: bool) -> String {
    let before_transport = thread_count();
    let topic = unique("life");
    let exchange = unique("life_exchange");
    {
        let transport = Transport::builder(url)
            .control_exchange(exchange.as_str())
            .build()
            .unwrap();
        let client = RpcClient::new(&transport, Target::new(topic.as_str()));
        // Warm the client side (reply consumer, send connection) so only the server is counted.
        let server_for_warmup = echo_server(&transport, &topic, "warm", 1);
        let _: Value = client.call(&ctx(), "echo", &json!({})).unwrap();
        server_for_warmup.stop();
        server_for_warmup.wait();
        let baseline = settled_thread_count();

        for round in 0..3 {
            let server = echo_server(&transport, &topic, "s1", 8);
            assert!(
                thread_count() >= baseline + 9,
                "listener + 8 workers running"
            );
            for i in 0..20 {
                let echoed: Value = client.call(&ctx(), "echo", &json!({"i": i})).unwrap();
                assert_eq!(echoed, json!({"i": i}));
                client.cast(&ctx(), "echo", &json!({"i": i})).unwrap();
            }
            server.stop();
            server.wait();
            threads_back_to(
                baseline,
                &format!("round {round}: server threads gone after wait()"),
            );
            drop(server);
        }
        assert_eq!(transport.pending_calls(), 0);
        if rabbit {
            assert!(
                our_connections() >= 2,
                "send and reply connections are open"
            );
        }
    }
    // Dropping the transport (and every clone) closes its connections and joins their threads.
    threads_back_to(before_transport, "transport threads joined on drop");
    if rabbit {
        // The broker lists a closed connection for a moment longer.
        eventually(
            "no connection of this process left",
            Duration::from_secs(10),
            || our_connections() == 0,
        );
        delete_on_broker(
            url,
            &[
                topic.clone(),
                format!("{topic}.s1"),
                format!("{topic}.warm"),
            ],
            &[exchange],
        );
    }
    topic
}

#[test]
fn no_thread_consumer_or_connection_outlives_its_owner() {
    exercise(&memory_url(), false);
    exercise(&broker_url(), true);
}
