//! End-to-end: the real conductor with its embedded broker and real
//! edge-worker processes, on ephemeral ports in temp dirs.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::time::{Duration, Instant};

use e2e::*;
use protocol::{Body, TopicKind};
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn online_with_metrics(c: &Conductor, id: &str) -> bool {
    let w = c.worker(id);
    w["status"] == "online" && !w["metrics"].is_null()
}

#[test]
fn three_workers_enrol_report_go_offline_on_kill9_and_come_back_with_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();

    let mut workers: Vec<Worker> = (0..3)
        .map(|i| {
            Worker::start(
                &dir.path().join(format!("w{i}")),
                &c.url(),
                Some(&token),
                WorkerOpts::named(&format!("pi-{i}")),
            )
        })
        .collect();
    let ids: Vec<String> = workers.iter_mut().map(|w| w.wait_id()).collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "each worker has its own id: {ids:?}"
    );
    for id in &ids {
        wait_for(&format!("{id} online with metrics"), SECS(20), || {
            online_with_metrics(&c, id).then_some(())
        });
    }
    let listed = c.workers();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let detail = c.worker(&ids[0]);
    assert_eq!(detail["inventory"]["hostname"], "pi-0", "{detail}");
    assert!(
        detail["metrics"]["metrics"]["memory_total"]
            .as_u64()
            .unwrap()
            > 0
    );

    // kill -9 one worker: offline within 3 intervals (LWT or missed frames).
    let interval = Duration::from_millis(workers[1].opts.interval_ms);
    workers[1].proc.kill9();
    let killed = Instant::now();
    wait_for("killed worker offline", 3 * interval + SECS(2), || {
        (c.status_of(&ids[1]) == "offline").then_some(())
    });
    println!("offline detected after {:?}", killed.elapsed());
    assert_eq!(c.status_of(&ids[0]), "online");
    assert_eq!(c.status_of(&ids[2]), "online");

    // Restart it: same identity, online again, no new record.
    workers[1].restart();
    assert_eq!(workers[1].wait_id(), ids[1]);
    wait_for("restarted worker online", SECS(20), || {
        (c.status_of(&ids[1]) == "online").then_some(())
    });
    assert_eq!(c.workers().len(), 3);
}

/// `log` without its ANSI colour sequences (`ESC [ … m`).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The lines of `log` (without colours) at level ERROR.
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" ERROR ")).collect()
}

/// A normal start, an enrolment and a worker reporting is what a new user
/// sees first: none of it is an error (the broker's readiness probe used to
/// log `router-drop … client_id="conductor-probe"` at ERROR on every start).
#[test]
fn a_normal_start_and_an_enrolment_log_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&c.registration_token()),
        WorkerOpts::named("first-hour"),
    );
    let id = w.wait_id();
    wait_for("online with metrics", SECS(20), || {
        online_with_metrics(&c, &id).then_some(())
    });
    // A few metrics frames and their acknowledgements.
    std::thread::sleep(SECS(1));
    let log = plain(&c.proc.output());
    assert!(log.contains(" INFO "), "the conductor logs at info: {log}");
    assert_eq!(
        error_lines(&log),
        Vec::<&str>::new(),
        "conductor log:\n{log}"
    );
    let worker_log = plain(&w.proc.output());
    assert_eq!(
        error_lines(&worker_log),
        Vec::<&str>::new(),
        "worker log:\n{worker_log}"
    );
}

#[test]
fn wrong_registration_token_is_refused_and_leaves_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));

    let (status, body) = c.post(
        "/api/v1/enroll",
        &json!({"token": "not-the-token", "hostname": "intruder", "machine_id": "m1"}),
    );
    assert_eq!(status, 401, "{body}");

    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some("wrong-token"),
        WorkerOpts::named("intruder"),
    );
    let code = w.proc.wait_exit(SECS(20));
    assert!(matches!(code, Some(c) if c != 0), "worker exit: {code:?}");
    assert!(
        w.proc.output().to_lowercase().contains("token"),
        "the worker says why: {}",
        w.proc.tail(10)
    );
    assert!(w.id().is_none());
    assert!(c.workers().is_empty());
}

#[test]
fn forged_replayed_and_malformed_frames_are_rejected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("victim"),
    );
    let id = w.wait_id();
    wait_for("online", SECS(20), || {
        online_with_metrics(&c, &id).then_some(())
    });

    // A genuine frame, read with the observer login.
    let (user, pass) = c.observer();
    let observer = MqttClient::connect(c.mqtt, "observer-1", Some((&user, &pass)))
        .expect("observer login accepted");
    let metrics_topic = protocol::topic::topic(&id, TopicKind::Metrics);
    observer.subscribe(&metrics_topic);
    let (_, genuine) = observer
        .recv_until(SECS(10), |t, _| t == metrics_topic)
        .expect("a genuine metrics frame");
    // The broker lets nobody but the worker publish on its topics, so the
    // attacker here holds the worker's own broker login (a stolen
    // state.json without the frame secret, say): the HMAC is what stands.
    w.proc.kill9();
    // Only once the broker has dropped the killed worker's connection (its
    // will marks it offline): a CONNECT under the same client id that the
    // broker sees while the dead connection is still registered replaces it,
    // and the dead link's late disconnect can then close the new one.
    wait_for("killed worker offline", SECS(20), || {
        (c.status_of(&id) == "offline").then_some(())
    });
    let (wu, wp) = w.mqtt_login();
    let mallory =
        MqttClient::connect(c.mqtt, &id, Some((&wu, &wp))).expect("the worker's own broker login");
    let genuine_env = protocol::open(&genuine, &id)
        .unwrap()
        .verify(&w.secret())
        .unwrap();

    // 1. Forged: a well-formed frame with a huge seq under the wrong key.
    let forged_seq = u64::MAX / 2;
    let mut env = genuine_env.clone();
    env.seq = forged_seq;
    let forged = protocol::seal(&protocol::Secret::from_bytes([9; 32]), &env).unwrap();
    let bad_tag_before = c.rejected("bad_tag");
    mallory.publish(&metrics_topic, forged);
    wait_for("bad_tag counted", SECS(10), || {
        (c.rejected("bad_tag") > bad_tag_before).then_some(())
    });

    // 2. Replayed: the genuine frame again.
    let replayed_before = c.rejected("replayed") + c.rejected("too_old");
    mallory.publish(&metrics_topic, genuine.clone());
    wait_for("replay counted", SECS(10), || {
        (c.rejected("replayed") + c.rejected("too_old") > replayed_before).then_some(())
    });

    // 3. Truncated, garbage, oversized, wrong version.
    let before: Vec<f64> = ["truncated", "malformed", "oversized", "version"]
        .iter()
        .map(|r| c.rejected(r))
        .collect();
    mallory.publish(&metrics_topic, genuine[..genuine.len() / 2].to_vec());
    mallory.publish(&metrics_topic, genuine[..8].to_vec());
    mallory.publish(
        &metrics_topic,
        [protocol::FORMAT_VERSION, 0xff, 0xff, 0xff].repeat(20),
    );
    mallory.publish(
        &metrics_topic,
        vec![protocol::FORMAT_VERSION; protocol::MAX_FRAME_LEN + 100],
    );
    let mut v9 = genuine.clone();
    v9[0] = 9;
    mallory.publish(&metrics_topic, v9);
    wait_for("malformed input counted", SECS(10), || {
        let now: Vec<f64> = ["truncated", "malformed", "oversized", "version"]
            .iter()
            .map(|r| c.rejected(r))
            .collect();
        now.iter().zip(&before).all(|(n, b)| n > b).then_some(())
    });

    // A frame for the wrong topic kind: a genuine metrics frame on `birth`.
    let mismatch_before = c.rejected("topic_mismatch");
    let mut env2 = genuine_env.clone();
    env2.seq += 1_000_000;
    let misplaced = protocol::seal(&w.secret(), &env2).unwrap();
    mallory.publish(&protocol::topic::topic(&id, TopicKind::Birth), misplaced);
    wait_for("topic mismatch counted", SECS(10), || {
        (c.rejected("topic_mismatch") > mismatch_before).then_some(())
    });

    // State unchanged: the worker's real frames still flow (a forged huge seq
    // would have made every later genuine frame look old), and the history
    // holds no forged seq.
    drop(mallory);
    w.restart();
    let last_seq = |c: &Conductor| {
        c.raw_history(&id)
            .iter()
            .filter_map(|p| p["seq"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let seen = last_seq(&c);
    wait_for("genuine frames still accepted", SECS(30), || {
        (last_seq(&c) > seen).then_some(())
    });
    wait_for("online again", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let history = c.raw_history(&id);
    assert!(history
        .iter()
        .all(|p| p["seq"].as_u64().unwrap() < 1_000_000));
    assert_eq!(c.status_of(&id), "online");
    let (status, _) = c.get("/api/v1/health");
    assert_eq!(status, 200, "conductor still healthy");
    assert!(w.proc.alive());
    assert!(matches!(
        genuine_env.body,
        Body::Metrics(_) | Body::MetricsBatch(_)
    ));
}

#[test]
fn revoked_worker_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("stolen"),
    );
    let id = w.wait_id();
    wait_for("online", SECS(20), || {
        online_with_metrics(&c, &id).then_some(())
    });
    let (user, pass) = w.mqtt_login();

    let (status, body) = c.post(&format!("/api/v1/workers/{id}/revoke"), &json!({}));
    assert_eq!(status, 200, "{body}");
    w.proc.kill9();
    assert!(
        MqttClient::connect(c.mqtt, &user, Some((&user, &pass))).is_none(),
        "a revoked worker's MQTT login is refused"
    );
    let detail = c.worker(&id);
    assert_eq!(detail["revoked"], true, "{detail}");
}

#[test]
fn conductor_kill9_keeps_enrolments_tokens_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let mut w = Worker::start(
        &dir.path().join("w"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("survivor"),
    );
    let id = w.wait_id();
    wait_for("several samples stored", SECS(20), || {
        (c.raw_history(&id).len() >= 5).then_some(())
    });
    let (status, api) = c.post("/api/v1/tokens", &json!({"name": "script"}));
    assert_eq!(status, 201, "{api}");
    let api_token = api["token"].as_str().unwrap().to_string();

    c.restart_after_kill9();
    let history = c.raw_history(&id);
    assert!(history.len() >= 5, "history kept: {}", history.len());
    assert_eq!(c.workers().len(), 1);
    // The API token still works.
    let (status, _) = read_with_token(&c, &api_token);
    assert_eq!(status, 200);
    // The registration token still enrols a new machine.
    let (status, body) = c.post(
        "/api/v1/enroll",
        &json!({"token": token, "hostname": "second", "machine_id": "m-second"}),
    );
    assert_eq!(status, 200, "registration token survived: {body}");

    // The worker reconnects over MQTT on its own when the embedded broker is back.
    wait_for("worker reports again", SECS(30), || {
        (c.status_of(&id) == "online").then_some(())
    });
}

fn read_with_token(c: &Conductor, token: &str) -> (u16, String) {
    match http()
        .get(format!("{}/api/v1/workers", c.url()))
        .header("Authorization", format!("Bearer {token}"))
        .call()
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// Wire format 2 end to end (protocol/README.md, Format 2): the worker's
/// first frames are format 1 and so is the conductor's first `Stored`
/// (it answers in the format it last received); after that `Stored` the
/// worker seals format 2, the conductor stores those frames and sends its
/// commands to the worker in format 2, and nothing is refused on the way.
#[test]
fn the_worker_and_the_conductor_move_to_format_2_after_the_first_stored() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let (user, pass) = c.observer();
    let sniffer = MqttClient::connect(c.mqtt, "format-sniffer", Some((&user, &pass)))
        .expect("observer login accepted");
    // Every frame topic (and `status`, a text), plus the acknowledgements.
    for filter in ["aerekos/v1/+/+", "aerekos/v1/+/cmd/stored"] {
        sniffer.subscribe(filter);
    }
    std::thread::sleep(Duration::from_millis(300));
    let token = c.registration_token();
    let mut opts = WorkerOpts::named("compact");
    opts.interval_ms = 1000;
    let mut w = Worker::start(&dir.path().join("w"), &c.url(), Some(&token), opts);
    let id = w.wait_id();
    let secret = w.secret();

    // (topic suffix, format byte, seq) of every frame, until a format-2
    // metrics frame has been seen.
    let mut frames: Vec<(String, u8, u64)> = Vec::new();
    let v2_seq = wait_for("a format-2 metrics frame", SECS(30), || {
        while let Some((topic, payload, _)) = sniffer.recv(Duration::from_millis(100)) {
            if topic.ends_with("/status") {
                continue;
            }
            let env = protocol::open(&payload, &id)
                .unwrap()
                .verify(&secret)
                .unwrap_or_else(|e| panic!("{topic}: {e}"));
            assert_eq!(env.version, payload[0]);
            let suffix = topic.rsplit_once(&format!("{id}/")).unwrap().1.to_string();
            frames.push((suffix.clone(), payload[0], env.seq));
            if suffix == "metrics" && payload[0] == protocol::FORMAT_V2 {
                return Some(env.seq);
            }
        }
        None
    });
    assert_eq!(
        frames.first().map(|f| (f.1, f.2)),
        Some((protocol::FORMAT_VERSION, 1)),
        "the worker's first frame (seq 1) precedes any Stored: {frames:?}"
    );
    let stored_at = frames
        .iter()
        .position(|f| f.0 == "cmd/stored")
        .expect("a Stored");
    assert_eq!(
        frames[stored_at].1,
        protocol::FORMAT_VERSION,
        "the first Stored answers a format-1 worker in format 1: {frames:?}"
    );
    assert!(
        frames[..stored_at]
            .iter()
            .all(|f| f.1 == protocol::FORMAT_VERSION),
        "format 2 only after a Stored: {frames:?}"
    );

    // The conductor stores format-2 frames.
    wait_for("the format-2 frame in the history", SECS(10), || {
        c.raw_history(&id)
            .iter()
            .any(|p| p["seq"].as_u64() == Some(v2_seq))
            .then_some(())
    });
    assert_eq!(c.worker(&id)["wire_format"], 2);
    // Its commands to this worker are format 2 now, and the worker obeys.
    let (status, body) = c.post(
        &format!("/api/v1/workers/{id}/commands"),
        &json!({"action": "ping"}),
    );
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    let (_, cmd) = sniffer
        .recv_until(SECS(10), |t, _| t.ends_with(&format!("{id}/cmd")))
        .expect("the ping command on the wire");
    assert_eq!(cmd[0], protocol::FORMAT_V2);
    for reason in ["version", "malformed", "bad_tag", "topic_mismatch"] {
        assert_eq!(c.rejected(reason), 0.0, "{reason}");
    }
    assert!(w.proc.alive());
}
