//! Alerts end to end: real conductor and edge-worker processes and a real
//! HTTP webhook receiver. A rule fires once when its condition has held
//! long enough, resolves once when it clears; the notifications are signed,
//! retried while the receiver is down, delivered in order, and not repeated
//! across a conductor `kill -9`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{bin, metric, wait_for, Conductor, Worker, WorkerOpts};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use test_support::free_port;

/// One request the receiver took.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver on `addr` that answers 204 and records every request.
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(addr: SocketAddr) -> Receiver {
        let server = Arc::new(tiny_http::Server::http(addr).unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (server.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let headers = req
                    .headers()
                    .iter()
                    .map(|h| (h.field.to_string(), h.value.to_string()))
                    .collect();
                g.lock().unwrap().push(Received { headers, body });
                let _ = req.respond(tiny_http::Response::empty(204));
            }
        });
        Receiver {
            got,
            server,
            thread: Some(thread),
        }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn verify(r: &Received, secret: &str) {
    let ts = r.header("X-Aerekos-Timestamp");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{}", r.body).as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        r.header("X-Aerekos-Signature"),
        format!("sha256={hex}"),
        "signature over {ts}.<body>"
    );
}

fn alerts(c: &Conductor, query: &str) -> Vec<Value> {
    let (status, v) = c.get(&format!("/api/v1/alerts{query}"));
    assert_eq!(status, 200, "{v}");
    v["alerts"].as_array().unwrap().clone()
}

fn start_conductor(dir: &std::path::Path) -> Conductor {
    Conductor::start_with_env(
        dir,
        &["--default-interval-ms", "300"],
        &[("AEREKOS_ALERT_INTERVAL", "200ms")],
    )
}

#[test]
fn offline_alert_fires_once_resolves_once_retries_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = start_conductor(&dir.path().join("conductor"));
    // The receiver's port is chosen now but nothing listens yet: the first
    // attempts fail and are retried.
    let hook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (status, rcv) = c.post(
        "/api/v1/alert-receivers",
        &json!({"name": "ops", "url": format!("http://{hook}/hook")}),
    );
    assert_eq!(status, 201, "{rcv}");
    let secret = rcv["secret"].as_str().unwrap().to_string();
    assert!(secret.len() >= 32, "a generated secret: {rcv}");
    let (_, listed) = c.get("/api/v1/alert-receivers");
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is shown once: {listed}"
    );
    let (status, rule) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "down", "kind": "worker_offline", "for": "1s"}),
    );
    assert_eq!(status, 201, "{rule}");
    let (status, dup) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "down", "kind": "worker_offline"}),
    );
    assert_eq!(status, 409, "{dup}");

    let mut w = Worker::start(
        &dir.path().join("w1"),
        &c.url(),
        Some(&c.registration_token()),
        WorkerOpts::named("pi-alert"),
    );
    let id = w.wait_id();
    wait_for("online", Duration::from_secs(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        alerts(&c, "").is_empty(),
        "nothing fires while it is online"
    );

    w.proc.kill9();
    let firing = wait_for("the alert fires", Duration::from_secs(20), || {
        let a = alerts(&c, "?state=firing");
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(firing.len(), 1, "{firing:?}");
    let alert = &firing[0];
    assert_eq!(alert["subject"], json!(id));
    assert_eq!(alert["kind"], json!("worker_offline"));
    assert!(
        alert["summary"].as_str().unwrap().contains("pi-alert"),
        "{alert}"
    );
    let alert_id = alert["id"].as_i64().unwrap();
    // Failed attempts are recorded while the receiver is down.
    let failed = wait_for("two failed attempts", Duration::from_secs(20), || {
        let (_, a) = c.get(&format!("/api/v1/alerts/{alert_id}"));
        let n = a["notifications"][0].clone();
        (n["attempts"].as_u64() >= Some(2)).then_some(n)
    });
    assert!(failed["delivered_ms"].is_null(), "{failed}");
    assert!(failed["last_error"].is_string(), "{failed}");

    let receiver = Receiver::start(hook);
    let first = wait_for("the firing notification", Duration::from_secs(30), || {
        let got = receiver.got();
        (!got.is_empty()).then_some(got)
    });
    let r = &first[0];
    verify(r, &secret);
    assert_eq!(r.header("X-Aerekos-Event"), "firing");
    let body = r.json();
    assert_eq!(body["event"], json!("firing"));
    assert_eq!(body["alert"]["id"], json!(alert_id));
    assert_eq!(body["alert"]["subject"], json!(id));
    assert!(body["text"].as_str().unwrap().starts_with("[FIRING] down"));
    let firing_delivery = r.header("X-Aerekos-Delivery").to_string();

    // kill -9 while it fires: after the restart it is still the one alert,
    // and nothing is sent again.
    c.restart_after_kill9();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts(&c, "?state=firing").len(), 1);
    assert_eq!(alerts(&c, "").len(), 1, "no second alert");
    assert_eq!(receiver.got().len(), 1, "no repeat: {:?}", receiver.got());

    // The worker comes back: resolved, once.
    w.restart();
    let got = wait_for("the resolved notification", Duration::from_secs(30), || {
        let got = receiver.got();
        (got.len() >= 2).then_some(got)
    });
    let r = &got[1];
    verify(r, &secret);
    assert_eq!(r.header("X-Aerekos-Event"), "resolved");
    assert_ne!(r.header("X-Aerekos-Delivery"), firing_delivery);
    let body = r.json();
    assert_eq!(body["alert"]["id"], json!(alert_id));
    assert_eq!(body["alert"]["state"], json!("resolved"));
    assert_eq!(body["alert"]["resolved_why"], json!("condition cleared"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.got().len(), 2, "{:?}", receiver.got());
    let history = alerts(&c, "");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["state"], json!("resolved"));
    let notes = history[0]["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes.iter().all(|n| n["delivered_ms"].is_u64()),
        "{notes:?}"
    );
    let prom = c.prometheus();
    assert_eq!(metric(&prom, "aerekos_alerts_firing{rule=\"down\"}"), 0.0);
    assert_eq!(
        metric(&prom, "aerekos_alert_notifications_undelivered"),
        0.0
    );

    // The CLI shows the same history.
    let out = std::process::Command::new(bin("aerekos"))
        .args(["--url", &c.url(), "alert", "list"])
        .env("AEREKOS_TOKEN", &c.admin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("resolved") && l.contains("down") && l.contains(&id)),
        "{text}"
    );
}

#[test]
fn metric_rules_watch_the_selected_workers_and_a_deleted_rule_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_conductor(&dir.path().join("conductor"));
    for (bad, why) in [
        (
            json!({"name": "x", "kind": "metric_above", "metric": "cpu"}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "metric_above", "metric": "volts", "threshold": 1}),
            "unknown variant",
        ),
        (
            json!({"name": "x", "kind": "worker_offline", "for": "later"}),
            "duration",
        ),
    ] {
        let (status, v) = c.post("/api/v1/alert-rules", &bad);
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{bad}: {v}");
    }
    let (status, v) = c.post(
        "/api/v1/alert-receivers",
        &json!({"name": "bad", "url": "ftp://example.org/"}),
    );
    assert_eq!(status, 400, "{v}");

    let token = c.registration_token();
    let mut a = Worker::start(
        &dir.path().join("a"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("pi-a"),
    );
    let mut b = Worker::start(
        &dir.path().join("b"),
        &c.url(),
        Some(&token),
        WorkerOpts::named("pi-b"),
    );
    let (ida, idb) = (a.wait_id(), b.wait_id());
    let (status, v) = c.put(
        &format!("/api/v1/workers/{ida}/labels"),
        &json!({"site": "shop"}),
    );
    assert!(status == 200 || status == 204, "{v}");
    wait_for("metrics", Duration::from_secs(20), || {
        [&ida, &idb]
            .iter()
            .all(|id| c.worker(id)["metrics"].is_object())
            .then_some(())
    });
    // Memory in use is above 0 % on every machine: the rule holds for the
    // selected worker only.
    let (status, rule) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "mem", "kind": "metric_above", "metric": "memory",
                "threshold": 0, "selector": {"site": "shop"}}),
    );
    assert_eq!(status, 201, "{rule}");
    let firing = wait_for("fires", Duration::from_secs(20), || {
        let f = alerts(&c, "?state=firing");
        (!f.is_empty()).then_some(f)
    });
    std::thread::sleep(Duration::from_millis(800));
    let firing_now = alerts(&c, "?state=firing");
    assert_eq!(firing_now.len(), 1, "pi-b is not selected: {firing_now:?}");
    assert_eq!(firing[0]["subject"], json!(ida));
    assert!(firing[0]["value"].as_f64().unwrap() > 0.0);
    assert!(
        firing[0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("memory "),
        "{}",
        firing[0]
    );
    let prom = c.prometheus();
    assert_eq!(metric(&prom, "aerekos_alerts_firing{rule=\"mem\"}"), 1.0);

    let (status, _) = c.delete(&format!("/api/v1/alert-rules/{}", rule["id"]));
    assert_eq!(status, 204);
    let resolved = wait_for("resolves", Duration::from_secs(20), || {
        let all = alerts(&c, "");
        (all[0]["state"] == json!("resolved")).then_some(all)
    });
    assert_eq!(resolved[0]["resolved_why"], json!("rule deleted"));
    assert!(alerts(&c, "?state=firing").is_empty());
}
