//! Metrics batches (`protocol::batch`) through a real conductor and its
//! broker: a batch is stored as its samples (seqs and dates from the
//! envelope), its newest sample is the latest, its period the liveness
//! interval; an unreadable one is refused as `malformed` and changes
//! nothing; `Stored` carries `STORED_ACCEPTS_BATCH`; looking at a batching
//! worker sends it one `Live` per half live period, and a worker that does
//! not batch none.
#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

mod common;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use protocol::batch::BatchWriter;
use protocol::topic::{topic, TopicKind};
use protocol::{Action, Body, Command, Metrics, MetricsBatch};
use rumqttc::{Client, QoS};
use serde_json::Value;

const INTERVAL_MS: u32 = 10_000;
const PERIOD_MS: u32 = 300_000;
const AGE_MS: u32 = 250;

/// A worker's own MQTT connection: publishes frames it seals with the
/// seqs it is given, and records every command it can verify that arrives
/// on its `cmd` and `cmd/stored` topics (it replies to none).
struct BatchWorker {
    id: String,
    secret: protocol::Secret,
    client: Client,
    commands: Arc<Mutex<Vec<Command>>>,
    _thread: JoinHandle<()>,
}

impl BatchWorker {
    fn connect(c: &Conductor, e: &Enrolled) -> BatchWorker {
        let commands = Arc::new(Mutex::new(Vec::new()));
        let (id, secret, seen) = (e.id.clone(), e.secret.clone(), commands.clone());
        let on_publish: OnPublish = Box::new(move |_, p| {
            let Ok(opened) = protocol::open(&p.payload, &id) else {
                return;
            };
            if let Ok(env) = opened.verify(&secret) {
                if let Body::Command(cmd) = env.body {
                    seen.lock().unwrap().push(cmd);
                }
            }
        });
        let (client, t) = connect(
            c.started.mqtt_addr,
            &e.id,
            &e.username,
            &e.password,
            Some(on_publish),
        )
        .unwrap();
        for kind in [TopicKind::Cmd, TopicKind::Stored] {
            client
                .subscribe(topic(&e.id, kind), QoS::AtLeastOnce)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(200)); // let the SubAcks land
        BatchWorker {
            id: e.id.clone(),
            secret: e.secret.clone(),
            client,
            commands,
            _thread: t,
        }
    }

    fn send(&self, kind: TopicKind, seq: u64, body: Body) {
        self.publish(kind, seal(&self.secret, &self.id, seq, body));
    }

    fn publish(&self, kind: TopicKind, frame: Vec<u8>) {
        self.client
            .publish(topic(&self.id, kind), QoS::AtLeastOnce, false, frame)
            .unwrap();
    }

    /// The `Live` commands received so far.
    fn lives(&self) -> Vec<protocol::LiveRequest> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match &c.action {
                Action::Live(req) => Some(req.clone()),
                _ => None,
            })
            .collect()
    }
}

fn sample(cpu: u16) -> Metrics {
    match metrics(cpu) {
        Body::Metrics(m) => m,
        other => panic!("not metrics: {other:?}"),
    }
}

fn batch(samples: &[Metrics]) -> MetricsBatch {
    let mut w = BatchWriter::new();
    for m in samples {
        w.push(m).unwrap();
    }
    w.finish(INTERVAL_MS, PERIOD_MS, AGE_MS)
}

/// The worker's entry in `GET /workers` (which, unlike `GET /workers/{id}`,
/// is not someone looking at it: no `Live`).
/// Raw rows `(received_at_ms, seq, sample)` of `id`, read from the store.
fn rows(c: &Conductor, id: &str) -> Vec<(u64, u64, Metrics)> {
    let store = conductor::store::Store::open_at(&c.store_at).unwrap();
    store
        .raw_metrics(id, 0, u64::try_from(i64::MAX).unwrap())
        .unwrap()
        .into_iter()
        .map(|(at, seq, blob)| (at, seq, postcard::from_bytes(&blob).unwrap()))
        .collect()
}

fn online_with_birth(c: &Conductor, w: &BatchWorker) {
    w.send(TopicKind::Birth, 1, birth("pi-batch", INTERVAL_MS));
    wait_for("online", T, || {
        (c.listed(&w.id)["status"] == "online").then_some(())
    });
}

#[test]
fn a_batch_is_stored_as_its_samples_and_acknowledged_with_the_batch_bit() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-batch");
    let w = BatchWorker::connect(&c, &e);
    online_with_birth(&c, &w);

    // Three samples, seqs 2..=4, the envelope's the last.
    let samples = [sample(100), sample(200), sample(300)];
    let before = conductor::state::now_ms();
    w.send(TopicKind::Metrics, 4, Body::MetricsBatch(batch(&samples)));
    let stored = wait_for("3 rows", T, || {
        let r = rows(&c, &e.id);
        (r.len() == 3).then_some(r)
    });
    let after = conductor::state::now_ms();
    let seqs: Vec<u64> = stored.iter().map(|r| r.1).collect();
    assert_eq!(seqs, [2, 3, 4]);
    let got: Vec<&Metrics> = stored.iter().map(|r| &r.2).collect();
    assert_eq!(got, samples.iter().collect::<Vec<_>>());
    // The newest dated `age_ms` before receipt, each older one an interval
    // before the next.
    let newest = stored[2].0;
    let age = u64::from(AGE_MS);
    assert!(
        (before - age..=after - age).contains(&newest),
        "{before} {newest} {after}"
    );
    assert_eq!(stored[1].0, newest - u64::from(INTERVAL_MS));
    assert_eq!(stored[0].0, newest - 2 * u64::from(INTERVAL_MS));

    // The newest is the latest; the period is the liveness interval.
    let v = c.listed(&e.id);
    assert_eq!(v["summary"]["received_at_ms"], newest, "{v}");
    assert_eq!(v["summary"]["cpu_percent"], 3.0, "{v}");
    assert_eq!(v["interval_ms"], PERIOD_MS, "{v}");
    assert_eq!(v["batching"], true, "{v}");
    assert!(v["live_until_ms"].is_null(), "{v}");
    // Every sample in the minute rollups.
    let minutes = c.get(&format!(
        "/api/v1/workers/{}/metrics?resolution=minute&from=0",
        e.id
    ));
    let n: u64 = minutes["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["n"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 3, "{minutes}");

    // Acknowledged up to the batch's seq, with the capability bit.
    wait_for("Stored(4)", T, || {
        w.commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| matches!(c.action, Action::Stored(n) if n >= 4))
            .then_some(())
    });
    for cmd in w.commands.lock().unwrap().iter() {
        if let Action::Stored(_) = cmd.action {
            assert_eq!(cmd.id, protocol::STORED_ACCEPTS_BATCH, "{cmd:?}");
        }
    }

    // A plain metrics frame outside a live period: no longer batching, the
    // birth's interval back.
    w.send(TopicKind::Metrics, 5, metrics(500));
    wait_for("not batching", T, || {
        let v = c.listed(&e.id);
        (v["batching"] == false && v["interval_ms"] == INTERVAL_MS).then_some(())
    });
    wait_for("4 rows", T, || (rows(&c, &e.id).len() == 4).then_some(()));
    // Batching again.
    w.send(
        TopicKind::Metrics,
        8,
        Body::MetricsBatch(batch(&[sample(600), sample(700), sample(800)])),
    );
    wait_for("batching", T, || {
        let v = c.listed(&e.id);
        (v["batching"] == true && v["interval_ms"] == PERIOD_MS).then_some(())
    });
    let v = c.worker(&e.id);
    assert_eq!(v["metrics"]["seq"], 8, "{v}");
    assert_eq!(v["metrics"]["metrics"]["cpu_total"], 800, "{v}");
    // (Sent a second apart rather than a period, the second batch's older
    // samples are dated before the plain frame: compare the seqs only.)
    let mut seqs = wait_for("7 rows", T, || {
        let seqs: Vec<u64> = rows(&c, &e.id).iter().map(|r| r.1).collect();
        (seqs.len() == 7).then_some(seqs)
    });
    seqs.sort_unstable();
    assert_eq!(seqs, [2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(c.rejected("malformed"), 0);
    c.stop();
}

#[test]
fn an_unreadable_batch_is_refused_as_malformed_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let e = c.enroll_new("pi-corrupt");
    let w = BatchWorker::connect(&c, &e);
    online_with_birth(&c, &w);
    let accepted = c.accepted();

    // The sample stream cut short, then sealed properly.
    let good = batch(&[sample(100), sample(200), sample(300)]);
    let mut cut = good.clone();
    cut.samples.truncate(cut.samples.len() - 7);
    w.send(TopicKind::Metrics, 4, Body::MetricsBatch(cut));
    wait_for("malformed", T, || {
        (c.rejected("malformed") == 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300)); // a commit, had there been one
    assert!(rows(&c, &e.id).is_empty());
    assert_eq!(c.accepted(), accepted);
    let v = c.listed(&e.id);
    assert_eq!(v["batching"], false, "{v}");
    assert_eq!(v["interval_ms"], INTERVAL_MS, "{v}");
    assert!(v["summary"].is_null(), "{v}");
    // A plain GET: nobody looking (and it does not batch: no Live either way).
    let v = c.worker(&e.id);
    assert_eq!(v["counters"]["replay_highest"], 1, "{v}");
    assert_eq!(v["counters"]["rejected"], 1, "{v}");
    assert!(v["metrics"].is_null(), "{v}");

    // The window did not move: the good batch under the same seq is taken.
    w.send(TopicKind::Metrics, 4, Body::MetricsBatch(good));
    wait_for("3 rows", T, || (rows(&c, &e.id).len() == 3).then_some(()));
    assert_eq!(c.accepted(), accepted + 1);
    assert_eq!(c.rejected("malformed"), 1);
    assert_eq!(c.rejected("replayed"), 0);
    // A batch elsewhere than on the metrics topic is a topic mismatch.
    w.send(
        TopicKind::Birth,
        8,
        Body::MetricsBatch(batch(&[sample(1), sample(2)])),
    );
    wait_for("topic_mismatch", T, || {
        (c.rejected("topic_mismatch") == 1).then_some(())
    });
    c.stop();
}

#[test]
fn looking_at_a_batching_worker_makes_it_live_once_per_half_period() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let a = c.enroll_new("pi-batching");
    let b = c.enroll_new("pi-plain");
    let wa = BatchWorker::connect(&c, &a);
    let wb = BatchWorker::connect(&c, &b);
    online_with_birth(&c, &wa);
    online_with_birth(&c, &wb);
    wa.send(
        TopicKind::Metrics,
        3,
        Body::MetricsBatch(batch(&[sample(10), sample(20)])),
    );
    wb.send(TopicKind::Metrics, 2, metrics(30));
    wait_for("a batching, b reporting", T, || {
        (c.listed(&a.id)["batching"] == true && c.listed(&b.id)["summary"].is_object())
            .then_some(())
    });
    assert!(wa.lives().is_empty(), "no one looked yet");

    // A plain GET /workers/{id} (scripts, the CLI) is not someone looking.
    let v = c.worker(&a.id);
    assert!(v["live_until_ms"].is_null(), "{v}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(wa.lives().is_empty(), "a plain GET sent a Live");
    // The dashboard's worker page polls GET /workers/{id}?live=1: one Live.
    let v = c.get(&format!("/api/v1/workers/{}?live=1", a.id));
    let until = v["live_until_ms"].as_u64().expect("live_until_ms set");
    let now = conductor::state::now_ms();
    let live_ms = u64::from(conductor::live::LIVE_FOR_S) * 1000;
    assert!(until > now && until <= now + live_ms, "{until} {now}");
    let lives = wait_for("a Live", T, || {
        let l = wa.lives();
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(
        lives,
        [protocol::LiveRequest {
            interval_ms: conductor::live::LIVE_INTERVAL_MS,
            for_s: conductor::live::LIVE_FOR_S,
        }]
    );
    // Looking again within the first half of the period: none.
    let again = c.get(&format!("/api/v1/workers/{}?live=1", a.id));
    assert_eq!(again["live_until_ms"], until);
    let (code, v) = call(&c, "POST", &format!("/api/v1/workers/{}/live", a.id), None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        (v["live_until_ms"].as_u64(), &v["sent"]),
        (Some(until), &Value::Bool(false))
    );
    // A viewer may ask too (a GET of the worker does the same).
    let (_, t) = call(
        &c,
        "POST",
        "/api/v1/tokens",
        Some(serde_json::json!({"name": "viewer", "role": "viewer"})),
    );
    let viewer = t["token"].as_str().unwrap();
    let (code, v) = c.call(
        "POST",
        &format!("/api/v1/workers/{}/live", a.id),
        Some(viewer),
        None,
    );
    assert_eq!((code, &v["sent"]), (202, &Value::Bool(false)), "{v}");
    // Plain metrics while live keep it batching.
    wa.send(TopicKind::Metrics, 4, metrics(40));
    wait_for("live sample", T, || {
        (c.listed(&a.id)["summary"]["cpu_percent"] == 0.4).then_some(())
    });
    assert_eq!(c.listed(&a.id)["batching"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(wa.lives().len(), 1, "{:?}", wa.lives());

    // A worker that does not batch: never a Live, 409 when asked.
    let v = c.worker(&b.id);
    assert_eq!(
        (&v["batching"], &v["live_until_ms"]),
        (&Value::Bool(false), &Value::Null)
    );
    let (code, v) = call(&c, "POST", &format!("/api/v1/workers/{}/live", b.id), None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("does not batch"),
        "{v}"
    );
    let (code, v) = call(&c, "POST", "/api/v1/workers/w-ffffffffffff/live", None);
    assert_eq!(code, 404, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(wb.lives().is_empty(), "{:?}", wb.lives());
    assert_eq!(wa.lives().len(), 1, "{:?}", wa.lives());
    c.stop();
}
