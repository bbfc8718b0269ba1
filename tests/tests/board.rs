//! Raspberry Pi board health end to end: a real edge-worker reads a Pi's
//! `/sys` and `/proc` from a fixture tree (`--host-root`, as a container
//! reads the host's), and the conductor shows what the firmware says in the
//! API, the Prometheus endpoint, an alert and the JSON mirror, keeps it
//! across a restart, and the broker keeps the frame retained for MQTT
//! Explorer. The fixture is
//! changed under the running agent as a sagging supply would change the
//! firmware's bits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::fs;
use std::time::Duration;

use e2e::{
    metric, pi_host_root, pi_throttled_file, wait_for, Conductor, MqttClient, Worker, WorkerOpts,
};
use protocol::topic::TopicKind;
use protocol::Body;
use serde_json::{json, Value};

fn firing(c: &Conductor, rule: &str) -> Vec<Value> {
    let (status, v) = c.get("/api/v1/alerts?state=firing");
    assert_eq!(status, 200, "{v}");
    v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["rule"] == json!(rule))
        .cloned()
        .collect()
}

#[test]
fn a_pi_with_a_weak_supply_shows_in_the_api_prometheus_alerts_and_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Conductor::start_with_env(
        &dir.path().join("conductor"),
        &["--default-interval-ms", "300"],
        &[("AEREKOS_ALERT_INTERVAL", "200ms")],
    );
    let (status, rule) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "psu", "kind": "metric_above", "metric": "under_voltage", "threshold": 0}),
    );
    assert_eq!(status, 201, "{rule}");

    let root = pi_host_root("pi-zero-w", &dir.path().join("host"));
    let throttled = pi_throttled_file(&root);
    assert!(throttled.is_file(), "fixture layout");
    let token = c.registration_token();
    let mut opts = WorkerOpts::named("pi-zero");
    opts.extra = vec!["--host-root".into(), root.display().to_string()];
    let mut pi = Worker::start(&dir.path().join("pi"), &c.url(), Some(&token), opts);
    // A machine that is not a Pi (an empty host root) sends no board.
    let empty = dir.path().join("empty-root");
    fs::create_dir_all(&empty).unwrap();
    let mut opts = WorkerOpts::named("not-a-pi");
    opts.extra = vec!["--host-root".into(), empty.display().to_string()];
    let mut other = Worker::start(&dir.path().join("other"), &c.url(), Some(&token), opts);
    let (id, other_id) = (pi.wait_id(), other.wait_id());

    let board = wait_for("the Pi's board", Duration::from_secs(20), || {
        let w = c.worker(&id);
        (!w["board"].is_null()).then(|| w["board"].clone())
    });
    assert_eq!(board["throttled"], json!("0x50005"), "{board}");
    assert_eq!(
        board["flags"],
        json!([
            "under_voltage_now",
            "throttled_now",
            "under_voltage_since_boot",
            "throttled_since_boot"
        ])
    );
    assert_eq!(board["under_voltage"], json!(true));
    assert_eq!(board["throttling"], json!(true));
    assert_eq!(board["revision"], json!("9000c1"));
    assert_eq!(board["model"], json!("Zero W"));
    assert_eq!(board["memory_bytes"], json!(512u64 << 20));
    assert_eq!(board["serial"], json!("00000000deadbeef"));
    assert!(board["sd"].is_null(), "the fixture has no SD card: {board}");
    let listed = c.workers();
    let row = listed.iter().find(|w| w["id"] == json!(id)).unwrap();
    assert_eq!(row["board"]["under_voltage"], json!(true), "{row}");
    assert_eq!(row["device_model"], json!("Raspberry Pi Zero W Rev 1.1"));
    // The SoC temperature from the Pi's thermal zone.
    let temps = wait_for("a sample", Duration::from_secs(20), || {
        let m = c.worker(&id)["metrics"]["metrics"]["temperatures"].clone();
        m.is_array().then_some(m)
    });
    assert_eq!(
        temps,
        json!([{"name": "cpu-thermal", "millicelsius": 52078}]),
        "{temps}"
    );

    wait_for(
        "the other worker's metrics",
        Duration::from_secs(20),
        || (!c.worker(&other_id)["metrics"].is_null()).then_some(()),
    );
    assert!(
        c.worker(&other_id)["board"].is_null(),
        "not a Pi: {}",
        c.worker(&other_id)
    );

    let prom = c.prometheus();
    let series = |flag: &str| {
        format!("aerekos_worker_pi_throttled{{worker_id=\"{id}\",hostname=\"pi-zero\",flag=\"{flag}\"}}")
    };
    assert_eq!(metric(&prom, &series("under_voltage_now")), 1.0, "{prom}");
    assert_eq!(metric(&prom, &series("throttled_now")), 1.0);
    assert!(
        prom.contains(&format!("{} 0", series("freq_capped_now"))),
        "every flag has a series, 0 when clear"
    );
    assert!(
        !prom.contains(&format!(
            "aerekos_worker_pi_throttled{{worker_id=\"{other_id}\""
        )),
        "no series for a machine that is not a Pi"
    );

    let alert = wait_for("the under-voltage alert", Duration::from_secs(20), || {
        firing(&c, "psu").into_iter().next()
    });
    assert_eq!(alert["subject"], json!(id), "{alert}");
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .starts_with("under_voltage on pi-zero"),
        "{alert}"
    );
    assert_eq!(firing(&c, "psu").len(), 1, "the other worker never matches");

    // The frame is retained: a client that subscribes later (MQTT Explorer)
    // gets it at once, and it verifies with the worker's secret.
    let (user, pass) = c.observer();
    let observer = MqttClient::connect(c.mqtt, "observer-board", Some((&user, &pass)))
        .expect("observer login accepted");
    let topic = protocol::topic::topic(&id, TopicKind::Board);
    assert_eq!(topic, format!("aerekos/v1/{id}/board"));
    observer.subscribe(&topic);
    let (_, frame) = observer
        .recv_until(Duration::from_secs(10), |t, _| t == topic)
        .expect("the retained board frame");
    let env = protocol::open(&frame, &id)
        .unwrap()
        .verify(&pi.secret())
        .unwrap();
    match env.body {
        Body::Board(b) => assert_eq!(b.revision, Some(0x9000c1)),
        other => panic!("expected a board frame, got {other:?}"),
    }
    // And the conductor's JSON mirror of it, in plain words.
    let mirror = protocol::topic::topic(&id, TopicKind::JsonBoard);
    observer.subscribe(&mirror);
    let (_, payload) = observer
        .recv_until(Duration::from_secs(10), |t, _| t == mirror)
        .expect("the retained json/board mirror");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["worker_id"], json!(id), "{v}");
    assert_eq!(v["model"], json!("Zero W"), "{v}");
    assert_eq!(v["under_voltage"], json!(true), "{v}");

    // The supply recovers: the "now" bits clear, the "since boot" ones stay.
    fs::write(&throttled, "50000\n").unwrap();
    wait_for("the flags to follow", Duration::from_secs(20), || {
        (c.worker(&id)["board"]["flags"]
            == json!(["under_voltage_since_boot", "throttled_since_boot"]))
        .then_some(())
    });
    wait_for("the alert to resolve", Duration::from_secs(20), || {
        firing(&c, "psu").is_empty().then_some(())
    });
    let board = c.worker(&id)["board"].clone();
    assert_eq!(board["under_voltage"], json!(true), "since boot: {board}");
    assert_eq!(board["throttling"], json!(false), "{board}");

    // The conductor keeps it across a restart, with the Pi gone (stopped
    // cleanly: its writer commits what it holds. After a kill -9 a frame not
    // yet committed is one the worker has no `Stored` for and sends again,
    // which this dead worker cannot).
    pi.proc.kill9();
    other.proc.kill9();
    c.proc.terminate();
    c.restart_after_kill9();
    let board = c.worker(&id)["board"].clone();
    assert_eq!(
        board["flags"],
        json!(["under_voltage_since_boot", "throttled_since_boot"]),
        "stored: {board}"
    );
    assert_eq!(board["model"], json!("Zero W"));
}
