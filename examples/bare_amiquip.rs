//! The baseline `warren bench` is compared with: the same workloads written directly on
//! amiquip, with no framework, printing the same JSON (see `scripts/bench-compare`).
//!
//! ```text
//! cargo run --release --example bare_amiquip -- --mode call --clients 16 --duration 10 --json
//! ```
//!
//! What it does, and so what warren's overhead is measured against:
//! * connections with TCP_NODELAY (the bench's `amqp.rs`), one for the clients, one per server;
//! * call: each client thread has its own channel and exclusive, server-named reply queue
//!   (with `--reply-queue shared`: one for the process, whose consumer thread routes each reply
//!   to its caller, as warren does); it publishes `{payload}` with `reply_to` and a
//!   `correlation_id` through the default exchange to the queue `<topic>` and waits for the
//!   reply (consumed without acks, as warren's);
//! * server: `--workers` threads per server, each with its own channel consuming `<topic>`
//!   (prefetch `--prefetch`), replying on that channel and then acking;
//! * cast: the same, without reply; fanout: every server consumes its own exclusive queue bound
//!   to the fanout exchange `<topic>_fanout`;
//! * `--confirm on` puts every channel in confirm mode and waits for each publish's confirm
//!   (requests, casts and replies, as warren by default); `--confirm off` confirms nothing;
//! * bodies are `{"payload": ...}` (request) and the payload string (reply) in the `--codec`.
//!
//! Only `--role both` is implemented.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions,
    ExchangeType, FieldTable, Publish, QueueDeclareOptions,
};
use clap::{Parser, ValueEnum};
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[path = "../src/bin/warren/bench/amqp.rs"]
mod amqp;
#[path = "../src/bin/warren/bench/stats.rs"]
mod stats;

use stats::{Limit, Stats};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Call,
    Cast,
    Fanout,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CodecArg {
    Json,
    Msgpack,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReplyQueue {
    PerThread,
    Shared,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

/// Bare-amiquip request/reply and casts, same flags and JSON as `warren bench`.
#[derive(Parser)]
struct Args {
    #[arg(
        long,
        env = "WARREN_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/"
    )]
    url: String,
    #[arg(long, value_enum, default_value = "call")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// Consuming threads (channels) per server.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, conflicts_with = "count")]
    duration: Option<f64>,
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, value_enum, default_value = "msgpack")]
    codec: CodecArg,
    #[arg(long, value_enum, default_value = "on")]
    confirm: Switch,
    /// Prefetch of each server channel.
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// Where replies go: an exclusive queue per client thread, or one queue for the process
    /// whose consumer thread routes each reply to its caller (warren's scheme, and oslo's).
    #[arg(long, value_enum, default_value = "per-thread")]
    reply_queue: ReplyQueue,
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(Serialize, Deserialize)]
struct Request<'a> {
    payload: Cow<'a, str>,
}

fn encode<T: Serialize>(codec: CodecArg, value: &T) -> Vec<u8> {
    match codec {
        CodecArg::Json => serde_json::to_vec(value).unwrap_or_default(),
        CodecArg::Msgpack => rmp_serde::to_vec_named(value).unwrap_or_default(),
    }
}

fn decode<'a, T: Deserialize<'a>>(codec: CodecArg, body: &'a [u8]) -> Option<T> {
    match codec {
        CodecArg::Json => serde_json::from_slice(body).ok(),
        CodecArg::Msgpack => rmp_serde::from_slice(body).ok(),
    }
}

fn main() {
    let args = Args::parse();
    let setup = Setup {
        topic: format!(
            "bare-bench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        codec: args.codec,
        mode: args.mode,
        confirm: args.confirm,
        payload: "x".repeat(args.payload),
    };
    let stats = Stats::new();
    let started = Instant::now();
    let duration = match (args.duration, args.count) {
        (Some(secs), _) => Some(Duration::from_secs_f64(secs)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let limit = Arc::new(Limit::new(
        duration,
        args.count,
        Arc::new(AtomicBool::new(false)),
    ));
    let servers_stop = Arc::new(AtomicBool::new(false));
    let mut server_threads = Vec::new();
    let mut server_connections = Vec::new();
    for _ in 0..args.servers {
        match start_server(&args, &setup, &stats, &servers_stop) {
            Ok((connection, threads)) => {
                server_connections.push(connection);
                server_threads.extend(threads);
            }
            Err(e) => {
                eprintln!("server: {e}");
                std::process::exit(4);
            }
        }
    }
    let ticker_stop = Arc::new(AtomicBool::new(false));
    let ticker = stats.ticker(ticker_stop.clone(), args.quiet);
    let sent = run_clients(&args, &setup, &stats, &limit);
    if args.mode != Mode::Call {
        let copies = if args.mode == Mode::Fanout {
            args.servers as u64
        } else {
            1
        };
        stats.wait_for(sent * copies, &limit);
    }
    ticker_stop.store(true, Ordering::Release);
    let _ = ticker.join();
    servers_stop.store(true, Ordering::Release);
    for t in server_threads {
        let _ = t.join();
    }
    for c in server_connections {
        let _ = c.close();
    }
    amqp::delete_queues(&args.url, std::slice::from_ref(&setup.topic));
    let report = stats.report(
        json!({
            "tool": "bare-amiquip",
            "mode": match args.mode { Mode::Call => "call", Mode::Cast => "cast", Mode::Fanout => "fanout" },
            "role": "both",
            "clients": args.clients,
            "servers": args.servers,
            "workers": args.workers,
            "codec": match args.codec { CodecArg::Json => "json", CodecArg::Msgpack => "msgpack" },
            "payload": args.payload,
            "confirm": if args.confirm == Switch::On { "on" } else { "off" },
        }),
        started.elapsed().as_secs_f64(),
    );
    println!("{}", stats::summary(&report));
    if args.json {
        println!("{report}");
    }
}

type ServerThreads = Vec<thread::JoinHandle<()>>;

fn start_server(
    args: &Args,
    setup: &Setup,
    stats: &Arc<Stats>,
    stop: &Arc<AtomicBool>,
) -> Result<(amiquip::Connection, ServerThreads), String> {
    let mut connection = amqp::open(&args.url)?;
    let fail = |e: amiquip::Error| e.to_string();
    let topic = setup.topic.as_str();
    let mut threads = Vec::new();
    // Fanout: one auto-delete queue per server, consumed by all its workers (and deleted once
    // they cancel).
    let fanout_queue = if args.mode == Mode::Fanout {
        let channel = connection.open_channel(None).map_err(fail)?;
        let exchange = channel
            .exchange_declare(
                ExchangeType::Fanout,
                format!("{topic}_fanout"),
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
            )
            .map_err(fail)?;
        let queue = channel
            .queue_declare(
                "",
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
            )
            .map_err(fail)?;
        queue.bind(&exchange, "", FieldTable::new()).map_err(fail)?;
        let name = queue.name().to_string();
        channel.close().map_err(fail)?;
        Some(name)
    } else {
        None
    };
    for _ in 0..args.workers {
        let channel = connection.open_channel(None).map_err(fail)?;
        channel.qos(0, args.prefetch, false).map_err(fail)?;
        let queue = match &fanout_queue {
            Some(name) => name.clone(),
            None => {
                channel
                    .queue_declare(topic, QueueDeclareOptions::default())
                    .map_err(fail)?;
                topic.to_string()
            }
        };
        let (stats, stop, setup) = (stats.clone(), stop.clone(), setup.clone());
        threads.push(thread::spawn(move || {
            let mut keep = None;
            serve(&channel, &queue, &setup, &stats, &stop, &mut keep);
            let _ = channel.close();
            // Only now may the consumer's receiver go (amiquip's consumer-drop race).
            drop(keep);
        }));
    }
    Ok((connection, threads))
}

fn serve(
    channel: &Channel,
    queue: &str,
    setup: &Setup,
    stats: &Stats,
    stop: &AtomicBool,
    keep: &mut Option<Receiver<ConsumerMessage>>,
) {
    let (codec, mode) = (setup.codec, setup.mode);
    // With --confirm on, replies are confirmed too (as warren's servers do by default).
    let confirms = match setup.confirm {
        Switch::On => match channel
            .enable_publisher_confirms()
            .and_then(|()| channel.listen_for_publisher_confirms())
        {
            Ok(confirms) => Some(confirms),
            Err(e) => {
                eprintln!("confirms: {e}");
                return;
            }
        },
        Switch::Off => None,
    };
    let mut published = 0_u64;
    let consumer = match channel.basic_consume(queue, ConsumerOptions::default()) {
        Ok(consumer) => consumer,
        Err(e) => {
            eprintln!("consume {queue}: {e}");
            return;
        }
    };
    *keep = Some(consumer.receiver().clone());
    while !stop.load(Ordering::Acquire) {
        let delivery = match consumer.receiver().recv_timeout(Duration::from_millis(20)) {
            Ok(ConsumerMessage::Delivery(delivery)) => delivery,
            Ok(_) => return,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(_) => return,
        };
        let request: Option<Request> = decode(codec, &delivery.body);
        match (mode, request) {
            (Mode::Call, Some(request)) => {
                let reply_to = delivery.properties.reply_to().clone().unwrap_or_default();
                let mut properties = AmqpProperties::default();
                if let Some(id) = delivery.properties.correlation_id() {
                    properties = properties.with_correlation_id(id.clone());
                }
                let body = encode(codec, &request.payload);
                if let Err(e) =
                    channel.basic_publish("", Publish::with_properties(&body, reply_to, properties))
                {
                    eprintln!("reply: {e}");
                    return;
                }
                published += 1;
                if let Some(confirms) = &confirms {
                    if wait_for_confirm(confirms, published).is_none() {
                        return;
                    }
                }
            }
            (_, Some(_)) => {
                stats.handled();
            }
            (_, None) => {
                stats.errors.other.fetch_add(1, Ordering::Relaxed);
            }
        }
        if consumer.ack(delivery).is_err() {
            return;
        }
    }
}

/// Runs the client threads; returns the number of casts sent.
fn run_clients(args: &Args, setup: &Setup, stats: &Arc<Stats>, limit: &Arc<Limit>) -> u64 {
    let mut connection = match amqp::open(&args.url) {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("client: {e}");
            limit.stop.store(true, Ordering::Release);
            return 0;
        }
    };
    let sent = Arc::new(AtomicU64::new(0));
    let router_stop = Arc::new(AtomicBool::new(false));
    let (router, mut routed) = if args.mode == Mode::Call && args.reply_queue == ReplyQueue::Shared
    {
        match start_router(&mut connection, args.clients, &router_stop) {
            Ok((router, queue, receivers)) => (
                Some(router),
                receivers
                    .into_iter()
                    .map(|r| (queue.clone(), r))
                    .collect::<Vec<_>>()
                    .into_iter(),
            ),
            Err(e) => {
                eprintln!("reply router: {e}");
                limit.stop.store(true, Ordering::Release);
                return 0;
            }
        }
    } else {
        (None, Vec::new().into_iter())
    };
    let mut threads = Vec::new();
    for index in 0..args.clients {
        let shared_reply = routed.next();
        let channel = match connection.open_channel(None) {
            Ok(channel) => channel,
            Err(e) => {
                eprintln!("client channel: {e}");
                break;
            }
        };
        let (stats, limit, sent, setup) =
            (stats.clone(), limit.clone(), sent.clone(), setup.clone());
        threads.push(thread::spawn(move || {
            let mut keep = None;
            let run = Run {
                index,
                shared_reply,
                stats: &stats,
                limit: &limit,
                sent: &sent,
            };
            if let Err(e) = client(&channel, &setup, run, &mut keep) {
                eprintln!("client: {e}");
                stats.errors.other.fetch_add(1, Ordering::Relaxed);
            }
            let _ = channel.close();
            drop(keep);
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    router_stop.store(true, Ordering::Release);
    if let Some(router) = router {
        let _ = router.join();
    }
    let _ = connection.close();
    sent.load(Ordering::Relaxed)
}

/// Replies routed to client thread `index` by the shared reply queue's consumer thread.
type Routed = Receiver<amiquip::Delivery>;

/// `--reply-queue shared`: declares one exclusive reply queue and starts the thread that
/// consumes it and hands each reply to the client thread named in its correlation id
/// (`<thread>-<n>`). Returns the thread, the queue name and one receiver per client thread.
fn start_router(
    connection: &mut amiquip::Connection,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Result<(thread::JoinHandle<()>, String, Vec<Routed>), String> {
    let channel = connection.open_channel(None).map_err(|e| e.to_string())?;
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..clients).map(|_| crossbeam_channel::unbounded()).unzip();
    let (name_tx, name_rx) = crossbeam_channel::bounded(1);
    let stop = stop.clone();
    let router = thread::spawn(move || {
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        let name = match channel.queue_declare("", exclusive) {
            Ok(queue) => queue.name().to_string(),
            Err(e) => {
                let _ = name_tx.send(Err(e.to_string()));
                return;
            }
        };
        let consumer = match channel.basic_consume(name.clone(), no_ack()) {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = name_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = name_tx.send(Ok(name));
        let keep = consumer.receiver().clone();
        while !stop.load(Ordering::Acquire) {
            match consumer.receiver().recv_timeout(Duration::from_millis(20)) {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    let to = delivery
                        .properties
                        .correlation_id()
                        .as_deref()
                        .and_then(|id| id.split('-').next())
                        .and_then(|t| t.parse::<usize>().ok());
                    if let Some(sender) = to.and_then(|t| senders.get(t)) {
                        let _ = sender.send(delivery);
                    }
                }
                Ok(_) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(_) => break,
            }
        }
        drop(consumer);
        let _ = channel.close();
        drop(keep);
    });
    match name_rx.recv() {
        Ok(Ok(name)) => Ok((router, name, receivers)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the reply router exited".into()),
    }
}

/// Consumer options without acknowledgements (replies, as warren consumes them).
fn no_ack() -> ConsumerOptions {
    ConsumerOptions {
        no_ack: true,
        ..ConsumerOptions::default()
    }
}

/// Waits for the confirm of publish `tag`: `Some(true)` acked, `Some(false)` nacked, `None`
/// when the connection is gone.
fn wait_for_confirm(confirms: &Receiver<amiquip::Confirm>, tag: u64) -> Option<bool> {
    loop {
        match confirms.recv() {
            Ok(amiquip::Confirm::Ack(p)) if p.delivery_tag >= tag => return Some(true),
            Ok(amiquip::Confirm::Nack(p)) if p.delivery_tag >= tag => return Some(false),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// What the run sends, and where.
#[derive(Clone)]
struct Setup {
    topic: String,
    codec: CodecArg,
    mode: Mode,
    confirm: Switch,
    payload: String,
}

/// One client thread's place in the run.
struct Run<'a> {
    index: usize,
    /// With `--reply-queue shared`: the shared queue and this thread's routed replies.
    shared_reply: Option<(String, Routed)>,
    stats: &'a Stats,
    limit: &'a Limit,
    sent: &'a AtomicU64,
}

/// Where a client thread's replies come from.
enum Replies<'a> {
    Own(amiquip::Consumer<'a>),
    Routed(Routed),
}

impl Replies<'_> {
    /// The next reply; `Err(true)` on timeout, `Err(false)` when the connection is gone.
    fn next(&self, timeout: Duration) -> Result<amiquip::Delivery, bool> {
        match self {
            Replies::Own(consumer) => match consumer.receiver().recv_timeout(timeout) {
                Ok(ConsumerMessage::Delivery(delivery)) => Ok(delivery),
                Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(false),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(true),
            },
            Replies::Routed(routed) => routed.recv_timeout(timeout).map_err(|e| e.is_timeout()),
        }
    }
}

fn client(
    channel: &Channel,
    setup: &Setup,
    run: Run<'_>,
    keep: &mut Option<Receiver<ConsumerMessage>>,
) -> amiquip::Result<()> {
    let Run {
        index,
        shared_reply,
        stats,
        limit,
        sent,
    } = run;
    let (topic, codec, mode, confirm) =
        (setup.topic.as_str(), setup.codec, setup.mode, setup.confirm);
    let payload = setup.payload.as_str();
    let confirms = if confirm == Switch::On {
        channel.enable_publisher_confirms()?;
        Some(channel.listen_for_publisher_confirms()?)
    } else {
        None
    };
    let (exchange, routing_key) = match mode {
        Mode::Fanout => (format!("{topic}_fanout"), String::new()),
        _ => (String::new(), topic.to_string()),
    };
    let reply = match (mode, shared_reply) {
        (Mode::Call, Some((queue, routed))) => Some((queue, Replies::Routed(routed))),
        (Mode::Call, None) => {
            let queue = channel.queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
            )?;
            let name = queue.name().to_string();
            let consumer = channel.basic_consume(name.clone(), no_ack())?;
            *keep = Some(consumer.receiver().clone());
            Some((name, Replies::Own(consumer)))
        }
        _ => None,
    };
    let body = encode(
        codec,
        &Request {
            payload: payload.into(),
        },
    );
    let mut published = 0_u64;
    let mut next_id = 0_u64;
    while limit.claim() {
        stats.starting();
        let begun = Instant::now();
        next_id += 1;
        let correlation_id = format!("{index}-{next_id}");
        let mut properties = AmqpProperties::default();
        if let Some((queue, _)) = &reply {
            properties = properties
                .with_reply_to(queue.clone())
                .with_correlation_id(correlation_id.clone());
        }
        channel.basic_publish(
            exchange.as_str(),
            Publish::with_properties(&body, routing_key.clone(), properties),
        )?;
        published += 1;
        if let Some(confirms) = &confirms {
            match wait_for_confirm(confirms, published) {
                Some(true) => {}
                Some(false) => {
                    stats.errors.delivery.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                None => return Ok(()),
            }
        }
        let Some((_, replies)) = &reply else {
            sent.fetch_add(1, Ordering::Relaxed);
            stats.latency.record(begun.elapsed().as_micros() as u64);
            continue;
        };
        loop {
            match replies.next(Duration::from_secs(10)) {
                Ok(delivery) => {
                    if delivery.properties.correlation_id().as_deref()
                        != Some(correlation_id.as_str())
                    {
                        continue; // a late reply to an earlier, timed-out call
                    }
                    let echoed: Option<String> = decode(codec, &delivery.body);
                    if echoed.is_some_and(|e| e.len() == payload.len()) {
                        stats.call_done(begun.elapsed());
                    } else {
                        stats.errors.other.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Err(true) => {
                    stats.errors.timeout.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(false) => return Ok(()),
            }
        }
    }
    Ok(())
}
