//! Per-worker logins on NATS in operator mode (`conductor nats-auth`,
//! `--nats-account-seed`), against a real `nats-server`: each worker
//! enrols with a JWT of its own as its MQTT password and a client id other
//! workers cannot guess; with that login a worker reaches its own topics
//! only: it cannot read another's commands, subscribe to everything or to
//! the gateway's internal subjects, or publish on another's topics; a login
//! not signed by the fleet account is refused. Logins expire
//! (`AEREKOS_NATS_LOGIN_TTL`): a worker renews its own, a revoked one gets
//! none and stays off the bus.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::net::SocketAddr;
use std::time::Duration;

use e2e::nats::NatsCluster;
use e2e::*;
use protocol::topic::{topic, TopicKind};
use rumqttc::SubscribeReasonCode;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Every `aerekos_frames_rejected_total` reason.
const REASONS: [&str; 11] = [
    "oversized",
    "truncated",
    "version",
    "malformed",
    "unknown_worker",
    "revoked",
    "topic_mismatch",
    "bad_tag",
    "replayed",
    "too_old",
    "duplicate",
];

fn state_of(w: &Worker) -> Value {
    serde_json::from_str(&std::fs::read_to_string(w.state_dir.join("state.json")).unwrap()).unwrap()
}

/// The MQTT client ids connected to node 0.
fn client_ids(nats: &NatsCluster) -> Vec<String> {
    let connz = nats.monitor(0, "/connz?limit=1000");
    connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["mqtt_client"].as_str().map(str::to_string))
        .collect()
}

/// One NATS node in operator mode, a conductor holding the fleet
/// account's seed (with `env`), and workers `a` and `b` enrolled with it.
struct Fleet {
    nats: NatsCluster,
    c: Conductor,
    a: Worker,
    b: Worker,
}

impl Fleet {
    /// `None`: nats-server is missing (skipped, see `e2e::nats`).
    fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> Option<Fleet> {
        let (nats, seed) = NatsCluster::start_operator(&dir.join("nats"), 1)?;
        let bus = nats.conductor_url();
        let seed = seed.display().to_string();
        let c = Conductor::start_with_env(
            &dir.join("c"),
            &["--mqtt-url", &bus, "--nats-account-seed", &seed],
            env,
        );
        let token = c.registration_token();
        let worker = |name: &str| {
            Worker::start(
                &dir.join(name),
                &c.url(),
                Some(&token),
                WorkerOpts::named(name),
            )
        };
        let (a, b) = (worker("a"), worker("b"));
        Some(Fleet { nats, c, a, b })
    }
}

#[test]
fn each_worker_gets_a_nats_login_of_its_own_that_reaches_only_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Fleet {
        nats,
        c,
        mut a,
        mut b,
    }) = Fleet::start(dir.path(), &[])
    else {
        return;
    };
    let (ia, ib) = (a.wait_id(), b.wait_id());
    for id in [&ia, &ib] {
        wait_for("the worker online with metrics", SECS(60), || {
            let (_, v) = c.get(&format!("/api/v1/workers/{id}"));
            (v["status"] == "online" && !v["metrics"].is_null()).then_some(())
        });
        let (status, reply) = c.post(
            &format!("/api/v1/workers/{id}/commands"),
            &json!({"action": "ping"}),
        );
        assert_eq!(status, 200, "a command through NATS: {reply}");
    }

    // Logins of their own: a JWT each, and client ids that are not the
    // worker ids (nor `conductor` for the conductor).
    let (sa, sb) = (state_of(&a), state_of(&b));
    assert_eq!(sa["mqtt_username"], ia.as_str());
    let (pa, pb) = (
        sa["mqtt_password"].as_str().unwrap().to_string(),
        sb["mqtt_password"].as_str().unwrap().to_string(),
    );
    assert!(pa.starts_with("eyJ") && pa.split('.').count() == 3, "{pa}");
    assert_ne!(pa, pb);
    let cid_a = sa["mqtt_client_id"].as_str().unwrap().to_string();
    assert!(cid_a.starts_with(&format!("{ia}-")), "{cid_a}");
    let ids = client_ids(&nats);
    assert!(ids.contains(&cid_a), "{ids:?}");
    assert!(
        !ids.iter().any(|i| i == "conductor" || *i == ia || *i == ib),
        "guessable client ids: {ids:?}"
    );
    assert_eq!(ids.len(), 3, "A, B and the conductor: {ids:?}");

    // A login the fleet account did not sign is refused: garbage, and a
    // token of the same shape signed by another account.
    let node: SocketAddr = format!("127.0.0.1:{}", nats.mqtt_port(0)).parse().unwrap();
    assert!(MqttClient::connect(node, "x-1", Some((&ia, "not-a-jwt"))).is_none());
    let other = tempfile::tempdir().unwrap();
    conductor::nats_auth::generate(&other.path().join("other.conf"), other.path()).unwrap();
    let foreign = conductor::nats_auth::FleetAccount::load(
        &other.path().join(conductor::nats_auth::ACCOUNT_SEED),
    )
    .unwrap()
    .worker_jwt(&ia, std::time::Duration::from_secs(3600))
    .unwrap();
    assert!(
        MqttClient::connect(node, "x-2", Some((&ia, &foreign))).is_none(),
        "a login signed by another account"
    );
    // A's own login connects (the same call, so the refusals above are not
    // the client's doing).
    let own = MqttClient::connect(node, "x-3", Some((&ia, &pa))).expect("A's login");
    drop(own);

    // With A's own login (A stopped, its client id taken over):
    drop(a);
    let forged = MqttClient::connect(node, &cid_a, Some((&ia, &pa))).expect("A's own login");
    // its own commands: yes;
    assert!(matches!(
        forged
            .subscribe_acked(&topic(&ia, TopicKind::Cmd))
            .as_slice(),
        [SubscribeReasonCode::Success(_)]
    ));
    // B's commands, everything, the gateway's internal subjects: no.
    for filter in [
        topic(&ib, TopicKind::Cmd),
        topic(&ib, TopicKind::Stored),
        "aerekos/v1/+/cmd".to_string(),
        "#".to_string(),
        "$MQTT/sub/#".to_string(),
    ] {
        assert_eq!(
            forged.subscribe_acked(&filter),
            vec![SubscribeReasonCode::Failure],
            "A subscribed to {filter}"
        );
    }
    // Publishing garbage on its own metrics reaches the conductor (which
    // rejects it); on B's, it is dropped by NATS.
    let rejected = || -> f64 { REASONS.iter().map(|r| c.rejected(r)).sum() };
    let before = rejected();
    forged.publish(&topic(&ia, TopicKind::Metrics), vec![9, 9, 9]);
    wait_for("A's garbage rejected by the conductor", SECS(10), || {
        (rejected() > before).then_some(())
    });
    let before = rejected();
    forged.publish(&topic(&ib, TopicKind::Metrics), vec![9, 9, 9]);
    forged.publish(&topic(&ib, TopicKind::Status), b"offline".to_vec());
    std::thread::sleep(SECS(2));
    assert_eq!(
        rejected(),
        before,
        "A's publish on B's topic reached the conductor"
    );
    let (_, v) = c.get(&format!("/api/v1/workers/{ib}"));
    assert_eq!(v["status"], "online", "A marked B offline: {v}");
    // B still takes commands.
    let (status, reply) = c.post(
        &format!("/api/v1/workers/{ib}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!(status, 200, "{reply}");

    // The observer login from the API reads the tree and publishes nothing.
    let (_, info) = c.get("/api/v1/mqtt");
    let (ou, op) = (
        info["observer_username"].as_str().unwrap().to_string(),
        info["observer_password"].as_str().unwrap().to_string(),
    );
    let obs = MqttClient::connect(node, "explorer", Some((&ou, &op))).expect("observer login");
    assert!(matches!(
        obs.subscribe_acked("aerekos/v1/#").as_slice(),
        [SubscribeReasonCode::Success(_)]
    ));
    let metrics = topic(&ib, TopicKind::Metrics);
    assert!(
        obs.recv_until(SECS(15), |t, _| t == metrics).is_some(),
        "the observer reads B's metrics"
    );
    let before = rejected();
    obs.publish(&topic(&ib, TopicKind::Metrics), vec![9, 9, 9]);
    std::thread::sleep(SECS(2));
    assert_eq!(rejected(), before, "the observer published");
}

/// `--nats-login-ttl`: NATS closes a worker's connection when its login
/// expires and refuses the login; the agent re-enrols with its proof for a
/// fresh one and goes on. A revoked worker is refused at that re-enrolment
/// and stays off the bus: the expiry is the revocation.
#[test]
fn an_expired_nats_login_is_renewed_and_a_revoked_worker_gets_none() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("AEREKOS_NATS_LOGIN_TTL", "10s")];
    let Some(Fleet {
        nats,
        c,
        mut a,
        mut b,
    }) = Fleet::start(dir.path(), &env)
    else {
        return;
    };
    let (ia, ib) = (a.wait_id(), b.wait_id());
    let seq = |id: &str| {
        let (_, v) = c.get(&format!("/api/v1/workers/{id}"));
        v["metrics"]["seq"].as_u64().unwrap_or(0)
    };
    for id in [&ia, &ib] {
        wait_for("the worker storing metrics", SECS(60), || {
            (seq(id) > 0).then_some(())
        });
    }
    let first = state_of(&a)["mqtt_password"].as_str().unwrap().to_string();
    let cid_b = state_of(&b)["mqtt_client_id"].as_str().unwrap().to_string();

    // B is revoked; its connection lasts until its login expires.
    let (status, body) = c.post(&format!("/api/v1/workers/{ib}/revoke"), &json!({}));
    assert_eq!(status, 200, "{body}");

    // A's login expires (10 s): a fresh one is saved, and frames go on.
    wait_for("A renewing its NATS login", SECS(60), || {
        let now = state_of(&a)["mqtt_password"].as_str()?.to_string();
        (now != first).then_some(())
    });
    let after = seq(&ia);
    wait_for("A's frames after the renewal", SECS(30), || {
        (seq(&ia) > after + 5).then_some(())
    });
    assert!(
        a.proc.output().contains("fresh MQTT login"),
        "{}",
        a.proc.output()
    );

    // B: off the bus once its login expired, and kept off.
    wait_for("B's connection closed by NATS", SECS(40), || {
        (!client_ids(&nats).contains(&cid_b)).then_some(())
    });
    std::thread::sleep(SECS(12));
    assert!(
        !client_ids(&nats).contains(&cid_b),
        "the revoked worker is back on the bus"
    );
    let log = b.proc.output();
    assert!(log.contains("no fresh MQTT login"), "{log}");
    // A twice over its TTL: still connected, still storing.
    let now = seq(&ia);
    wait_for("A still storing", SECS(30), || {
        (seq(&ia) > now + 5).then_some(())
    });
}
