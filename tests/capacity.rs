//! Capacity on the real broker: calls outstanding by the ten thousand without a thread each.
//!
//! Its own binary, so that no other test's threads blur the count.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::gate::{cleanup, gated_server, Gate, OpenOnDrop};
use common::{broker_url, thread_count, unique};
use warren::{PendingCall, RequestContext, RpcClient, Target, Transport};

#[test]
fn ten_thousand_calls_outstanding_from_ten_threads() {
    let url = broker_url();
    let topic = unique("capacity");
    let gate = Arc::new(Gate::default());
    let (server, _server_transport) = gated_server(&url, &topic, &gate);
    let _open_on_exit = OpenOnDrop(gate.clone());
    let transport = Transport::new(&url).expect("transport");
    let client =
        RpcClient::new(&transport, Target::new(topic.as_str())).timeout(Duration::from_secs(120));
    // The first call opens the client's connections (and their threads).
    let first: PendingCall<u64> = client
        .start_call(
            &RequestContext::new(),
            "gated",
            &serde_json::json!({"n": 10_000}),
        )
        .expect("sent");
    let threads_before = thread_count();

    // Ten threads send a thousand calls each and hand the pending calls back.
    let senders: Vec<_> = (0..10_u64)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                (0..1000_u64)
                    .map(|i| {
                        let n = t * 1000 + i;
                        let call: PendingCall<u64> = client
                            .start_call(
                                &RequestContext::new(),
                                "gated",
                                &serde_json::json!({"n": n}),
                            )
                            .expect("sent");
                        (n, call)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let pending: Vec<(u64, PendingCall<u64>)> = senders
        .into_iter()
        .flat_map(|s| s.join().expect("sender"))
        .collect();
    assert_eq!(pending.len(), 10_000);
    assert_eq!(transport.pending_calls(), 10_001, "all outstanding at once");
    assert!(
        thread_count() <= threads_before + 2,
        "no thread per call: {} threads before, {} now",
        threads_before,
        thread_count()
    );

    gate.open();
    for (n, call) in pending {
        assert_eq!(call.wait().expect("result"), n);
    }
    assert_eq!(first.wait().expect("result"), 10_000);
    assert_eq!(transport.pending_calls(), 0);
    server.stop();
    server.wait();
    cleanup(&url, &topic);
}
