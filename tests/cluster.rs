//! warren on a 3-node RabbitMQ cluster of private nodes (tests/common/cluster.rs, never the
//! shared broker) with quorum queues and the URL listing every node, under node failures: a
//! node killed with SIGKILL under calls and at-least-once casts, the quorum leader's node
//! killed, a rolling restart, a client partitioned from its node, fanout after a node loss.
//! Each scenario prints its figures (`FIGURES ...`: time to resume, calls failed, casts lost)
//! and asserts them. The tests share one cluster, one at a time (they kill its nodes); each
//! restarts what it killed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::cluster::{self, Cluster, CLIENT_USER, SERVER_USER};
use common::{ctx, eventually, unique, with_query};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use warren::{
    AckMode, Endpoint, Error, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target,
    Transport,
};

/// 1 s heartbeats, short pauses between reconnection attempts (as in tests/resilience.rs).
const FAST: &str = "heartbeat_timeout_threshold=1&kombu_reconnect_splay=0.2&rabbit_retry_interval=0.2&rabbit_retry_backoff=0.2&rabbit_interval_max=1";
/// Server queues are quorum queues (replicated on the three nodes).
const QUORUM: &str = "rabbit_quorum_queue=true";
/// oslo's stream fanout: one replicated stream per topic, reply and fanout queues quorum.
const STREAM: &str = "rabbit_quorum_queue=true&rabbit_transient_quorum_queue=true&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10";

/// Timeout of the load's calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the probe's calls (the probe measures when service resumes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of the load's casts (a cast retries on a new connection within it).
const CAST_TIMEOUT: Duration = Duration::from_secs(10);
/// How late a call may return after its timeout (scheduling on 2 busy cores).
const LATE: Duration = Duration::from_millis(1500);
/// "Resumes within a few seconds": from the kill to the first successful call sent after it.
const RESUME_BOUND: Duration = Duration::from_secs(5);
/// One reconnect: the broker closes the connection (or 2 missed heartbeats), a pause of at
/// most `rabbit_interval_max` + splay, connecting and declaring again on another node.
const ONE_RECONNECT: Duration = Duration::from_secs(4);

fn init_logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct Numbered {
    id: u64,
}

/// One RPC server of a topic, as at-least-once as warren goes: casts acknowledged only once
/// handled (`AckMode::AfterHandling`), duplicates dropped by `_unique_id`. Handled casts go
/// to `handled`.
struct Server {
    server: RpcServer,
    _transport: Transport,
    handled: Receiver<u64>,
}

impl Server {
    fn start(url: &str, topic: &str, name: &str) -> Server {
        let (handled_tx, handled) = crossbeam_channel::unbounded();
        let transport = Transport::new(url).expect("server transport");
        let who = name.to_string();
        let endpoint = Endpoint::new()
            .method("add", |_: &RequestContext, x: Add| {
                Ok::<_, Failure>(x.a + x.b)
            })
            .method("whoami", move |_: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>(who.clone())
            })
            .method("record", move |_: &RequestContext, n: Numbered| {
                let _ = handled_tx.send(n.id);
                Ok::<_, Failure>(())
            });
        let server = RpcServer::builder(&transport, Target::new(topic).with_server(name))
            .endpoint(endpoint)
            .workers(4)
            .ack_mode(AckMode::AfterHandling { requeue_limit: 3 })
            .duplicate_window(1_000_000)
            .build()
            .expect("server");
        server.start().expect("server start");
        eventually("the server consumes", Duration::from_secs(20), || {
            server.is_consuming()
        });
        Server {
            server,
            _transport: transport,
            handled,
        }
    }

    fn stop(&self) {
        self.server.stop();
        self.server.wait();
    }
}

/// A client of `topic` on the cluster (its own transport), publishing `mandatory` with
/// confirms (`at_least_once`).
fn client(url: &str, topic: &str) -> RpcClient {
    let transport = Transport::new(url).expect("client transport");
    RpcClient::new(&transport, Target::new(topic))
        .at_least_once(true)
        .timeout(CALL_TIMEOUT)
}

/// One call of the load.
#[derive(Debug, Clone)]
struct Call {
    probe: bool,
    started: Instant,
    ended: Instant,
    /// `None` if it returned the right sum; else the error's kind and text.
    error: Option<(&'static str, String)>,
}

impl Call {
    fn ok(&self) -> bool {
        self.error.is_none()
    }
}

fn kind(error: &Error) -> &'static str {
    match error {
        Error::Timeout { .. } => "Timeout",
        Error::DeliveryFailure { .. } => "DeliveryFailure",
        Error::Connection { .. } => "Connection",
        Error::Undeliverable { .. } => "Undeliverable",
        Error::Remote { .. } => "Remote",
        Error::Refused { .. } => "Refused",
        Error::Closed => "Closed",
        _ => "other",
    }
}

#[derive(Default)]
struct Journal {
    calls: Mutex<Vec<Call>>,
    confirmed: Mutex<BTreeSet<u64>>,
    /// Casts that returned an error: id, kind, text.
    unconfirmed: Mutex<Vec<(u64, &'static str, String)>>,
}

/// Calls `add` from 4 threads (timeout [`CALL_TIMEOUT`]), a probe calling with a short
/// timeout (to see when service resumes), and confirmed casts `record {id}` with ids 0, 1...
struct Load {
    running: Arc<AtomicBool>,
    journal: Arc<Journal>,
    threads: Vec<JoinHandle<()>>,
}

/// What a load saw.
struct Report {
    calls: Vec<Call>,
    confirmed: BTreeSet<u64>,
    unconfirmed: Vec<(u64, &'static str, String)>,
}

impl Load {
    fn start(client: &RpcClient) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let journal = Arc::new(Journal::default());
        let mut threads = Vec::new();
        for t in 0..5_i64 {
            let probe = t == 4;
            let client = if probe {
                client.prepare().timeout(PROBE_TIMEOUT)
            } else {
                client.clone()
            };
            let (running, journal) = (running.clone(), journal.clone());
            threads.push(thread::spawn(move || {
                let mut i = 0_i64;
                while running.load(Ordering::Acquire) {
                    let expected = t * 1_000_000_000 + i;
                    let started = Instant::now();
                    let result: Result<i64, Error> =
                        client.call(&ctx(), "add", &json!({"a": t * 1_000_000_000, "b": i}));
                    let ended = Instant::now();
                    let error = match result {
                        Ok(sum) if sum == expected => None,
                        Ok(sum) => Some(("wrong result", format!("{sum} for {expected}"))),
                        Err(e) => Some((kind(&e), e.to_string())),
                    };
                    journal.calls.lock().push(Call {
                        probe,
                        started,
                        ended,
                        error,
                    });
                    i += 1;
                    // Pacing the load, not synchronisation.
                    thread::sleep(Duration::from_millis(if probe { 20 } else { 10 }));
                }
            }));
        }
        let caster = client.prepare().timeout(CAST_TIMEOUT);
        let (casting, cast_journal) = (running.clone(), journal.clone());
        threads.push(thread::spawn(move || {
            let mut id = 0_u64;
            while casting.load(Ordering::Acquire) {
                match caster.cast(&ctx(), "record", &json!({ "id": id })) {
                    Ok(()) => {
                        cast_journal.confirmed.lock().insert(id);
                    }
                    Err(e) => cast_journal
                        .unconfirmed
                        .lock()
                        .push((id, kind(&e), e.to_string())),
                }
                id += 1;
                // Pacing the load, not synchronisation.
                thread::sleep(Duration::from_millis(5));
            }
        }));
        Load {
            running,
            journal,
            threads,
        }
    }

    /// Successful load calls (not the probe's) and confirmed casts so far.
    fn progress(&self) -> (usize, usize) {
        let calls = self
            .journal
            .calls
            .lock()
            .iter()
            .filter(|c| c.ok() && !c.probe)
            .count();
        (calls, self.journal.confirmed.lock().len())
    }

    /// Waits until `calls` more calls succeeded and `casts` more casts were confirmed; fails
    /// with what did flow and the errors meanwhile if they do not within `within`.
    fn flowing(&self, calls: usize, casts: usize, within: Duration) {
        let since = Instant::now();
        let (c0, k0) = self.progress();
        let deadline = since + within;
        loop {
            let (c, k) = self.progress();
            if c >= c0 + calls && k >= k0 + casts {
                return;
            }
            if Instant::now() > deadline {
                let calls_failed: Vec<String> = self
                    .journal
                    .calls
                    .lock()
                    .iter()
                    .filter(|call| call.started >= since)
                    .filter_map(|call| call.error.as_ref().map(|(kind, e)| format!("{kind}: {e}")))
                    .take(10)
                    .collect();
                let casts_failed = self.journal.unconfirmed.lock().len();
                panic!(
                    "calls and casts do not flow: {} of {calls} calls and {} of {casts} casts in \
                     {within:?}; first call errors meanwhile: {calls_failed:#?}; unconfirmed \
                     casts in all: {casts_failed}",
                    c - c0,
                    k - k0
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a call sent at or after `since` succeeded; returns when that was (from
    /// `since`), or `None` if none did within `within`.
    fn resumed(&self, since: Instant, within: Duration) -> Option<Duration> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(resumed) = first_success_after(&self.journal.calls.lock(), since) {
                return Some(resumed);
            }
            // `None` is a result here (reported by the caller: "NOT resumed ..."), not a
            // silent give-up.
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the load threads and joins them.
    fn stop(&mut self) {
        self.running.store(false, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().expect("load thread");
        }
    }

    fn finish(mut self) -> Report {
        self.stop();
        let journal = std::mem::take(&mut self.journal);
        let journal = Arc::try_unwrap(journal).ok().expect("threads ended");
        Report {
            calls: journal.calls.into_inner(),
            confirmed: journal.confirmed.into_inner(),
            unconfirmed: journal.unconfirmed.into_inner(),
        }
    }
}

/// A test that fails stops its load too: its threads would go on calling, and keep their
/// connections, through the tests after it.
impl Drop for Load {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Release);
        for t in self.threads.drain(..) {
            // Joined quietly: a panic of its own is already the test's failure.
            let _ = t.join();
        }
    }
}

/// From `since` to the end of the first successful call sent at or after it.
fn first_success_after(calls: &[Call], since: Instant) -> Option<Duration> {
    calls
        .iter()
        .filter(|c| c.ok() && c.started >= since)
        .map(|c| c.ended - since)
        .min()
}

impl Report {
    /// Load calls (not the probe's) that failed.
    fn failed(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| !c.ok() && !c.probe).collect()
    }

    fn probe_failed(&self) -> usize {
        self.calls.iter().filter(|c| !c.ok() && c.probe).count()
    }

    fn ok(&self) -> usize {
        self.calls.iter().filter(|c| c.ok()).count()
    }

    /// The distinct errors of calls sent at or after `since`.
    fn errors_since(&self, since: Instant) -> BTreeSet<(&'static str, String)> {
        self.calls
            .iter()
            .filter(|c| c.started >= since)
            .filter_map(|c| c.error.clone())
            .collect()
    }

    /// Failed calls by kind of error.
    fn failures_by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for call in self.calls.iter().filter(|c| !c.ok()) {
            *kinds.entry(call.error.as_ref().unwrap().0).or_default() += 1;
        }
        kinds
    }

    /// The longest time without a successful call ending, between `from` and `to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut ends: Vec<Instant> = self
            .calls
            .iter()
            .filter(|c| c.ok() && c.ended >= from && c.ended <= to)
            .map(|c| c.ended)
            .collect();
        ends.push(from);
        ends.push(to);
        ends.sort();
        ends.windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Every call returned within its timeout (plus scheduling slack), with the right result
    /// or a typed error saying the broker or the reply was lost; none failed because the
    /// broker nacked its request (a nacked message was never queued: it is sent again).
    fn assert_calls_fail_only_within_their_timeout(&self) {
        for call in &self.calls {
            let timeout = if call.probe {
                PROBE_TIMEOUT
            } else {
                CALL_TIMEOUT
            };
            let took = call.ended - call.started;
            assert!(took <= timeout + LATE, "a call took {took:?}: {call:?}");
            if let Some((kind, text)) = &call.error {
                assert!(
                    matches!(*kind, "Timeout" | "Connection" | "DeliveryFailure"),
                    "unexpected failure {kind}: {text}"
                );
                assert!(
                    !text.contains("nack"),
                    "a call failed at once on a broker nack (it should be sent again within its \
                     timeout): {call:?}"
                );
            }
        }
    }

    /// Load calls that failed were all sent before `instant` (in flight when the fault hit).
    fn assert_only_calls_in_flight_failed(&self, instant: Instant) {
        let late: Vec<_> = self
            .failed()
            .into_iter()
            .filter(|c| c.started > instant)
            .collect();
        assert!(
            late.is_empty(),
            "calls sent after the fault failed: {late:#?}"
        );
    }
}

/// How the confirmed casts were handled.
#[derive(Debug)]
struct Delivery {
    lost: Vec<u64>,
    duplicated: Vec<u64>,
    handled: usize,
}

/// Waits until every confirmed cast was handled (at most 30 s; what is still missing then is
/// returned as lost, which `assert_exactly_once` reports), then 2 s more for anything handled
/// again.
fn delivery(handled: &Receiver<u64>, confirmed: &BTreeSet<u64>) -> Delivery {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !confirmed.iter().all(|id| counts.contains_key(id)) {
        match handled.recv_deadline(deadline) {
            Ok(id) => *counts.entry(id).or_default() += 1,
            Err(_) => break,
        }
    }
    while let Ok(id) = handled.recv_timeout(Duration::from_secs(2)) {
        *counts.entry(id).or_default() += 1;
    }
    Delivery {
        lost: confirmed
            .iter()
            .filter(|id| !counts.contains_key(id))
            .copied()
            .collect(),
        duplicated: counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect(),
        handled: counts.len(),
    }
}

/// Prints a scenario's figures.
fn figures(scenario: &str, report: &Report, delivery: &Delivery, extra: &str) {
    eprintln!(
        "FIGURES {scenario}: {extra}; calls ok {}, load calls failed {} (probe, {} s timeout: {}), \
         failures by kind {:?}; casts confirmed {}, unconfirmed {}, handled {}, lost {}, \
         handled twice {}",
        report.ok(),
        report.failed().len(),
        PROBE_TIMEOUT.as_secs(),
        report.probe_failed(),
        report.failures_by_kind(),
        report.confirmed.len(),
        report.unconfirmed.len(),
        delivery.handled,
        delivery.lost.len(),
        delivery.duplicated.len(),
    );
    for failed in report.failed().iter().take(20) {
        eprintln!("  failed call: {failed:?}");
    }
    for unconfirmed in report.unconfirmed.iter().take(20) {
        eprintln!("  unconfirmed cast: {unconfirmed:?}");
    }
}

/// Every confirmed cast was handled exactly once.
fn assert_exactly_once(scenario: &str, delivery: &Delivery) {
    assert!(
        delivery.lost.is_empty(),
        "{scenario}: confirmed casts never handled: {:?}",
        delivery.lost
    );
    assert!(
        delivery.duplicated.is_empty(),
        "{scenario}: casts handled more than once: {:?}",
        delivery.duplicated
    );
}

/// Kills node `victim` with SIGKILL under the load, measures when service resumes, restarts
/// the node (still under load) and checks the guarantees.
fn kill_under_load(
    cluster: &Cluster,
    scenario: &str,
    victim: usize,
    server: &Server,
    load: Load,
    queue: &str,
) {
    let leader_before = cluster.leader(queue);
    let killed = Instant::now();
    cluster.kill9(victim);
    let dead = Instant::now();
    // Service resumes while the node is down (else: when, once it is back?).
    let resume = load.resumed(killed, RESUME_BOUND + Duration::from_secs(5));
    if resume.is_some() {
        // Steady again before the node comes back under the same load.
        load.flowing(100, 100, Duration::from_secs(60));
    }
    let rejoin_started = Instant::now();
    cluster.restart(victim);
    let rejoined = Instant::now();
    let late_resume = match resume {
        Some(_) => None,
        None => load.resumed(killed, Duration::from_secs(30)),
    };
    if resume.is_some() || late_resume.is_some() {
        load.flowing(100, 100, Duration::from_secs(60));
    }
    let leader_after = cluster.leader(queue);
    let ended = Instant::now();
    let report = load.finish();
    let delivery = delivery(&server.handled, &report.confirmed);
    let gap_at_kill = report.longest_gap(killed, rejoin_started);
    // (Measured from when service came back, if it came back only with the node.)
    let rejoin_from = match (resume, late_resume) {
        (None, Some(late)) => rejoin_started.max(killed + late),
        _ => rejoin_started,
    };
    let gap_at_rejoin = report.longest_gap(rejoin_from, ended);
    let resumed_text = match (resume, late_resume) {
        (Some(resume), _) => format!("time to resume {resume:?}"),
        (None, Some(late)) => format!(
            "NOT resumed while the node was down ({:?}); resumed {late:?} after the kill, once \
             it was back",
            rejoin_started - killed
        ),
        (None, None) => "NOT resumed, not even once the node was back".to_string(),
    };
    figures(
        scenario,
        &report,
        &delivery,
        &format!(
            "killed node {victim} (kill took {:?}), queue leader on {leader_before:?} before, \
             {leader_after:?} after; {resumed_text}, longest gap without a successful call \
             {gap_at_kill:?} (while the node was down), {gap_at_rejoin:?} (while it restarted and \
             rejoined, {:?})",
            dead - killed,
            rejoined - rejoin_started
        ),
    );
    assert!(
        resume.is_some_and(|r| r <= RESUME_BOUND),
        "{scenario}: service did not resume within {RESUME_BOUND:?} of the kill ({resumed_text}); \
         errors of the calls sent after the kill: {:#?}",
        report.errors_since(dead)
    );
    assert_exactly_once(scenario, &delivery);
    report.assert_calls_fail_only_within_their_timeout();
    report.assert_only_calls_in_flight_failed(dead);
    assert!(
        gap_at_rejoin <= ONE_RECONNECT,
        "{scenario}: the node's return stopped service for {gap_at_rejoin:?}"
    );
}

/// The durable queues servers `servers` of `topic` declare: shared, per server, dead letters,
/// and the stream of a stream fanout.
fn queues_of(topic: &str, servers: &[&str]) -> Vec<String> {
    let mut queues = vec![
        topic.to_string(),
        format!("{topic}_dlq"),
        format!("{topic}_fanout"),
    ];
    queues.extend(servers.iter().map(|s| format!("{topic}.{s}")));
    queues
}

/// kill -9 of the node holding every connection of a server and its client (and the leader
/// of the quorum queue it declared) under calls from 4 threads and confirmed at-least-once
/// casts: calls fail only within their timeout (only those in flight at the kill), service
/// resumes within a few seconds through another node, every confirmed cast is handled exactly
/// once; the node's return disturbs nothing.
#[test]
fn killing_the_node_a_server_is_connected_to_loses_no_confirmed_cast() {
    init_logs();
    let cluster = cluster::shared();
    let topic = unique("kill");
    let options = format!("{FAST}&{QUORUM}");
    let server = Server::start(
        &with_query(&cluster.url_from(0, SERVER_USER), &options),
        &topic,
        "s1",
    );
    let client = client(
        &with_query(&cluster.url_from(0, CLIENT_USER), &options),
        &topic,
    );
    let load = Load::start(&client);
    load.flowing(200, 200, Duration::from_secs(60));
    let victim = cluster.node_of(SERVER_USER);
    assert_eq!(victim, 0, "the server uses the URL's first node");
    assert_eq!(cluster.node_of(CLIENT_USER), victim, "so does the client");
    kill_under_load(
        &cluster,
        "kill -9 server's node",
        victim,
        &server,
        load,
        &topic,
    );
    assert_ne!(
        cluster.node_of(SERVER_USER),
        victim,
        "the server stays on the node it failed over to"
    );
    server.stop();
    cluster.delete_queues(&queues_of(&topic, &["s1"]));
}

/// kill -9 of the node holding the quorum queues' leader while the server and its client are
/// connected to another node: a new leader is elected, with the same guarantees.
#[test]
fn killing_the_quorum_leaders_node_loses_no_confirmed_cast() {
    init_logs();
    let cluster = cluster::shared();
    let topic = unique("leader");
    let options = format!("{FAST}&{QUORUM}");
    // The server's queues were declared through node 1: their leader is there.
    Server::start(
        &with_query(&cluster.url_from(1, SERVER_USER), &options),
        &topic,
        "s1",
    )
    .stop();
    let victim = 1;
    assert_eq!(cluster.leader(&topic), Some(victim));
    assert_eq!(cluster.leader(&format!("{topic}.s1")), Some(victim));
    let server = Server::start(
        &with_query(&cluster.url_from(0, SERVER_USER), &options),
        &topic,
        "s1",
    );
    let client = client(
        &with_query(&cluster.url_from(2, CLIENT_USER), &options),
        &topic,
    );
    let load = Load::start(&client);
    load.flowing(200, 200, Duration::from_secs(60));
    assert_eq!(cluster.node_of(SERVER_USER), 0);
    assert_eq!(cluster.node_of(CLIENT_USER), 2);
    kill_under_load(
        &cluster,
        "kill -9 quorum leader's node",
        victim,
        &server,
        load,
        &topic,
    );
    assert_ne!(
        cluster.leader(&topic),
        Some(victim),
        "a new leader was elected"
    );
    server.stop();
    cluster.delete_queues(&queues_of(&topic, &["s1"]));
}

/// Every node is stopped cleanly and started again, one at a time (waiting until no quorum
/// queue depends on the next one), under load: service never stops for longer than one
/// reconnect, every confirmed cast is handled exactly once.
#[test]
fn a_rolling_restart_never_stops_service_longer_than_one_reconnect() {
    init_logs();
    let cluster = cluster::shared();
    let topic = unique("rolling");
    let options = format!("{FAST}&{QUORUM}");
    let server = Server::start(
        &with_query(&cluster.url_from(0, SERVER_USER), &options),
        &topic,
        "s1",
    );
    let client = client(
        &with_query(&cluster.url_from(1, CLIENT_USER), &options),
        &topic,
    );
    let load = Load::start(&client);
    load.flowing(200, 200, Duration::from_secs(60));
    let started = Instant::now();
    let mut restarts = Vec::new();
    for node in 0..cluster.len() {
        eventually(
            "no quorum queue depends on the node",
            Duration::from_secs(60),
            || !cluster.quorum_critical(node),
        );
        let stopping = Instant::now();
        cluster.stop(node);
        let stopped = Instant::now();
        cluster.restart(node);
        restarts.push((node, stopping, stopped - stopping, stopping.elapsed()));
        // How long the restart stopped service is the gap measured below; this only waits
        // for the load to go on, which a loaded machine may slow.
        load.flowing(50, 50, Duration::from_secs(60));
    }
    let ended = Instant::now();
    let report = load.finish();
    let delivery = delivery(&server.handled, &report.confirmed);
    let gaps: Vec<String> = restarts
        .iter()
        .map(|(node, stopping, stop_took, down_for)| {
            let gap = report.longest_gap(*stopping, *stopping + *down_for);
            format!("node {node}: stop {stop_took:?}, back after {down_for:?}, longest gap {gap:?}")
        })
        .collect();
    let longest = report.longest_gap(started, ended);
    figures(
        "rolling restart",
        &report,
        &delivery,
        &format!(
            "longest gap without a successful call {longest:?} over {:?}; {}",
            ended - started,
            gaps.join("; ")
        ),
    );
    assert!(
        longest <= ONE_RECONNECT,
        "service stopped for {longest:?} during the rolling restart ({}); errors of the calls: \
         {:#?}",
        gaps.join("; "),
        report.errors_since(started)
    );
    assert_exactly_once("rolling restart", &delivery);
    report.assert_calls_fail_only_within_their_timeout();
    server.stop();
    cluster.delete_queues(&queues_of(&topic, &["s1"]));
}

/// A client cut off from its node by the network (its node's proxy blackholes: TCP stays
/// open, nothing flows) notices within two heartbeats and fails over to another node; the
/// calls and casts keep their guarantees.
#[test]
fn a_client_partitioned_from_its_node_fails_over_within_two_heartbeats() {
    init_logs();
    let cluster = cluster::shared();
    let topic = unique("partition");
    let options = format!("{FAST}&{QUORUM}");
    let server = Server::start(
        &with_query(&cluster.url_from(0, SERVER_USER), &options),
        &topic,
        "s1",
    );
    // The client goes through the proxies, node 0's first.
    let client = client(
        &with_query(&cluster.proxied_url_from(0, CLIENT_USER), &options),
        &topic,
    );
    let load = Load::start(&client);
    load.flowing(200, 200, Duration::from_secs(60));
    let node = cluster.node_of(CLIENT_USER);
    assert_eq!(node, 0);
    let through = cluster.proxy(node).open_connections();
    assert!(through >= 2, "the reply and send connections: {through}");
    let others = || {
        (0..cluster.len())
            .filter(|&i| i != node)
            .map(|i| cluster.proxy(i).open_connections())
            .sum::<usize>()
    };
    assert_eq!(others(), 0);

    let cut = Instant::now();
    cluster.proxy(node).blackhole(true);
    eventually(
        "every client connection moved to another node",
        Duration::from_secs(10),
        || others() >= through,
    );
    let moved = cut.elapsed();
    let resume = load
        .resumed(cut, Duration::from_secs(20))
        .expect("calls succeed again after the partition");
    load.flowing(200, 200, Duration::from_secs(60));
    let after = cluster.nodes_of(CLIENT_USER);
    let ended = Instant::now();
    let report = load.finish();
    let delivery = delivery(&server.handled, &report.confirmed);
    figures(
        "client partitioned from its node",
        &report,
        &delivery,
        &format!(
            "blackholed node {node}'s proxy; every client connection on another node after \
             {moved:?}, time to resume {resume:?}, longest gap without a successful call {:?}; \
             client connections afterwards on nodes {after:?}",
            report.longest_gap(cut, ended)
        ),
    );
    assert_exactly_once("client partitioned from its node", &delivery);
    report.assert_calls_fail_only_within_their_timeout();
    assert!(
        moved <= Duration::from_secs(5),
        "moved after {moved:?}: 2 s to detect (heartbeat 1 s) + reconnect"
    );
    assert!(resume <= RESUME_BOUND, "service resumed after {resume:?}");
    assert!(
        !after.is_empty() && !after.contains(&node),
        "the client's live connections are elsewhere: {after:?}"
    );
    server.stop();
    cluster.delete_queues(&queues_of(&topic, &["s1"]));
}

/// Servers of one topic, each on its own transport, reporting `(server, n)` for each
/// `record {n}` fanout cast.
struct Fanout {
    topic: String,
    servers: Vec<(RpcServer, Transport)>,
    names: Vec<String>,
    events: Receiver<(String, u64)>,
    client: RpcClient,
}

impl Fanout {
    /// Server `f<i>` connects to node `i` first; the client to node `client_node`.
    fn start(cluster: &Cluster, label: &str, options: &str, client_node: usize) -> Fanout {
        let topic = unique(label);
        let (tx, events) = crossbeam_channel::unbounded();
        let mut servers = Vec::new();
        let mut names = Vec::new();
        for i in 0..cluster.len() {
            let name = format!("f{i}");
            let transport = Transport::new(&with_query(
                &cluster.url_from(i, SERVER_USER),
                &format!("{FAST}&{options}"),
            ))
            .expect("fanout server transport");
            let server =
                RpcServer::builder(&transport, Target::new(topic.as_str()).with_server(&name))
                    .endpoint(fanout_endpoint(&name, tx.clone()))
                    .workers(1)
                    .build()
                    .expect("fanout server");
            server.start().expect("fanout server start");
            eventually(
                "the fanout server consumes",
                Duration::from_secs(20),
                || server.is_consuming(),
            );
            servers.push((server, transport));
            names.push(name);
        }
        let transport = Transport::new(&with_query(
            &cluster.url_from(client_node, CLIENT_USER),
            &format!("{FAST}&{options}"),
        ))
        .expect("fanout client transport");
        let client = RpcClient::new(&transport, Target::new(topic.as_str()))
            .fanout(true)
            .timeout(CAST_TIMEOUT);
        Fanout {
            topic,
            servers,
            names,
            events,
            client,
        }
    }

    fn cast(&self, n: u64) -> bool {
        self.client
            .cast(&ctx(), "record", &json!({ "n": n }))
            .is_ok()
    }

    /// Every `(server, n)` received until `done` holds for them, or `within` passed (the
    /// callers' assertions then say what is missing).
    fn received_until(
        &self,
        within: Duration,
        done: impl Fn(&[(String, u64)]) -> bool,
    ) -> Vec<(String, u64)> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while !done(&got) {
            match self.events.recv_deadline(deadline) {
                Ok(event) => got.push(event),
                Err(_) => break,
            }
        }
        got
    }

    /// Every `(server, n)` received within `window` (an observation window: what arrives in
    /// it, extra copies included).
    fn received(&self, window: Duration) -> Vec<(String, u64)> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Ok(event) = self.events.recv_deadline(deadline) {
            got.push(event);
        }
        got
    }

    fn stop(&self, cluster: &Cluster) {
        for (server, _) in &self.servers {
            server.stop();
        }
        for (server, _) in &self.servers {
            server.wait();
        }
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        cluster.delete_queues(&queues_of(&self.topic, &names));
    }
}

fn fanout_endpoint(name: &str, events: Sender<(String, u64)>) -> Endpoint {
    #[derive(Deserialize)]
    struct N {
        n: u64,
    }
    let name = name.to_string();
    Endpoint::new().method("record", move |_: &RequestContext, x: N| {
        let _ = events.send((name.clone(), x.n));
        Ok::<_, Failure>(())
    })
}

/// What one topic's fanout casts did after the kill.
struct Recovery {
    /// Every cast sent after the kill: n, when, confirmed.
    sent: Vec<(u64, Instant, bool)>,
    /// Every `(server, n)` received after the kill.
    got: Vec<(String, u64)>,
    /// The first cast that reached every server, and when it was sent (from the kill).
    back: (u64, Duration),
}

impl Recovery {
    fn receivers(&self, n: u64) -> BTreeSet<&str> {
        self.got
            .iter()
            .filter(|(_, m)| *m == n)
            .map(|(s, _)| s.as_str())
            .collect()
    }

    fn deliveries(&self, server: &str, n: u64) -> usize {
        self.got
            .iter()
            .filter(|(s, m)| s == server && *m == n)
            .count()
    }
}

/// Sends fanout casts 1, 2... every 100 ms from the kill on until one reaches every server,
/// then 5 more.
fn recover(fanout: &Fanout, killed: Instant) -> Recovery {
    let mut recovery = Recovery {
        sent: Vec::new(),
        got: Vec::new(),
        back: (0, Duration::ZERO),
    };
    let everyone = fanout.names.len();
    let mut n = 1;
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "{}: fanout did not reach every server within 30 s of the kill: {:?}",
            fanout.topic,
            recovery.got
        );
        let at = Instant::now();
        let confirmed = fanout.cast(n);
        recovery.sent.push((n, at, confirmed));
        recovery
            .got
            .extend(fanout.received(Duration::from_millis(100)));
        let back = recovery
            .sent
            .iter()
            .find(|(m, ..)| recovery.receivers(*m).len() == everyone);
        if let Some(&(m, at, _)) = back {
            recovery.back = (m, at - killed);
            break;
        }
        n += 1;
    }
    for m in n + 1..=n + 5 {
        let confirmed = fanout.cast(m);
        recovery.sent.push((m, Instant::now(), confirmed));
    }
    // Until every server got each of these 5 (the broker delivers a queue's messages in
    // order, so the earlier ones it is going to get came first), then 1 s more for copies.
    let last: Vec<u64> = recovery
        .sent
        .iter()
        .filter(|&&(m, _, confirmed)| m > n && confirmed)
        .map(|&(m, ..)| m)
        .collect();
    let before = recovery.got.clone();
    let rest = fanout.received_until(Duration::from_secs(30), |got| {
        last.iter().all(|m| {
            fanout
                .names
                .iter()
                .all(|server| before.iter().chain(got).any(|(s, k)| s == server && k == m))
        })
    });
    recovery.got.extend(rest);
    recovery.got.extend(fanout.received(Duration::from_secs(1)));
    recovery
}

/// Fanout casts reach every server after a node is lost: with classic fanout queues (one per
/// server, not durable: a server re-declares its own on another node, and casts sent while it
/// reconnects are lost for it, as in oslo), and with oslo's stream fanout (one replicated
/// stream; a server resumes after the last offset it saw: every confirmed cast reaches every
/// server exactly once, even those sent while the stream's leader was being replaced).
#[test]
fn fanout_reaches_every_server_after_a_node_loss() {
    init_logs();
    let cluster = cluster::shared();
    let classic = Fanout::start(&cluster, "fanout", QUORUM, 1);
    let stream = Fanout::start(&cluster, "stream", STREAM, 1);
    // Before: one cast reaches every server of each.
    for fanout in [&classic, &stream] {
        assert!(fanout.cast(0));
        let everyone = fanout.names.len();
        let mut got = fanout.received_until(Duration::from_secs(20), |got| got.len() >= everyone);
        got.extend(fanout.received(Duration::from_millis(300)));
        assert_eq!(got.len(), fanout.names.len(), "{}: {got:?}", fanout.topic);
    }
    let stream_queue = format!("{}_fanout", stream.topic);
    let victim = cluster
        .leader(&stream_queue)
        .expect("the stream has a leader");
    assert!(
        cluster
            .connections()
            .iter()
            .any(|c| c.node == victim && c.user == SERVER_USER),
        "servers are connected to the stream leader's node"
    );

    let killed = Instant::now();
    cluster.kill9(victim);
    let (classic_recovery, stream_recovery) = thread::scope(|scope| {
        let c = scope.spawn(|| recover(&classic, killed));
        let s = scope.spawn(|| recover(&stream, killed));
        (c.join().expect("classic"), s.join().expect("stream"))
    });
    let new_leader = cluster.leader(&stream_queue);

    // Classic: from the first cast that reached everyone on, every cast reaches every server
    // once; before it, servers re-declaring their queue missed some.
    let (first, classic_time) = classic_recovery.back;
    let mut classic_missed = 0;
    for &(n, _, confirmed) in &classic_recovery.sent {
        assert!(confirmed, "classic fanout cast {n} not confirmed");
        for server in &classic.names {
            let times = classic_recovery.deliveries(server, n);
            assert!(times <= 1, "classic: {server} got cast {n} {times} times");
            if n >= first {
                assert_eq!(times, 1, "classic: {server} missed cast {n}");
            }
            classic_missed += usize::from(times == 0);
        }
    }
    // Stream: every confirmed cast reached every server exactly once.
    let mut stream_wrong = Vec::new();
    for &(n, _, confirmed) in &stream_recovery.sent {
        for server in &stream.names {
            let times = stream_recovery.deliveries(server, n);
            if (confirmed && times != 1) || times > 1 {
                stream_wrong.push((server.clone(), n, times));
            }
        }
    }
    let (stream_first, stream_time) = stream_recovery.back;
    eprintln!(
        "FIGURES fanout after a node loss: killed node {victim} (the stream's leader, and a \
         server of each topic); classic: first cast to reach every server sent \
         {classic_time:?} after the kill (cast {first}), {classic_missed} deliveries missed by \
         servers re-declaring their queue; stream: first cast to reach every server sent \
         {stream_time:?} after the kill (cast {stream_first}), casts not confirmed {}, \
         confirmed casts missed or repeated {}, new stream leader {new_leader:?}",
        stream_recovery.sent.iter().filter(|s| !s.2).count(),
        stream_wrong.len(),
    );
    assert!(
        stream_wrong.is_empty(),
        "stream casts not received exactly once (server, cast, times): {stream_wrong:?}"
    );
    assert!(
        classic_time <= RESUME_BOUND && stream_time <= RESUME_BOUND,
        "fanout reached every server again only {classic_time:?} (classic) / {stream_time:?} \
         (stream) after the kill"
    );
    classic.stop(&cluster);
    stream.stop(&cluster);
}
