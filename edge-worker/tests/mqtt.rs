//! `edge_worker::run` against a real Mosquitto: status, birth, metrics in
//! seq order, commands (reply once, replays refused, also after a restart),
//! clean shutdown, and a broker outage that loses no frame.
//!
//! Needs `/usr/sbin/mosquitto` (CI installs it); the tests fail, not skip,
//! without it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_worker::{run, WorkerConfig};
use protocol::{Action, Body, Envelope, EventKind, ReplyStatus, Secret, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_support::free_port;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const ID: &str = "w-itest";
const SECRET_HEX: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn secret() -> Secret {
    Secret::from_hex(SECRET_HEX).unwrap()
}

// fits: u64 milliseconds last 584 million years after 1970.
#[allow(clippy::cast_possible_truncation)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A Mosquitto on a loopback port with persistence in its dir; killed on drop.
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "mosquitto is not installed (expected /usr/sbin/mosquitto): \
         apt-get install mosquitto; CI installs it"
    );
}

impl Mosquitto {
    async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        fs::create_dir_all(dir).unwrap();
        fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nlog_dest file {}/mosquitto.log\n",
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            port,
            dir: dir.to_path_buf(),
        };
        m.spawn().await;
        m
    }

    async fn spawn(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (Mosquitto saves its persistence file) and reap.
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// An MQTT subscriber that reconnects on its own and forwards publishes.
struct Sub {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: JoinHandle<()>,
}

impl Sub {
    async fn connect(port: u16, client_id: &str, clean: bool, filter: &str) -> Sub {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let sub_client = client.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            sub_client
                                .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                                .unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed in time")
            .unwrap();
        Sub { client, rx, task }
    }

    /// The next message matching `pred`, or `None` after `timeout`;
    /// every message seen on the way is passed to `seen`.
    async fn recv_until(
        &mut self,
        timeout: Duration,
        mut seen: impl FnMut(&Msg),
        mut pred: impl FnMut(&Msg) -> bool,
    ) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            seen(&msg);
            if pred(&msg) {
                return Some(msg);
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn topic(kind: TopicKind) -> String {
    protocol::topic::topic(ID, kind)
}

fn open(msg: &Msg) -> Envelope {
    protocol::open(&msg.payload, ID)
        .unwrap_or_else(|e| panic!("undecodable frame on {}: {e}", msg.topic))
        .verify(&secret())
        .unwrap_or_else(|e| panic!("frame on {} fails verification: {e}", msg.topic))
}

fn write_state(dir: &Path, mqtt_url: &str) {
    fs::create_dir_all(dir).unwrap();
    // Written by hand (not through the library) to pin the file format.
    let json = format!(
        r#"{{
  "worker_id": "{ID}",
  "secret": "{SECRET_HEX}",
  "conductor_url": "http://127.0.0.1:9",
  "mqtt_url": "{mqtt_url}",
  "mqtt_username": "",
  "mqtt_password": "",
  "seq_reserved": 1,
  "cmd_highest": 0,
  "cmd_bitmap": 0
}}"#
    );
    fs::write(dir.join("state.json"), json).unwrap();
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), edge_worker::WorkerError>>,
}

fn start_worker(cfg: WorkerConfig) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        let res = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("worker stops within 10 s")
            .unwrap();
        res.expect("clean shutdown returns Ok");
    }
}

fn config(dir: &Path, interval_ms: u64) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(dir);
    cfg.interval = Duration::from_millis(interval_ms);
    cfg.hostname = Some("itest-host".into());
    cfg.machine_id = Some("itest-machine".into());
    cfg
}

fn command(seq: u64, id: u32, action: Action, key: &Secret) -> Vec<u8> {
    let env = Envelope {
        version: protocol::FORMAT_VERSION,
        worker_id: protocol::frame::bounded(ID),
        seq,
        sent_at_ms: now_ms(),
        body: Body::Command(protocol::Command { id, action }),
    };
    protocol::seal(key, &env).unwrap()
}

fn is_reply(msg: &Msg, cmd_id: u32) -> bool {
    msg.topic == topic(TopicKind::Reply)
        && matches!(open(msg).body, Body::Reply(r) if r.cmd_id == cmd_id)
}

fn is_rejection(msg: &Msg, reason: &str) -> bool {
    msg.topic == topic(TopicKind::Events)
        && matches!(open(msg).body, Body::Event(e)
            if e.kind == EventKind::CommandRejected && e.detail.starts_with(reason))
}

#[tokio::test]
async fn streams_frames_in_order_answers_commands_once_and_shuts_down_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &broker.url());
    let mut sub = Sub::connect(broker.port, "observer", true, &format!("aerekos/v1/{ID}/+")).await;

    let worker = start_worker(config(&state_dir, 300));

    // online, a birth, then metrics; every frame authentic, seqs increasing.
    let mut last_seq = 0u64;
    let mut online = false;
    let mut birth = None;
    let mut metrics = 0;
    sub.recv_until(
        Duration::from_secs(15),
        |_| {},
        |m| {
            if m.topic == topic(TopicKind::Status) {
                online |= m.payload == b"online";
            } else {
                let env = open(m);
                assert!(
                    env.seq > last_seq,
                    "seq {} after {last_seq} on {}",
                    env.seq,
                    m.topic
                );
                last_seq = env.seq;
                match env.body {
                    Body::Birth(b) => birth = Some(b),
                    Body::Metrics(mt) => {
                        assert!(mt.memory_total > 0);
                        metrics += 1;
                    }
                    _ => {}
                }
            }
            online && birth.is_some() && metrics >= 3
        },
    )
    .await
    .expect("online, birth and 3 metrics frames");
    assert!(online, "retained online status");
    let b = birth.expect("a birth frame");
    assert_eq!(b.hostname.as_str(), "itest-host");
    assert_eq!(b.interval_ms, 300);
    assert!(metrics >= 3, "metrics frames: {metrics}");

    // Status and birth are retained: a late subscriber gets both at once.
    let mut late = Sub::connect(broker.port, "late", true, &format!("aerekos/v1/{ID}/+")).await;
    let (mut retained_online, mut retained_birth) = (false, false);
    late.recv_until(
        Duration::from_secs(5),
        |_| {},
        |m| {
            retained_online |=
                m.retain && m.topic == topic(TopicKind::Status) && m.payload == b"online";
            retained_birth |= m.retain && m.topic == topic(TopicKind::Birth);
            retained_online && retained_birth
        },
    )
    .await
    .expect("retained online status and birth");
    drop(late);

    // A sealed Ping gets exactly one Ok reply.
    let ping = command(1, 7, Action::Ping, &secret());
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, ping.clone())
        .await
        .unwrap();
    let reply = sub
        .recv_until(Duration::from_secs(5), |_| {}, |m| is_reply(m, 7))
        .await
        .expect("a reply to the ping");
    match open(&reply).body {
        Body::Reply(r) => assert_eq!(r.status, ReplyStatus::Ok),
        other => panic!("{other:?}"),
    }

    // The same command again: refused (event), no second reply.
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, ping.clone())
        .await
        .unwrap();
    let mut second_reply = false;
    let rejected = sub
        .recv_until(
            Duration::from_secs(5),
            |m| second_reply |= is_reply(m, 7),
            |m| is_rejection(m, "replayed"),
        )
        .await;
    assert!(rejected.is_some(), "replay reported as CommandRejected");
    let more = sub
        .recv_until(Duration::from_millis(1200), |_| {}, |m| is_reply(m, 7))
        .await;
    assert!(
        !second_reply && more.is_none(),
        "a replayed command is applied once"
    );

    // A command sealed with another key: refused, not applied.
    let forged = command(2, 8, Action::Ping, &Secret::from_bytes([1; 32]));
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    let mut forged_reply = false;
    let rejected = sub
        .recv_until(
            Duration::from_secs(5),
            |m| forged_reply |= is_reply(m, 8),
            |m| is_rejection(m, "bad_tag"),
        )
        .await;
    assert!(
        rejected.is_some() && !forged_reply,
        "forged command refused"
    );

    // SetInterval: Ok reply, then a birth announcing the new interval.
    let set = command(3, 9, Action::SetInterval(200), &secret());
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, set)
        .await
        .unwrap();
    sub.recv_until(Duration::from_secs(5), |_| {}, |m| is_reply(m, 9))
        .await
        .expect("reply to SetInterval");
    sub.recv_until(
        Duration::from_secs(5),
        |_| {},
        |m| {
            m.topic == topic(TopicKind::Birth)
                && matches!(open(m).body, Body::Birth(b) if b.interval_ms == 200)
        },
    )
    .await
    .expect("birth with the new interval");

    // Clean shutdown: retained offline, queue drained, nothing left on disk.
    let mut max_seq = 0;
    worker.shutdown().await;
    sub.recv_until(
        Duration::from_secs(5),
        |m| {
            if m.topic != topic(TopicKind::Status) {
                max_seq = max_seq.max(open(m).seq);
            }
        },
        |m| m.topic == topic(TopicKind::Status) && m.payload == b"offline",
    )
    .await
    .expect("offline status on clean shutdown");
    assert!(
        !state_dir.join("outbox.bin").exists(),
        "drained outbox leaves no file"
    );
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(state_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["cmd_highest"], 3, "command window persisted: {state}");
    assert!(state["seq_reserved"].as_u64().unwrap() > last_seq);

    // Restart on the same state: seqs continue upwards, the old ping is
    // still refused.
    let worker = start_worker(config(&state_dir, 300));
    let first = sub
        .recv_until(
            Duration::from_secs(10),
            |_| {},
            |m| m.topic == topic(TopicKind::Metrics) || m.topic == topic(TopicKind::Birth),
        )
        .await
        .expect("frames after restart");
    let seq = open(&first).seq;
    assert!(
        seq > last_seq.max(max_seq),
        "seq {seq} reused after restart"
    );
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, ping)
        .await
        .unwrap();
    let mut replied = false;
    sub.recv_until(
        Duration::from_secs(5),
        |m| replied |= is_reply(m, 7),
        |m| is_rejection(m, "replayed") || is_rejection(m, "too_old"),
    )
    .await
    .expect("old command refused after restart");
    assert!(!replied);
    worker.shutdown().await;
}

#[tokio::test]
async fn broker_outage_queues_frames_and_delivers_all_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &broker.url());
    // A persistent session, so frames published while it reconnects queue.
    let mut sub = Sub::connect(broker.port, "sniffer", false, &format!("aerekos/v1/{ID}/+")).await;
    let mut cfg = config(&state_dir, 200);
    cfg.flush_interval = Duration::from_millis(300);
    let worker = start_worker(cfg);

    let mut frames: Vec<Envelope> = Vec::new();
    let mut record = |m: &Msg| {
        if m.topic != topic(TopicKind::Status) {
            frames.push(open(m));
        }
    };
    let mut metrics = 0;
    sub.recv_until(Duration::from_secs(10), &mut record, |m| {
        metrics += usize::from(m.topic == topic(TopicKind::Metrics));
        metrics >= 3
    })
    .await
    .expect("metrics before the outage");

    broker.stop().await;
    let stopped_at = now_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        state_dir.join("outbox.bin").exists(),
        "queued frames persisted after the flush interval"
    );
    let restarted_at = now_ms();
    broker.spawn().await;

    sub.recv_until(Duration::from_secs(20), &mut record, |m| {
        m.topic == topic(TopicKind::Metrics) && open(m).sent_at_ms > restarted_at + 1000
    })
    .await
    .expect("frames after the outage");

    // First deliveries in seq order (QoS 1 may repeat a frame), no gaps.
    let mut unique: BTreeMap<u64, Envelope> = BTreeMap::new();
    let mut last_new = 0;
    for env in frames {
        if unique.contains_key(&env.seq) {
            continue;
        }
        assert!(
            env.seq > last_new,
            "seq {} first seen after {last_new}",
            env.seq
        );
        last_new = env.seq;
        unique.insert(env.seq, env);
    }
    let seqs: Vec<u64> = unique.keys().copied().collect();
    let (first, last) = (seqs[0], *seqs.last().unwrap());
    assert_eq!(
        seqs.len() as u64,
        last - first + 1,
        "contiguous seqs {first}..={last}: {seqs:?}"
    );
    // The samples taken while the broker was down were queued, not lost.
    let during: Vec<&Envelope> = unique
        .values()
        .filter(|e| matches!(e.body, Body::Metrics(_)))
        .filter(|e| e.sent_at_ms > stopped_at && e.sent_at_ms < restarted_at)
        .collect();
    assert!(
        during.len() >= 5,
        "metrics from the 1.5 s outage: {}",
        during.len()
    );
    assert!(
        unique
            .values()
            .all(|e| !matches!(&e.body, Body::Metrics(m) if m.dropped > 0)),
        "nothing dropped"
    );

    // Drained → the outbox file goes away. No conductor here, so no
    // `Stored`: frames leave at the PubAck once none came for the agent's
    // 10 s STORED_TIMEOUT after the first PubAck.
    let deadline = Instant::now() + Duration::from_secs(15);
    while state_dir.join("outbox.bin").exists() {
        assert!(Instant::now() < deadline, "outbox.bin removed once drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bytes flow both ways.
    Forward,
    /// Connections stay open but every byte is swallowed (frames "sent"
    /// into the void: never acknowledged).
    Blackhole,
    /// Open connections are cut and new ones are closed at once.
    Down,
}

/// A TCP proxy in front of the broker that the test can break.
struct Proxy {
    port: u16,
    mode: tokio::sync::watch::Sender<Mode>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target_port: u16) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, rx) = tokio::sync::watch::channel(Mode::Forward);
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns2 = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *rx.borrow() == Mode::Down {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let rx = rx.clone();
                let conn = tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let rx2 = rx.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if *rx.borrow() == Mode::Forward
                                && uw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = ur.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if *rx2.borrow() == Mode::Forward
                                && cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
                conns2.lock().unwrap().push(conn);
            }
        });
        Proxy {
            port,
            mode,
            conns,
            task,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        if mode == Mode::Down {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Mode::Down);
    }
}

/// Wire format (protocol/README.md, Format 2): format 1 until a `Stored`
/// arrives, format 2 (no worker id on the wire) while they come, format 1
/// again once none came for `STORED_TIMEOUT` after a PubAck (an older
/// conductor took over).
#[tokio::test]
async fn frames_switch_to_format_2_after_a_stored_and_back_when_stored_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &broker.url());
    let mut sub = Sub::connect(broker.port, "format", true, &format!("aerekos/v1/{ID}/+")).await;
    let worker = start_worker(config(&state_dir, 150));
    let metrics_in = |m: &Msg, format: u8| {
        m.topic == topic(TopicKind::Metrics) && m.payload.first() == Some(&format)
    };

    let v1 = sub
        .recv_until(
            Duration::from_secs(10),
            |_| {},
            |m| {
                assert_ne!(m.payload.first(), Some(&protocol::FORMAT_V2), "{}", m.topic);
                metrics_in(m, protocol::FORMAT_VERSION)
            },
        )
        .await
        .expect("format-1 metrics before any Stored");
    let stored = command(1, 0, Action::Stored(open(&v1).seq), &secret());
    sub.client
        .publish(topic(TopicKind::Stored), QoS::AtMostOnce, false, stored)
        .await
        .unwrap();
    let v2 = sub
        .recv_until(
            Duration::from_secs(5),
            |_| {},
            |m| metrics_in(m, protocol::FORMAT_V2),
        )
        .await
        .expect("format-2 metrics after the Stored");
    // It verifies against the topic's id; its bytes hold no id.
    let env = open(&v2);
    assert_eq!(env.version, protocol::FORMAT_V2);
    assert!(!v2.payload.windows(ID.len()).any(|w| w == ID.as_bytes()));

    // No more Stored: back to format 1 after the 10 s fallback.
    let t0 = Instant::now();
    sub.recv_until(
        Duration::from_secs(20),
        |_| {},
        |m| metrics_in(m, protocol::FORMAT_VERSION),
    )
    .await
    .expect("format 1 again once Stored stopped");
    assert!(
        t0.elapsed() >= edge_worker::session::STORED_TIMEOUT - Duration::from_secs(1),
        "not before the fallback: {:?}",
        t0.elapsed()
    );
    worker.shutdown().await;
}

/// Frames the broker never acknowledged (swallowed by a dead link) are
/// published again, from the front, after the reconnect.
#[tokio::test]
async fn unacknowledged_frames_are_republished_after_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let proxy = Proxy::start(broker.port).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &proxy.url());
    let mut sub = Sub::connect(broker.port, "direct", true, &format!("aerekos/v1/{ID}/+")).await;
    let worker = start_worker(config(&state_dir, 150));

    let mut frames: Vec<Envelope> = Vec::new();
    let mut record = |m: &Msg| {
        if m.topic != topic(TopicKind::Status) {
            frames.push(open(m));
        }
    };
    let mut metrics = 0;
    sub.recv_until(Duration::from_secs(10), &mut record, |m| {
        metrics += usize::from(m.topic == topic(TopicKind::Metrics));
        metrics >= 2
    })
    .await
    .expect("metrics before the failure");

    // ~6 frames go into the void, then the link drops for a while.
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(900)).await;
    proxy.set(Mode::Down);
    let cut_at = now_ms();
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.set(Mode::Forward);

    sub.recv_until(Duration::from_secs(15), &mut record, |m| {
        m.topic == topic(TopicKind::Metrics) && open(m).sent_at_ms > cut_at + 1500
    })
    .await
    .expect("frames after the reconnect");

    let mut seqs: Vec<u64> = frames.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let (first, last) = (seqs[0], *seqs.last().unwrap());
    assert_eq!(
        seqs.len() as u64,
        last - first + 1,
        "contiguous seqs {first}..={last}: {seqs:?}"
    );
    worker.shutdown().await;
}

/// A small queue overflows during an outage: the oldest frames go, the
/// count arrives in the next metrics frame and one QueueOverflow event.
#[tokio::test]
async fn overflow_drops_oldest_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let proxy = Proxy::start(broker.port).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &proxy.url());
    let mut sub = Sub::connect(broker.port, "direct", true, &format!("aerekos/v1/{ID}/+")).await;
    let mut cfg = config(&state_dir, 100);
    cfg.queue_capacity = 5;
    let worker = start_worker(cfg);
    sub.recv_until(
        Duration::from_secs(10),
        |_| {},
        |m| m.topic == topic(TopicKind::Metrics),
    )
    .await
    .expect("metrics before the outage");

    proxy.set(Mode::Down);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set(Mode::Forward);

    let mut dropped = 0u32;
    let mut overflow_events = 0;
    let mut observe = |m: &Msg| {
        if m.topic != topic(TopicKind::Status) {
            match open(m).body {
                Body::Metrics(mt) => dropped += mt.dropped,
                Body::Event(e) if e.kind == EventKind::QueueOverflow => overflow_events += 1,
                _ => {}
            }
        }
        (dropped, overflow_events)
    };
    sub.recv_until(
        Duration::from_secs(15),
        |_| {},
        |m| {
            let (d, e) = observe(m);
            d > 0 && e > 0
        },
    )
    .await
    .expect("drops reported");
    // Anything more for a moment: still one event for the one outage.
    sub.recv_until(
        Duration::from_millis(700),
        |_| {},
        |m| {
            observe(m);
            false
        },
    )
    .await;
    assert_eq!(overflow_events, 1, "one QueueOverflow event per outage");
    assert!(
        dropped >= 5,
        "~15 samples into a queue of 5: dropped {dropped}"
    );
    worker.shutdown().await;
}

/// Live processes whose command line contains `needle` (zombies excluded).
fn procs_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let found = cmdline
            .split(|b| *b == 0)
            .any(|a| String::from_utf8_lossy(a).contains(needle));
        if found && edge_worker::supervisor::proc_start_time(pid).is_some() {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every process with the marker on drop, even after a failure.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in procs_with(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn service_status(msg: &Msg) -> Option<protocol::ServiceStatus> {
    if msg.topic != topic(TopicKind::Services) {
        return None;
    }
    match open(msg).body {
        Body::ServiceStatus(s) => Some(s),
        other => panic!("{other:?} on the services topic"),
    }
}

#[tokio::test]
async fn deploys_and_removes_a_process_service_over_mqtt() {
    use protocol::frame::bounded;
    use protocol::{RestartPolicy, ServiceSpec, ServiceState};

    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&tmp.path().join("broker")).await;
    let state_dir = tmp.path().join("state");
    write_state(&state_dir, &broker.url());
    let marker = format!("97.{}{}", std::process::id(), now_ms() % 100_000);
    let _reaper = Reaper(marker.clone());
    let mut sub = Sub::connect(
        broker.port,
        "svc-observer",
        true,
        &format!("aerekos/v1/{ID}/+"),
    )
    .await;
    let worker = start_worker(config(&state_dir, 1000));
    // Commands are not retained: publish once the worker has subscribed.
    sub.recv_until(
        Duration::from_secs(10),
        |_| {},
        |m| m.topic == topic(TopicKind::Birth),
    )
    .await
    .expect("a birth");

    let mut args = heapless::Vec::new();
    args.push(bounded(&marker)).unwrap();
    let spec = ServiceSpec {
        name: bounded("sleeper"),
        version: 1,
        command: bounded("sleep"),
        args,
        env: heapless::Vec::new(),
        working_dir: bounded(""),
        restart: RestartPolicy::Always,
        max_restarts: 3,
        restart_window_s: 60,
        backoff_ms: 100,
    };
    let deploy = command(1, 21, Action::Deploy(spec), &secret());
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, deploy)
        .await
        .unwrap();
    let mut running_pid = None;
    let mut reply_ok = false;
    sub.recv_until(
        Duration::from_secs(10),
        |_| {},
        |m| {
            if is_reply(m, 21) {
                match open(m).body {
                    Body::Reply(r) => {
                        assert_eq!(r.status, ReplyStatus::Ok, "{}", r.detail);
                        reply_ok = true;
                    }
                    other => panic!("{other:?}"),
                }
            }
            if let Some(s) = service_status(m) {
                if s.name == "sleeper" && s.state == ServiceState::Running {
                    running_pid = Some(s.pid);
                }
            }
            reply_ok && running_pid.is_some()
        },
    )
    .await
    .expect("an Ok reply and a Running status");
    let pid = running_pid.unwrap();
    assert_eq!(procs_with(&marker), vec![pid]);

    // The worker stops cleanly: the service keeps running, and the next
    // worker adopts it and reports it after connecting.
    worker.shutdown().await;
    assert_eq!(
        procs_with(&marker),
        vec![pid],
        "the service outlives the worker"
    );
    let worker = start_worker(config(&state_dir, 1000));
    // The birth marks the command subscription; the status may come on
    // either side of it.
    let (mut adopted, mut birth) = (false, false);
    sub.recv_until(
        Duration::from_secs(10),
        |_| {},
        |m| {
            birth |= m.topic == topic(TopicKind::Birth);
            adopted |=
                service_status(m).is_some_and(|s| s.state == ServiceState::Running && s.pid == pid);
            adopted && birth
        },
    )
    .await
    .expect("the same pid reported Running after a restart, and a birth");
    assert_eq!(procs_with(&marker), vec![pid], "exactly one copy");

    let remove = command(2, 22, Action::Remove(bounded("sleeper")), &secret());
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, remove)
        .await
        .unwrap();
    let mut removed = false;
    sub.recv_until(
        Duration::from_secs(10),
        |_| {},
        |m| {
            if let Some(s) = service_status(m) {
                removed |= s.name == "sleeper" && s.state == ServiceState::Removed;
            }
            removed
        },
    )
    .await
    .expect("a Removed status");
    assert!(procs_with(&marker).is_empty(), "{:?}", procs_with(&marker));

    // Start on the removed service: an Error reply.
    let start = command(3, 23, Action::Start(bounded("sleeper")), &secret());
    sub.client
        .publish(topic(TopicKind::Cmd), QoS::AtLeastOnce, false, start)
        .await
        .unwrap();
    let reply = sub
        .recv_until(Duration::from_secs(5), |_| {}, |m| is_reply(m, 23))
        .await
        .expect("a reply to the start");
    match open(&reply).body {
        Body::Reply(r) => assert_eq!(r.status, ReplyStatus::Error),
        other => panic!("{other:?}"),
    }
    worker.shutdown().await;
}
