//! The local API over real loopback HTTP (ureq): per-service isolation of
//! config and secrets, authentication, and publishes reaching the session's
//! queue with the right service name and bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;

use edge_worker::local_api::{
    self, derive_token, LocalApi, LocalPublish, Registry, ENV_API, ENV_SERVICE, ENV_TOKEN,
    MAX_BODY, PUBLISH_BURST,
};
use protocol::{Body, EventKind, Secret};
use serde_json::{json, Value};
use tokio::sync::mpsc;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Fixture {
    api: LocalApi,
    rx: mpsc::Receiver<LocalPublish>,
    a: String,
    b: String,
    agent: ureq::Agent,
}

fn fixture(queue: usize) -> Fixture {
    let secret = Secret::from_bytes([42; 32]);
    let registry = Registry::new(&secret, "w-0123456789ab");
    let a = registry
        .register(
            "svc-a",
            map(&[("mode", "fast"), ("port", "8080")]),
            map(&[("db_pass", "hunter2"), ("api key", "k-a")]),
        )
        .unwrap();
    let b = registry
        .register("svc-b", map(&[("mode", "slow")]), map(&[("b_only", "k-b")]))
        .unwrap();
    assert_eq!(a, derive_token(&secret, "svc-a"));
    let (tx, rx) = local_api::channel(queue);
    let api = LocalApi::start("127.0.0.1:0", registry, tx).unwrap();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    Fixture {
        api,
        rx,
        a,
        b,
        agent,
    }
}

impl Fixture {
    fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(format!("{}{path}", self.api.url()));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().unwrap();
        let code = resp.status().as_u16();
        (code, resp.body_mut().read_json().unwrap())
    }

    fn post(&self, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
        let mut resp = self
            .agent
            .post(format!("{}{path}", self.api.url()))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        let code = resp.status().as_u16();
        (code, resp.body_mut().read_json().unwrap())
    }
}

#[test]
fn each_service_sees_only_its_own_config_and_secrets() {
    let f = fixture(8);
    let (a, b) = (f.a.as_str(), f.b.as_str());
    assert_eq!(
        f.get("/v1/config", Some(a)),
        (200, json!({"mode": "fast", "port": "8080"}))
    );
    assert_eq!(f.get("/v1/config", Some(b)), (200, json!({"mode": "slow"})));
    assert_eq!(
        f.get("/v1/secrets", Some(a)),
        (200, json!({"db_pass": "hunter2", "api key": "k-a"}))
    );
    assert_eq!(
        f.get("/v1/secrets/db_pass", Some(a)),
        (200, json!({"key": "db_pass", "value": "hunter2"}))
    );
    assert_eq!(f.get("/v1/secrets/api%20key", Some(a)).1["value"], "k-a");
    // B's secret through A's token: not found; A's through B's: same.
    assert_eq!(f.get("/v1/secrets/b_only", Some(a)).0, 404);
    assert_eq!(f.get("/v1/secrets/db_pass", Some(b)).0, 404);
    assert_eq!(
        f.get("/v1/secrets/b_only", Some(b)).1["value"],
        json!("k-b")
    );

    let registry = f.api.registry();
    assert!(registry.set_state("svc-a", "healthy"));
    assert_eq!(
        f.get("/v1/health", Some(a)),
        (
            200,
            json!({"service": "svc-a", "state": "healthy", "worker_id": "w-0123456789ab"})
        )
    );
    assert_eq!(f.get("/v1/health", Some(b)).1["state"], "starting");

    // No token, a wrong one, another scheme, an unregistered service's.
    for token in [None, Some("0".repeat(64).as_str()), Some(&a[1..])] {
        let (code, body) = f.get("/v1/secrets", token);
        assert_eq!(code, 401, "{token:?}");
        assert!(body["error"].is_string());
    }
    let resp = f
        .agent
        .get(format!("{}/v1/config", f.api.url()))
        .header("Authorization", format!("Basic {a}"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let other = derive_token(&Secret::from_bytes([42; 32]), "svc-c");
    assert_eq!(f.get("/v1/config", Some(&other)).0, 401);

    assert_eq!(f.get("/v1/nope", Some(a)).0, 404);
    assert_eq!(f.get("/v1/events", Some(a)).0, 405);
    assert_eq!(f.post("/v1/config", a, b"{}").0, 405);

    // Unregistered: the token stops working at once.
    assert!(registry.unregister("svc-b"));
    assert_eq!(f.get("/v1/config", Some(b)).0, 401);
    assert_eq!(f.get("/v1/config", Some(a)).0, 200);
}

#[test]
fn env_names_the_running_api_and_goes_away_on_stop() {
    let f = fixture(8);
    let registry = f.api.registry().clone();
    let env: BTreeMap<_, _> = registry.env("svc-a").into_iter().collect();
    assert_eq!(env[ENV_TOKEN], f.a);
    assert_eq!(env[ENV_API], f.api.url());
    assert!(env[ENV_API].starts_with("http://127.0.0.1:"));
    assert_eq!(env[ENV_SERVICE], "svc-a");
    let url = f.api.url();
    f.api.stop();
    assert!(registry.env("svc-a").is_empty());
    assert!(f.agent.get(format!("{url}/v1/health")).call().is_err());
}

#[test]
fn events_and_metrics_reach_the_queue_with_the_service_name() {
    let mut f = fixture(8);
    let (code, _) = f.post("/v1/events", &f.a, br#"{"text": "cache warmed"}"#);
    assert_eq!(code, 202);
    let (code, _) = f.post(
        "/v1/metrics",
        &f.b,
        br#"{"samples": {"queue_depth": 17, "errors_total": -1}}"#,
    );
    assert_eq!(code, 202);

    let first = f.rx.try_recv().unwrap();
    assert_eq!(first.service(), "svc-a");
    let Body::Event(ev) = first.into_body() else {
        panic!("not an event")
    };
    assert_eq!(ev.kind, EventKind::ServiceEvent);
    assert_eq!(ev.detail, "svc-a: cache warmed");

    let Body::ServiceMetrics(m) = f.rx.try_recv().unwrap().into_body() else {
        panic!("not metrics")
    };
    assert_eq!(m.name, "svc-b");
    let samples: Vec<_> = m
        .samples
        .iter()
        .map(|s| (s.key.as_str(), s.value))
        .collect();
    assert_eq!(samples, [("errors_total", -1), ("queue_depth", 17)]);
    assert!(f.rx.try_recv().is_err());
}

#[test]
fn bad_publishes_are_refused_and_nothing_is_queued() {
    let mut f = fixture(8);
    let big = json!({ "text": "x".repeat(MAX_BODY) }).to_string();
    assert_eq!(f.post("/v1/events", &f.a, big.as_bytes()).0, 413);
    let (code, body) = f.post("/v1/metrics", &f.a, br#"{"samples": {"Bad-Key": 1}}"#);
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("Bad-Key"));
    assert_eq!(
        f.post("/v1/metrics", &f.a, br#"{"samples": {"ok": 1.5}}"#)
            .0,
        400
    );
    assert_eq!(f.post("/v1/events", &f.a, b"not json").0, 400);
    assert_eq!(f.post("/v1/events", &f.a, br#"{"txt": "x"}"#).0, 400);
    assert!(f.rx.try_recv().is_err());

    // Long text is cut to the wire bound, never refused.
    let long = json!({ "text": "y".repeat(1000) }).to_string();
    assert_eq!(f.post("/v1/events", &f.a, long.as_bytes()).0, 202);
    let Body::Event(ev) = f.rx.try_recv().unwrap().into_body() else {
        panic!("not an event")
    };
    assert_eq!(ev.detail.len(), 200);
}

#[test]
fn a_full_queue_answers_503_and_a_flood_429() {
    let mut f = fixture(1);
    let ev = br#"{"text": "one"}"#;
    assert_eq!(f.post("/v1/events", &f.a, ev).0, 202);
    let (code, body) = f.post("/v1/events", &f.a, ev);
    assert_eq!(code, 503, "{body}");
    assert!(f.rx.try_recv().is_ok());
    assert_eq!(f.post("/v1/events", &f.a, ev).0, 202);
    assert!(f.rx.try_recv().is_ok());

    // B publishes until rate limited (draining the queue), A is unaffected.
    let mut accepted = 0;
    let mut limited = false;
    for _ in 0..(3 * PUBLISH_BURST) {
        match f.post("/v1/events", &f.b, ev).0 {
            202 => accepted += 1,
            429 => {
                limited = true;
                break;
            }
            other => panic!("unexpected {other}"),
        }
        f.rx.try_recv().unwrap();
    }
    assert!(limited && accepted >= PUBLISH_BURST, "{accepted}");
    assert_eq!(f.post("/v1/events", &f.a, ev).0, 202);
}
