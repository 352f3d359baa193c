//! `warren bench`: a load generator in the spirit of RabbitMQ PerfTest and oslo's simulator.
//!
//! Servers and client threads run in this process (`--role both`) or in separate ones
//! (`--role server` on one side, `--role client` on the other, same `--topic` and codec).
//! Numbers follow `stats` (and the bench contract): completed operations, per-call latency at
//! the caller, errors by kind, peak RSS, one JSON object on the last stdout line with
//! `--json`. Every queue the bench declares is deleted when it ends, signalled or not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use warren::observe::Stats as Observed;
use warren::{
    Codec, Endpoint, Error, Failure as RemoteFailure, RequestContext, RpcClient, RpcServer, Target,
    Transport, TransportBuilder,
};

use crate::Failure;

pub mod amqp;
pub mod stats;

use stats::{Limit, Stats};

/// What the clients send.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Request/reply: each client thread calls `echo` and waits for the payload back.
    Call,
    /// Casts to the topic: one server handles each.
    Cast,
    /// Casts to every server of the topic.
    Fanout,
}

/// Which side of the benchmark this process runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Servers and clients in this process.
    Both,
    /// Only servers: serve until `--duration` ends or SIGTERM/SIGINT.
    Server,
    /// Only clients, against a `--role server` process on the same `--topic`.
    Client,
}

/// On or off.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// `warren bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// What to send.
    #[arg(long, value_enum, default_value = "call")]
    mode: Mode,
    /// Client threads, sharing one transport.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// RPC servers, each with its own transport (connections).
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// Worker threads per server.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Bytes of payload per message (a string argument, echoed back by calls).
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    payload: usize,
    /// Run this many seconds (default 10 unless --count; a server runs until signalled).
    #[arg(long, value_name = "SECS", conflicts_with = "count")]
    duration: Option<f64>,
    /// Complete this many operations, then stop.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Codec of what this process sends.
    #[arg(long, value_enum, default_value = "msgpack")]
    codec: CodecArg,
    /// Wait for the broker's publisher confirm on each publish: casts, call requests, and the
    /// servers' replies.
    #[arg(long, value_enum, default_value = "on")]
    confirm: Switch,
    /// Which side to run.
    #[arg(long, value_enum, default_value = "both")]
    role: Role,
    /// Topic (default: a unique name per run; required with --role server/client).
    #[arg(long)]
    topic: Option<String>,
    /// Seconds a call waits for its reply before counting as a timeout.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    timeout: f64,
    /// Print the result as one JSON object on the last stdout line.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Record what the servers and clients do through an observer on their transports
    /// (`warren::observe::Stats`) and print its per-method table after the summary (before
    /// the JSON line): calls, failures, in-flight, latency at each side, connections.
    #[arg(long)]
    stats: bool,
}

/// The codec flag.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecArg {
    Json,
    Msgpack,
}

impl CodecArg {
    fn codec(self) -> Codec {
        match self {
            CodecArg::Json => Codec::Json,
            CodecArg::Msgpack => Codec::MsgPack,
        }
    }
}

/// The arguments of every bench message.
#[derive(Serialize, Deserialize)]
struct Payload<'a> {
    payload: std::borrow::Cow<'a, str>,
}

/// Runs the benchmark and prints its result.
pub fn run(url: &str, args: BenchArgs) -> Result<(), Failure> {
    let Checked { duration, timeout } = check(&args)?;
    let topic = match (&args.topic, args.role) {
        (Some(topic), _) => topic.clone(),
        (None, Role::Both) => format!(
            "warren-bench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        (None, _) => {
            return Err(Failure::usage(
                "--role server and --role client need --topic",
            ))
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| Failure::usage(format!("cannot handle signals: {e}")))?;
    }
    let stats = Stats::new();
    let observed = args.stats.then(|| Arc::new(Observed::new()));
    let started = Instant::now();
    let limit = Limit::new(duration, args.count, stop);

    let mut servers = Vec::new();
    let mut queues = Vec::new();
    let outcome = (|| {
        if args.role != Role::Client {
            // In `--role both` the calls are counted at the caller; the servers count casts.
            let count_handled = args.role == Role::Server || args.mode != Mode::Call;
            queues.push(topic.clone());
            for i in 0..args.servers {
                let name = format!("bench-{}-{i}", std::process::id());
                queues.push(format!("{topic}.{name}"));
                servers.push(start_server(
                    url,
                    &args,
                    &topic,
                    &name,
                    count_handled.then(|| stats.clone()),
                    observed.as_ref(),
                )?);
            }
        }
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = stats.ticker(ticker_stop.clone(), args.quiet);
        let result = match args.role {
            Role::Server => {
                serve(&stats, &limit, args.count);
                Ok(())
            }
            _ => run_clients(
                url,
                &args,
                timeout,
                &topic,
                &stats,
                &limit,
                observed.as_ref(),
            ),
        };
        ticker_stop.store(true, Ordering::Release);
        let _ = ticker.join();
        result
    })();
    for server in &servers {
        server.0.stop();
    }
    for server in &servers {
        server.0.wait();
        server.1.close();
    }
    amqp::delete_queues(url, &queues);
    outcome?;

    let report = stats.report(
        json!({
            "tool": "warren",
            "mode": flag_value(args.mode),
            "role": flag_value(args.role),
            "clients": if args.role == Role::Server { 0 } else { args.clients },
            "servers": if args.role == Role::Client { 0 } else { args.servers },
            "workers": args.workers,
            "codec": flag_value(args.codec),
            "payload": args.payload,
            "confirm": flag_value(args.confirm),
        }),
        started.elapsed().as_secs_f64(),
    );
    println!("{}", stats::summary(&report));
    if let Some(observed) = &observed {
        print!("{}", observed.snapshot());
    }
    if args.json {
        println!("{report}");
    }
    Ok(())
}

/// How a flag's value is spelled on the command line (and in the report).
fn flag_value(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// The flags' values in seconds, checked.
struct Checked {
    /// How long the run lasts; `None`: until `--count` or a signal.
    duration: Option<Duration>,
    /// How long a call waits for its reply.
    timeout: Duration,
}

fn check(args: &BenchArgs) -> Result<Checked, Failure> {
    if args.role != Role::Server && args.clients == 0 {
        return Err(Failure::usage("--clients must be at least 1"));
    }
    if args.role != Role::Client && (args.servers == 0 || args.workers == 0) {
        return Err(Failure::usage("--servers and --workers must be at least 1"));
    }
    if args.count == Some(0) {
        return Err(Failure::usage("--count must be at least 1"));
    }
    let duration = match (args.duration, args.count, args.role) {
        (Some(secs), _, _) => Some(crate::rpc::seconds("--duration", secs)?),
        (None, None, Role::Server) | (None, Some(_), _) => None,
        (None, None, _) => Some(Duration::from_secs(10)),
    };
    Ok(Checked {
        duration,
        timeout: crate::rpc::seconds("--timeout", args.timeout)?,
    })
}

fn start_server(
    url: &str,
    args: &BenchArgs,
    topic: &str,
    name: &str,
    counter: Option<Arc<Stats>>,
    observed: Option<&Arc<Observed>>,
) -> Result<(RpcServer, Transport), Failure> {
    let transport = observe(Transport::builder(url), observed)
        .codec(args.codec.codec())
        .build()?;
    let echo_counter = counter.clone();
    let endpoint = Endpoint::new()
        .method("echo", move |_: &RequestContext, args: Payload<'static>| {
            if let Some(stats) = &echo_counter {
                stats.handled();
            }
            Ok::<_, RemoteFailure>(args.payload)
        })
        .method("ping", |_: &RequestContext, _: warren::NoArgs| {
            Ok::<_, RemoteFailure>(())
        })
        .method("sink", move |_: &RequestContext, _: Payload<'static>| {
            if let Some(stats) = &counter {
                stats.handled();
            }
            Ok::<_, RemoteFailure>(())
        });
    let server = RpcServer::builder(&transport, Target::new(topic).with_server(name))
        .endpoint(endpoint)
        .workers(args.workers)
        .confirm_replies(args.confirm == Switch::On)
        .build()?;
    server.start()?;
    Ok((server, transport))
}

/// With `--stats`, the transport reports to `observed`.
fn observe(builder: TransportBuilder, observed: Option<&Arc<Observed>>) -> TransportBuilder {
    match observed {
        Some(observed) => builder.observer(observed.clone()),
        None => builder,
    }
}

/// `--role server`: waits until the duration, `count` handled messages or a signal end the run.
fn serve(stats: &Stats, limit: &Limit, count: Option<u64>) {
    while !limit.over() && count.is_none_or(|n| stats.ok.load(Ordering::Relaxed) < n) {
        thread::sleep(Duration::from_millis(20));
    }
}

fn run_clients(
    url: &str,
    args: &BenchArgs,
    timeout: Duration,
    topic: &str,
    stats: &Arc<Stats>,
    limit: &Limit,
    observed: Option<&Arc<Observed>>,
) -> Result<(), Failure> {
    let transport = observe(Transport::builder(url), observed)
        .codec(args.codec.codec())
        .build()?;
    let client = RpcClient::new(&transport, Target::new(topic))
        .timeout(timeout)
        .confirm(args.confirm == Switch::On)
        .fanout(args.mode == Mode::Fanout);
    let ctx = RequestContext::new();
    let payload: String = "x".repeat(args.payload);
    if args.mode == Mode::Call {
        // Opens the connections and the reply queue outside the measurement (not counted by
        // a `--role server` either).
        client.call::<_, ()>(&ctx, "ping", &())?;
    }
    let sent = AtomicU64::new(0);
    let casting = args.mode != Mode::Call;
    let count_sends = args.role == Role::Client;
    thread::scope(|scope| {
        for i in 0..args.clients {
            let (client, ctx, payload, sent) = (&client, &ctx, &payload, &sent);
            let spawned = thread::Builder::new()
                .name(format!("bench-client-{i}"))
                .spawn_scoped(scope, move || {
                    let message = Payload {
                        payload: payload.as_str().into(),
                    };
                    while limit.claim() {
                        stats.starting();
                        let begun = Instant::now();
                        let outcome = if casting {
                            client.cast(ctx, "sink", &message).map(|()| true)
                        } else {
                            client
                                .call::<_, String>(ctx, "echo", &message)
                                .map(|echoed| echoed.len() == payload.len())
                        };
                        match outcome {
                            Ok(true) if casting => {
                                sent.fetch_add(1, Ordering::Relaxed);
                                // A cast's latency is its publish (and confirm) time.
                                stats.latency.record(begun.elapsed().as_micros() as u64);
                                if count_sends {
                                    stats.done();
                                }
                            }
                            Ok(true) => stats.call_done(begun.elapsed()),
                            Ok(false) => {
                                stats.errors.other.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => count_error(stats, &e),
                        }
                    }
                });
            if let Err(e) = spawned {
                eprintln!("cannot spawn a client thread: {e}");
            }
        }
    });
    if args.role == Role::Both && args.mode != Mode::Call {
        // The run ends when the last sent cast has been handled (or the time is up).
        let copies = if args.mode == Mode::Fanout {
            args.servers as u64
        } else {
            1
        };
        stats.wait_for(sent.load(Ordering::Relaxed) * copies, limit);
    }
    transport.close();
    Ok(())
}

/// Counts a failed operation by kind.
fn count_error(stats: &Stats, error: &Error) {
    let counter = match error {
        Error::Timeout { .. } => &stats.errors.timeout,
        Error::Remote { .. } => &stats.errors.remote,
        Error::DeliveryFailure { .. }
        | Error::Undeliverable { .. }
        | Error::Connection { .. }
        | Error::Refused { .. } => &stats.errors.delivery,
        _ => &stats.errors.other,
    };
    if counter.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!(
            "first error of its kind: {}",
            crate::term::line(&error.to_string())
        );
    }
}
