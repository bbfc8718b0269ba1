//! Agent self-update, conductor side: the release key at enrolment, signed
//! releases checked against it, agent rollouts in waves that pass on the
//! reported version and stop at a worker's rollback, the alert that
//! reports it. Real in-process conductor, fake MQTT workers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use protocol::topic::TopicKind;
use protocol::{Action, Body};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

fn keypair() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn start(key: &Ed25519KeyPair) -> (tempfile::TempDir, Conductor) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.release_key = Some(protocol::hex_string(key.public_key().as_ref()));
    cfg.alert_interval = "100ms".into();
    let c = Conductor::start_with(cfg);
    (dir, c)
}

fn upload(c: &Conductor, arch: &str, bytes: &[u8]) -> String {
    let auth = format!("Bearer {}", c.admin());
    let (code, _, body) = http_raw(
        "POST",
        &c.url(&format!("/api/v1/artifacts?arch={arch}&name=edge-worker")),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        bytes.to_vec(),
    );
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["sha256"].as_str().unwrap().to_string()
}

fn release_body(key: &Ed25519KeyPair, version: &str, arch: &str, sha_hex: &str) -> Value {
    let sha: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&sha_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let sig = key.sign(&protocol::release::signed_message(version, arch, &sha).unwrap());
    json!({"version": version, "arch": arch, "sha256": sha_hex,
           "signature": protocol::hex_string(sig.as_ref())})
}

/// Uploads an aarch64 agent binary for `version` and publishes its
/// release signed with `key`; the binary's SHA-256 (hex).
fn publish_release(c: &Conductor, key: &Ed25519KeyPair, version: &str) -> String {
    let sha = upload(c, "aarch64", format!("\x7fELF agent {version}").as_bytes());
    let (code, v) = call(
        c,
        "POST",
        "/api/v1/agent-releases",
        Some(release_body(key, version, "aarch64", &sha)),
    );
    assert_eq!(code, 201, "{v}");
    sha
}

/// A Birth reporting agent `version` (aarch64).
fn birth_at(hostname: &str, version: &str) -> Body {
    let mut b = birth(hostname, 60_000);
    if let Body::Birth(x) = &mut b {
        x.agent_version = protocol::bounded(version);
    }
    b
}

fn is_update(a: &Action, version: &str) -> bool {
    matches!(a, Action::UpdateAgent(u) if u.version.as_str() == version)
}

fn rollout(c: &Conductor, id: &Value) -> Value {
    c.get(&format!("/api/v1/agent-rollouts/{id}"))
}

fn wait_state(c: &Conductor, id: &Value, state: &str) -> Value {
    wait_for(&format!("agent rollout {state}"), T, || {
        let r = rollout(c, id);
        (r["state"] == state).then_some(r)
    })
}

fn member<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["worker_id"] == id)
        .unwrap_or_else(|| panic!("{id} not a member: {r}"))
}

#[test]
fn releases_are_checked_against_the_release_key() {
    let key = keypair();
    let (_dir, c) = start(&key);

    // Workers pin the key from their enrolment (this one is never online).
    let Body::Birth(inventory) = birth("pi", 60_000) else {
        unreachable!()
    };
    let (code, v) = c.enroll(
        json!({"token": c.started.local_enroll_token, "hostname": "pi",
                                    "inventory": inventory}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["release_key"],
        protocol::hex_string(key.public_key().as_ref())
    );

    let sha = upload(&c, "aarch64", b"\x7fELF agent 0.2.0");
    // Signed with another key: refused, nothing stored.
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-releases",
        Some(release_body(&keypair(), "0.2.0", "aarch64", &sha)),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("does not verify"),
        "{v}"
    );
    // Signed for another arch.
    let mut moved = release_body(&key, "0.2.0", "aarch64", &sha);
    moved["arch"] = json!("x86_64");
    let (code, _) = call(&c, "POST", "/api/v1/agent-releases", Some(moved));
    assert_eq!(code, 400);
    // Invalid fields.
    let mut bad = release_body(&key, "0.2.0", "aarch64", &sha);
    bad["version"] = json!("0.2");
    let (code, v) = call(&c, "POST", "/api/v1/agent-releases", Some(bad));
    assert_eq!(code, 400, "{v}");
    // Properly signed, but the binary was never uploaded.
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-releases",
        Some(release_body(&key, "0.2.0", "aarch64", &"ab".repeat(32))),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("upload"), "{v}");

    let good = release_body(&key, "0.2.0", "aarch64", &sha);
    let (code, v) = call(&c, "POST", "/api/v1/agent-releases", Some(good.clone()));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["size"], 16);
    assert_eq!(v["sha256"], sha);
    let (code, _) = call(&c, "POST", "/api/v1/agent-releases", Some(good));
    assert_eq!(code, 200, "the same release again");
    let other = upload(&c, "aarch64", b"\x7fELF another 0.2.0");
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-releases",
        Some(release_body(&key, "0.2.0", "aarch64", &other)),
    );
    assert_eq!(code, 409, "{v}");
    let list = c.get("/api/v1/agent-releases");
    assert_eq!(list["releases"].as_array().unwrap().len(), 1, "{list}");

    // Its binary stays while the release exists.
    let (code, v) = call(&c, "DELETE", &format!("/api/v1/artifacts/{sha}"), None);
    assert_eq!(code, 409, "{v}");
    // No release of that version; no worker online to canary.
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.3.0"})),
    );
    assert_eq!(code, 404, "{v}");
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.2.0", "trial_s": 1})),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.2.0"})),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("online"), "{v}");
    // Nobody the selector matches: done at once.
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.2.0", "selector": {"site": "nowhere"}})),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["state"], "succeeded", "{v}");

    let (code, _) = call(&c, "DELETE", "/api/v1/agent-releases/0.2.0/aarch64", None);
    assert_eq!(code, 204);
    let (code, _) = call(&c, "DELETE", "/api/v1/agent-releases/0.2.0/aarch64", None);
    assert_eq!(code, 404);
    let (code, _) = call(&c, "DELETE", &format!("/api/v1/artifacts/{sha}"), None);
    assert_eq!(code, 204);
    c.stop();

    // Without a key: nothing to pin, no release accepted.
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let (_, v) = c.enroll(json!({"token": c.started.local_enroll_token, "hostname": "pi"}));
    assert!(v.get("release_key").is_none(), "{v}");
    let sha = upload(&c, "aarch64", b"\x7fELF agent");
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/agent-releases",
        Some(release_body(&key, "0.2.0", "aarch64", &sha)),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no release key"),
        "{v}"
    );
}

#[test]
fn an_agent_rollout_updates_the_canary_then_the_rest() {
    let key = keypair();
    let (_dir, c) = start(&key);
    let sha = publish_release(&c, &key, "0.2.0");
    let ws: Vec<(Enrolled, SvcWorker)> = (0..3)
        .map(|i| {
            let e = enroll_labels(&c, &format!("pi-{i}"), json!({"site": "shop"}));
            let w = SvcWorker::connect(&c, &e, &format!("pi-{i}"));
            wait_status(&c, &e.id, "online", T);
            (e, w)
        })
        .collect();
    let other = enroll_labels(&c, "elsewhere", json!({"site": "lab"}));
    let _o = SvcWorker::connect(&c, &other, "elsewhere");

    let (code, r) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(
            json!({"version": "0.2.0", "canary": 1, "settle_s": 1, "trial_s": 30,
                    "selector": {"site": "shop"}}),
        ),
    );
    assert_eq!(code, 201, "{r}");
    assert_eq!(r["state"], "in_progress");
    assert_eq!(
        r["members"].as_array().unwrap().len(),
        3,
        "the selector: {r}"
    );
    assert_eq!(r["policy"]["trial_s"], 30);
    let id = r["id"].clone();
    // One at a time.
    let (code, _) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.2.0"})),
    );
    assert_eq!(code, 409);
    let (code, _) = call(&c, "DELETE", "/api/v1/agent-releases/0.2.0/aarch64", None);
    assert_eq!(code, 409, "in use");

    let canary_id = r["waves"][0]["workers"][0].as_str().unwrap().to_string();
    let canary = &ws.iter().find(|(e, _)| e.id == canary_id).unwrap().1;
    match canary.wait_action("UpdateAgent", |a| is_update(a, "0.2.0")) {
        Action::UpdateAgent(u) => {
            assert_eq!(u.arch.as_str(), "aarch64");
            assert_eq!(protocol::hex_string(&u.sha256), sha);
            assert_eq!(u.size, 16);
            assert_eq!(u.trial_s, 30);
            assert!(!u.allow_downgrade);
            let m = protocol::release::signed_message("0.2.0", "aarch64", &u.sha256).unwrap();
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ED25519,
                key.public_key().as_ref(),
            )
            .verify(&m, &u.signature)
            .unwrap();
        }
        other => panic!("{other:?}"),
    }
    std::thread::sleep(Duration::from_millis(500));
    for (e, w) in &ws {
        if e.id != canary_id {
            assert!(
                !w.actions().iter().any(|a| is_update(a, "0.2.0")),
                "only the canary first"
            );
        }
    }
    // The new binary on trial reports 0.2.0: that is not a pass yet.
    canary.send(birth_at("pi-canary", "0.2.0"), TopicKind::Birth);
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        member(&rollout(&c, &id), &canary_id)["state"],
        "sent",
        "on trial, not switched"
    );
    // The switched agent says so: after settling, the rest follow.
    let switched = |w: &SvcWorker, host: &str| {
        w.send(
            Body::Event(protocol::Event {
                kind: protocol::EventKind::AgentUpdated,
                detail: protocol::bounded("0.1.0 -> 0.2.0"),
            }),
            TopicKind::Events,
        );
        w.send(birth_at(host, "0.2.0"), TopicKind::Birth);
    };
    switched(canary, "pi-canary");
    for (_, w) in &ws {
        w.wait_action("UpdateAgent", |a| is_update(a, "0.2.0"));
        if w.id != canary_id {
            switched(w, "pi");
        }
    }
    let r = wait_state(&c, &id, "succeeded");
    assert_eq!(r["counts"]["updated"], 3, "{r}");
    assert_eq!(member(&r, &canary_id)["from_version"], "0.1.0");
    assert!(_o.actions().iter().all(|a| !is_update(a, "0.2.0")));

    let workers = c.get("/api/v1/workers");
    let versions: Vec<&str> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["agent_version"].as_str().unwrap())
        .collect();
    assert_eq!(versions.iter().filter(|v| **v == "0.2.0").count(), 3);
    let prom = c.prometheus();
    assert_eq!(
        prom_value(&prom, "aerekos_workers_by_agent_version{version=\"0.2.0\"}"),
        3
    );
    assert_eq!(
        prom_value(&prom, "aerekos_workers_by_agent_version{version=\"0.1.0\"}"),
        1
    );
    let list = c.get("/api/v1/agent-rollouts");
    assert_eq!(list["rollouts"][0]["id"], id);
    // Ended: nothing to abort.
    let (code, _) = call(
        &c,
        "POST",
        &format!("/api/v1/agent-rollouts/{id}/abort"),
        None,
    );
    assert_eq!(code, 409);
}

#[test]
fn a_rolled_back_canary_stops_the_agent_rollout_and_alerts() {
    let key = keypair();
    let (_dir, c) = start(&key);
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/alert-rules",
        Some(json!({"name": "agent", "kind": "agent_update_failed"})),
    );
    assert_eq!(code, 201, "{v}");
    publish_release(&c, &key, "0.99.0");
    let ws: Vec<SvcWorker> = (0..2)
        .map(|i| {
            let e = enroll_labels(&c, &format!("pi-{i}"), json!({}));
            let w = SvcWorker::connect(&c, &e, &format!("pi-{i}"));
            wait_status(&c, &e.id, "online", T);
            w
        })
        .collect();
    let (code, r) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.99.0", "settle_s": 1})),
    );
    assert_eq!(code, 201, "{r}");
    let id = r["id"].clone();
    let canary_id = r["waves"][0]["workers"][0].as_str().unwrap().to_string();
    let canary = ws.iter().find(|w| w.id == canary_id).unwrap();
    let rest = ws.iter().find(|w| w.id != canary_id).unwrap();
    canary.wait_action("UpdateAgent", |a| is_update(a, "0.99.0"));
    // The trial fails on the device; the old agent is back and says so.
    canary.send(
        Body::Event(protocol::Event {
            kind: protocol::EventKind::AgentUpdateFailed,
            detail: protocol::bounded(
                "0.99.0: rolled back: exited with exit status: 3 during the trial",
            ),
        }),
        TopicKind::Events,
    );
    let r = wait_state(&c, &id, "reverted");
    assert_eq!(
        r["reason"],
        format!(
            "wave 0 failed: {canary_id}: 0.99.0: rolled back: exited with exit status: 3 during the trial"
        ),
        "{r}"
    );
    assert_eq!(member(&r, &canary_id)["state"], "failed");
    assert_eq!(member(&r, &rest.id)["state"], "skipped");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !rest.actions().iter().any(|a| is_update(a, "0.99.0")),
        "later waves never start"
    );
    let alerts = wait_for("the agent_update_failed alert", T, || {
        let v = c.get("/api/v1/alerts?state=firing");
        (!v["alerts"].as_array().unwrap().is_empty()).then_some(v)
    });
    assert_eq!(
        alerts["alerts"][0]["kind"], "agent_update_failed",
        "{alerts}"
    );
    assert!(alerts["alerts"][0]["summary"]
        .as_str()
        .unwrap()
        .contains("rolled back"));

    // A second attempt, aborted by hand: no alert for that one.
    let (code, r) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.99.0", "settle_s": 1})),
    );
    assert_eq!(code, 201, "{r}");
    let (code, v) = call(
        &c,
        "POST",
        &format!("/api/v1/agent-rollouts/{}/abort", r["id"]),
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "reverted");
    assert_eq!(v["reason"], "aborted by request");
    let (code, _) = call(&c, "GET", "/api/v1/agent-rollouts/999", None);
    assert_eq!(code, 404);
}

#[test]
fn a_restart_keeps_what_the_agents_said_and_the_trial_holds() {
    let key = keypair();
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut cfg = test_config(dir.path());
        cfg.release_key = Some(protocol::hex_string(key.public_key().as_ref()));
        cfg
    };
    let c = Conductor::start_with(config());
    publish_release(&c, &key, "0.2.0");
    let e = enroll_labels(&c, "pi-0", json!({"site": "shop"}));
    let w = SvcWorker::connect(&c, &e, "pi-0");
    wait_status(&c, &e.id, "online", T);
    let (code, r) = call(
        &c,
        "POST",
        "/api/v1/agent-rollouts",
        Some(json!({"version": "0.2.0", "canary": 1, "settle_s": 1, "trial_s": 30})),
    );
    assert_eq!(code, 201, "{r}");
    let id = r["id"].clone();
    // It replies Ok (SvcWorker does), restarts on the new binary, on trial:
    // 0.2.0 reported, no `AgentUpdated`.
    w.wait_action("UpdateAgent", |a| is_update(a, "0.2.0"));
    w.send(birth_at("pi-0", "0.2.0"), TopicKind::Birth);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        member(&rollout(&c, &id), &e.id)["state"],
        "sent",
        "on trial"
    );
    let seq = w.seq.load(std::sync::atomic::Ordering::SeqCst);
    drop(w);
    c.stop();

    // The conductor restarts (or a standby takes over) while the agent is on
    // trial: the trial still holds, as the notes came back from the store.
    // Before they were kept, a member sent before the start passed on its
    // version alone.
    let c = Conductor::start_with(config());
    let w = SvcWorker::connect_from(&c, &e, "pi-0", seq);
    w.send(birth_at("pi-0", "0.2.0"), TopicKind::Birth);
    wait_status(&c, &e.id, "online", T);
    std::thread::sleep(Duration::from_millis(2_500));
    let r = rollout(&c, &id);
    assert_eq!(member(&r, &e.id)["state"], "sent", "still on trial: {r}");
    assert_eq!(r["state"], "in_progress", "{r}");
    // The switched agent says so: it passes.
    w.send(
        Body::Event(protocol::Event {
            kind: protocol::EventKind::AgentUpdated,
            detail: protocol::bounded("0.1.0 -> 0.2.0"),
        }),
        TopicKind::Events,
    );
    let r = wait_state(&c, &id, "succeeded");
    assert_eq!(r["counts"]["updated"], 1, "{r}");
}
