//! key-manager end to end: a real worker local API (edge-worker's
//! `LocalApi`), the real `key-manager` binary as a child process, and ureq
//! clients over loopback HTTP.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use service_runtime::harness::{
    http_agent, json_call, map, LocalPublish, ServiceProcess, Spawned, Worker, FAST_REPORTING,
};

const SERVICE: &str = "key-manager";
const APP1: &str = "app1-token-3f9a1c0d5e7b2a4c";
const APP2: &str = "app2-token-81bd0e4c6a2f9d3e";
const PLAINTEXT: &[u8] = b"PLAINTEXT-MARKER-do-not-log-7d1e";

/// A running key-manager process.
type Km = ServiceProcess;

fn default_secrets() -> BTreeMap<String, String> {
    map(&[("clients", &format!("app1:{APP1},app2:{APP2}"))])
}

/// A worker's local API with the key-manager service registered.
fn km_worker(secret_byte: u8, secrets: BTreeMap<String, String>) -> Worker {
    Worker::start(
        secret_byte,
        "w-test",
        &[(SERVICE, map(&[("site", "test")]), secrets)],
    )
}

fn spawn_km(worker: &Worker, data: &Path) -> Spawned {
    Spawned::new(
        Path::new(env!("CARGO_BIN_EXE_key-manager")),
        worker.env(SERVICE),
        data,
        &FAST_REPORTING,
    )
}

fn start_km(worker: &Worker, data: &Path) -> Km {
    spawn_km(worker, data).ready()
}

/// Nothing secret in the process's stdout/stderr.
fn assert_clean(km: &Km, secrets: &[&str]) {
    let out = km.output();
    for s in secrets
        .iter()
        .chain(&[APP1, APP2, std::str::from_utf8(PLAINTEXT).unwrap()])
    {
        assert!(!out.contains(s), "output leaks a secret: {out}");
    }
    assert!(!out.contains(&B64.encode(PLAINTEXT)), "output leaks: {out}");
    assert!(!out.contains("panicked"), "{out}");
}

/// `method path` with an optional bearer token and JSON body → (status, JSON).
fn call(
    km: &Km,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    json_call(&http_agent(), &km.url, token, method, path, body)
}

fn ok(km: &Km, method: &str, path: &str, body: Option<Value>) -> Value {
    let (code, v) = call(km, Some(APP1), method, path, body);
    assert!((200..300).contains(&code), "{method} {path}: {code} {v}");
    v
}

fn encrypt(km: &Km, key: &str, pt: &[u8], aad: Option<&[u8]>) -> Value {
    let mut body = json!({ "plaintext": B64.encode(pt) });
    if let Some(a) = aad {
        body["aad"] = json!(B64.encode(a));
    }
    ok(km, "POST", &format!("/v1/keys/{key}/encrypt"), Some(body))
}

fn decrypt(km: &Km, token: &str, ct: &str, aad: Option<&[u8]>) -> (u16, Value) {
    let mut body = json!({ "ciphertext": ct });
    if let Some(a) = aad {
        body["aad"] = json!(B64.encode(a));
    }
    call(km, Some(token), "POST", "/v1/decrypt", Some(body))
}

fn plaintext_of(v: &Value) -> Vec<u8> {
    B64.decode(v["plaintext"].as_str().unwrap()).unwrap()
}

#[test]
fn keys_encrypt_rotate_reencrypt_datakeys_disable_and_audit() {
    let mut worker = km_worker(1, default_secrets());
    let dir = tempfile::tempdir().unwrap();
    let km = start_km(&worker, dir.path());

    let created = ok(&km, "POST", "/v1/keys", Some(json!({"name": "orders"})));
    assert_eq!(created["latest_version"], 1);
    assert_eq!(created["enabled"], true);
    let (code, v) = call(
        &km,
        Some(APP1),
        "POST",
        "/v1/keys",
        Some(json!({"name": "orders"})),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("already exists"));

    // Encrypt and decrypt, with aad.
    let e1 = encrypt(&km, "orders", PLAINTEXT, Some(b"order-42"));
    assert_eq!(e1["version"], 1);
    let ct1 = e1["ciphertext"].as_str().unwrap().to_string();
    let (code, d) = decrypt(&km, APP2, &ct1, Some(b"order-42"));
    assert_eq!(code, 200, "{d}");
    assert_eq!(plaintext_of(&d), PLAINTEXT);
    assert_eq!(
        (d["key"].as_str(), d["version"].as_u64()),
        (Some("orders"), Some(1))
    );
    let (code, d) = decrypt(&km, APP1, &ct1, Some(b"order-43"));
    assert_eq!(code, 400, "wrong aad: {d}");
    let (code, _) = decrypt(&km, APP1, &ct1, None);
    assert_eq!(code, 400, "missing aad");

    // Rotate: old data still decrypts, new data uses v2.
    let rotated = ok(&km, "POST", "/v1/keys/orders/rotate", None);
    assert_eq!(rotated["latest_version"], 2);
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 2);
    let (code, d) = decrypt(&km, APP1, &ct1, Some(b"order-42"));
    assert_eq!((code, plaintext_of(&d)), (200, PLAINTEXT.to_vec()));
    let e2 = encrypt(&km, "orders", b"after", None);
    assert_eq!(e2["version"], 2);

    // Re-encrypt moves old ciphertext to the latest version.
    let r = ok(
        &km,
        "POST",
        "/v1/reencrypt",
        Some(json!({"ciphertext": ct1, "aad": B64.encode(b"order-42")})),
    );
    assert_eq!(r["version"], 2);
    let ct1b = r["ciphertext"].as_str().unwrap();
    assert_ne!(ct1b, ct1);
    let (code, d) = decrypt(&km, APP1, ct1b, Some(b"order-42"));
    assert_eq!((code, plaintext_of(&d)), (200, PLAINTEXT.to_vec()));
    // ... or to another key.
    ok(&km, "POST", "/v1/keys", Some(json!({"name": "archive"})));
    let r = ok(
        &km,
        "POST",
        "/v1/reencrypt",
        Some(json!({"ciphertext": ct1b, "aad": B64.encode(b"order-42"), "key": "archive"})),
    );
    assert_eq!(r["key"], "archive");

    // Data keys: the wrapped copy unwraps to the plaintext.
    let dk = ok(
        &km,
        "POST",
        "/v1/keys/orders/datakey",
        Some(json!({"bytes": 32})),
    );
    let plain = plaintext_of(&dk);
    assert_eq!(plain.len(), 32);
    let (code, d) = decrypt(&km, APP1, dk["ciphertext"].as_str().unwrap(), None);
    assert_eq!((code, plaintext_of(&d)), (200, plain));
    let (code, _) = call(
        &km,
        Some(APP1),
        "POST",
        "/v1/keys/orders/datakey",
        Some(json!({"bytes": 4096})),
    );
    assert_eq!(code, 400);

    // Metadata only; list.
    let meta = ok(&km, "GET", "/v1/keys/orders", None);
    assert_eq!(meta["name"], "orders");
    assert!(!meta.to_string().contains("material"));
    let list = ok(&km, "GET", "/v1/keys", None);
    let names: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["archive", "orders"]);

    // Disabled keys refuse encrypt and decrypt; enable restores.
    ok(&km, "POST", "/v1/keys/orders/disable", None);
    let (code, v) = call(
        &km,
        Some(APP1),
        "POST",
        "/v1/keys/orders/encrypt",
        Some(json!({"plaintext": "aGk="})),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("disabled"));
    let (code, _) = decrypt(&km, APP1, &ct1, Some(b"order-42"));
    assert_eq!(code, 409);
    ok(&km, "POST", "/v1/keys/orders/enable", None);
    let (code, _) = decrypt(&km, APP1, &ct1, Some(b"order-42"));
    assert_eq!(code, 200);

    // Per-key clients.
    ok(
        &km,
        "POST",
        "/v1/keys",
        Some(json!({"name": "private", "clients": ["app1"]})),
    );
    let e = encrypt(&km, "private", b"x", None);
    let (code, v) = decrypt(&km, APP2, e["ciphertext"].as_str().unwrap(), None);
    assert_eq!(code, 403, "{v}");
    let (_, list2) = call(&km, Some(APP2), "GET", "/v1/keys", None);
    assert_eq!(list2["keys"].as_array().unwrap().len(), 2, "{list2}");

    // Audit events reach the worker's queue; metrics too.
    worker.wait_event(SERVICE, "created key orders by app1");
    worker.wait_event(SERVICE, "rotated key orders to v2 by app1");
    worker.wait_event(SERVICE, "disabled key orders by app1");
    worker.wait_event(SERVICE, "enabled key orders by app1");
    worker.wait_for("metrics", |p| {
        matches!(p, LocalPublish::Metrics { name, samples } if name == SERVICE
            && samples.iter().any(|s| s.key.as_str() == "encrypts" && s.value > 0)
            && samples.iter().any(|s| s.key.as_str() == "keys" && s.value == 3))
    });
    assert_clean(&km, &[&worker.token(SERVICE)]);
}

#[test]
fn refusals_are_clear_and_never_crash() {
    let mut worker = km_worker(2, default_secrets());
    let dir = tempfile::tempdir().unwrap();
    let km = start_km(&worker, dir.path());
    ok(&km, "POST", "/v1/keys", Some(json!({"name": "k1"})));
    let ct = encrypt(&km, "k1", PLAINTEXT, None)["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();

    // Authentication.
    assert_eq!(call(&km, None, "GET", "/v1/keys", None).0, 401);
    assert_eq!(
        call(
            &km,
            Some("app1-token-wrong-000000"),
            "GET",
            "/v1/keys",
            None
        )
        .0,
        401
    );
    assert_eq!(
        call(&km, Some(&worker.token(SERVICE)), "GET", "/v1/keys", None).0,
        401,
        "the service token is not a client key"
    );
    let (code, v) = call(&km, None, "GET", "/healthz", None);
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")));

    // Sizes.
    let huge = json!({"plaintext": B64.encode(vec![7u8; 60 * 1024])});
    assert_eq!(
        call(&km, Some(APP1), "POST", "/v1/keys/k1/encrypt", Some(huge)).0,
        413
    );
    let big = json!({"plaintext": B64.encode(vec![7u8; 33 * 1024])});
    let (code, v) = call(&km, Some(APP1), "POST", "/v1/keys/k1/encrypt", Some(big));
    assert_eq!(code, 413, "{v}");
    let max = json!({"plaintext": B64.encode(vec![7u8; 32 * 1024])});
    assert_eq!(
        call(&km, Some(APP1), "POST", "/v1/keys/k1/encrypt", Some(max)).0,
        200
    );

    // Garbage and tampered ciphertexts.
    let raw = B64.decode(&ct).unwrap();
    let mut tampered = raw.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let mut relabelled = raw.clone();
    relabelled[2] = b'x'; // another key name of the same length
    let mut bad_version = raw.clone();
    bad_version[7] = 9;
    let garbage = [
        json!("not base64!!"),
        json!(""),
        json!(B64.encode(b"hello world, certainly not a ciphertext")),
        json!(B64.encode(&raw[..raw.len() - 1])),
        json!(B64.encode(&raw[..10])),
        json!(B64.encode(&tampered)),
        json!(B64.encode(&bad_version)),
        json!(B64.encode([0xA1u8, 0, 0, 0])),
        json!(B64.encode([0xA1u8, 200, 1, 2])),
    ];
    for g in garbage {
        let (code, v) = call(
            &km,
            Some(APP1),
            "POST",
            "/v1/decrypt",
            Some(json!({"ciphertext": g})),
        );
        assert_eq!(code, 400, "{g}: {v}");
        assert!(v["error"].is_string());
    }
    let (code, v) = call(
        &km,
        Some(APP1),
        "POST",
        "/v1/decrypt",
        Some(json!({"ciphertext": B64.encode(&relabelled)})),
    );
    assert_eq!(code, 404, "unknown key x1: {v}");
    let (code, v) = call(
        &km,
        Some(APP1),
        "POST",
        "/v1/decrypt",
        Some(json!({"ciphertext": B64.encode(&tampered)})),
    );
    assert!(
        v["error"].as_str().unwrap().contains("authentication"),
        "{code} {v}"
    );

    // Bad requests.
    for (method, path, body, want) in [
        ("POST", "/v1/keys", json!({"nmae": "x"}), 400),
        ("POST", "/v1/keys", json!({"name": "../etc"}), 400),
        (
            "POST",
            "/v1/keys",
            json!({"name": "k2", "clients": ["Bad Name"]}),
            400,
        ),
        ("POST", "/v1/keys", json!([1, 2]), 400),
        (
            "POST",
            "/v1/keys/nope/encrypt",
            json!({"plaintext": "aGk="}),
            404,
        ),
        ("POST", "/v1/keys/k1/encrypt", json!({}), 400),
        ("POST", "/v1/keys/k1/encrypt", json!({"plaintext": 5}), 400),
        ("POST", "/v1/keys/k1/rotate", json!({"x": 1}), 400),
        ("POST", "/v1/nothing", json!({}), 404),
        ("GET", "/v1/decrypt", json!({}), 405),
        ("GET", "/v1/keys/NOPE", json!({}), 400),
    ] {
        let (code, v) = call(&km, Some(APP1), method, path, Some(body.clone()));
        assert_eq!(code, want, "{method} {path} {body}: {v}");
    }
    // Not JSON at all.
    let resp = http_agent()
        .post(&format!("{}/v1/decrypt", km.url))
        .header("Authorization", &format!("Bearer {APP1}"))
        .send("{{{{ not json")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Still alive and serving; refusals were reported as one audit event.
    assert_eq!(call(&km, None, "GET", "/healthz", None).0, 200);
    assert_eq!(
        call(
            &km,
            Some(APP1),
            "POST",
            "/v1/decrypt",
            Some(json!({"ciphertext": ct}))
        )
        .0,
        200
    );
    worker.wait_event(
        SERVICE,
        "denied 3 requests with a missing or unknown API key",
    );
    worker.wait_for("denied metric", |p| {
        matches!(p, LocalPublish::Metrics { samples, .. }
            if samples.iter().any(|s| s.key.as_str() == "denied" && s.value == 3))
    });
    assert_clean(&km, &[&worker.token(SERVICE)]);
}

#[test]
fn kill9_right_after_acknowledged_writes_loses_nothing() {
    let worker = km_worker(3, default_secrets());
    let dir = tempfile::tempdir().unwrap();
    let mut km = start_km(&worker, dir.path());
    ok(&km, "POST", "/v1/keys", Some(json!({"name": "durable"})));
    let mut cts = vec![encrypt(&km, "durable", b"v1 data", None)["ciphertext"]
        .as_str()
        .unwrap()
        .to_string()];
    for round in 2..=6u64 {
        let v = ok(&km, "POST", "/v1/keys/durable/rotate", None);
        assert_eq!(v["latest_version"], round);
        km.kill9(); // at once after the acknowledgement
        km = start_km(&worker, dir.path());
        let meta = ok(&km, "GET", "/v1/keys/durable", None);
        assert_eq!(meta["latest_version"], round, "acknowledged rotation lost");
        for ct in &cts {
            assert_eq!(decrypt(&km, APP1, ct, None).0, 200);
        }
        let e = encrypt(&km, "durable", format!("v{round} data").as_bytes(), None);
        assert_eq!(e["version"], round);
        cts.push(e["ciphertext"].as_str().unwrap().to_string());
    }
    // Disable then kill: still disabled after the restart.
    ok(&km, "POST", "/v1/keys/durable/disable", None);
    km.kill9();
    km = start_km(&worker, dir.path());
    assert_eq!(ok(&km, "GET", "/v1/keys/durable", None)["enabled"], false);
    // Concurrent creates, killed right after the last answer: all there.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = km.url.clone();
            std::thread::spawn(move || {
                let r = http_agent()
                    .post(&format!("{url}/v1/keys"))
                    .header("Authorization", &format!("Bearer {APP1}"))
                    .send_json(json!({"name": format!("c{i}")}))
                    .unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 201);
    }
    km.kill9();
    km = start_km(&worker, dir.path());
    assert_eq!(
        ok(&km, "GET", "/v1/keys", None)["keys"]
            .as_array()
            .unwrap()
            .len(),
        9
    );
    // Key files hold no plaintext key names or material.
    for entry in std::fs::read_dir(dir.path().join("keys")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(bytes.starts_with(b"AKM1"));
        assert!(!String::from_utf8_lossy(&bytes).contains("durable"));
    }
    assert_clean(&km, &[&worker.token(SERVICE)]);
}

/// Waits for a process expected to refuse to start; returns its output.
fn expect_refusal(worker: &Worker, data: &Path) -> String {
    spawn_km(worker, data).refusal(Duration::from_secs(30))
}

#[test]
fn a_store_is_bound_to_its_master_key() {
    let dir = tempfile::tempdir().unwrap();
    // Master key derived from the service token of worker A.
    let a = km_worker(4, default_secrets());
    let km = start_km(&a, dir.path());
    ok(&km, "POST", "/v1/keys", Some(json!({"name": "bound"})));
    let ct = encrypt(&km, "bound", b"x", None)["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    drop(km);
    // Another worker (another token, so another derived master key).
    let b = km_worker(5, default_secrets());
    let out = expect_refusal(&b, dir.path());
    assert!(out.contains("different master key"), "{out}");
    assert!(
        !out.contains(&b.token(SERVICE)) && !out.contains(&a.token(SERVICE)),
        "{out}"
    );
    // Back on worker A it works.
    let km = start_km(&a, dir.path());
    assert_eq!(decrypt(&km, APP1, &ct, None).0, 200);
    drop(km);

    // An explicit master_key secret: bound to it, whatever the worker.
    let dir2 = tempfile::tempdir().unwrap();
    let mk1 = "11".repeat(32);
    let mut s1 = default_secrets();
    s1.insert("master_key".into(), mk1.clone());
    let c = km_worker(6, s1.clone());
    let km = start_km(&c, dir2.path());
    assert!(km
        .output()
        .contains("master key from the master_key secret"));
    ok(&km, "POST", "/v1/keys", Some(json!({"name": "moved"})));
    let ct = encrypt(&km, "moved", b"x", None)["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert_clean(&km, &[&mk1, &c.token(SERVICE)]);
    drop(km);
    let d = km_worker(7, s1); // same master_key on another worker: works
    let km = start_km(&d, dir2.path());
    assert_eq!(decrypt(&km, APP1, &ct, None).0, 200);
    drop(km);
    let mut s2 = default_secrets();
    s2.insert("master_key".into(), "22".repeat(32));
    let e = km_worker(6, s2);
    let out = expect_refusal(&e, dir2.path());
    assert!(
        out.contains("different master key than the master_key secret"),
        "{out}"
    );
    assert!(!out.contains(&mk1) && !out.contains(&"22".repeat(32)));
    // A malformed master_key is a clear start error.
    let mut s3 = default_secrets();
    s3.insert("master_key".into(), "abc".into());
    let out = expect_refusal(&km_worker(8, s3), tempfile::tempdir().unwrap().path());
    assert!(out.contains("64 hex characters"), "{out}");
}

#[test]
fn client_keys_issued_through_the_worker_apply_without_restart() {
    let worker = km_worker(9, default_secrets());
    let dir = tempfile::tempdir().unwrap();
    let km = start_km(&worker, dir.path());
    let app3 = "app3-token-5c2e9b7a1d4f8e60";
    assert_eq!(call(&km, Some(app3), "GET", "/v1/keys", None).0, 401);
    // The admin adds app3 and removes app2 in the spec's secrets; the
    // worker re-registers the service with them.
    worker
        .registry
        .register(
            SERVICE,
            map(&[("site", "test")]),
            map(&[("clients", &format!("app1:{APP1}")), ("client.app3", app3)]),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while call(&km, Some(app3), "GET", "/v1/keys", None).0 != 200 {
        assert!(Instant::now() < deadline, "app3 never accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(call(&km, Some(APP2), "GET", "/v1/keys", None).0, 401);
    assert_eq!(call(&km, Some(APP1), "GET", "/v1/keys", None).0, 200);
    assert_clean(&km, &[app3, &worker.token(SERVICE)]);
}
