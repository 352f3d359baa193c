//! A server whose handlers wait at a gate, for tests that need messages to pile up.

use std::sync::{Arc, Condvar, Mutex};

use serde::Deserialize;
use warren::{Endpoint, Failure, RequestContext, RpcServer, Target, Transport};

use super::delete_on_broker;

/// Handlers wait until the gate opens.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    pub fn pass(&self) {
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.changed.wait(open).expect("gate");
        }
    }

    pub fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.changed.notify_all();
    }
}

/// Opens the gate when dropped, so that a failing test does not leave its server's workers
/// (and so the server's drop) waiting forever. Declare it after the server: it drops first.
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[derive(Deserialize)]
struct N {
    n: u64,
}

/// A server of `topic` whose `gated` method returns its argument once the gate is open, and
/// whose `sink` cast waits for the gate too.
pub fn gated_server(url: &str, topic: &str, gate: &Arc<Gate>) -> (RpcServer, Transport) {
    let transport = Transport::new(url).expect("transport");
    let (call_gate, cast_gate) = (gate.clone(), gate.clone());
    let endpoint = Endpoint::new()
        .method("gated", move |_: &RequestContext, args: N| {
            call_gate.pass();
            Ok::<_, Failure>(args.n)
        })
        .method("sink", move |_: &RequestContext, _: serde_json::Value| {
            cast_gate.pass();
            Ok::<_, Failure>(())
        });
    let server = RpcServer::builder(&transport, Target::new(topic).with_server("s1"))
        .endpoint(endpoint)
        .workers(4)
        .build()
        .expect("server");
    server.start().expect("start");
    (server, transport)
}

/// Deletes the queues of a gated server of `topic`.
pub fn cleanup(url: &str, topic: &str) {
    delete_on_broker(url, &[topic.to_string(), format!("{topic}.s1")], &[]);
}
