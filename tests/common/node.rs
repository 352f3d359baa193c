//! Private RabbitMQ nodes for tests that kill or restart a broker (never the shared one):
//! own node name, AMQP and distribution ports, data and log directories; killed (`-9`) or
//! stopped and deleted when dropped. [`RabbitNode::start_with`] adds configuration (a TLS
//! listener, say), plugins and more ports to wait for.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// More ports the node must open before it counts as started (its TLS listener...).
    more_ports: Vec<u16>,
}

/// What a node is started with beyond the defaults (an empty `rabbitmq.conf`, no plugins).
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// The content of `rabbitmq.conf` (new-style config), e.g. a `listeners.ssl.default`
    /// line and `ssl_options.*`. Files it names must be readable by the `rabbitmq` user.
    pub config: String,
    /// Plugins to enable, e.g. `rabbitmq_auth_mechanism_ssl`.
    pub plugins: Vec<String>,
    /// Ports `config` opens that must accept connections before the node counts as started
    /// (the AMQP port always must).
    pub wait_for_ports: Vec<u16>,
}

/// The ports private nodes are given: below the kernel's ephemeral range (32768–60999 on
/// Debian), so that between a port's choice and the node's start (seconds) neither a
/// `bind(0)` (a test's proxy) nor an outgoing connection can take it. Ports were once chosen
/// by `bind(0)`: a CI run found its crash test's node dead before the crash, its AMQP port
/// apparently open but nothing served on it, and its log deleted; a port taken by another
/// node's distribution listener fits that, and [`RabbitNode::start_with`] now checks that the
/// node runs, says why it did not, and keeps its log's end.
const NODE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Of those, the ports of the cluster tests' nodes. `scripts/test` runs tests/cluster.rs beside
/// the other test binaries, and a cluster test restarts a node on the ports it had: another
/// process must not take them while the node is down.
const CLUSTER_PORTS: std::ops::Range<u16> = 20_000..23_000;

/// The part of [`NODE_PORTS`] this test binary takes its ports from.
fn node_ports() -> std::ops::Range<u16> {
    // Compiled into each test binary: the name of the one this copy is part of.
    if env!("CARGO_CRATE_NAME") == "cluster" {
        CLUSTER_PORTS
    } else {
        CLUSTER_PORTS.end..NODE_PORTS.end
    }
}

/// A port nobody listens on right now (for a node's listeners), from [`node_ports`], never the
/// same twice in one process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ports = node_ports();
    let span = u32::from(ports.end - ports.start);
    // Test processes of one run start at different places of the range.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let offset = start.wrapping_add(step) % span;
        let port = ports.start + u16::try_from(offset).expect("offset < span, a u16");
        let v4_free = TcpListener::bind(("0.0.0.0", port)).is_ok();
        // RabbitMQ listens on IPv6 too where the host has it.
        let v6_free = TcpListener::bind(("::", port))
            .err()
            .is_none_or(|e| e.kind() != std::io::ErrorKind::AddrInUse);
        if v4_free && v6_free {
            return port;
        }
    }
    panic!("no free port in {ports:?}")
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

impl RabbitNode {
    /// Starts a node and waits until it accepts AMQP connections.
    pub fn start(label: &str) -> RabbitNode {
        RabbitNode::start_with(label, NodeConfig::default())
    }

    /// Starts a node configured by `config` and waits until its AMQP port and every port of
    /// `config.wait_for_ports` accept connections. `label` makes the node's name
    /// (`warren_<label>_<pid>@localhost`): a process must not run two nodes with one label at
    /// the same time.
    pub fn start_with(label: &str, config: NodeConfig) -> RabbitNode {
        // A node that fails to start (a port of it taken after all) is tried again on new
        // ports of its own; `config`'s ports stay.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let node = RabbitNode::prepare(label, &config);
            match node.launch() {
                Ok(()) => return node,
                Err(failure) => {
                    eprintln!("{failure}; trying again on other ports");
                    failures.push(failure);
                }
            }
        }
        panic!("node {label} did not start three times: {failures:#?}")
    }

    /// A node's directory and environment, on new AMQP and distribution ports.
    fn prepare(label: &str, config: &NodeConfig) -> RabbitNode {
        let port = free_port();
        let dist_port = free_port();
        let name = format!("warren_{label}_{}@localhost", std::process::id());
        let dir =
            std::env::temp_dir().join(format!("warren-node-{label}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("mnesia")).expect("node dir");
        std::fs::create_dir_all(dir.join("log")).expect("node dir");
        std::fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", config.plugins.join(",")),
        )
        .expect("plugins file");
        std::fs::write(dir.join("rabbitmq.conf"), &config.config).expect("config file");
        // The Debian wrapper runs the node as the rabbitmq user.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let d = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
        let env = vec![
            ("RABBITMQ_NODENAME".into(), name.clone()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE".into(), d("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), d("log")),
            ("RABBITMQ_PID_FILE".into(), d("pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), d("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE".into(), d("rabbitmq")),
        ];
        RabbitNode {
            name,
            port,
            dir,
            env,
            more_ports: config.wait_for_ports.clone(),
        }
    }

    /// Starts the node and waits until it runs and its ports accept connections; on failure,
    /// says why, with the end of its log (dropping the node cleans up what is left of it).
    fn launch(&self) -> Result<(), String> {
        self.try_launch()
            .map_err(|why| format!("node {}: {why}\n{}", self.name, self.log_tail(30)))
    }

    fn try_launch(&self) -> Result<(), String> {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status()
            .map_err(|e| format!("rabbitmq-server does not run: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed: {status}"));
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        for &port in std::iter::once(&self.port).chain(&self.more_ports) {
            while !port_open(port) {
                if Instant::now() >= deadline {
                    return Err(format!("port {port} not open after 90 s"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // An open port is not yet this node's: another process may hold it. A node that runs
        // holds its listeners (RabbitMQ stops booting when one cannot bind).
        let output = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "await_startup", "--timeout", "60"])
            .output()
            .map_err(|e| format!("rabbitmqctl does not run: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr
                .lines()
                .find(|line| line.contains("epmd reports"))
                .or_else(|| stderr.lines().next())
                .unwrap_or_default();
            return Err(format!(
                "its ports are open but the node is not running: {}",
                why.trim()
            ));
        }
        Ok(())
    }

    /// The last `lines` lines of the node's log files (not its crash dump), for a failure
    /// message.
    fn log_tail(&self, lines: usize) -> String {
        let Ok(entries) = std::fs::read_dir(self.dir.join("log")) else {
            return "(no log directory)".into();
        };
        let mut tail = String::new();
        let logs = entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"));
        for entry in logs {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            tail.push_str(&format!("--- {} (end)\n", entry.path().display()));
            for line in &all[all.len().saturating_sub(lines)..] {
                tail.push_str(line);
                tail.push('\n');
            }
        }
        tail
    }

    /// Runs `rabbitmqctl -q -n <node> <args>` and fails the test if it fails.
    pub fn ctl(&self, args: &[&str]) {
        let output = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl -n {} {args:?}: {}{}",
            self.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `rabbitmqctl -q -n <node> <args> --formatter json` and parses the output.
    pub fn ctl_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let output = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .args(["--formatter", "json"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("rabbitmqctl JSON")
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/", self.port)
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The node's directory (data, logs, and its OS pid in `pid`), deleted when it is dropped.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn os_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .map(|p| p.trim().to_string())
    }

    /// Kills the node's VM with SIGKILL (a crash) and waits until its port is closed; fails
    /// the test if it stays open.
    pub fn kill9(&self) {
        assert!(
            self.kill9_quietly(),
            "node {} still listens on port {} 30 s after SIGKILL",
            self.name,
            self.port
        );
    }

    /// [`RabbitNode::kill9`] for clean-up: `false` if the port is still open after 30 s.
    fn kill9_quietly(&self) -> bool {
        if let Some(pid) = self.os_pid() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while port_open(self.port) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Starts the node again on the same data (durable queues and persistent messages kept).
    pub fn restart(&self) {
        if let Err(failure) = self.launch() {
            panic!("restarting: {failure}");
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        // A failing test shows how its node ended (its directory is deleted below).
        if std::thread::panicking() {
            eprintln!(
                "node {} when the test failed:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        let stopped = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped && !self.kill9_quietly() {
            eprintln!(
                "clean-up: node {} still listens on port {}",
                self.name, self.port
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
