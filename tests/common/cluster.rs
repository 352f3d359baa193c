//! A RabbitMQ cluster of private nodes ([`RabbitNode`]s on loopback, never the shared broker)
//! for tests that kill, restart or partition cluster members: started and joined by the test
//! itself (`rabbitmqctl -n <node> stop_app; join_cluster; start_app`, as `scripts/cluster`
//! does), a fault-injecting [`Proxy`] in front of every node, and helpers that find which node
//! holds a user's connections or a quorum queue's leader.
//!
//! Every node is torn down when the [`Cluster`] is dropped (a test that fails unwinds through
//! that drop), and a watchdog process kills the nodes and deletes their directories once the
//! test process is gone, however it ends (the [`shared`] cluster lives in a static, which is
//! never dropped).

use std::collections::BTreeSet;
use std::ops::Deref;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::RabbitNode;
use super::proxy::Proxy;

/// A user whose connections are a test's servers' (to find them in `list_connections`).
pub const SERVER_USER: &str = "warren_server";
/// A user whose connections are a test's clients'.
pub const CLIENT_USER: &str = "warren_client";

/// One connection of `list_connections`: which node holds it, whose it is, what for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Connection {
    /// Index of the node in the cluster.
    pub node: usize,
    pub user: String,
    /// warren's role for the connection (`listen`, `reply`, `send`), from its client
    /// properties.
    pub role: String,
}

pub struct Cluster {
    nodes: Vec<RabbitNode>,
    proxies: Vec<Proxy>,
    /// Nodes killed or stopped by the test (and not restarted since).
    down: Vec<AtomicBool>,
    /// Kills the nodes once this process is gone.
    watchdog: Option<Child>,
}

impl Cluster {
    /// Starts `size` nodes (`warren_<label><i>_<pid>@localhost`) at once, joins nodes 1.. to
    /// node 0, adds [`SERVER_USER`] and [`CLIENT_USER`] (password = name), and puts a proxy in
    /// front of every node.
    pub fn start(label: &str, size: usize) -> Cluster {
        assert!(size >= 1);
        let started = Instant::now();
        let results: Vec<thread::Result<RabbitNode>> = thread::scope(|scope| {
            let handles: Vec<_> = (0..size)
                .map(|i| scope.spawn(move || RabbitNode::start(&format!("{label}{i}"))))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        if results.iter().any(Result::is_err) {
            // The nodes that did start are stopped as `results` is dropped.
            panic!("a cluster node did not start (see the panic above)");
        }
        let nodes: Vec<RabbitNode> = results.into_iter().map(Result::unwrap).collect();
        let watchdog = watchdog(&nodes);
        let proxies = nodes.iter().map(|n| Proxy::start(&n.address())).collect();
        let cluster = Cluster {
            down: nodes.iter().map(|_| AtomicBool::new(false)).collect(),
            nodes,
            proxies,
            watchdog,
        };
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &first]);
            node.ctl(&["start_app"]);
        }
        let size_text = size.to_string();
        cluster.nodes[0].ctl(&["await_online_nodes", &size_text]);
        let members = cluster.running_members();
        assert_eq!(members.len(), size, "cluster members: {members:?}");
        for user in [SERVER_USER, CLIENT_USER] {
            cluster.nodes[0].ctl(&["add_user", user, user]);
            cluster.nodes[0].ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
        }
        eprintln!(
            "cluster of {size} nodes ({}) up in {:?}",
            cluster
                .nodes
                .iter()
                .map(|n| format!("{} on {}", n.name, n.port))
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed()
        );
        cluster
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    /// The proxy in front of node `i`.
    pub fn proxy(&self, i: usize) -> &Proxy {
        &self.proxies[i]
    }

    /// Node indexes starting with `first`, then the others in order.
    fn order(&self, first: usize) -> Vec<usize> {
        (0..self.len()).map(|k| (first + k) % self.len()).collect()
    }

    fn hosts_url(user: &str, addresses: &[String]) -> String {
        let hosts: Vec<String> = addresses
            .iter()
            .map(|a| format!("{user}:{user}@{a}"))
            .collect();
        format!("amqp://{}/", hosts.join(","))
    }

    /// The URL listing every node (guest), node 0 first.
    pub fn url(&self) -> String {
        self.url_from(0, "guest")
    }

    /// The URL listing every node, node `first` first (warren connects to it, and fails over
    /// to the next ones), logging in as `user`.
    pub fn url_from(&self, first: usize, user: &str) -> String {
        let addresses: Vec<String> = self
            .order(first)
            .into_iter()
            .map(|i| self.nodes[i].address())
            .collect();
        Cluster::hosts_url(user, &addresses)
    }

    /// Like [`url_from`](Self::url_from), through every node's proxy.
    pub fn proxied_url_from(&self, first: usize, user: &str) -> String {
        let addresses: Vec<String> = self
            .order(first)
            .into_iter()
            .map(|i| self.proxies[i].address())
            .collect();
        Cluster::hosts_url(user, &addresses)
    }

    /// The URL of node `i` alone (guest), for plain AMQP clean-up.
    pub fn node_url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    pub fn is_up(&self, i: usize) -> bool {
        !self.down[i].load(Ordering::Acquire)
    }

    /// A node that runs (to ask `rabbitmqctl` about the cluster).
    pub fn running_node(&self) -> usize {
        (0..self.len())
            .find(|&i| self.is_up(i))
            .expect("a running node")
    }

    /// Kills node `i`'s VM with SIGKILL (a crash) and waits until its port is closed.
    pub fn kill9(&self, i: usize) {
        self.down[i].store(true, Ordering::Release);
        self.nodes[i].kill9();
    }

    /// Stops node `i` cleanly (`rabbitmqctl shutdown`, which returns once the VM exited).
    pub fn stop(&self, i: usize) {
        self.down[i].store(true, Ordering::Release);
        self.nodes[i].ctl(&["shutdown"]);
    }

    /// Starts node `i` again on its data; it rejoins the cluster. Returns once it serves.
    pub fn restart(&self, i: usize) {
        self.nodes[i].restart();
        self.nodes[i].ctl(&["await_startup"]);
        self.down[i].store(false, Ordering::Release);
    }

    /// Restarts every node the test killed or stopped, lifts every proxy fault, and waits
    /// until every node runs in the cluster.
    pub fn heal(&self) {
        for proxy in &self.proxies {
            proxy.blackhole(false);
            proxy.refuse(false);
            proxy.delay(Duration::ZERO);
        }
        for i in 0..self.len() {
            if !self.is_up(i) {
                self.restart(i);
            }
        }
        let size = self.len().to_string();
        self.nodes[0].ctl(&["await_online_nodes", &size, "--timeout", "120"]);
    }

    /// `rabbitmqctl list_... --formatter json` on a running node.
    pub fn ctl_json(&self, args: &[&str]) -> Vec<Value> {
        self.nodes[self.running_node()].ctl_json(args)
    }

    /// Names of the running cluster members.
    pub fn running_members(&self) -> Vec<String> {
        let output = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.nodes[self.running_node()].name])
            .args(["cluster_status", "--formatter", "json"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "cluster_status: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let status: Value = serde_json::from_slice(&output.stdout).expect("cluster_status JSON");
        status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The node index whose AMQP port or node name is `value`.
    fn node_index(&self, port: Option<u64>, name: Option<&str>) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| Some(u64::from(n.port)) == port || Some(n.name.as_str()) == name)
    }

    /// Every client connection of the cluster (`list_connections user port
    /// client_properties`), with the node that holds it (its AMQP port).
    pub fn connections(&self) -> Vec<Connection> {
        let mut connections: Vec<Connection> = self
            .ctl_json(&["list_connections", "user", "port", "client_properties"])
            .iter()
            .filter_map(|c| {
                let node = self.node_index(c["port"].as_u64(), None)?;
                let role = c["client_properties"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p[0] == "information")
                    .and_then(|p| p[2].as_str())
                    .and_then(|info| info.split('(').nth(1))
                    .and_then(|rest| rest.split(',').next())
                    .unwrap_or("")
                    .to_string();
                Some(Connection {
                    node,
                    user: c["user"].as_str().unwrap_or("").to_string(),
                    role,
                })
            })
            .collect();
        connections.sort();
        connections
    }

    /// The nodes holding `user`'s connections.
    pub fn nodes_of(&self, user: &str) -> BTreeSet<usize> {
        self.connections()
            .into_iter()
            .filter(|c| c.user == user)
            .map(|c| c.node)
            .collect()
    }

    /// The node holding `user`'s connections, which must all be on one node.
    pub fn node_of(&self, user: &str) -> usize {
        let nodes = self.nodes_of(user);
        assert_eq!(
            nodes.len(),
            1,
            "{user}'s connections on one node: {:?}",
            self.connections()
        );
        *nodes.first().unwrap()
    }

    /// The node holding the leader of quorum queue or stream `queue` (`list_queues name
    /// leader`), if it has one now.
    pub fn leader(&self, queue: &str) -> Option<usize> {
        self.ctl_json(&["list_queues", "name", "leader"])
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| self.node_index(None, q["leader"].as_str()))
    }

    /// How many members of quorum queue `queue` are online.
    pub fn online_members(&self, queue: &str) -> usize {
        self.ctl_json(&["list_queues", "name", "online"])
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| q["online"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Whether stopping node `i` now would leave a quorum queue without a majority
    /// (`rabbitmq-queues check_if_node_is_quorum_critical`).
    pub fn quorum_critical(&self, i: usize) -> bool {
        !Command::new("rabbitmq-queues")
            .args(["-q", "-n", &self.nodes[i].name])
            .arg("check_if_node_is_quorum_critical")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-queues runs")
            .success()
    }

    /// Deletes `queues` (missing ones are fine) through a running node.
    pub fn delete_queues(&self, queues: &[String]) {
        super::delete_on_broker(&self.node_url(self.running_node()), queues, &[]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.proxies.clear();
        // Stop every node at once (each waits for its VM), then delete their directories.
        let nodes = std::mem::take(&mut self.nodes);
        thread::scope(|scope| {
            for node in nodes {
                scope.spawn(move || drop(node));
            }
        });
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// A process that waits for this one to end, then kills `nodes` (`kill -9` of the pid in
/// their directory) and deletes their directories: the nodes never outlive the test process,
/// even when it dies without unwinding or keeps a cluster in a static.
fn watchdog(nodes: &[RabbitNode]) -> Option<Child> {
    let dirs: Vec<String> = nodes
        .iter()
        .map(|n| format!("'{}'", n.dir().display()))
        .collect();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         for d in {dirs}; do \
           p=$(cat \"$d/pid\" 2>/dev/null) && grep -q beam \"/proc/$p/cmdline\" 2>/dev/null \
             && kill -9 \"$p\"; \
           rm -rf \"$d\"; \
         done",
        pid = std::process::id(),
        dirs = dirs.join(" ")
    );
    Command::new("sh")
        .args(["-c", &script])
        // A group of its own: an interrupted `scripts/test` signals the test process's group,
        // and this must outlive the test process to clean up after it.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("no cluster watchdog: {e}"))
        .ok()
}

/// The cluster the tests of one file share (starting one takes half a minute), behind a lock:
/// one test at a time uses it, since tests kill its nodes.
static SHARED: Mutex<Option<Cluster>> = Mutex::new(None);
/// How many shared clusters this process started (node names differ from one to the next).
static GENERATION: AtomicUsize = AtomicUsize::new(0);

/// The shared 3-node cluster, for this test alone until the guard is dropped. Dropping it
/// (even as the test fails) restarts the nodes the test killed or stopped and lifts proxy
/// faults; if that fails, the cluster is torn down and the next test starts a new one.
pub fn shared() -> SharedCluster {
    let mut guard = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.is_none() {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        *guard = Some(Cluster::start(&format!("cl{generation}n"), 3));
    }
    SharedCluster { guard }
}

pub struct SharedCluster {
    guard: MutexGuard<'static, Option<Cluster>>,
}

impl Deref for SharedCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        self.guard.as_ref().expect("the shared cluster")
    }
}

impl Drop for SharedCluster {
    fn drop(&mut self) {
        let Some(cluster) = self.guard.as_ref() else {
            return;
        };
        // Healed in a thread of its own: if that fails while this test is already failing,
        // it is not a panic during a panic.
        let healed = thread::scope(|scope| scope.spawn(|| cluster.heal()).join()).is_ok();
        if !healed {
            drop(self.guard.take());
            if !thread::panicking() {
                panic!("the shared cluster could not be restored after the test");
            }
        }
    }
}
