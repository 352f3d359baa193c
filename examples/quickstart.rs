//! Server and client in one process: a call, a cast, a fanout cast and a remote error.
//!
//! ```text
//! cargo run --example quickstart                       # RabbitMQ on 127.0.0.1:5672
//! WARREN_URL=memory://demo/ cargo run --example quickstart
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use warren::{
    Endpoint, Error, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport,
};

#[derive(Deserialize)]
struct Greet {
    name: String,
}

#[derive(Deserialize)]
struct Divide {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize, Debug)]
struct Greeting {
    text: String,
    served_by: String,
}

fn main() -> Result<(), Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let url =
        std::env::var("WARREN_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into());
    let transport = Transport::new(&url)?;
    let topic = "quickstart";

    // Casts have no reply; the handler tells main() through a channel when it ran.
    let (handled_tx, handled) = crossbeam_channel::unbounded();
    let endpoint = Endpoint::new()
        .method("greet", |ctx: &RequestContext, args: Greet| {
            Ok::<_, Failure>(Greeting {
                text: format!("hello, {}", args.name),
                served_by: ctx.get_str("user_id").unwrap_or("?").to_string(),
            })
        })
        .method("count", move |_: &RequestContext, _: NoArgs| {
            let _ = handled_tx.send(());
            Ok::<_, Failure>(())
        })
        .method("divide", |_: &RequestContext, args: Divide| {
            if args.b == 0 {
                Err(Failure::new("ZeroDivisionError", "builtins", "division by zero").expected())
            } else {
                Ok(args.a / args.b)
            }
        });
    let server = RpcServer::builder(&transport, Target::new(topic).with_server("quickstart-1"))
        .endpoint(endpoint)
        .workers(4)
        .build()?;
    server.start()?;
    println!("server listening on topic {topic} via {}", transport.url());

    let client = RpcClient::new(&transport, Target::new(topic));
    let ctx = RequestContext::new().with("user_id", "alice");

    let greeting: Greeting = client.call(&ctx, "greet", &json!({"name": "world"}))?;
    println!("call greet        -> {greeting:?}");

    client.cast(&ctx, "count", &())?;
    client.prepare().fanout(true).cast(&ctx, "count", &())?;
    let count = (0..2)
        .filter(|_| handled.recv_timeout(Duration::from_secs(5)).is_ok())
        .count();
    println!("cast + fanout     -> handled {count} casts");

    match client.call::<_, i64>(&ctx, "divide", &json!({"a": 1, "b": 0})) {
        Err(Error::Remote { class, message, .. }) => {
            println!("call divide(1, 0) -> remote {class}: {message}")
        }
        other => println!("call divide(1, 0) -> unexpected {other:?}"),
    }
    match client
        .prepare()
        .timeout(Duration::from_millis(500))
        .call::<_, ()>(&ctx, "greet", &json!({"name": 1}))
    {
        Err(Error::Remote { class, message, .. }) => {
            println!("call greet(1)     -> remote {class}: {message}")
        }
        other => println!("call greet(1)     -> unexpected {other:?}"),
    }

    server.stop();
    server.wait();
    println!("server stopped");
    Ok(())
}
