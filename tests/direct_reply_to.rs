//! Calls asking for their replies through RabbitMQ's direct reply-to (`direct_reply_to=true`):
//! the shared RPC scenarios again with every transport in that mode, then what is particular
//! to it: no reply queue, the request's `reply_to`, the fall-back to the reply queue when every
//! channel is taken, a caller gone before its reply, and `memory://` ignoring the option.

mod common;

use std::sync::Arc;
use std::time::Duration;

use amiquip::{FieldTable, QueueDeclareOptions};
use common::gate::{Gate, OpenOnDrop};
use common::{broker_url, ctx, eventually, memory_url, with_query, Bus};
use serde_json::{json, Value};
use warren::{Codec, Endpoint, Failure, RequestContext, RpcClient, Target, Transport};

const WAIT: Duration = Duration::from_secs(10);

/// `url` with `direct_reply_to=true` added to its query.
fn direct(url: &str) -> String {
    with_query(url, "direct_reply_to=true")
}

fn direct_url() -> String {
    direct(&broker_url())
}

scenario_tests!(direct_url());

/// (Many threads calling at once, each getting its own reply: the scenario
/// `many_client_threads_share_one_client` above.)
#[test]
fn calls_get_their_replies_without_a_reply_queue() {
    let mut bus = Bus::new(&direct_url());
    bus.start_server("s1", 2);
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    for i in 0..20_i64 {
        let sum: i64 = client
            .call(&ctx(), "add", &json!({"a": 1000, "b": i}))
            .unwrap();
        assert_eq!(sum, 1000 + i);
    }
    assert_eq!(transport.reply_queue_name(), None, "a reply queue was used");
    assert_eq!(transport.pending_calls(), 0);
}

#[test]
fn requests_carry_the_pseudo_queue_in_reply_to_and_in_their_body() {
    let mut bus = Bus::new(&direct_url());
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let probe = Endpoint::new().method("probe", move |ctx: &RequestContext, _: Value| {
        let _ = seen_tx.send(ctx.clone());
        Ok::<_, Failure>("ok".to_string())
    });
    bus.start_server_with("s1", |b| b.workers(1).endpoint(probe));
    let client = bus.client(Codec::Json);
    // The request on the wire: read it from a queue of our own bound to the topic too.
    let mut connection = amiquip::Connection::insecure_open(&broker_url()).unwrap();
    let channel = connection.open_channel(None).unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let spy = channel.queue_declare("", exclusive).unwrap();
    channel
        .queue_bind(
            spy.name(),
            bus.exchange.as_str(),
            bus.topic.as_str(),
            FieldTable::new(),
        )
        .unwrap();
    let reply: String = client.call(&ctx(), "probe", &json!({})).unwrap();
    assert_eq!(reply, "ok");
    assert!(seen.recv_timeout(WAIT).is_ok());
    let mut request = None;
    eventually("the spy got the request", WAIT, || {
        request = spy.get(true).unwrap();
        request.is_some()
    });
    let request = request.expect("the request").delivery;
    // The broker rewrote the property into the caller's channel; the body keeps the name.
    let reply_to = request.properties.reply_to().clone().unwrap_or_default();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > 30,
        "{reply_to:?}"
    );
    let body: Value = serde_json::from_slice(&request.body).expect("json");
    let message: Value =
        serde_json::from_str(body["oslo.message"].as_str().expect("oslo.message")).unwrap();
    assert_eq!(message["_reply_q"], "amq.rabbitmq.reply-to");
    let _ = connection.close();
}

#[test]
fn more_calls_than_channels_use_the_reply_queue_for_the_rest() {
    let mut bus = Bus::new(&direct_url());
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let gated = Endpoint::new().method("gated", move |_: &RequestContext, args: Value| {
        held.pass();
        Ok::<_, Failure>(args["n"].clone())
    });
    bus.start_server_with("s1", |b| b.workers(4).endpoint(gated));
    let _open = OpenOnDrop(gate.clone());
    let transport = bus.transport(Codec::MsgPack);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    // 32 channels per send connection: the calls after them wait on the reply queue.
    let pending: Vec<_> = (0..40_i64)
        .map(|n| {
            client
                .start_call::<_, i64>(&ctx(), "gated", &json!({ "n": n }))
                .unwrap()
        })
        .collect();
    assert_eq!(transport.pending_calls(), 40);
    assert!(
        transport.reply_queue_name().is_some(),
        "no call fell back to the reply queue"
    );
    gate.open();
    for (n, call) in pending.into_iter().enumerate() {
        assert_eq!(call.wait().unwrap(), n as i64);
    }
    assert_eq!(transport.pending_calls(), 0);
}

#[test]
fn a_reply_to_a_caller_gone_with_its_transport_is_dropped_and_the_server_carries_on() {
    let mut bus = Bus::new(&direct_url());
    let gate = Arc::new(Gate::default());
    let (started_tx, started) = crossbeam_channel::unbounded();
    let held = gate.clone();
    let gated = Endpoint::new().method("gated", move |_: &RequestContext, _: Value| {
        let _ = started_tx.send(());
        held.pass();
        Ok::<_, Failure>(1)
    });
    bus.start_server_with("s1", |b| b.workers(2).endpoint(gated));
    let _open = OpenOnDrop(gate.clone());
    let gone = Transport::builder(&direct_url())
        .control_exchange(bus.exchange.as_str())
        .build()
        .unwrap();
    let client = RpcClient::new(&gone, Target::new(bus.topic.as_str()));
    let call = client
        .start_call::<_, i64>(&ctx(), "gated", &json!({}))
        .unwrap();
    started.recv_timeout(WAIT).expect("the handler started");
    drop(call);
    gone.close();
    gate.open();
    // The server answered into the void and still serves.
    let sum: i64 = bus
        .client(Codec::MsgPack)
        .call(&ctx(), "add", &json!({"a": 1, "b": 2}))
        .unwrap();
    assert_eq!(sum, 3);
}

#[test]
fn memory_transports_ignore_the_option_and_use_their_reply_queue() {
    let mut bus = Bus::new(&direct(&memory_url()));
    bus.start_server("s1", 2);
    let transport = bus.transport(Codec::MsgPack);
    assert!(transport.options().direct_reply_to);
    let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()));
    let sum: i64 = client
        .call(&ctx(), "add", &json!({"a": 2, "b": 40}))
        .unwrap();
    assert_eq!(sum, 42);
    assert!(transport.reply_queue_name().is_some());
}

/// A broker user that may declare anything but reply queues; deleted when dropped.
struct NoReplyQueues(String);

impl Drop for NoReplyQueues {
    fn drop(&mut self) {
        common::rabbitmqctl_cleanup(&["delete_user", &self.0]);
    }
}

#[test]
fn a_client_not_allowed_to_declare_reply_queues_calls_with_direct_reply_to() {
    let user = NoReplyQueues(common::unique("noreplyq"));
    common::rabbitmqctl(&["add_user", &user.0, "pw4noreplyq"]);
    common::rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &user.0,
        "^(?!reply_).*",
        ".*",
        ".*",
    ]);
    let url = broker_url().replacen("guest:guest@", &format!("{}:pw4noreplyq@", user.0), 1);
    assert_ne!(url, broker_url(), "the test URL has guest's credentials");
    let mut bus = Bus::new(&broker_url());
    bus.start_server("s1", 2);
    let call = |url: &str| {
        let transport = Transport::builder(url)
            .control_exchange(bus.exchange.as_str())
            .build()
            .unwrap();
        let client = RpcClient::new(&transport, Target::new(bus.topic.as_str()))
            .timeout(Duration::from_secs(5));
        let result = client.call::<_, i64>(&ctx(), "add", &json!({"a": 2, "b": 40}));
        transport.close();
        result
    };
    assert_eq!(call(&direct(&url)).unwrap(), 42);
    let refused = call(&url);
    assert!(
        refused.is_err(),
        "the reply queue was declared: {refused:?}"
    );
}
