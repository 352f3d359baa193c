//! `warren`: command-line RPC against RabbitMQ (or any oslo.messaging deployment).
//!
//! Exit codes: 0 success; 1 remote error; 2 usage or bad input; 3 timeout; 4 connection or
//! delivery failure.
//!
//! What others wrote (a remote failure, a result, a notification, the broker's texts) reaches
//! the terminal with its control characters escaped ([`term`]).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod bench;
mod input;
mod notify;
mod rpc;
mod term;

/// Default broker when neither `--url` nor `WARREN_URL` is given.
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/";

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Blocking RPC over RabbitMQ, oslo.messaging compatible"
)]
struct Cli {
    /// Transport URL (rabbit://user:pass@host:port/vhost?option=value, or memory://NAME/);
    /// default amqp://guest:***@127.0.0.1:5672/.
    #[arg(long, global = true, env = "WARREN_URL", default_value = DEFAULT_URL, hide_env_values = true, hide_default_value = true)]
    url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call a remote method and print its result as JSON.
    Call(rpc::CallArgs),
    /// Cast a remote method (no result); `--fanout` sends it to every server of the topic.
    Cast(rpc::CastArgs),
    /// Send one notification.
    Notify(notify::NotifyArgs),
    /// Print notifications as JSON lines, until interrupted or `--count` of them.
    Listen(notify::ListenArgs),
    /// Measure call/cast throughput and latency (servers and clients in this process, or one
    /// side with --role).
    Bench(bench::BenchArgs),
}

/// A CLI failure: what to print on stderr and the exit code.
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Usage or bad input (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: format!("error: {}", message.into()),
        }
    }
}

impl From<warren::Error> for Failure {
    fn from(error: warren::Error) -> Failure {
        use warren::Error as E;
        let code = match &error {
            E::Remote { class, message, .. } => {
                return Failure {
                    code: 1,
                    message: format!("Remote error: {class}: {message}"),
                }
            }
            E::Timeout { .. } => 3,
            E::InvalidUrl { .. }
            | E::InvalidOption { .. }
            | E::InvalidTarget { .. }
            | E::InvalidVersion { .. }
            | E::VersionCap { .. }
            | E::Encode { .. } => 2,
            _ => 4,
        };
        Failure {
            code,
            message: format!("error: {error}"),
        }
    }
}

/// What a bounded operation was doing, for its timeout message.
pub enum Doing<'a> {
    /// `call` of this method.
    Call(&'a str),
    /// `cast` of this method.
    Cast(&'a str),
    /// `notify` of this event type.
    Notify(&'a str),
}

/// Runs `op`, a library operation bounded by `timeout` (the client's or notifier's), and
/// reports a deadline that expires anywhere in it, connecting included, as a timeout (exit 3).
pub fn bounded<T>(
    timeout: Duration,
    doing: Doing<'_>,
    op: impl FnOnce() -> Result<T, warren::Error>,
) -> Result<T, Failure> {
    use warren::Error as E;
    let started = Instant::now();
    op().map_err(|error| {
        let secs = timeout.as_secs_f64();
        let expired = started.elapsed() >= timeout;
        let message = match &error {
            E::Timeout { msg_id, .. } => {
                let id = if msg_id.is_empty() {
                    String::new()
                } else {
                    format!(" (message ID {msg_id})")
                };
                match doing {
                    Doing::Call(method) => {
                        format!("waiting for a reply to {method}{id}")
                    }
                    Doing::Cast(method) => {
                        format!("waiting for the broker to take the cast of {method}{id}")
                    }
                    Doing::Notify(event) => {
                        format!("waiting for the broker to take the notification {event}")
                    }
                }
            }
            // When the deadline has passed before a connection was even tried, the library
            // reports a delivery failure "after 0 attempts" whose cause is `Closed` (its
            // placeholder when no attempt failed). This CLI never closes its transport while
            // an operation runs, so past the deadline that can only be the deadline.
            E::Closed if expired => "connecting to the broker".to_string(),
            E::DeliveryFailure { reason, .. }
                if expired && reason.ends_with(&E::Closed.to_string()) =>
            {
                "connecting to the broker".to_string()
            }
            _ => return Failure::from(error),
        };
        Failure {
            code: 3,
            message: format!("error: timed out after {secs}s {message}"),
        }
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Call(args) => rpc::call(&cli.url, args),
        Command::Cast(args) => rpc::cast(&cli.url, args),
        Command::Notify(args) => notify::notify(&cli.url, args),
        Command::Listen(args) => notify::listen(&cli.url, args),
        Command::Bench(args) => bench::run(&cli.url, args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One line, whatever a remote failure or the broker put in it.
            eprintln!("{}", term::line(&failure.message));
            ExitCode::from(failure.code)
        }
    }
}
