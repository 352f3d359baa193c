//! `warren`: command-line RPC against RabbitMQ (or any oslo.messaging deployment).
//!
//! Exit codes: 0 success; 1 remote error; 2 usage or bad input; 3 timeout; 4 connection or
//! delivery failure.
//!
//! What others wrote (a remote failure, a result, a notification, the broker's texts) reaches
//! the terminal with its control characters escaped ([`term`]), in either `--output` format.
//!
//! Every subcommand's `--help` ends with worked examples; tests/cli.rs runs those of `call`,
//! `cast`, `notify`, `listen` and `bench` against a server of its own, so they stay true.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

mod bench;
mod input;
mod notify;
mod rpc;
mod term;

/// Default broker when neither `--url` nor `WARREN_URL` is given.
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/";

// Worked examples at the end of each subcommand's help. Every line starting with `warren` is
// run by tests/cli.rs (topics, the broker URL and `@args.json` adjusted to its own server), so
// keep them runnable: shell quoting with '...' only, no pipes, finite commands (a command
// that cannot be, such as a server running until signalled, goes in a `#` comment line).

const MAIN_EXAMPLES: &str = "\
Examples:
  warren call --topic compute start_instance '{\"instance_id\": \"vm-1\"}'
  warren --url 'rabbit://nova:secret@rabbit-1:5672/?control_exchange=nova' cast --topic compute --fanout refresh_cache
  warren call --help                 # more examples per subcommand
  source <(warren completions bash)  # tab completion in this shell (also zsh, fish, ...)

The broker is --url, else $WARREN_URL, else amqp://guest:guest@127.0.0.1:5672/.
Exit codes: 0 success, 1 remote error, 2 usage or bad input, 3 timeout,
4 connection or delivery failure.";

const CALL_EXAMPLES: &str = "\
Examples:
  # start_instance(instance_id=\"vm-1\") on any server of topic compute; prints the result:
  warren call --topic compute start_instance '{\"instance_id\": \"vm-1\"}'
  # On server host-1 only, which must implement version 1.1 or a later 1.x (default 1.0):
  warren call --topic compute --server host-1 --version 1.1 stop_instance '{\"instance_id\": \"vm-1\"}'
  # With a request context, on the exchange nova (default: the URL's control_exchange):
  warren call --topic compute --exchange nova --context '{\"user_id\": \"admin\"}' list_instances
  # Arguments from a file (`-`: from standard input), the result indented:
  warren --output pretty call --topic compute start_instance @args.json
  # Another broker (user, password, hosts, vhost, oslo options), instead of $WARREN_URL:
  warren --url 'rabbit://nova:secret@rabbit-1:5672/?control_exchange=nova' call --topic compute list_instances
  # memory://NAME/ is in-process only: from the command line, see `warren bench --help`.";

const CAST_EXAMPLES: &str = "\
Examples:
  # reboot_instance(instance_id=\"vm-1\") on server host-1, without waiting for a result:
  warren cast --topic compute --server host-1 reboot_instance '{\"instance_id\": \"vm-1\"}'
  # refresh_cache() on every server of topic compute:
  warren cast --topic compute --fanout refresh_cache
  # Arguments from a file (`-`: from standard input), sent as JSON rather than msgpack:
  warren cast --topic compute --codec json reboot_instance @args.json";

const NOTIFY_EXAMPLES: &str = "\
Examples:
  # An info notification on topic notifications (oslo's messagingv2 envelope):
  warren notify --publisher compute.host-1 --event-type compute.instance.create.end '{\"instance_id\": \"vm-1\"}'
  # An error one, with a context:
  warren notify --priority error --publisher compute.host-1 --event-type compute.instance.create.error --context '{\"user_id\": \"admin\"}' '{\"reason\": \"no valid host\"}'";

const LISTEN_EXAMPLES: &str = "\
Examples:
  # The next 2 notifications of topic notifications, every priority, one JSON line each:
  warren listen --count 2
  # Errors only, indented, through a private pool queue (the service's listeners lose nothing):
  warren --output pretty listen --priority error,critical --pool audit-1 --count 1";

const BENCH_EXAMPLES: &str = "\
Examples:
  # No broker needed: servers and clients in this process, on the in-process transport:
  warren --url memory://bench/ bench --count 2000
  # 1000 casts from 4 client threads (or --duration SECS), the result as JSON on the last line:
  warren bench --mode cast --clients 4 --count 1000 --quiet --json
  # One side per process (same --topic): `--role server` serves until SIGTERM/SIGINT.
  #   warren bench --role server --topic bench-1 &
  #   warren bench --role client --topic bench-1 --count 1000";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  source <(warren completions bash)     # this bash session
  warren completions bash > ~/.local/share/bash-completion/completions/warren
  warren completions zsh > ~/.zfunc/_warren   # with fpath+=(~/.zfunc) before compinit
  warren completions fish > ~/.config/fish/completions/warren.fish";

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Blocking RPC over RabbitMQ, oslo.messaging compatible",
    after_help = MAIN_EXAMPLES
)]
struct Cli {
    /// Transport URL (rabbit://user:pass@host:port/vhost?option=value, or memory://NAME/);
    /// default amqp://guest:***@127.0.0.1:5672/.
    #[arg(long, global = true, env = "WARREN_URL", default_value = DEFAULT_URL, hide_env_values = true, hide_default_value = true)]
    url: String,

    /// How `call` prints its result and `listen` each notification: json (the default: one
    /// compact JSON document per line) or pretty (indented). `bench` has its own --json.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    output: Option<Output>,

    #[command(subcommand)]
    command: Command,
}

/// The `--output` format.
#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    // Plain comments: doc comments would make clap list the values at length in every help.
    // One compact JSON document per line (stable, for scripts).
    #[default]
    Json,
    // Indented JSON, for people.
    Pretty,
}

impl Output {
    /// `value` in this format, escaped for a terminal ([`term`]), without a final newline.
    pub fn render(self, value: &serde_json::Value) -> String {
        match self {
            Output::Json => term::json(value),
            Output::Pretty => term::json_pretty(value),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Call a remote method and print its result as JSON.
    #[command(after_help = CALL_EXAMPLES)]
    Call(rpc::CallArgs),
    /// Cast a remote method (no result); `--fanout` sends it to every server of the topic.
    #[command(after_help = CAST_EXAMPLES)]
    Cast(rpc::CastArgs),
    /// Send one notification.
    #[command(after_help = NOTIFY_EXAMPLES)]
    Notify(notify::NotifyArgs),
    /// Print notifications as JSON, until interrupted or `--count` of them.
    #[command(after_help = LISTEN_EXAMPLES)]
    Listen(notify::ListenArgs),
    /// Measure call/cast throughput and latency (servers and clients in this process, or one
    /// side with --role).
    #[command(after_help = BENCH_EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Print a shell completion script on stdout.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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

/// `warren completions SHELL`: the script, generated from the parser's own definition.
fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    // Generated in memory first: clap_complete panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "warren", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        // `| head`: the reader has what it wanted, as `listen` treats it.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure {
            code: 4,
            message: format!("error: cannot write the completion script: {e}"),
        }),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let cli = Cli::parse();
    let output = cli.output.unwrap_or_default();
    let outcome = match cli.command {
        Command::Call(args) => rpc::call(&cli.url, args, output),
        Command::Cast(args) => rpc::cast(&cli.url, args),
        Command::Notify(args) => notify::notify(&cli.url, args),
        Command::Listen(args) => notify::listen(&cli.url, args, output),
        // bench prints its own report (--json: one line): refused rather than ignored.
        Command::Bench(_) if cli.output.is_some() => Err(Failure::usage(
            "--output does not apply to bench: its --json prints the result as one JSON line",
        )),
        Command::Bench(args) => bench::run(&cli.url, args),
        Command::Completions { shell } => completions(shell),
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
