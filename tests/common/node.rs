//! Private RabbitMQ nodes for tests that kill or restart a broker (never the shared one):
//! own node name, AMQP and distribution ports, data and log directories; killed (`-9`) or
//! stopped and deleted when dropped. [`RabbitNode::start_with`] adds configuration (a TLS
//! listener, say), plugins and more ports to wait for.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
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

/// A port nobody listens on right now (for a node's extra listeners).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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
        let node = RabbitNode {
            name,
            port,
            dir,
            env,
            more_ports: config.wait_for_ports,
        };
        node.launch();
        node
    }

    fn launch(&self) {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "rabbitmq-server -detached failed");
        let deadline = Instant::now() + Duration::from_secs(90);
        for &port in std::iter::once(&self.port).chain(&self.more_ports) {
            while !port_open(port) {
                assert!(
                    Instant::now() < deadline,
                    "node {} did not open port {port} (log: {})",
                    self.name,
                    self.dir.join("log").display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
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
        self.launch();
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
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
