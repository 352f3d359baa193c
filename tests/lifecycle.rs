//! Nothing leaks: after `stop()` + `wait()` no thread of the server remains, and after the
//! transport is dropped no thread or broker connection of this process remains.
//!
//! One test per binary, so no other test's threads or connections blur the counts.

mod common;

use std::time::Duration;

use common::{
    broker_url, delete_on_broker, eventually, memory_url, rabbitmqctl_json, thread_count, unique,
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

/// Every amiquip connection has a detached timer thread (mio-extras) that exits shortly after
/// the connection is closed; nothing can join it, so wait until no such thread is left.
/// They carry the name of the thread that opened the connection; ours are all "warren-*" or
/// "amiquip-io", so an unnamed straggler shows up under a borrowed name.
fn settle_threads() {
    let mut last = thread_count();
    let mut stable = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stable < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = thread_count();
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
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
        let _: Value = client
            .call(&RequestContext::new(), "echo", &json!({}))
            .unwrap();
        server_for_warmup.stop();
        server_for_warmup.wait();
        settle_threads();
        let baseline = thread_count();

        for round in 0..3 {
            let server = echo_server(&transport, &topic, "s1", 8);
            assert!(
                thread_count() >= baseline + 9,
                "listener + 8 workers running"
            );
            for i in 0..20 {
                let echoed: Value = client
                    .call(&RequestContext::new(), "echo", &json!({"i": i}))
                    .unwrap();
                assert_eq!(echoed, json!({"i": i}));
                client
                    .cast(&RequestContext::new(), "echo", &json!({"i": i}))
                    .unwrap();
            }
            server.stop();
            server.wait();
            settle_threads();
            assert_eq!(
                thread_count(),
                baseline,
                "round {round}: server threads gone after wait(): {:?}",
                common::thread_names()
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
    settle_threads();
    assert_eq!(
        thread_count(),
        before_transport,
        "transport threads joined on drop: {:?}",
        common::thread_names()
    );
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
