//! End-to-end against an external Mosquitto (`--mqtt-url`): the happy path,
//! forged frames on an anonymous broker, and a broker outage that must lose
//! nothing.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::*;
use protocol::{Body, TopicKind};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn mqtt_addr(m: &Mosquitto) -> SocketAddr {
    format!("127.0.0.1:{}", m.port).parse().unwrap()
}

#[test]
fn happy_path_and_forgery_on_an_anonymous_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let c = Conductor::start_with(
        &dir.path().join("conductor"),
        &["--mqtt-url", &broker.url()],
    );
    let token = c.registration_token();
    let mut a = Worker::start(
        &dir.path().join("a"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("a"),
    );
    let mut b = Worker::start(
        &dir.path().join("b"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("b"),
    );
    let (ia, ib) = (a.wait_id(), b.wait_id());
    for id in [&ia, &ib] {
        wait_for(&format!("{id} online"), SECS(20), || {
            let w = c.worker(id);
            (w["status"] == "online" && !w["metrics"].is_null()).then_some(())
        });
    }

    // People browsing the broker read the retained JSON mirror, in plain
    // units (docs/mirror/*.schema.json), not the wire's fixed point.
    let anon = MqttClient::connect(mqtt_addr(&broker), "explorer", None).unwrap();
    let birth_topic = protocol::topic::topic(&ia, TopicKind::JsonBirth);
    anon.subscribe(&birth_topic);
    let (_, payload) = anon
        .recv_until(SECS(10), |t, _| t == birth_topic)
        .expect("retained JSON birth");
    let birth: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(birth["worker_id"], ia.as_str(), "{birth}");
    let cores = birth["cpu_cores"].as_u64().unwrap();
    assert!(cores >= 1, "{birth}");
    assert!(birth["memory_total_bytes"].as_u64().unwrap() > 0, "{birth}");
    assert!(
        birth["metrics_interval_ms"].as_u64().unwrap() > 0,
        "{birth}"
    );
    let json_topic = protocol::topic::topic(&ia, TopicKind::JsonMetrics);
    anon.subscribe(&json_topic);
    let (_, payload) = anon
        .recv_until(SECS(10), |t, _| t == json_topic)
        .expect("retained JSON mirror");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["worker_id"], ia.as_str(), "{v}");
    assert!(v["seq"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["received_at_ms"].as_u64().unwrap() > 1_700_000_000_000,
        "{v}"
    );
    // cpu_percent is busy time averaged over the cores: a percentage, not
    // hundredths (the wire's 1250 is 12.5 here).
    let cpu = v["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "{v}");
    let per_core = v["cpu_percent_per_core"].as_array().unwrap();
    assert!(
        !per_core.is_empty() && per_core.len() as u64 <= cores,
        "{v}"
    );
    for core in per_core {
        assert!((0.0..=100.0).contains(&core.as_f64().unwrap()), "{v}");
    }
    for load in ["load1", "load5", "load15"] {
        let l = v[load].as_f64().unwrap();
        assert!((0.0..1000.0).contains(&l), "{load}: {v}");
    }
    match &v["temp_celsius"] {
        serde_json::Value::Null => {} // no thermal zone on this host
        t => assert!((-40.0..=150.0).contains(&t.as_f64().unwrap()), "{v}"),
    }
    let used = v["memory_used_bytes"].as_u64().unwrap();
    let total = v["memory_total_bytes"].as_u64().unwrap();
    assert!(0 < used && used <= total, "{v}");
    assert!(v["uptime_seconds"].as_u64().unwrap() > 0, "{v}");
    for raw in [
        "cpu_total",
        "millicelsius",
        "\"load\"",
        "rx_bps",
        "\"uptime_s\"",
    ] {
        assert!(!v.to_string().contains(raw), "raw {raw} in {v}");
    }
    assert!(
        !v.to_string().contains(&a.secret().to_hex()),
        "no secret in the mirror"
    );

    // Anyone can publish on an anonymous broker: forged frames are refused.
    let before = c.rejected("bad_tag");
    let metrics_topic = protocol::topic::topic(&ia, TopicKind::Metrics);
    let env =
        protocol::examples::envelope(u64::MAX / 4, Body::Metrics(protocol::examples::metrics()));
    let mut env = env;
    env.worker_id = protocol::frame::bounded(&ia);
    anon.publish(
        &metrics_topic,
        protocol::seal(&protocol::Secret::from_bytes([1; 32]), &env).unwrap(),
    );
    wait_for("forgery counted", SECS(10), || {
        (c.rejected("bad_tag") > before).then_some(())
    });
    assert!(c
        .raw_history(&ia)
        .iter()
        .all(|p| p["seq"].as_u64().unwrap() < 1_000_000));

    // kill -9 → offline (LWT through Mosquitto, or missed intervals).
    b.proc.kill9();
    wait_for("b offline", SECS(5), || {
        (c.status_of(&ib) == "offline").then_some(())
    });
    assert_eq!(c.status_of(&ia), "online");
}

#[test]
fn broker_outage_delivers_every_frame_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&dir.path().join("mosquitto"));
    let c = Conductor::start_with(
        &dir.path().join("conductor"),
        &["--mqtt-url", &broker.url()],
    );
    let token = c.registration_token();
    let mut opts = WorkerOpts::named("outage");
    opts.interval_ms = 1000;
    let mut w = Worker::start(&dir.path().join("w"), &c.url(), Some(&token), opts);
    let id = w.wait_id();
    let secret = w.secret();
    let sniffer = MqttClient::connect_with(
        mqtt_addr(&broker),
        "sniffer",
        None,
        &[&format!("aerekos/v1/{id}/+")],
    )
    .unwrap();
    wait_for("a few samples", SECS(20), || {
        (c.raw_history(&id).len() >= 3).then_some(())
    });

    // fits: u64 milliseconds last 584 million years after 1970.
    #[allow(clippy::cast_possible_truncation)]
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    broker.stop();
    let stopped_at = now_ms();
    std::thread::sleep(SECS(10));
    let restarted_at = now_ms();
    broker.start_again();

    // Every frame the worker sealed, seen on the broker by a persistent
    // sniffer, until frames sent well after the restart have arrived.
    let mut seen: BTreeMap<u64, (u64, Body)> = BTreeMap::new();
    wait_for("frames sent after the outage", SECS(30), || {
        while let Some((topic, payload, _)) = sniffer.recv(Duration::from_millis(100)) {
            if topic.ends_with("/status") {
                continue;
            }
            let env = protocol::open(&payload, &id)
                .unwrap()
                .verify(&secret)
                .unwrap();
            seen.insert(env.seq, (env.sent_at_ms, env.body));
        }
        seen.values()
            .any(|(sent, _)| *sent > restarted_at + 3000)
            .then_some(())
    });
    let seqs: Vec<u64> = seen.keys().copied().collect();
    let (first, last) = (seqs[0], *seqs.last().unwrap());
    assert_eq!(
        seqs.len() as u64,
        last - first + 1,
        "sequence numbers contiguous from {first} to {last}: {seqs:?}"
    );
    // The samples taken during the outage were queued and delivered.
    let during: Vec<u64> = seen
        .iter()
        .filter(|(_, (sent, body))| {
            matches!(body, Body::Metrics(_) | Body::MetricsBatch(_))
                && *sent > stopped_at
                && *sent < restarted_at
        })
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        during.len() >= 8,
        "samples from the 10 s outage: {during:?}"
    );
    // And every metrics frame reached the conductor's history.
    let last_metrics = seen
        .iter()
        .filter(|(_, (_, b))| matches!(b, Body::Metrics(_) | Body::MetricsBatch(_)))
        .map(|(seq, _)| *seq)
        .max()
        .unwrap();
    let caught_up = || {
        c.raw_history(&id)
            .iter()
            .any(|p| p["seq"].as_u64() == Some(last_metrics))
    };
    let deadline = std::time::Instant::now() + SECS(10);
    while !caught_up() {
        assert!(
            std::time::Instant::now() < deadline,
            "conductor never stored seq {last_metrics}:\n{}",
            c.proc.tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stored: std::collections::HashSet<u64> = c
        .raw_history(&id)
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    for (seq, (_, body)) in &seen {
        if matches!(body, Body::Metrics(_) | Body::MetricsBatch(_)) {
            assert!(
                stored.contains(seq),
                "metrics seq {seq} lost by the conductor"
            );
        }
    }
    assert!(w.proc.alive());
}

#[test]
fn mosquitto_over_tls_with_dynamic_security_confines_workers_and_kicks_the_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = SecureMosquitto::start(&dir.path().join("mosquitto")) else {
        return;
    };
    let ca_file = broker.ca_file.display().to_string();
    let c = Conductor::start_with(
        &dir.path().join("conductor"),
        &[
            "--mqtt-url",
            &broker.conductor_url(),
            "--mqtt-ca",
            &ca_file,
            "--mqtt-dynsec",
        ],
    );
    let token = c.registration_token();
    let mut a = Worker::start(
        &dir.path().join("a"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("a"),
    );
    let mut b = Worker::start(
        &dir.path().join("b"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("b"),
    );
    let (ia, ib) = (a.wait_id(), b.wait_id());
    for id in [&ia, &ib] {
        wait_for(&format!("{id} online over mqtts"), SECS(30), || {
            let w = c.worker(id);
            (w["status"] == "online" && !w["metrics"].is_null()).then_some(())
        });
    }
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.state_dir.join("state.json")).unwrap())
            .unwrap();
    assert_eq!(
        st["mqtt_url"],
        format!("mqtts://127.0.0.1:{}", broker.port),
        "{st}"
    );
    assert_eq!(st["mqtt_username"], ia, "a login of its own: {st}");
    assert!(
        a.state_dir.join("mqtt-ca.pem").is_file(),
        "the broker's CA came with the enrolment"
    );

    // The observer (from the API) reads, and cannot replace A's retained status.
    let (_, info) = c.get("/api/v1/mqtt");
    let (ou, op) = (
        info["observer_username"].as_str().unwrap().to_string(),
        info["observer_password"].as_str().unwrap().to_string(),
    );
    let status_topic = protocol::topic::topic(&ia, TopicKind::Status);
    let obs = MqttClient::connect_tls(broker.addr(), "explorer", Some((&ou, &op)), &broker.ca_pem)
        .expect("observer login");
    obs.subscribe(&status_topic);
    assert!(obs
        .recv_until(SECS(5), |t, p| t == status_topic && p == b"online")
        .is_some());
    obs.client
        .publish(
            &status_topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            b"offline".to_vec(),
        )
        .unwrap();
    std::thread::sleep(SECS(1));
    let fresh = MqttClient::connect_tls(
        broker.addr(),
        "explorer-2",
        Some((&ou, &op)),
        &broker.ca_pem,
    )
    .unwrap();
    fresh.subscribe(&status_topic);
    let (_, p) = fresh
        .recv_until(SECS(5), |t, _| t == status_topic)
        .expect("retained status");
    assert_eq!(p, b"online", "the observer could not replace it");

    // A's login cannot read B's commands or publish on B's topics.
    a.proc.terminate();
    let (au, ap) = a.mqtt_login();
    let fake_a = MqttClient::connect_tls(broker.addr(), &ia, Some((&au, &ap)), &broker.ca_pem)
        .expect("A's own login");
    assert_eq!(
        fake_a.subscribe_acked(&protocol::topic::topic(&ib, TopicKind::Cmd)),
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    let before = c.rejected("bad_tag") + c.rejected("topic_mismatch");
    fake_a.publish(
        &protocol::topic::topic(&ib, TopicKind::Metrics),
        vec![1, 2, 3],
    );
    std::thread::sleep(SECS(2));
    assert_eq!(
        c.rejected("bad_tag") + c.rejected("topic_mismatch"),
        before,
        "the forged frame never reached the conductor"
    );
    drop(fake_a);

    // Revoking B kicks its live session and its login no longer works.
    let (status, body) = c.post(
        &format!("/api/v1/workers/{ib}/revoke"),
        &serde_json::json!({}),
    );
    assert_eq!(status, 200, "{body}");
    let (bu, bp) = b.mqtt_login();
    wait_for("B's live session closed by the broker", SECS(15), || {
        (!tcp_peers_of(b.proc.pid())
            .iter()
            .any(|p| p.port() == broker.port))
        .then_some(())
    });
    let t = protocol::topic::topic(&ib, TopicKind::Status);
    let s = MqttClient::connect_tls(
        broker.addr(),
        "explorer-3",
        Some((&ou, &op)),
        &broker.ca_pem,
    )
    .unwrap();
    s.subscribe(&t);
    assert!(
        s.recv_until(SECS(5), |tt, p| tt == t && p == b"offline")
            .is_some(),
        "the retained status says offline"
    );
    assert!(
        MqttClient::connect_tls(broker.addr(), &ib, Some((&bu, &bp)), &broker.ca_pem).is_none(),
        "a revoked worker's login is gone"
    );
    std::thread::sleep(SECS(2));
    assert!(
        !tcp_peers_of(b.proc.pid())
            .iter()
            .any(|p| p.port() == broker.port),
        "B never got back in"
    );
    b.proc.terminate();
}
