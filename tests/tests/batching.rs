//! Metrics batches end to end (issue 17 §1): a real edge-worker with
//! `--batch` sends one `MetricsBatch` frame per batch period to a real
//! conductor, which stores every sample under its own seq and time, keeps
//! the worker online on the batch period's clock, and, while someone looks,
//! has the worker send every sample at once (`Action::Live`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::{wait_for, Conductor, MqttClient, Worker, WorkerOpts};
use protocol::{Body, Envelope, TopicKind};
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Metrics frames seen on the worker's metrics topic for `for_`.
fn sniff_metrics(
    c: &Conductor,
    w: &Worker,
    id: &str,
    for_: Duration,
    mut also: impl FnMut(),
) -> Vec<Envelope> {
    let (user, pass) = c.observer();
    let sniffer = MqttClient::connect(c.mqtt, &format!("sniff-{id}"), Some((&user, &pass)))
        .expect("observer login accepted");
    let topic = protocol::topic::topic(id, TopicKind::Metrics);
    sniffer.subscribe(&topic);
    let secret = w.secret();
    let end = Instant::now() + for_;
    let mut out = Vec::new();
    while Instant::now() < end {
        also();
        if let Some((t, payload, _)) = sniffer.recv(Duration::from_millis(100)) {
            if t == topic {
                let env = protocol::open(&payload, id)
                    .unwrap()
                    .verify(&secret)
                    .unwrap();
                out.push(env);
            }
        }
    }
    out
}

fn history_by_seq(c: &Conductor, id: &str) -> BTreeMap<u64, u64> {
    c.raw_history(id)
        .iter()
        .map(|p| {
            (
                p["seq"].as_u64().unwrap(),
                p["received_at_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn start(dir: &std::path::Path, name: &str, batch_ms: u64) -> (Conductor, Worker, String) {
    let c = Conductor::start(&dir.join("conductor"));
    let token = c.registration_token();
    let mut opts = WorkerOpts::named(name);
    opts.interval_ms = 200;
    opts.batch_ms = Some(batch_ms);
    let mut w = Worker::start(&dir.join(name), &c.url(), Some(&token), opts);
    let id = w.wait_id();
    // Until the worker reads the conductor's first `Stored` (which says the
    // conductor takes batches) its samples go one by one; `batching` turns
    // true with its first batch.
    wait_for("worker online and batching", SECS(30), || {
        let d = c.worker(&id);
        (d["status"] == "online" && !d["metrics"].is_null() && d["batching"] == json!(true))
            .then_some(())
    });
    (c, w, id)
}

#[test]
fn a_batching_worker_sends_one_frame_per_period_and_every_sample_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (c, w, id) = start(dir.path(), "batcher", 2_000);
    // Batches of 10 samples at 200 ms: a frame every 2 s. Watched for 7 s,
    // the worker must stay online throughout (the conductor's liveness
    // clock is the batch period, not the 200 ms interval).
    let mut statuses = Vec::new();
    let mut last_poll = Instant::now();
    let frames = sniff_metrics(&c, &w, &id, SECS(7), || {
        if last_poll.elapsed() > Duration::from_millis(300) {
            last_poll = Instant::now();
            statuses.push(c.status_of(&id));
        }
    });
    assert!(
        statuses.iter().all(|s| s == "online"),
        "the worker left online between batches: {statuses:?}"
    );
    let batches: Vec<(u64, protocol::MetricsBatch)> = frames
        .iter()
        .filter_map(|e| match &e.body {
            Body::MetricsBatch(b) => Some((e.seq, b.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        batches.len(),
        frames.len(),
        "only batches on the metrics topic: {:?}",
        frames.iter().map(|e| e.body.kind()).collect::<Vec<_>>()
    );
    // 7 s at 2 s a batch: three or four frames, against 35 at one a sample.
    assert!(
        (3..=4).contains(&batches.len()),
        "{} batch frames in 7 s",
        batches.len()
    );
    for (_, b) in &batches {
        assert_eq!((b.count, b.interval_ms, b.period_ms), (10, 200, 2_000));
        assert_eq!(b.decode().unwrap().len(), 10);
    }

    // Every sample of every batch is in the history under its own seq,
    // dated one interval apart.
    let last = batches.last().unwrap().0;
    wait_for("the last batch stored", SECS(10), || {
        history_by_seq(&c, &id).contains_key(&last).then_some(())
    });
    let history = history_by_seq(&c, &id);
    for (seq, b) in &batches {
        let seqs: Vec<u64> = (seq + 1 - u64::from(b.count)..=*seq).collect();
        let times: Vec<u64> = seqs
            .iter()
            .map(|s| {
                *history
                    .get(s)
                    .unwrap_or_else(|| panic!("sample seq {s} not stored"))
            })
            .collect();
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], 200, "sample times {times:?}");
        }
    }
    // The inventory carries the liveness clock: the batch period.
    let d = c.worker(&id);
    assert_eq!(d["inventory"]["interval_ms"], json!(2_000), "{d}");
    assert_eq!(d["interval_ms"], json!(2_000), "{d}");
    assert_eq!(d["batching"], json!(true), "{d}");
}

#[test]
fn someone_looking_makes_a_batching_worker_live() {
    let dir = tempfile::tempdir().unwrap();
    let (c, w, id) = start(dir.path(), "looked-at", 60_000);
    let (status, body) = c.post(&format!("/api/v1/workers/{id}/live"), &json!({}));
    assert_eq!(status, 202, "{body}");
    assert!(body["live_until_ms"].as_u64().is_some(), "{body}");
    // Live: every 200 ms sample goes at once, as a plain Metrics frame
    // (the pending batch first).
    let frames = sniff_metrics(&c, &w, &id, SECS(3), || {});
    let plain = frames
        .iter()
        .filter(|e| matches!(e.body, Body::Metrics(_)))
        .count();
    assert!(plain >= 8, "{plain} samples sent at once in 3 s");
    let d: Value = c.worker(&id);
    assert!(d["live_until_ms"].as_u64().is_some(), "{d}");

    // A worker that does not batch (`--batch 0`) is never sent `Live`.
    let (status, body) = {
        let token = c.registration_token();
        let mut opts = WorkerOpts::named("plain");
        opts.interval_ms = 200;
        opts.batch_ms = Some(0);
        let mut p = Worker::start(&dir.path().join("plain"), &c.url(), Some(&token), opts);
        let pid = p.wait_id();
        wait_for("plain worker online with metrics", SECS(30), || {
            let d = c.worker(&pid);
            (d["status"] == "online" && !d["metrics"].is_null()).then_some(())
        });
        assert_eq!(c.worker(&pid)["batching"], json!(false));
        c.post(&format!("/api/v1/workers/{pid}/live"), &json!({}))
    };
    assert_eq!(status, 409, "{body}");
}
