//! The local API over real loopback HTTP (ureq): per-service isolation of
//! config and secrets, authentication, and publishes reaching the session's
//! queue with the right service name and bounds.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edge_worker::local_api::{
    self, derive_token, LocalApi, LocalPublish, Registry, ENV_API, ENV_SERVICE, ENV_TOKEN,
    HANDLER_THREADS, MAX_BODY, MAX_HEAD, MAX_HEADERS, PUBLISH_BURST, REQUEST_TIMEOUT,
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

/// Sends `request` as raw bytes (then half-closes if asked) and reads
/// everything the server sends back until it closes.
fn raw(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn status(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a response: {response:?}"))
}

#[test]
fn oversized_heads_get_431_and_the_server_keeps_serving() {
    let f = fixture(8);
    let addr = f.api.addr();
    let long = format!(
        "GET /v1/health HTTP/1.1\r\nAuthorization: Bearer {}\r\nX-Filler: {}\r\n\r\n",
        f.a,
        "x".repeat(MAX_HEAD)
    );
    let out = raw(addr, long.as_bytes(), false);
    assert_eq!(status(&out), 431, "{out}");
    assert!(out.contains("Connection: close"));
    assert!(out.contains(&format!("over {MAX_HEAD} bytes")), "{out}");

    let mut many = format!(
        "GET /v1/health HTTP/1.1\r\nAuthorization: Bearer {}\r\n",
        f.a
    );
    for i in 0..MAX_HEADERS {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status(&raw(addr, many.as_bytes(), false)), 431);

    // Just within both bounds: served.
    let mut fits = format!(
        "GET /v1/health HTTP/1.1\r\nAuthorization: Bearer {}\r\n",
        f.a
    );
    for i in 0..MAX_HEADERS - 1 {
        fits.push_str(&format!("X-{i}: y\r\n"));
    }
    fits.push_str("\r\n");
    assert_eq!(status(&raw(addr, fits.as_bytes(), false)), 200);
    assert_eq!(f.get("/v1/health", Some(&f.a)).0, 200);
}

#[test]
fn bodies_need_a_content_length_and_the_token_is_checked_first() {
    let mut f = fixture(8);
    let addr = f.api.addr();
    let auth = format!("Authorization: Bearer {}\r\n", f.a);
    let chunked = format!(
        "POST /v1/events HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n\
         f\r\n{{\"text\": \"x\"}}\r\n0\r\n\r\n"
    );
    assert_eq!(status(&raw(addr, chunked.as_bytes(), false)), 411);
    let no_length = format!("POST /v1/events HTTP/1.1\r\n{auth}\r\n{{\"text\": \"x\"}}");
    assert_eq!(status(&raw(addr, no_length.as_bytes(), true)), 411);
    let bad_len = format!("POST /v1/events HTTP/1.1\r\n{auth}Content-Length: 1e3\r\n\r\n");
    assert_eq!(status(&raw(addr, bad_len.as_bytes(), true)), 400);
    // A body over the cap without a token: 401, as before (the token is
    // checked before the body is looked at).
    let big = format!(
        "POST /v1/events HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
        MAX_BODY + 1,
        "x".repeat(MAX_BODY + 1)
    );
    assert_eq!(status(&raw(addr, big.as_bytes(), false)), 401);
    // HTTP/1.0 and bare-LF line ends are served.
    let body = r#"{"text": "hi"}"#;
    let old = format!(
        "POST /v1/events HTTP/1.0\n{}Content-Length: {}\n\n{body}",
        auth.replace("\r\n", "\n"),
        body.len()
    );
    assert_eq!(status(&raw(addr, old.as_bytes(), false)), 202);
    assert!(matches!(f.rx.try_recv(), Ok(LocalPublish::Event { text, .. }) if text == "hi"));
    assert!(f.rx.try_recv().is_err());
}

#[test]
fn a_short_body_is_400_on_eof() {
    let mut f = fixture(8);
    let req = format!(
        "POST /v1/events HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Length: 20\r\n\r\n{{\"te",
        f.a
    );
    let started = Instant::now();
    let out = raw(f.api.addr(), req.as_bytes(), true);
    assert_eq!(status(&out), 400, "{out}");
    assert!(out.contains("closed after 4 of 20 bytes"), "{out}");
    assert!(started.elapsed() < REQUEST_TIMEOUT);
    assert!(f.rx.try_recv().is_err());
}

#[test]
fn stalled_clients_time_out_without_blocking_the_api_for_long() {
    let f = fixture(8);
    let addr = f.api.addr();
    // One silent client: another thread serves at once.
    let silent = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    assert_eq!(f.get("/v1/health", Some(&f.a)).0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Every thread held (a silent client, clients stalled mid-body): a
    // request waits at most for the request timeout.
    let mut stalled = Vec::new();
    for _ in 1..HANDLER_THREADS {
        let mut s = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Length: 20\r\n\r\nabc",
            f.a
        );
        s.write_all(head.as_bytes()).unwrap();
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(f.get("/v1/health", Some(&f.a)).0, 200);
    let waited = started.elapsed();
    assert!(
        waited < REQUEST_TIMEOUT + Duration::from_secs(3),
        "{waited:?}"
    );

    // The stalled ones got 400; the silent one was closed without a word.
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(status(&out), 400, "{out}");
        assert!(out.contains("did not arrive within"), "{out}");
    }
    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let _ = silent.read_to_end(&mut out);
    assert!(out.is_empty());
}

#[test]
fn stop_is_prompt_with_an_idle_connection_open() {
    let f = fixture(8);
    let registry = f.api.registry().clone();
    let addr = f.api.addr();
    let mut idle = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /v1/health HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    f.api.stop();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(registry.env("svc-a").is_empty());
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = idle.read_to_end(&mut out);
    assert!(out.is_empty());
    assert!(TcpStream::connect(addr).is_err());
}
