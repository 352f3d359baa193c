//! `warren call` and `warren cast`.

use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};
use warren::{Codec, RequestContext, RpcClient, Target, Transport};

use crate::input::Inputs;
use crate::{bounded, Doing, Failure, Output};

/// Where and how to send.
#[derive(Args)]
pub struct SendArgs {
    /// Topic of the servers.
    #[arg(long)]
    topic: String,
    /// Send to this server only (routing key `<topic>.<server>`).
    #[arg(long)]
    server: Option<String>,
    /// Exchange (default: the transport's control exchange, `openstack`).
    #[arg(long)]
    exchange: Option<String>,
    /// Interface namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Minimum version the server must implement (X.Y).
    #[arg(long)]
    version: Option<String>,
    /// Seconds to wait for the reply (call) or the broker (cast).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Request context as a JSON object, e.g. '{"user_id": "admin"}'; @FILE reads it from
    /// FILE, - from standard input.
    #[arg(long, value_name = "JSON")]
    context: Option<String>,
    /// Codec to send with: json (oslo.messaging wire format) or msgpack.
    #[arg(long, value_parser = ["json", "msgpack"])]
    codec: Option<String>,
    /// Remote method name.
    method: String,
    /// Arguments as a JSON object of named arguments (default `{}`); @FILE reads it from FILE,
    /// - from standard input.
    #[arg(value_name = "ARGS_JSON")]
    args: Option<String>,
}

/// `warren call`.
#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    send: SendArgs,
}

/// `warren cast`.
#[derive(Args)]
pub struct CastArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Send to every server of the topic.
    #[arg(long)]
    fanout: bool,
}

pub fn call(url: &str, args: CallArgs, output: Output) -> Result<(), Failure> {
    let prepared = prepare(url, &args.send, false)?;
    let method = args.send.method.as_str();
    let result: Value = bounded(prepared.timeout, Doing::Call(method), || {
        prepared
            .client
            .call(&prepared.context, method, &prepared.args)
    })?;
    // Whatever the server put in it, escaped for the terminal (and still the same JSON).
    println!("{}", output.render(&result));
    Ok(())
}

pub fn cast(url: &str, args: CastArgs) -> Result<(), Failure> {
    let prepared = prepare(url, &args.send, args.fanout)?;
    let method = args.send.method.as_str();
    bounded(prepared.timeout, Doing::Cast(method), || {
        prepared
            .client
            .cast(&prepared.context, method, &prepared.args)
    })
}

struct Prepared {
    client: RpcClient,
    context: RequestContext,
    args: Map<String, Value>,
    /// The client's timeout.
    timeout: Duration,
}

fn prepare(url: &str, send: &SendArgs, fanout: bool) -> Result<Prepared, Failure> {
    let mut inputs = Inputs::default();
    let args = inputs.object("ARGS_JSON", send.args.as_deref())?;
    let context = RequestContext::from(inputs.object("--context", send.context.as_deref())?);
    let mut builder = Transport::builder(url);
    if let Some(codec) = &send.codec {
        builder = builder.codec(codec.parse::<Codec>()?);
    }
    let transport = builder.build()?;
    let mut target = Target::new(send.topic.as_str()).with_fanout(fanout);
    target.server = send.server.clone();
    target.exchange = send.exchange.clone();
    target.namespace = send.namespace.clone();
    target.version = send.version.clone();
    let mut client = RpcClient::new(&transport, target);
    let timeout = match send.timeout {
        Some(secs) => seconds("--timeout", secs)?,
        None => transport.options().rpc_response_timeout,
    };
    client = client.timeout(timeout);
    Ok(Prepared {
        client,
        context,
        args,
        timeout,
    })
}

/// A flag's value in seconds (`--timeout`, `--duration`): positive and finite.
pub fn seconds(flag: &str, secs: f64) -> Result<Duration, Failure> {
    if secs.is_finite() && secs > 0.0 && secs < 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(Failure::usage(format!(
            "{flag} must be a positive number of seconds, not {secs}"
        )))
    }
}
