//! `warren notify` and `warren listen`.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use warren::{
    Notification, NotificationEndpoint, NotificationFormat, NotificationListener,
    NotificationResult, Notifier, Priority, RequestContext, Target, Transport,
};

use crate::input::Inputs;
use crate::{bounded, Doing, Failure, Output};

/// `warren notify`.
#[derive(Args)]
pub struct NotifyArgs {
    /// Notification topic (routing key `<topic>.<priority>`).
    #[arg(long, default_value = "notifications")]
    topic: String,
    /// Publisher id, e.g. compute.host-1.
    #[arg(long)]
    publisher: String,
    /// Event type, e.g. compute.instance.create.end.
    #[arg(long)]
    event_type: String,
    /// audit, debug, info, warn, error, critical or sample.
    #[arg(long, default_value = "info")]
    priority: String,
    /// Exchange (default: the transport's control exchange).
    #[arg(long)]
    exchange: Option<String>,
    /// v2 (oslo's messagingv2, enveloped) or v1 (oslo's messaging, bare).
    #[arg(long, default_value = "v2", value_parser = ["v2", "v1"])]
    format: String,
    /// Context as a JSON object; @FILE reads it from FILE, - from standard input.
    #[arg(long, value_name = "JSON")]
    context: Option<String>,
    /// Seconds to wait for the broker.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Payload as JSON (default `{}`); @FILE reads it from FILE, - from standard input.
    #[arg(value_name = "PAYLOAD_JSON")]
    payload: Option<String>,
}

/// `warren listen`.
#[derive(Args)]
pub struct ListenArgs {
    /// Notification topics (repeat, or separate with commas).
    #[arg(long, default_value = "notifications", value_delimiter = ',')]
    topic: Vec<String>,
    /// Priorities to listen to (repeat, or separate with commas; default: all).
    #[arg(long, value_delimiter = ',')]
    priority: Vec<String>,
    /// Exchange (default: the transport's control exchange).
    #[arg(long)]
    exchange: Option<String>,
    /// Listen through a pool queue of this name: a private copy of every notification, so that
    /// the service's own listeners lose nothing.
    #[arg(long)]
    pool: Option<String>,
    /// Exit after this many notifications (default: run until interrupted).
    #[arg(long)]
    count: Option<usize>,
}

pub fn notify(url: &str, args: NotifyArgs) -> Result<(), Failure> {
    let priority: Priority = args
        .priority
        .parse()
        .map_err(|e: warren::Error| Failure::usage(e.to_string()))?;
    let mut inputs = Inputs::default();
    let payload = inputs
        .value("PAYLOAD_JSON", args.payload.as_deref())?
        .unwrap_or_else(|| json!({}));
    let context = RequestContext::from(inputs.object("--context", args.context.as_deref())?);
    let transport = Transport::new(url)?;
    let mut notifier = Notifier::new(&transport, args.publisher).topics([args.topic]);
    if args.format == "v1" {
        notifier = notifier.format(NotificationFormat::V1);
    }
    if let Some(exchange) = args.exchange {
        notifier = notifier.exchange(exchange);
    }
    let timeout = match args.timeout {
        Some(secs) => crate::rpc::seconds("--timeout", secs)?,
        None => transport.options().rpc_response_timeout,
    };
    notifier = notifier.timeout(timeout);
    bounded(timeout, Doing::Notify(&args.event_type), || {
        notifier.notify(&context, priority, &args.event_type, &payload)
    })
}

pub fn listen(url: &str, args: ListenArgs, output: Output) -> Result<(), Failure> {
    let priorities: Vec<Priority> = if args.priority.is_empty() {
        Priority::ALL.to_vec()
    } else {
        args.priority
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|e: warren::Error| Failure::usage(e.to_string()))
            })
            .collect::<Result<_, _>>()?
    };
    let transport = Transport::new(url)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut endpoint = NotificationEndpoint::new();
    for priority in priorities {
        let tx = tx.clone();
        endpoint = endpoint.on(priority, move |n: &Notification| {
            let _ = tx.send(n.clone());
            NotificationResult::Handled
        });
    }
    let targets = args
        .topic
        .iter()
        .map(|topic| {
            let target = Target::new(topic.as_str());
            match &args.exchange {
                Some(exchange) => target.with_exchange(exchange.as_str()),
                None => target,
            }
        })
        .collect();
    let mut builder = NotificationListener::builder(&transport, targets)
        .endpoint(endpoint)
        .workers(1)
        .retry(0);
    if let Some(pool) = args.pool {
        builder = builder.pool(pool);
    }
    let listener = builder.build()?;
    listener.start()?;
    let mut printed = 0;
    let stdout = std::io::stdout();
    while !matches!(args.count, Some(count) if printed >= count) {
        let Ok(n) = rx.recv_timeout(Duration::from_secs(3600)) else {
            continue;
        };
        let line = json!({
            "priority": n.priority.as_str(),
            "publisher_id": n.publisher_id,
            "event_type": n.event_type,
            "payload": n.payload,
            "ctxt": n.ctxt,
            "metadata": {"message_id": n.metadata.message_id, "timestamp": n.metadata.timestamp},
        });
        let mut out = stdout.lock();
        // Whatever a publisher put in it, escaped for the terminal (and still the same JSON):
        // one line (json), or one indented document per notification (pretty).
        if writeln!(out, "{}", output.render(&line))
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
        printed += 1;
    }
    listener.stop();
    listener.wait();
    Ok(())
}
