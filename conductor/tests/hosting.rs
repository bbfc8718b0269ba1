//! Hosting services, conductor side: artifacts, manifests and their access
//! rules, secrets kept out of every API answer, rollouts with automatic
//! revert, log relay, service metrics and events, per-worker stops. Real
//! in-process conductor, fake MQTT workers.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use protocol::manifest::{Program, Runtime};
use protocol::topic::TopicKind;
use protocol::{Action, Body, ServiceState};
use serde_json::{json, Value};

fn sha_hex(b: &[u8]) -> String {
    protocol::hex_string(&protocol::manifest::digest(b))
}

fn upload(c: &Conductor, arch: &str, name: &str, bytes: Vec<u8>) -> (u16, Value) {
    let auth = format!("Bearer {}", c.admin());
    let (code, _, body) = http_raw(
        "POST",
        &c.url(&format!("/api/v1/artifacts?arch={arch}&name={name}")),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        bytes,
    );
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn agent_get(c: &Conductor, path: &str, auth: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    http_raw("GET", &c.url(path), &[("Authorization", auth)], vec![])
}

fn rollout_of(c: &Conductor, name: &str) -> Value {
    c.get(&format!("/api/v1/services/{name}"))["rollout"].clone()
}

fn wait_rollout_state(c: &Conductor, name: &str, state: &str, timeout: Duration) -> Value {
    wait_for(&format!("rollout {state}"), timeout, || {
        let r = rollout_of(c, name);
        (r["state"] == state).then_some(r)
    })
}

#[test]
fn artifacts_manifests_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.max_artifact_bytes = 512 * 1024;
    let c = Conductor::start_with(cfg);
    let ea = enroll_labels(&c, "pi-a", json!({}));
    let eb = enroll_labels(&c, "pi-b", json!({}));
    let a = SvcWorker::connect(&c, &ea, "pi-a");
    let b = SvcWorker::connect(&c, &eb, "pi-b");
    wait_status(&c, &ea.id, "online", T);
    wait_status(&c, &eb.id, "online", T);

    // Upload: larger than the JSON body limit, streamed and hashed.
    let bin: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = sha_hex(&bin);
    let (code, v) = upload(&c, "aarch64", "relay%20v1", bin.clone());
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["sha256"], sha);
    assert_eq!(v["size"], bin.len());
    assert_eq!(v["name"], "relay v1");
    assert_eq!(upload(&c, "aarch64", "big", vec![1u8; 600 * 1024]).0, 413);
    assert_eq!(upload(&c, "a/b", "x", vec![1]).0, 400);
    assert_eq!(
        http_raw(
            "POST",
            &c.url("/api/v1/artifacts?arch=x86_64"),
            &[],
            vec![1]
        )
        .0,
        401
    );
    let list = c.get("/api/v1/artifacts");
    assert_eq!(list["artifacts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["artifacts"][0]["arch"], "aarch64");

    // Agent download: the right tag gets the bytes; others get 401.
    let path = format!("/api/v1/agent/artifacts/{sha}");
    let (code, headers, body) = agent_get(&c, &path, &a.http_auth(&path));
    assert_eq!(code, 200);
    assert_eq!(sha_hex(&body), sha);
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-length") && v == &bin.len().to_string()));
    let forged = protocol::manifest::http_auth(&b.secret, &a.id, "GET", &path);
    assert_eq!(agent_get(&c, &path, &forged).0, 401);
    assert_eq!(agent_get(&c, &path, &a.http_auth("/other")).0, 401);
    assert_eq!(
        agent_get(&c, &path, &format!("Bearer {}", c.admin())).0,
        401
    );
    let missing = format!("/api/v1/agent/artifacts/{}", "0".repeat(64));
    assert_eq!(agent_get(&c, &missing, &a.http_auth(&missing)).0, 404);

    // A spec with artifacts, health, limits, config and secrets.
    let spec = json!({"name": "relay", "artifacts": {"aarch64": sha}, "args": ["--port", "8080"],
        "health": {"http": {"port": 8080, "path": "/healthz"}},
        "limits": {"memory_bytes": 64_000_000},
        "config": {"mode": "fast", "threshold": 3},
        "secrets": {"API_KEY": "s3cr3t-api-key", "DB_PASSWORD": "s3cr3t-db-pw"}});
    let (code, v) = call(&c, "POST", "/api/v1/services", Some(spec));
    assert_eq!(code, 201, "{v}");
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(json!({"name": "nope", "artifacts": {"x86_64": sha}})),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("x86_64"), "{v}");
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/relay/deployment",
        Some(json!({"workers": [ea.id]})),
    );
    assert_eq!(code, 200, "{v}");

    // The target fetches the manifest named by the command, digest checked.
    let act = a.wait_action("deploy", |x| is_deploy(x, "relay", 1));
    let m = fetch_manifest(&c, &a, &act);
    match &m.runtime {
        Runtime::Process(p) => match &p.program {
            Program::Artifacts(list) => {
                assert_eq!(list[0].arch, "aarch64");
                assert_eq!(protocol::hex_string(&list[0].sha256), sha);
                assert_eq!(list[0].size, bin.len() as u64);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(m.secrets["API_KEY"], "s3cr3t-api-key");
    assert_eq!(m.config["threshold"], "3");
    // Another worker may not read it (404), a bad tag is 401.
    let mpath = "/api/v1/agent/manifests/relay/1";
    assert_eq!(agent_get(&c, mpath, &b.http_auth(mpath)).0, 404);
    let forged = protocol::manifest::http_auth(&b.secret, &a.id, "GET", mpath);
    assert_eq!(agent_get(&c, mpath, &forged).0, 401);
    let v9 = "/api/v1/agent/manifests/relay/9";
    assert_eq!(agent_get(&c, v9, &a.http_auth(v9)).0, 404);

    // The referenced artifact cannot be deleted; an unused one can.
    let (code, v) = call(&c, "DELETE", &format!("/api/v1/artifacts/{sha}"), None);
    assert_eq!(code, 409, "{v}");
    let other = b"#!/bin/sh\necho other\n".to_vec();
    let osha = sha_hex(&other);
    assert_eq!(upload(&c, "armv7", "", other).0, 201);
    assert_eq!(
        call(&c, "DELETE", &format!("/api/v1/artifacts/{osha}"), None).0,
        204
    );
    let opath = format!("/api/v1/agent/artifacts/{osha}");
    assert_eq!(agent_get(&c, &opath, &a.http_auth(&opath)).0, 404);
    assert_eq!(
        call(&c, "DELETE", &format!("/api/v1/artifacts/{osha}"), None).0,
        404
    );

    // Secrets: names only, in every answer; never in the JSON mirror.
    a.report("relay", 1, ServiceState::Healthy);
    wait_for("healthy in sync", T, || {
        let v = c.get("/api/v1/services/relay");
        (target(&v, &ea.id)["in_sync"] == true).then_some(())
    });
    let one = c.get("/api/v1/services/relay");
    assert_eq!(
        one["versions"][0]["spec"]["secrets"],
        json!(["API_KEY", "DB_PASSWORD"])
    );
    assert_eq!(one["versions"][0]["spec"]["config"]["threshold"], 3);
    let mqtt = c.get("/api/v1/mqtt");
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let seen2 = seen.clone();
    let (obs, _t) = connect(
        c.started.mqtt_addr,
        "observer-test",
        mqtt["observer_username"].as_str().unwrap(),
        mqtt["observer_password"].as_str().unwrap(),
        Some(Box::new(move |_, p| {
            seen2.lock().unwrap().extend_from_slice(&p.payload)
        })),
    )
    .unwrap();
    obs.subscribe("aerekos/v1/#", rumqttc::QoS::AtMostOnce)
        .unwrap();
    a.send(birth("pi-a", 60_000), TopicKind::Birth);
    a.send(metrics(1000), TopicKind::Metrics);
    wait_for("mirror seen", T, || {
        (!seen.lock().unwrap().is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut texts = vec![
        String::from_utf8_lossy(&seen.lock().unwrap()).to_string(),
        c.prometheus(),
    ];
    for p in [
        "/api/v1/services".to_string(),
        "/api/v1/services/relay".to_string(),
        "/api/v1/services/relay/rollouts".to_string(),
        format!("/api/v1/workers/{}/services", ea.id),
        format!("/api/v1/workers/{}", ea.id),
        "/api/v1/artifacts".to_string(),
    ] {
        texts.push(c.get(&p).to_string());
    }
    for t in texts {
        assert!(!t.contains("s3cr3t"), "a secret leaked: {t}");
    }
    if let conductor::store::StoreLocation::Sqlite(dir) = &c.store_at {
        let db = std::fs::read(dir.join("conductor.db")).unwrap_or_default();
        assert!(!db.is_empty());
    }
}

/// Three workers with role=web run `web` v1; v2 (and v3) are stored.
fn three_on_v1(c: &Conductor, health: bool) -> Vec<SvcWorker> {
    let mut spec = json!({"name": "web", "command": "/bin/sleep", "args": ["1000"]});
    if health {
        spec["health"] = json!({"http": {"port": 8080, "path": "/healthz"}});
    }
    for _ in 0..3 {
        let (code, v) = call(c, "POST", "/api/v1/services", Some(spec.clone()));
        assert_eq!(code, 201, "{v}");
    }
    let ws: Vec<SvcWorker> = (0..3)
        .map(|i| {
            let e = enroll_labels(c, &format!("pi-{i}"), json!({"role": "web"}));
            let w = SvcWorker::connect(c, &e, &format!("pi-{i}"));
            wait_status(c, &e.id, "online", T);
            w
        })
        .collect();
    let (code, v) = call(
        c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"version": 1, "labels": {"role": "web"}})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["rollout"],
        Value::Null,
        "a first deployment applies at once"
    );
    let ok = if health {
        ServiceState::Healthy
    } else {
        ServiceState::Running
    };
    for w in &ws {
        w.wait_action("deploy v1", |x| is_deploy(x, "web", 1));
        w.report("web", 1, ok);
    }
    ws
}

fn got_v(w: &SvcWorker, v: u32) -> bool {
    w.actions().iter().any(|a| is_deploy(a, "web", v))
}

#[test]
fn failing_canary_reverts_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let ws = three_on_v1(&c, false);

    // A higher version through PUT: a rollout with the given policy.
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"version": 2, "labels": {"role": "web"},
                    "rollout": {"canary": 1, "settle_s": 1}})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["rollout"]["state"], "in_progress", "{v}");
    assert_eq!(
        v["deployment"]["version"], 1,
        "kept until the rollout succeeds"
    );
    let canary_id = v["rollout"]["waves"][0]["workers"][0]
        .as_str()
        .unwrap()
        .to_string();
    let canary = ws.iter().find(|w| w.id == canary_id).unwrap();
    canary.wait_action("deploy v2", |x| is_deploy(x, "web", 2));
    // A second rollout or another version meanwhile is refused.
    let (code, _) = call(
        &c,
        "POST",
        "/api/v1/services/web/rollout",
        Some(json!({"version": 3})),
    );
    assert_eq!(code, 409);
    let (code, _) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"version": 3, "labels": {"role": "web"}})),
    );
    assert_eq!(code, 409);

    canary.report_detail("web", 2, ServiceState::Failed, "2 restarts in 60 s");
    let r = wait_rollout_state(&c, "web", "reverted", T);
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains(&canary_id) && reason.contains("failed"),
        "{reason}"
    );
    // The canary goes back to v1; the others never saw v2.
    wait_for("canary back to v1", T, || {
        (canary
            .actions()
            .iter()
            .filter(|a| is_deploy(a, "web", 1))
            .count()
            >= 2)
            .then_some(())
    });
    let order: Vec<u32> = canary
        .actions()
        .iter()
        .filter_map(|a| match a {
            Action::DeployManifest(m) => Some(m.version),
            _ => None,
        })
        .collect();
    assert_eq!(order.last(), Some(&1), "{order:?}");
    assert!(order.contains(&2), "{order:?}");
    for w in ws.iter().filter(|w| w.id != canary_id) {
        assert!(!got_v(w, 2), "{} got v2: {:?}", w.id, w.actions());
    }
    let svc = c.get("/api/v1/services/web");
    assert_eq!(svc["deployment"]["version"], 1);
    assert_eq!(target(&svc, &canary_id)["desired_version"], 1);
    let hist = c.get("/api/v1/services/web/rollouts");
    assert_eq!(hist["rollouts"].as_array().unwrap().len(), 1);
    assert_eq!(hist["rollouts"][0]["from_version"], 1);
    assert_eq!(hist["rollouts"][0]["to_version"], 2);
    assert!(hist["rollouts"][0]["finished_ms"].as_u64().is_some());
    // These fake workers speak wire format 1 only (they send no format 2):
    // the conductor never sends them anything else.
    for w in &ws {
        let formats = w.formats.lock().unwrap().clone();
        assert!(!formats.is_empty(), "{} received commands", w.id);
        assert!(
            formats.iter().all(|f| *f == protocol::FORMAT_VERSION),
            "{}: {formats:?}",
            w.id
        );
        assert_eq!(
            c.get(&format!("/api/v1/workers/{}", w.id))["wire_format"],
            1
        );
    }
}

#[test]
fn healthy_canary_rolls_out_to_all_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let ws = three_on_v1(&c, true);
    let (code, r) = call(
        &c,
        "POST",
        "/api/v1/services/web/rollout",
        Some(json!({"version": 2, "canary_percent": 30, "settle_s": 1})),
    );
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["waves"][0]["workers"].as_array().unwrap().len(), 1);
    assert_eq!(r["waves"][1]["workers"].as_array().unwrap().len(), 2);
    let canary_id = r["waves"][0]["workers"][0].as_str().unwrap().to_string();
    let canary = ws.iter().find(|w| w.id == canary_id).unwrap();
    canary.wait_action("deploy v2", |x| is_deploy(x, "web", 2));
    // `running` is not enough when the spec has a health check.
    canary.report("web", 2, ServiceState::Running);

    // The conductor restarts mid-rollout: it resumes.
    let ids: Vec<(String, protocol::Secret, u64)> = ws
        .iter()
        .map(|w| {
            (
                w.id.clone(),
                w.secret.clone(),
                w.seq.load(std::sync::atomic::Ordering::SeqCst),
            )
        })
        .collect();
    drop(ws);
    c.stop();
    let c = Conductor::start(dir.path());
    let r = rollout_of(&c, "web");
    assert_eq!(r["state"], "in_progress", "{r}");
    let ws: Vec<SvcWorker> = ids
        .iter()
        .map(|(id, secret, seq)| {
            // Same identity, fresh MQTT login (the broker's port changed).
            let e = reenroll(&c, id, secret);
            SvcWorker::connect_from(&c, &e, id, *seq)
        })
        .collect();
    for w in &ws {
        wait_status(&c, &w.id, "online", T);
        let v = if w.id == canary_id { 2 } else { 1 };
        w.report("web", v, ServiceState::Running);
    }
    std::thread::sleep(Duration::from_millis(2500));
    for w in ws.iter().filter(|w| w.id != canary_id) {
        assert!(!got_v(w, 2), "moved before the canary was healthy");
    }
    let canary = ws.iter().find(|w| w.id == canary_id).unwrap();
    canary.report("web", 2, ServiceState::Healthy);
    for w in ws.iter().filter(|w| w.id != canary_id) {
        w.wait_action("deploy v2", |x| is_deploy(x, "web", 2));
        w.report("web", 2, ServiceState::Healthy);
    }
    let r = wait_rollout_state(&c, "web", "succeeded", T);
    assert_eq!(r["wave"], 1);
    let svc = c.get("/api/v1/services/web");
    assert_eq!(svc["deployment"]["version"], 2);
    for w in &ws {
        assert_eq!(target(&svc, &w.id)["in_sync"], true, "{svc}");
    }
}

/// Re-enrols worker `id` (same identity) and returns fresh MQTT credentials.
fn reenroll(c: &Conductor, id: &str, secret: &protocol::Secret) -> Enrolled {
    let (code, v) = c.enroll(json!({
        "token": c.started.local_enroll_token,
        "hostname": id,
        "machine_id": format!("mid-{id}"),
        "labels": {"role": "web"},
        "worker_id": id,
        "proof": protocol::reenroll_proof(secret, id),
    }));
    assert_eq!(code, 200, "{v}");
    Enrolled {
        id: id.to_string(),
        secret: secret.clone(),
        username: v["mqtt_username"].as_str().unwrap().into(),
        password: v["mqtt_password"].as_str().unwrap().into(),
        mqtt_url: v["mqtt_url"].as_str().unwrap().into(),
    }
}

#[test]
fn log_relay_streams_chunks_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = enroll_labels(&c, "pi-log", json!({}));
    let w = SvcWorker::connect(&c, &e, "pi-log");
    wait_status(&c, &e.id, "online", T);

    let url = c.url(&format!(
        "/api/v1/workers/{}/services/web/logs?tail=4096&follow=30",
        e.id
    ));
    let auth = format!("Bearer {}", c.admin());
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, u16>>();
    let reader = std::thread::spawn(move || {
        let req = ureq::http::Request::builder()
            .method("GET")
            .uri(&url)
            .header("Authorization", &auth)
            .body(())
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent.run(req).unwrap();
        if resp.status() != 200 {
            let _ = tx.send(Err(resp.status().as_u16()));
            return;
        }
        let mut body = resp.into_body().into_reader();
        let mut buf = [0u8; 4096];
        loop {
            match body.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = tx.send(Ok(buf[..n].to_vec()));
                }
            }
        }
    });
    let (cmd_id, act) = w.wait_command("logs", |a| matches!(a, Action::Logs(_)));
    match &act {
        Action::Logs(r) => {
            assert_eq!(
                (r.name.as_str(), r.tail_bytes, r.follow_s),
                ("web", 4096, 30)
            );
        }
        other => panic!("{other:?}"),
    }
    let chunk = |index: u32, data: &str, last: bool| {
        Body::LogChunk(protocol::LogChunk {
            cmd_id,
            name: protocol::bounded("web"),
            index,
            data: heapless::Vec::from_slice(data.as_bytes()).unwrap(),
            last,
        })
    };
    w.send(chunk(0, "line one\n", false), TopicKind::Logs);
    // Streamed: the first chunk arrives before the worker sent the last.
    let first = rx.recv_timeout(T).unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&first), "line one\n");
    // A chunk for another command is not mixed in.
    w.send(
        Body::LogChunk(protocol::LogChunk {
            cmd_id: cmd_id + 1000,
            name: protocol::bounded("web"),
            index: 1,
            data: heapless::Vec::from_slice(b"stray\n").unwrap(),
            last: true,
        }),
        TopicKind::Logs,
    );
    w.send(chunk(1, "line two\n", false), TopicKind::Logs);
    w.send(chunk(2, "line three\n", true), TopicKind::Logs);
    let started = Instant::now();
    let mut rest = Vec::new();
    while let Ok(Ok(b)) = rx.recv_timeout(T) {
        rest.extend(b);
    }
    reader.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "ended at last");
    assert_eq!(String::from_utf8_lossy(&rest), "line two\nline three\n");

    // Nothing from the worker within 5 s: 504; an offline worker: 504 at once.
    let silent = c.call(
        "GET",
        &format!("/api/v1/workers/{}/services/web/logs", e.id),
        Some(&c.admin()),
        None,
    );
    assert_eq!(silent.0, 504, "{}", silent.1);
    let off = enroll_labels(&c, "pi-off", json!({}));
    let t = Instant::now();
    let (code, _) = call(
        &c,
        "GET",
        &format!("/api/v1/workers/{}/services/web/logs", off.id),
        None,
    );
    assert_eq!(code, 504);
    assert!(t.elapsed() < Duration::from_secs(2));
    let (code, _) = call(
        &c,
        "GET",
        &format!("/api/v1/workers/{}/services/web/logs?follow=301", e.id),
        None,
    );
    assert_eq!(code, 400);
}

#[test]
fn service_metrics_events_and_persistent_stop() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = enroll_labels(&c, "pi-m", json!({}));
    let w = SvcWorker::connect(&c, &e, "pi-m");
    wait_status(&c, &e.id, "online", T);
    let (code, _) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(json!({"name": "web", "command": "/bin/sleep"})),
    );
    assert_eq!(code, 201);
    let (code, _) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"workers": [e.id]})),
    );
    assert_eq!(code, 200);
    w.wait_action("deploy", |x| is_deploy(x, "web", 1));
    w.report("web", 1, ServiceState::Running);

    let mut samples = heapless::Vec::new();
    for (k, v) in [("requests_total", 42i64), ("queue_depth", -3)] {
        let _ = samples.push(protocol::Sample {
            key: protocol::bounded(k),
            value: v,
        });
    }
    w.send(
        Body::ServiceMetrics(protocol::ServiceMetrics {
            name: protocol::bounded("web"),
            samples,
        }),
        TopicKind::ServiceMetrics,
    );
    w.send(
        Body::Event(protocol::Event {
            kind: protocol::EventKind::ServiceEvent,
            detail: protocol::bounded("web: cache warmed"),
        }),
        TopicKind::Events,
    );
    let svc = wait_for("metrics", T, || {
        let v = c.get("/api/v1/services/web");
        (target(&v, &e.id)["actual"]["metrics"]["requests_total"] == 42).then_some(v)
    });
    assert_eq!(target(&svc, &e.id)["actual"]["metrics"]["queue_depth"], -3);
    assert_eq!(svc["events"][0]["kind"], "ServiceEvent", "{svc}");
    assert_eq!(svc["events"][0]["detail"], "web: cache warmed");
    let prom = c.prometheus();
    assert!(
        prom.contains(&format!(
            "aerekos_service_metric{{worker_id=\"{}\",service=\"web\",key=\"requests_total\"}} 42",
            e.id
        )),
        "{prom}"
    );
    let ws = c.get(&format!("/api/v1/workers/{}/services", e.id));
    assert_eq!(ws["services"][0]["actual"]["metrics"]["requests_total"], 42);

    // A per-worker stop is kept: reconciliation stops it again if it runs.
    let (code, v) = call(
        &c,
        "POST",
        &format!("/api/v1/workers/{}/services/web/stop", e.id),
        None,
    );
    assert_eq!(code, 200, "{v}");
    let stops = || {
        w.actions()
            .iter()
            .filter(|a| matches!(a, Action::Stop(n) if n.as_str() == "web"))
            .count()
    };
    assert_eq!(stops(), 1);
    w.report("web", 1, ServiceState::Running);
    wait_for("stopped again", T, || (stops() >= 2).then_some(()));
    let ws = c.get(&format!("/api/v1/workers/{}/services", e.id));
    assert_eq!(ws["services"][0]["desired"]["state"], "stopped");
    w.report("web", 1, ServiceState::Stopped);
    wait_for("in sync stopped", T, || {
        let v = c.get("/api/v1/services/web");
        (target(&v, &e.id)["in_sync"] == true).then_some(())
    });
    // `start` clears it.
    let (code, _) = call(
        &c,
        "POST",
        &format!("/api/v1/workers/{}/services/web/start", e.id),
        None,
    );
    assert_eq!(code, 200);
    w.report("web", 1, ServiceState::Running);
    let n = stops();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stops(), n);
    let v = c.get("/api/v1/services/web");
    assert_eq!(target(&v, &e.id)["desired_state"], "running");
}

// ---- Sealed manifests: the secrets travel only sealed to their worker ----

use test_support::leaks::{holds as contains, leak_forms};

#[test]
fn sealed_manifests_carry_no_secret_and_open_only_for_their_worker() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start_with(test_config(dir.path()));
    let ea = enroll_labels(&c, "pi-a", json!({}));
    let eb = enroll_labels(&c, "pi-b", json!({}));
    let a = SvcWorker::connect(&c, &ea, "pi-a");
    let b = SvcWorker::connect(&c, &eb, "pi-b");
    wait_status(&c, &ea.id, "online", T);
    wait_status(&c, &eb.id, "online", T);
    let mut rnd = [0u8; 12];
    getrandom::fill(&mut rnd).unwrap();
    let value = format!("sealed-secret-{}", protocol::hex_string(&rnd));
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(
            json!({"name": "vault", "command": "/bin/sleep", "args": ["1000"],
            "config": {"mode": "test"}, "secrets": {"DB_PASSWORD": value}}),
        ),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/vault/deployment",
        Some(json!({"workers": [ea.id]})),
    );
    assert_eq!(code, 200, "{v}");
    let act = a.wait_action("deploy", |x| is_deploy(x, "vault", 1));
    let Action::DeployManifest(r) = &act else {
        panic!("{act:?}")
    };

    // The sealed answer: binary, not to be cached, no form of the secret.
    let spath = "/api/v1/agent/sealed-manifests/vault/1";
    let (code, headers, sealed) = agent_get(&c, spath, &a.http_auth(spath));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&sealed));
    let header = |name: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("content-type"), ["application/octet-stream"]);
    assert_eq!(header("cache-control"), ["no-store"]);
    for (form, bytes) in leak_forms(&value) {
        assert!(!contains(&sealed, &bytes), "the secret as {form} is in it");
    }
    assert!(!contains(&sealed, b"DB_PASSWORD") && !contains(&sealed, b"/bin/sleep"));

    // It opens with the worker's secret to exactly the manifest whose
    // digest the command carried: the plaintext route's bytes.
    let ctx = protocol::sealed::manifest_context(&ea.id, "vault", 1);
    let opened = protocol::sealed::open(&a.secret, ctx.as_bytes(), &sealed).unwrap();
    assert_eq!(protocol::manifest::digest(&opened), r.digest);
    let m = protocol::Manifest::decode_verified(&opened, r).unwrap();
    assert_eq!(m.secrets["DB_PASSWORD"], value);
    let ppath = "/api/v1/agent/manifests/vault/1";
    let (code, _, plain) = agent_get(&c, ppath, &a.http_auth(ppath));
    assert_eq!((code, &plain), (200, &opened), "the plaintext route stays");
    assert_eq!(sealed.len(), opened.len() + protocol::sealed::OVERHEAD);
    assert_eq!(sealed[0], protocol::sealed::SEALED_FORMAT);
    // A fresh nonce per answer: other bytes, the same manifest.
    let (_, _, again) = agent_get(&c, spath, &a.http_auth(spath));
    assert_ne!(again[1..13], sealed[1..13]);
    assert_eq!(
        protocol::sealed::open(&a.secret, ctx.as_bytes(), &again).unwrap(),
        opened
    );

    // Another worker cannot open it (with its own secret, under either id),
    // nor does it get one of its own (not targeted: 404).
    let ctx_b = protocol::sealed::manifest_context(&eb.id, "vault", 1);
    for cx in [&ctx, &ctx_b] {
        assert_eq!(
            protocol::sealed::open(&b.secret, cx.as_bytes(), &sealed),
            Err(protocol::sealed::SealError::BadTag)
        );
    }
    let (code, _, body) = agent_get(&c, spath, &b.http_auth(spath));
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
    assert!(!contains(&body, value.as_bytes()));
    // Nor as another version or service of a's (404 before any sealing).
    let v9 = "/api/v1/agent/sealed-manifests/vault/9";
    assert_eq!(agent_get(&c, v9, &a.http_auth(v9)).0, 404);

    // Unauthenticated, forged, another path's tag, a bearer token: 401.
    let (code, _, body) = http_raw("GET", &c.url(spath), &[], vec![]);
    assert_eq!(code, 401);
    assert!(!contains(&body, value.as_bytes()));
    let forged = protocol::manifest::http_auth(&b.secret, &ea.id, "GET", spath);
    assert_eq!(agent_get(&c, spath, &forged).0, 401);
    assert_eq!(agent_get(&c, spath, &a.http_auth(ppath)).0, 401);
    assert_eq!(
        agent_get(&c, spath, &format!("Bearer {}", c.admin())).0,
        401
    );
    // What an older conductor does with the sealed route (an agent path it
    // does not know falls through to the bearer-token API): 401, which is
    // why the worker falls back to the plaintext route on 401 as on 404.
    let unknown = "/api/v1/agent/no-such-route/vault/1";
    assert_eq!(agent_get(&c, unknown, &a.http_auth(unknown)).0, 401);
}
