//! End-to-end tests of the conductor library: real broker, real SQLite, real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use protocol::topic::{topic, TopicKind};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

#[test]
fn wrong_token_is_401_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (code, v) = c.enroll(json!({"token": "nope", "hostname": "pi"}));
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].is_string());
    let (code, _) = c.enroll(json!({"hostname": "pi"}));
    assert_eq!(code, 401);
    assert_eq!(c.get("/api/v1/workers")["workers"], json!([]));

    // Unauthenticated / bad token API calls.
    assert_eq!(c.call("GET", "/api/v1/workers", None, None).0, 401);
    assert_eq!(
        c.call("GET", "/api/v1/workers", Some("aes_bogus"), None).0,
        401
    );
    // Health needs no auth; oversized body → 413.
    let (code, health) = c.call("GET", "/api/v1/health", None, None);
    assert_eq!(code, 200);
    // The suite runs on SQLite and again on PostgreSQL (tests/run.sh).
    match &c.store_at {
        conductor::store::StoreLocation::Sqlite(_) => {
            assert_eq!(
                (&health["store"], &health["lease_epoch"]),
                (&json!("sqlite"), &json!(null))
            );
            assert!(!c.prometheus().contains("aerekos_store_lease_epoch"));
        }
        conductor::store::StoreLocation::Postgres(_) => {
            assert_eq!(health["store"], "postgres");
            assert_eq!(health["lease_epoch"], 1, "{health}");
            assert!(c.prometheus().contains("\naerekos_store_lease_epoch 1\n"));
        }
    }
    let big = vec![b'x'; 70 * 1024];
    assert_eq!(
        http("POST", &c.url("/api/v1/enroll"), None, Some(big)).0,
        413
    );
}

#[test]
fn enrol_frames_online_metrics_and_commands() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-one");
    assert!(
        protocol::topic::is_valid_worker_id(&e.id) && e.id.starts_with("w-") && e.id.len() == 14
    );
    assert!(
        e.mqtt_url
            .ends_with(&format!(":{}", c.started.mqtt_addr.port())),
        "{}",
        e.mqtt_url
    );
    assert_eq!(c.worker(&e.id)["status"], "offline"); // enrolled, never seen

    // A registration token from the API also works.
    let (code, v) = c.call(
        "POST",
        "/api/v1/registration-token/rotate",
        Some(&c.admin()),
        None,
    );
    assert_eq!(code, 200);
    let reg = v["token"].as_str().unwrap().to_string();
    let (code, _) = c.enroll(json!({"token": reg, "hostname": "pi-two"}));
    assert_eq!(code, 200);

    let w = FakeWorker::connect(&c, &e, true).unwrap();
    w.send(birth("pi-one", 10_000));
    w.send(metrics(1234));
    wait_for("metrics", T, || {
        let v = c.worker(&e.id);
        (v["metrics"]["seq"] == 2).then_some(())
    });
    let v = c.worker(&e.id);
    assert_eq!(v["status"], "online");
    assert_eq!(v["inventory"]["arch"], "aarch64");
    assert_eq!(v["labels"]["site"], "lab");
    assert_eq!(v["summary"]["cpu_percent"], 12.34);
    let row = c.listed(&e.id);
    assert_eq!(row["device_model"], "Raspberry Pi 5 Model B Rev 1.0");
    assert_eq!(row["summary"]["temp_max_celsius"], 51.5);
    assert!(c.accepted() >= 2);
    let prom = c.prometheus();
    assert!(
        prom.contains(&format!(
            "aerekos_worker_up{{worker_id=\"{}\",hostname=\"pi-one\"}} 1",
            e.id
        )),
        "{prom}"
    );
    assert!(prom.contains("aerekos_worker_cpu_percent"));

    // History (written by the batching writer within ~100 ms).
    let raw = wait_for("raw history", T, || {
        let v = c.get(&format!(
            "/api/v1/workers/{}/metrics?from=0&resolution=raw",
            e.id
        ));
        (v["points"].as_array().unwrap().len() == 1).then_some(v)
    });
    assert_eq!(raw["points"][0]["seq"], 2);
    assert_eq!(raw["points"][0]["metrics"]["cpu_total"], 1234);
    let minute = c.get(&format!(
        "/api/v1/workers/{}/metrics?from=0&resolution=minute",
        e.id
    ));
    assert_eq!(minute["points"][0]["n"], 1);

    // Labels.
    let (code, v) = c.call(
        "PUT",
        &format!("/api/v1/workers/{}/labels", e.id),
        Some(&c.admin()),
        Some(json!({"rack": "r2"})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(c.worker(&e.id)["labels"], json!({"rack": "r2"}));

    // Commands: ping round trip through the fake worker.
    let (code, v) = c.call(
        "POST",
        &format!("/api/v1/workers/{}/commands", e.id),
        Some(&c.admin()),
        Some(json!({"action": "ping"})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["detail"], "pong");
    let (code, v) = c.call(
        "POST",
        &format!("/api/v1/workers/{}/commands", e.id),
        Some(&c.admin()),
        Some(json!({"action": {"set_interval_ms": 5000}})),
    );
    assert_eq!(code, 200, "{v}");

    // API tokens.
    let (code, v) = c.call(
        "POST",
        "/api/v1/tokens",
        Some(&c.admin()),
        Some(json!({"name": "script"})),
    );
    assert_eq!(code, 201);
    let api = v["token"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(c.call("GET", "/api/v1/workers", Some(&api), None).0, 200);
    assert_eq!(c.get("/api/v1/tokens")["tokens"][0]["name"], "script");
    assert_eq!(
        c.call(
            "DELETE",
            &format!("/api/v1/tokens/{id}"),
            Some(&c.admin()),
            None
        )
        .0,
        204
    );
    assert_eq!(c.call("GET", "/api/v1/workers", Some(&api), None).0, 401);

    // MQTT info and JSON mirror carry no secrets.
    let m = c.get("/api/v1/mqtt");
    assert_eq!(m["observer_username"], "observer");
    let observer_pw = m["observer_password"].as_str().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    let (obs, _t) = connect(
        c.started.mqtt_addr,
        "explorer",
        "observer",
        &observer_pw,
        Some(Box::new(move |_, p| {
            seen2
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&p.payload).into_owned())
        })),
    )
    .unwrap();
    obs.subscribe(
        format!("aerekos/v1/{}/json/#", e.id),
        rumqttc::QoS::AtLeastOnce,
    )
    .unwrap();
    let mirrored = wait_for("retained mirror", T, || {
        let s = seen.lock().unwrap();
        (s.len() >= 2).then(|| s.join("\n"))
    });
    // Plain units with the unit in the name (docs/mirror/*.schema.json),
    // not the wire's fixed point.
    let payloads: Vec<serde_json::Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let m = payloads
        .iter()
        .find(|v| v.get("cpu_percent").is_some())
        .unwrap_or_else(|| panic!("no json/metrics: {mirrored}"));
    assert_eq!(m["worker_id"], e.id.as_str());
    assert_eq!(m["cpu_percent"], 12.34);
    assert_eq!(m["temp_celsius"], 51.5);
    let b = payloads
        .iter()
        .find(|v| v.get("cpu_cores").is_some())
        .unwrap_or_else(|| panic!("no json/birth: {mirrored}"));
    assert_eq!(b["arch"], "aarch64");
    assert!(!mirrored.contains("cpu_total") && !mirrored.contains("millicelsius"));
    assert!(!mirrored.contains(&e.secret.to_hex()));
    // Observer may not impersonate a worker client id.
    assert!(connect(c.started.mqtt_addr, &e.id, "observer", &observer_pw, None).is_err());
}

#[test]
fn command_without_reply_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-silent");
    let _w = FakeWorker::connect(&c, &e, false).unwrap();
    let (code, v) = c.call(
        "POST",
        &format!("/api/v1/workers/{}/commands", e.id),
        Some(&c.admin()),
        Some(json!({"action": "rebirth"})),
    );
    assert_eq!(code, 504, "{v}");
}

#[test]
fn forged_replayed_and_garbage_frames_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let a = c.enroll_new("pi-a");
    let b = c.enroll_new("pi-b");
    let wa = FakeWorker::connect(&c, &a, false).unwrap();
    let wb = FakeWorker::connect(&c, &b, false).unwrap();
    let good = wa.send(metrics(100));
    wait_for("accept", T, || {
        (c.worker(&a.id)["metrics"]["seq"] == 1).then_some(())
    });

    // Forged: B (valid creds) publishes on A's topic a frame claiming A,
    // sealed with B's secret. The broker refuses it (a worker publishes on
    // its own topics only) and closes B's connection: the conductor never
    // sees it.
    let forged = seal(&b.secret, &a.id, 50, metrics(9999));
    wb.raw(&topic(&a.id, TopicKind::Metrics), forged.clone());
    wait_for("B disconnected by the broker", T, || {
        wb.connection_closed().then_some(())
    });
    let denied = prom_value(
        &c.prometheus(),
        "aerekos_mqtt_denied_total{who=\"worker\",action=\"publish\"}",
    );
    assert_eq!(denied, 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.rejected("bad_tag"), 0);
    // Through a broker that let it pass, the tag refuses it.
    let injector = Injector::connect(&c);
    injector.raw(&topic(&a.id, TopicKind::Metrics), forged);
    wait_for("bad_tag", T, || (c.rejected("bad_tag") == 1).then_some(()));

    // Replay of a genuine frame.
    wa.raw(&topic(&a.id, TopicKind::Metrics), good);
    wait_for("replayed", T, || {
        (c.rejected("replayed") == 1).then_some(())
    });

    // Too old: jump ahead, then a seq below the window.
    wa.raw(
        &topic(&a.id, TopicKind::Metrics),
        seal(&a.secret, &a.id, 500, metrics(200)),
    );
    wa.raw(
        &topic(&a.id, TopicKind::Metrics),
        seal(&a.secret, &a.id, 400, metrics(300)),
    );
    wait_for("too_old", T, || (c.rejected("too_old") == 1).then_some(()));

    // Garbage.
    let mt = topic(&a.id, TopicKind::Metrics);
    wa.raw(&mt, vec![1, 2, 3]);
    wa.raw(&mt, vec![9; 40]);
    wa.raw(&mt, [vec![1], vec![0xff; 40]].concat());
    wa.raw(&mt, vec![1; protocol::MAX_FRAME_LEN + 1]);
    wa.raw(&mt, Vec::new());
    // Unknown worker, topic mismatch (A's frame on B's topic; metrics on
    // the birth topic). The first two only another broker would pass.
    injector.raw(
        &topic("w-ffffffffffff", TopicKind::Metrics),
        seal(&a.secret, "w-ffffffffffff", 1, metrics(1)),
    );
    injector.raw(
        &topic(&b.id, TopicKind::Metrics),
        seal(&a.secret, &a.id, 600, metrics(1)),
    );
    wa.raw(
        &topic(&a.id, TopicKind::Birth),
        seal(&a.secret, &a.id, 601, metrics(1)),
    );
    wait_for("all rejections", T, || {
        let p = c.prometheus();
        let r = |reason: &str| {
            prom_value(
                &p,
                &format!("aerekos_frames_rejected_total{{reason=\"{reason}\"}}"),
            )
        };
        (r("truncated") == 2
            && r("version") == 1
            && r("malformed") == 1
            && r("oversized") == 1
            && r("unknown_worker") == 1
            && r("topic_mismatch") == 2)
            .then_some(())
    });
    // State unchanged by rejections: the forged cpu never became the latest.
    let v = c.worker(&a.id);
    assert_eq!(v["metrics"]["seq"], 500);
    assert_eq!(v["metrics"]["metrics"]["cpu_total"], 200);
    assert_eq!(c.accepted(), 2);
    // Still alive and accepting.
    wa.raw(&mt, seal(&a.secret, &a.id, 700, metrics(700)));
    wait_for("accept after garbage", T, || {
        (c.worker(&a.id)["metrics"]["seq"] == 700).then_some(())
    });
}

#[test]
fn reenrol_with_proof_keeps_identity_without_proof_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-same");
    let proof = protocol::reenroll_proof(&e.secret, &e.id);
    let (code, v) = c.enroll(json!({"hostname": "pi-same", "machine_id": "mid-pi-same", "worker_id": e.id, "proof": proof}));
    assert_eq!(code, 200, "{v}");
    let again = Enrolled::from_json(&v);
    assert_eq!(again.id, e.id);
    assert_eq!(again.secret, e.secret);
    assert_ne!(again.password, e.password);
    // Old MQTT password no longer works; the new one does.
    assert!(FakeWorker::connect(&c, &e, false).is_err());
    assert!(FakeWorker::connect(&c, &again, false).is_ok());

    // Bad proof → 401.
    let (code, _) =
        c.enroll(json!({"hostname": "pi-same", "worker_id": e.id, "proof": "00".repeat(32)}));
    assert_eq!(code, 401);
    // No proof, same hostname and machine id → a new worker.
    let other = c.enroll_new("pi-same");
    assert_ne!(other.id, e.id);
    let (code, v) = c.enroll(
        json!({"token": c.started.local_enroll_token, "hostname": "pi-same", "worker_id": e.id}),
    );
    assert_eq!(code, 200);
    assert_ne!(v["worker_id"], e.id.as_str());
    assert_eq!(
        c.get("/api/v1/workers")["workers"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn revoked_worker_is_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-bad");
    let w = FakeWorker::connect(&c, &e, false).unwrap();
    w.send(metrics(1));
    wait_for("accept", T, || {
        (c.worker(&e.id)["metrics"]["seq"] == 1).then_some(())
    });
    let (code, _) = c.call(
        "POST",
        &format!("/api/v1/workers/{}/revoke", e.id),
        Some(&c.admin()),
        None,
    );
    assert_eq!(code, 200);
    // The embedded broker closes its live connection (the login check runs
    // only at CONNECT); frames published for it by anyone else are refused
    // as revoked (tests/tests/security.rs).
    wait_for("the revoked worker's connection closed", T, || {
        w.connection_closed().then_some(())
    });
    let v = c.worker(&e.id);
    assert_eq!(v["revoked"], true);
    assert_eq!(v["metrics"]["seq"], 1);
    assert!(
        FakeWorker::connect(&c, &e, false).is_err(),
        "revoked login must be refused"
    );
    let proof = protocol::reenroll_proof(&e.secret, &e.id);
    let (code, _) = c.enroll(json!({"hostname": "pi-bad", "worker_id": e.id, "proof": proof}));
    assert_eq!(code, 403);
}

#[test]
fn restart_keeps_workers_tokens_history_and_replay_window() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (_, v) = c.call(
        "POST",
        "/api/v1/registration-token/rotate",
        Some(&c.admin()),
        None,
    );
    let reg = v["token"].as_str().unwrap().to_string();
    let e = c.enroll_new("pi-persist");
    let w = FakeWorker::connect(&c, &e, false).unwrap();
    w.send(birth("pi-persist", 10_000));
    let m2 = w.send(metrics(222));
    w.send(metrics(333));
    wait_for("accepted", T, || {
        (c.worker(&e.id)["metrics"]["seq"] == 3).then_some(())
    });
    let m3_shown = c.worker(&e.id)["metrics"]["metrics"].clone();
    drop(w);
    c.stop();

    let c = Conductor::start(dir.path());
    let v = c.worker(&e.id);
    assert_eq!(v["hostname"], "pi-persist");
    assert_eq!(
        v["inventory"]["device_model"],
        "Raspberry Pi 5 Model B Rev 1.0"
    );
    assert_eq!(v["status"], "offline");
    assert_eq!(v["counters"]["replay_highest"], 3);
    // The latest metrics are shown before the worker's next frame.
    assert_eq!(v["metrics"]["seq"], 3, "{v}");
    assert_eq!(v["metrics"]["metrics"], m3_shown, "{v}");
    let row = c.listed(&e.id);
    assert!(row["summary"]["cpu_percent"].is_number(), "{row}");
    let hist = c.get(&format!("/api/v1/workers/{}/metrics?from=0", e.id));
    assert_eq!(hist["points"].as_array().unwrap().len(), 2);
    // The registration token hash survived.
    assert_eq!(c.enroll(json!({"token": reg, "hostname": "pi-new"})).0, 200);
    // The replay window survived: the old frame is refused on the new broker.
    let w = FakeWorker::connect(&c, &e, false).unwrap();
    w.raw(&topic(&e.id, TopicKind::Metrics), m2);
    wait_for("replayed after restart", T, || {
        (c.rejected("replayed") == 1).then_some(())
    });
    w.seq.store(3, std::sync::atomic::Ordering::SeqCst);
    w.send(metrics(444));
    wait_status(&c, &e.id, "online", T);
}

#[test]
fn liveness_online_stale_offline_and_lwt() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-live");
    let w = FakeWorker::connect(&c, &e, false).unwrap();
    w.send(birth("pi-live", 300));
    wait_status(&c, &e.id, "online", T);
    wait_status(&c, &e.id, "stale", T);
    wait_status(&c, &e.id, "offline", T);
    w.send(metrics(5));
    wait_status(&c, &e.id, "online", T);

    // LWT / clean "offline" status text marks offline at once; "online" text does not revive.
    let e2 = c.enroll_new("pi-lwt");
    let w2 = FakeWorker::connect(&c, &e2, false).unwrap();
    w2.send(metrics(5));
    wait_status(&c, &e2.id, "online", T);
    w2.client
        .publish(
            topic(&e2.id, TopicKind::Status),
            rumqttc::QoS::AtLeastOnce,
            true,
            "offline",
        )
        .unwrap();
    wait_status(&c, &e2.id, "offline", Duration::from_secs(2));
    w2.client
        .publish(
            topic(&e2.id, TopicKind::Status),
            rumqttc::QoS::AtLeastOnce,
            true,
            "online",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.worker(&e2.id)["status"], "offline");
}

#[test]
fn login_wrong_password_and_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (code, v) = c.call(
        "POST",
        "/api/v1/login",
        None,
        Some(json!({"username": "admin", "password": "wrong"})),
    );
    assert_eq!(code, 401, "{v}");
    // A good login yields a session that logout ends.
    let session = c.admin();
    assert_eq!(
        c.call("GET", "/api/v1/registration-token", Some(&session), None)
            .0,
        200
    );
    assert_eq!(
        c.call("POST", "/api/v1/logout", Some(&session), None).0,
        204
    );
    assert_eq!(
        c.call("GET", "/api/v1/registration-token", Some(&session), None)
            .0,
        401
    );
    let mut saw_429 = false;
    for _ in 0..12 {
        let (code, _) = c.call(
            "POST",
            "/api/v1/login",
            None,
            Some(json!({"username": "admin", "password": "wrong"})),
        );
        if code == 429 {
            saw_429 = true;
            break;
        }
        assert_eq!(code, 401);
    }
    assert!(saw_429, "login must be rate limited");
    // Enrolment has its own per-IP bucket, limited the same way.
    let mut enrol_429 = false;
    for _ in 0..12 {
        if c.enroll(json!({"token": "x", "hostname": "h"})).0 == 429 {
            enrol_429 = true;
            break;
        }
    }
    assert!(enrol_429, "enrolment must be rate limited");
}
