//! `warren`: command-line RPC against RabbitMQ (or any oslo.messaging deployment).
//!
//! Exit codes: 0 success; 1 remote error; 2 usage or bad input; 3 timeout; 4 connection or
//! delivery failure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod notify;
mod rpc;

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
            eprintln!("{}", failure.message.replace('\n', " "));
            ExitCode::from(failure.code)
        }
    }
}
