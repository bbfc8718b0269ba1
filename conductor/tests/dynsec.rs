//! The dynamic-security plugin on a real Mosquitto (no mocks): each test
//! starts its own broker in a temp dir from `dynsec::mosquitto_config`, with
//! a file made by `mosquitto_ctrl dynsec init`, and checks with real MQTT
//! clients what workers and the observer may do once `conductor::dynsec`
//! has written the rules.
//!
//! Skipped (with a message) when mosquitto, mosquitto_ctrl or the plugin
//! is missing, unless `AEREKOS_REQUIRE_MOSQUITTO=1`.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conductor::dynsec::{self, DynSec, DynSecError};
use conductor::mqtt::MqttSettings;
use protocol::topic::{topic, TopicKind};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

const ADMIN: &str = "conductor";
const ADMIN_PW: &str = "admin-test-password";
const OBSERVER_PW: &str = "observer-test-password";
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(700);
/// How long something that must happen may take.
const SOON: Duration = Duration::from_secs(5);

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A Mosquitto with the plugin, killed on drop.
struct Broker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// `None` (test skipped) when Mosquitto or the plugin is not installed.
    fn start() -> Option<Broker> {
        let required = std::env::var("AEREKOS_REQUIRE_MOSQUITTO").is_ok_and(|v| v == "1");
        let missing = |what: &str| -> Option<Broker> {
            assert!(
                !required,
                "{what} not found and AEREKOS_REQUIRE_MOSQUITTO=1 (apt-get install mosquitto)"
            );
            eprintln!("SKIPPED: {what} not found (apt-get install mosquitto)");
            None
        };
        let Some(bin) = find(&["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]) else {
            return missing("mosquitto");
        };
        let Some(ctrl) = find(&["/usr/bin/mosquitto_ctrl", "/usr/local/bin/mosquitto_ctrl"]) else {
            return missing("mosquitto_ctrl");
        };
        let Some(plugin) = dynsec::find_plugin() else {
            return missing("the dynamic-security plugin (mosquitto_dynamic_security.so)");
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("dynamic-security.json");
        let out = Command::new(ctrl)
            .args(["dynsec", "init"])
            .arg(&file)
            .args([ADMIN, ADMIN_PW])
            .output()
            .expect("run mosquitto_ctrl");
        assert!(out.status.success(), "mosquitto_ctrl dynsec init: {out:?}");
        let port = test_support::free_port();
        let mut conf =
            dynsec::mosquitto_config(&format!("{port} 127.0.0.1"), &plugin, &file, ADMIN);
        // Started as root, Mosquitto would switch to the `mosquitto` user,
        // which cannot write the temp dir.
        conf.push_str("user root\nlog_dest stdout\nlog_type all\n");
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write config");
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let broker = Broker { child, port, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "mosquitto did not listen:\n{}",
                broker.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(broker)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn settings(&self, username: &str, password: &str) -> MqttSettings {
        MqttSettings {
            client_id: conductor::mqtt::CLIENT_ID.into(),
            host: "127.0.0.1".into(),
            port: self.port,
            more: Vec::new(),
            username: Some(username.into()),
            password: Some(password.into()),
            tls: None,
        }
    }

    async fn dynsec(&self) -> DynSec {
        DynSec::connect(&self.settings(ADMIN, ADMIN_PW))
            .await
            .expect("connect as the dynsec admin")
    }

    /// `mosquitto_ctrl dynsec <args>` logged in as `user`, as another admin
    /// tool would; panics unless it succeeds.
    fn ctrl(&self, (user, pw): (&str, &str), args: &[&str]) {
        let out = Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-u", user, "-P", pw, "dynsec"])
            .args(args)
            .output()
            .expect("run mosquitto_ctrl");
        assert!(out.status.success(), "mosquitto_ctrl {args:?}: {out:?}");
    }

    async fn connect(&self, id: &str, user: &str, pw: &str) -> Result<Client, ConnectionError> {
        Client::connect(self.port, id, user, pw, None).await
    }
}

#[derive(Debug)]
enum Ev {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    Closed(String),
}

/// A real MQTT 3.1.1 client whose events arrive on a channel.
struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Ev>,
    /// Events looked at and not consumed yet.
    seen: VecDeque<Ev>,
    closed: bool,
    /// Drives the event loop; aborting it drops the TCP connection without
    /// a DISCONNECT (the broker then publishes the will).
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(
        port: u16,
        id: &str,
        user: &str,
        pw: &str,
        will: Option<(&str, &[u8])>,
    ) -> Result<Client, ConnectionError> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(user, pw);
        opts.set_keep_alive(Duration::from_secs(5));
        if let Some((t, payload)) = will {
            opts.set_last_will(rumqttc::LastWill::new(
                t,
                payload.to_vec(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        loop {
            match tokio::time::timeout(SOON, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ConnectionError::NetworkTimeout),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    },
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Ok(Client {
            client,
            rx,
            seen: VecDeque::new(),
            closed: false,
            task,
        })
    }

    /// The first event (buffered or new, within `within`) `f` accepts;
    /// the others stay buffered.
    async fn wait_for<T>(
        &mut self,
        within: Duration,
        mut f: impl FnMut(&Ev) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.seen.iter().position(|e| f(e).is_some()) {
            let ev = self.seen.remove(i)?;
            return f(&ev);
        }
        let until = tokio::time::Instant::now() + within;
        loop {
            let ev = match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => return None,
            };
            if matches!(ev, Ev::Closed(_)) {
                self.closed = true;
            }
            if let Some(t) = f(&ev) {
                return Some(t);
            }
            self.seen.push_back(ev);
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let codes = self
            .wait_for(SOON, |e| match e {
                Ev::SubAck(c) => Some(c.clone()),
                _ => None,
            })
            .await
            .unwrap_or_else(|| panic!("no SUBACK for {filter}"));
        assert_eq!(codes.len(), 1);
        codes[0]
    }

    /// QoS 1; `Ok` on the PUBACK, `Err` if the connection closed instead.
    async fn publish(&mut self, t: &str, payload: &[u8], retain: bool) -> Result<(), String> {
        self.client
            .publish(t, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("queue publish");
        self.wait_for(SOON, |e| match e {
            Ev::PubAck => Some(Ok(())),
            Ev::Closed(why) => Some(Err(why.clone())),
            _ => None,
        })
        .await
        .unwrap_or_else(|| Err("no PUBACK".into()))
    }

    /// The next message on `t` within `within`: (payload, retain).
    async fn message(&mut self, t: &str, within: Duration) -> Option<(Vec<u8>, bool)> {
        self.wait_for(within, |e| match e {
            Ev::Publish {
                topic,
                payload,
                retain,
            } if topic == t => Some((payload.clone(), *retain)),
            _ => None,
        })
        .await
    }

    /// Whether any message carrying `payload` arrived within `within`.
    async fn got_payload(&mut self, payload: &[u8], within: Duration) -> bool {
        self.wait_for(within, |e| match e {
            Ev::Publish { payload: p, .. } if p == payload => Some(()),
            _ => None,
        })
        .await
        .is_some()
    }

    /// Whether the connection ended within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        self.closed
            || self
                .wait_for(within, |e| matches!(e, Ev::Closed(_)).then_some(()))
                .await
                .is_some()
    }
}

fn refused(r: Result<Client, ConnectionError>) -> ConnectReturnCode {
    match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a refused login, got {e}"),
        Ok(_) => panic!("expected a refused login, the broker accepted it"),
    }
}

#[tokio::test]
async fn a_worker_publishes_and_reads_only_its_own_topics() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    ds.ensure_roles(None).await.expect("ensure_roles");
    ds.add_worker("w-1", "pw-1").await.expect("add w-1");
    ds.add_worker("w-2", "pw-2").await.expect("add w-2");

    // The conductor's login (given aerekos-conductor by ensure_roles).
    let mut cond = b
        .connect("conductor", ADMIN, ADMIN_PW)
        .await
        .expect("conductor");
    assert_eq!(
        cond.subscribe("aerekos/v1/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    let mut w1 = b.connect("w-1", "w-1", "pw-1").await.expect("w-1 logs in");
    for kind in [TopicKind::Cmd, TopicKind::Stored] {
        assert!(
            matches!(
                w1.subscribe(&topic("w-1", kind)).await,
                SubscribeReasonCode::Success(_)
            ),
            "{kind:?}"
        );
    }
    // Other filters: SUBACK 0x80, and the connection stays.
    for f in [
        topic("w-2", TopicKind::Cmd),
        topic("w-2", TopicKind::Stored),
        topic("w-1", TopicKind::Metrics),
        topic("w-1", TopicKind::JsonMetrics),
        "aerekos/v1/+/cmd".into(),
        "aerekos/v1/#".into(),
        "#".into(),
        "$SYS/#".into(),
        "$CONTROL/dynamic-security/#".into(),
    ] {
        assert_eq!(w1.subscribe(&f).await, SubscribeReasonCode::Failure, "{f}");
    }

    // Its own worker-side topics reach the conductor.
    w1.publish(&topic("w-1", TopicKind::Metrics), b"m1", false)
        .await
        .expect("own metrics");
    assert_eq!(
        cond.message(&topic("w-1", TopicKind::Metrics), SOON).await,
        Some((b"m1".to_vec(), false))
    );

    // Everything else: Mosquitto still sends the PUBACK (MQTT 3.1.1 has no
    // refusal code), keeps the connection and routes nothing.
    let forged: Vec<String> = vec![
        topic("w-2", TopicKind::Metrics),
        topic("w-2", TopicKind::Status),
        topic("w-1", TopicKind::JsonMetrics),
        topic("w-1", TopicKind::JsonBirth),
        topic("w-1", TopicKind::Cmd),
        topic("w-1", TopicKind::Stored),
        topic("w-2", TopicKind::Cmd),
        "aerekos/v1/w-1/metrics/extra".into(),
        "other/topic".into(),
    ];
    for t in &forged {
        w1.publish(t, b"forged", false)
            .await
            .unwrap_or_else(|e| panic!("refused publish to {t} closed the connection: {e}"));
    }
    // A command to the plugin from a worker is dropped too.
    w1.publish(
        dynsec::CONTROL_TOPIC,
        br#"{"commands":[{"command":"deleteClient","username":"w-2"}]}"#,
        false,
    )
    .await
    .expect("refused $CONTROL publish keeps the connection");
    // Mosquitto handles one connection's packets in order: the marker's
    // arrival means every forged publish before it was dropped.
    w1.publish(&topic("w-1", TopicKind::Events), b"marker", false)
        .await
        .expect("own events");
    assert!(cond
        .message(&topic("w-1", TopicKind::Events), SOON)
        .await
        .is_some());
    assert!(!cond.got_payload(b"forged", Duration::ZERO).await);
    assert!(!w1.got_payload(b"forged", Duration::ZERO).await);

    // Commands: its own reach it, another worker's do not.
    cond.publish(&topic("w-2", TopicKind::Cmd), b"for-w2", false)
        .await
        .expect("cmd w-2");
    cond.publish(&topic("w-1", TopicKind::Cmd), b"for-w1", false)
        .await
        .expect("cmd w-1");
    cond.publish(&topic("w-1", TopicKind::Stored), b"stored-w1", false)
        .await
        .expect("stored w-1");
    assert_eq!(
        w1.message(&topic("w-1", TopicKind::Cmd), SOON).await,
        Some((b"for-w1".to_vec(), false))
    );
    assert!(w1
        .message(&topic("w-1", TopicKind::Stored), SOON)
        .await
        .is_some());
    assert!(!w1.got_payload(b"for-w2", QUIET).await);
    assert!(
        !w1.closed_within(Duration::ZERO).await,
        "refusals never closed it"
    );

    // The login is the triple username = client id = worker id + password.
    let code = refused(b.connect("not-w-1", "w-1", "pw-1").await);
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    refused(b.connect("w-1", "w-1", "wrong").await);
    refused(b.connect("w-2", "w-1", "pw-1").await);
    refused(b.connect("anon", "", "").await);
    // The forged deleteClient did nothing: w-2 still logs in.
    b.connect("w-2", "w-2", "pw-2").await.expect("w-2 logs in");
    // Refused logins with its client id did not take over w-1's session.
    assert!(!w1.closed_within(QUIET).await);
}

#[tokio::test]
async fn a_worker_last_will_is_published_only_on_its_own_status() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    ds.ensure_roles(None).await.expect("ensure_roles");
    ds.add_worker("w-1", "pw-1").await.expect("add w-1");
    ds.add_worker("w-2", "pw-2").await.expect("add w-2");
    let mut cond = b
        .connect("conductor", ADMIN, ADMIN_PW)
        .await
        .expect("conductor");
    assert!(matches!(
        cond.subscribe("aerekos/v1/#").await,
        SubscribeReasonCode::Success(_)
    ));

    // Mosquitto checks a will's topic when it sends the will, not at
    // CONNECT: both log in, only the worker's own will is delivered.
    let own = topic("w-1", TopicKind::Status);
    let w1 = Client::connect(b.port, "w-1", "w-1", "pw-1", Some((&own, b"offline")))
        .await
        .expect("own will accepted");
    // w-2's will names w-1's status.
    let w2 = Client::connect(b.port, "w-2", "w-2", "pw-2", Some((&own, b"forged-will")))
        .await
        .expect("the will is not checked at CONNECT");
    w2.task.abort();
    assert!(!cond.got_payload(b"forged-will", QUIET).await);
    w1.task.abort();
    // Live subscribers get it with the retain flag cleared; it is retained.
    assert_eq!(
        cond.message(&own, SOON).await,
        Some((b"offline".to_vec(), false))
    );
    let mut fresh = b.connect("fresh", ADMIN, ADMIN_PW).await.expect("fresh");
    assert!(matches!(
        fresh.subscribe(&own).await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        fresh.message(&own, SOON).await,
        Some((b"offline".to_vec(), true))
    );
}

#[tokio::test]
async fn the_observer_reads_the_tree_and_cannot_replace_a_retained_status() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    let changes = ds
        .ensure_roles(Some(OBSERVER_PW))
        .await
        .expect("ensure_roles");
    assert!(
        changes.contains(&"createClient observer".to_string()),
        "{changes:?}"
    );
    ds.add_worker("w-1", "pw-1").await.expect("add w-1");
    let status = topic("w-1", TopicKind::Status);

    let mut w1 = b.connect("w-1", "w-1", "pw-1").await.expect("w-1");
    w1.publish(&status, b"online", true)
        .await
        .expect("retained status");
    assert!(matches!(
        w1.subscribe(&topic("w-1", TopicKind::Cmd)).await,
        SubscribeReasonCode::Success(_)
    ));

    // MQTT Explorer's defaults: `#` is granted, `$SYS/#` is not.
    let mut obs = b
        .connect("mqtt-explorer-1234", "observer", OBSERVER_PW)
        .await
        .expect("observer logs in");
    assert!(matches!(
        obs.subscribe("#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(obs.subscribe("$SYS/#").await, SubscribeReasonCode::Failure);
    assert_eq!(
        obs.message(&status, SOON).await,
        Some((b"online".to_vec(), true))
    );
    w1.publish(&topic("w-1", TopicKind::Metrics), b"m1", false)
        .await
        .expect("metrics");
    assert_eq!(
        obs.message(&topic("w-1", TopicKind::Metrics), SOON).await,
        Some((b"m1".to_vec(), false))
    );

    // Its publishes are acknowledged and dropped; it stays connected.
    obs.publish(&status, b"offline", true)
        .await
        .expect("PUBACK, no disconnect");
    obs.publish(&topic("w-1", TopicKind::Cmd), b"obs-cmd", false)
        .await
        .expect("PUBACK, no disconnect");
    obs.publish(&topic("w-1", TopicKind::JsonMetrics), b"obs-json", true)
        .await
        .expect("PUBACK, no disconnect");
    assert!(!obs.closed_within(Duration::ZERO).await);
    assert!(!w1.got_payload(b"obs-cmd", QUIET).await);

    // A fresh subscriber still gets the worker's retained status.
    let mut fresh = b
        .connect("fresh", "observer", OBSERVER_PW)
        .await
        .expect("fresh");
    assert!(matches!(
        fresh.subscribe(&status).await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        fresh.message(&status, SOON).await,
        Some((b"online".to_vec(), true))
    );
    assert!(!fresh.got_payload(b"offline", QUIET).await);
    assert!(matches!(
        fresh.subscribe(&topic("w-1", TopicKind::JsonMetrics)).await,
        SubscribeReasonCode::Success(_)
    ));
    assert!(!fresh.got_payload(b"obs-json", QUIET).await);

    // The same password again changes nothing and keeps it connected
    // (checked by logging in, not by setting it).
    assert_eq!(
        ds.ensure_roles(Some(OBSERVER_PW)).await.expect("again"),
        Vec::<String>::new()
    );
    assert!(
        !obs.closed_within(QUIET).await,
        "an unchanged observer must not be disconnected"
    );
    // A new one replaces it, and Mosquitto closes the sessions of the old.
    assert_eq!(
        ds.ensure_roles(Some("new-observer-pw"))
            .await
            .expect("new password"),
        vec!["modifyClient observer".to_string()]
    );
    assert!(obs.closed_within(SOON).await);
    refused(
        b.connect("mqtt-explorer-1234", "observer", OBSERVER_PW)
            .await,
    );
    b.connect("mqtt-explorer-1234", "observer", "new-observer-pw")
        .await
        .expect("new observer password");
}

#[tokio::test]
async fn remove_worker_refuses_its_login_and_closes_its_session() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    ds.ensure_roles(None).await.expect("ensure_roles");
    for (id, pw) in [("w-1", "pw-1"), ("w-2", "pw-2")] {
        ds.add_worker(id, pw).await.expect("add");
    }
    let mut ids = ds.worker_ids().await.expect("worker_ids");
    ids.sort();
    assert_eq!(ids, ["w-1", "w-2"]);

    let mut w1 = b.connect("w-1", "w-1", "pw-1").await.expect("w-1");
    assert!(matches!(
        w1.subscribe(&topic("w-1", TopicKind::Cmd)).await,
        SubscribeReasonCode::Success(_)
    ));
    let started = Instant::now();
    assert_eq!(
        ds.remove_worker("w-1").await.expect("remove"),
        ["deleteClient w-1", "deleteRole aerekos-worker-w-1"]
    );
    // deleteClient closes the live session (no extra kick needed).
    assert!(
        w1.closed_within(SOON).await,
        "the revoked worker stayed connected"
    );
    eprintln!("revoked session closed after {:?}", started.elapsed());
    refused(b.connect("w-1", "w-1", "pw-1").await);
    assert_eq!(
        ds.remove_worker("w-1").await.expect("again"),
        Vec::<String>::new()
    );
    assert_eq!(ds.worker_ids().await.expect("worker_ids"), ["w-2"]);

    // Bad ids are refused before anything is sent.
    for bad in ["observer", ADMIN, "W-1", "", "a/b", "#"] {
        assert!(matches!(
            ds.add_worker(bad, "pw").await,
            Err(DynSecError::InvalidWorker(_))
        ));
    }

    // Through the served handle, from a plain thread as the HTTP threads will.
    let mut w2 = b.connect("w-2", "w-2", "pw-2").await.expect("w-2");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (handle, task) = ds.serve(stop_rx);
    let task = tokio::spawn(task);
    let h = handle.clone();
    let from_thread = tokio::task::spawn_blocking(move || {
        let added = h.add_worker_blocking("w-3", "pw-3").expect("add w-3");
        let removed = h.remove_worker_blocking("w-2").expect("remove w-2");
        (added, removed)
    });
    let (added, removed) = from_thread.await.expect("thread");
    assert_eq!(added, ["createRole aerekos-worker-w-3", "createClient w-3"]);
    assert_eq!(
        removed,
        ["deleteClient w-2", "deleteRole aerekos-worker-w-2"]
    );
    assert!(w2.closed_within(SOON).await);
    b.connect("w-3", "w-3", "pw-3").await.expect("w-3 logs in");
    let _ = stop_tx.send(true);
    tokio::time::timeout(SOON, task)
        .await
        .expect("task stops")
        .expect("task");
    assert!(matches!(
        handle.add_worker("w-4", "pw-4").await,
        Err(DynSecError::Stopped)
    ));
}

#[tokio::test]
async fn ensure_roles_and_add_worker_twice_are_idempotent() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    let mut first = ds.ensure_roles(Some(OBSERVER_PW)).await.expect("first");
    first.sort();
    assert_eq!(
        first,
        [
            "addClientRole conductor aerekos-conductor",
            "createClient observer",
            "createRole aerekos-conductor",
            "createRole aerekos-observer",
        ]
    );
    assert_eq!(
        ds.ensure_roles(Some(OBSERVER_PW)).await.expect("second"),
        Vec::<String>::new()
    );
    assert_eq!(
        ds.ensure_roles(None).await.expect("third"),
        Vec::<String>::new()
    );

    assert_eq!(
        ds.add_worker("w-1", "pw-1").await.expect("add"),
        ["createRole aerekos-worker-w-1", "createClient w-1"]
    );
    let mut w1 = b.connect("w-1", "w-1", "pw-1").await.expect("w-1");
    // Again: only the password is set again (Mosquitto cannot compare it),
    // and Mosquitto closes the live session on any change to the client.
    assert_eq!(
        ds.add_worker("w-1", "pw-1").await.expect("again"),
        ["modifyClient w-1"]
    );
    assert!(w1.closed_within(SOON).await);
    let mut w1 = b
        .connect("w-1", "w-1", "pw-1")
        .await
        .expect("same password");
    assert!(matches!(
        w1.subscribe(&topic("w-1", TopicKind::Cmd)).await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        w1.subscribe(&topic("w-2", TopicKind::Cmd)).await,
        SubscribeReasonCode::Failure
    );
    // A new password (re-enrolment) replaces the old one.
    assert_eq!(
        ds.add_worker("w-1", "pw-new").await.expect("new pw"),
        ["modifyClient w-1"]
    );
    refused(b.connect("w-1", "w-1", "pw-1").await);
    b.connect("w-1", "w-1", "pw-new")
        .await
        .expect("new password");

    // Another admin (its own login: changing a client disconnects every
    // session of it, which would cut mosquitto_ctrl off before its answer)
    // widens the worker's role, gives it the admin role and takes the
    // conductor's role away: the next calls put them back.
    let other = ("other-admin", "other-admin-pw");
    b.ctrl((ADMIN, ADMIN_PW), &["createClient", other.0, "-p", other.1]);
    b.ctrl((ADMIN, ADMIN_PW), &["addClientRole", other.0, "admin"]);
    let widen = [
        "addRoleACL",
        "aerekos-worker-w-1",
        "publishClientSend",
        "aerekos/v1/w-2/metrics",
        "allow",
        "20",
    ];
    b.ctrl(other, &widen);
    b.ctrl(other, &["addClientRole", "w-1", "admin"]);
    b.ctrl(other, &["removeClientRole", ADMIN, "aerekos-conductor"]);
    let mut again = ds.add_worker("w-1", "pw-new").await.expect("repair worker");
    again.sort();
    assert_eq!(again, ["modifyClient w-1", "modifyRole aerekos-worker-w-1"]);
    assert_eq!(
        ds.ensure_roles(None).await.expect("repair conductor"),
        ["addClientRole conductor aerekos-conductor"]
    );
    let mut cond = b
        .connect("conductor", ADMIN, ADMIN_PW)
        .await
        .expect("conductor");
    assert!(matches!(
        cond.subscribe("aerekos/v1/#").await,
        SubscribeReasonCode::Success(_)
    ));
    let mut w1 = b.connect("w-1", "w-1", "pw-new").await.expect("w-1");
    assert_eq!(
        w1.subscribe("$CONTROL/dynamic-security/#").await,
        SubscribeReasonCode::Failure
    );
    w1.publish(&topic("w-2", TopicKind::Metrics), b"widened", false)
        .await
        .expect("PUBACK");
    w1.publish(&topic("w-1", TopicKind::Metrics), b"own", false)
        .await
        .expect("PUBACK");
    assert!(cond
        .message(&topic("w-1", TopicKind::Metrics), SOON)
        .await
        .is_some());
    assert!(!cond.got_payload(b"widened", Duration::ZERO).await);
}

#[tokio::test]
async fn connect_reports_a_wrong_or_non_admin_login() {
    let Some(b) = Broker::start() else { return };
    let err = DynSec::connect(&b.settings(ADMIN, "wrong"))
        .await
        .expect_err("wrong password");
    assert!(matches!(err, DynSecError::Refused { .. }), "{err}");
    let mut ds = b.dynsec().await;
    ds.ensure_roles(Some(OBSERVER_PW))
        .await
        .expect("ensure_roles");
    let err = DynSec::connect(&b.settings("observer", OBSERVER_PW))
        .await
        .expect_err("observer is no admin");
    assert!(matches!(err, DynSecError::NotAdmin { .. }), "{err}");
    let mut no_login = b.settings(ADMIN, ADMIN_PW);
    no_login.username = None;
    assert!(matches!(
        DynSec::connect(&no_login).await,
        Err(DynSecError::NoLogin)
    ));
    eprintln!("errors read: {err}");
}

/// With Home Assistant discovery on, the conductor publishes under its
/// prefix and the observer (Home Assistant's login) reads it there; a
/// tree outside both stays closed to the observer.
#[tokio::test]
async fn extra_trees_let_the_conductor_publish_and_the_observer_read_discovery() {
    let Some(b) = Broker::start() else { return };
    let mut ds = b.dynsec().await;
    ds.set_extra_trees(vec!["homeassistant/#".into()]);
    ds.ensure_roles(Some(OBSERVER_PW))
        .await
        .expect("ensure_roles");
    let mut conductor = b
        .connect("conductor", ADMIN, ADMIN_PW)
        .await
        .expect("conductor");
    let mut obs = b
        .connect("home-assistant", "observer", OBSERVER_PW)
        .await
        .expect("observer logs in");
    assert!(matches!(
        obs.subscribe("homeassistant/#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert!(matches!(
        obs.subscribe("#").await,
        SubscribeReasonCode::Success(_)
    ));
    let config = "homeassistant/sensor/aerekos_w-1/cpu/config";
    conductor
        .publish(config, b"{\"name\":\"CPU\"}", true)
        .await
        .expect("the conductor publishes discovery");
    // Live delivery to a standing subscription: retain flag cleared.
    assert_eq!(
        obs.message(config, SOON).await,
        Some((b"{\"name\":\"CPU\"}".to_vec(), false))
    );
    // Another application's tree: the admin login may publish there, the
    // observer's `#` does not deliver it.
    conductor
        .publish("other-app/state", b"private", false)
        .await
        .expect("publish elsewhere");
    assert!(!obs.got_payload(b"private", QUIET).await);

    // Without the extra tree (discovery turned off), the roles go back to
    // aerekos/v1/# only and the observer no longer receives discovery.
    let mut ds = b.dynsec().await;
    let changes = ds.ensure_roles(Some(OBSERVER_PW)).await.expect("again");
    assert!(!changes.is_empty(), "the extra ACLs are removed");
    let mut fresh = b
        .connect("home-assistant-2", "observer", OBSERVER_PW)
        .await
        .expect("observer logs in again");
    assert!(matches!(
        fresh.subscribe("#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert!(!fresh.got_payload(b"{\"name\":\"CPU\"}", QUIET).await);
    // ...which a fresh subscriber got as retained while the tree was open.
    let mut ds = b.dynsec().await;
    ds.set_extra_trees(vec!["homeassistant/#".into()]);
    ds.ensure_roles(Some(OBSERVER_PW)).await.expect("reopened");
    let mut again = b
        .connect("home-assistant-3", "observer", OBSERVER_PW)
        .await
        .expect("observer logs in a third time");
    assert!(matches!(
        again.subscribe("homeassistant/#").await,
        SubscribeReasonCode::Success(_)
    ));
    assert_eq!(
        again.message(config, SOON).await,
        Some((b"{\"name\":\"CPU\"}".to_vec(), true))
    );
}
