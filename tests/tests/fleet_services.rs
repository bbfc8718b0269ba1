//! End-to-end: the fleet services (services/) deployed the way a user
//! deploys them: their binaries uploaded to the conductor as artifacts,
//! specs with client keys in `secrets`, deployed to a worker, then used over
//! the network by real clients. Audit events and metrics come back to the
//! conductor through the worker's local API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::path::Path;
use std::time::Duration;

use e2e::services::*;
use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A client token of the form the services accept (16..=256 characters).
fn token(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{nanos:x}-{}", std::process::id())
}

fn start_one(dir: &Path) -> (Conductor, Worker, String) {
    let c = Conductor::start(&dir.join("conductor"));
    let mut w = Worker::start(
        &dir.join("worker"),
        &c.url(),
        Some(&c.registration_token()),
        WorkerOpts::named("services-host"),
    );
    let id = w.wait_id();
    wait_for("worker online", SECS(30), || {
        (c.status_of(&id) == "online").then_some(())
    });
    (c, w, id)
}

/// Uploads `binary`, stores `spec` (with the artifact filled in), deploys it
/// to `id` through the CLI and waits until the worker reports it healthy.
fn deploy_artifact(c: &Conductor, id: &str, binary: &Path, mut spec: Value) {
    let sha = upload_artifact(c, binary);
    let name = spec["name"].as_str().unwrap().to_string();
    spec["artifacts"] = json!({ std::env::consts::ARCH: sha });
    create_service(c, &spec);
    let (ok, out, err) = cli(c, &["deploy", &name, "--workers", id]);
    assert!(ok, "deploy {name}: {err}{out}");
    wait_for(&format!("{name} healthy"), SECS(60), || {
        (state_of(c, &name, id) == "healthy").then_some(())
    });
}

/// `spec.health` for an HTTP `/healthz` on `port`.
fn health(port: u16) -> Value {
    json!({"http": {"port": port, "path": "/healthz"},
           "interval_ms": 500, "timeout_ms": 1000, "retries": 3})
}

fn post(url: &str, bearer: &str, body: &Value) -> (u16, Value) {
    let mut resp = http()
        .post(url)
        .header("Authorization", &format!("Bearer {bearer}"))
        .send_json(body)
        .unwrap();
    let status = resp.status().as_u16();
    let v = resp.body_mut().read_json().unwrap_or(Value::Null);
    (status, v)
}

/// The worker's record on the conductor (events included) as text.
fn worker_text(c: &Conductor, id: &str) -> String {
    c.get(&format!("/api/v1/workers/{id}")).1.to_string()
}

#[test]
fn key_manager_deployed_through_the_conductor_serves_clients_and_reports_back() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _worker, id) = start_one(dir.path());
    let km = service_bin("aerekos-key-manager", "key-manager");
    let port = free_port();
    let orders = token("orders");
    deploy_artifact(
        &c,
        &id,
        &km,
        json!({"name": "key-manager",
               "args": ["--listen", format!("127.0.0.1:{port}"), "--report-interval-ms", "500"],
               "restart": "always", "health": health(port),
               "secrets": {"client.orders": orders}}),
    );
    let base = format!("http://127.0.0.1:{port}");

    // A client with the key issued through the conductor uses the KMS.
    let (status, v) = post(&format!("{base}/v1/keys"), &orders, &json!({"name": "orders"}));
    assert_eq!(status, 201, "{v}");
    let plain = "aGVsbG8gZmxlZXQ="; // "hello fleet"
    let (status, enc) = post(
        &format!("{base}/v1/keys/orders/encrypt"),
        &orders,
        &json!({ "plaintext": plain }),
    );
    assert_eq!(status, 200, "{enc}");
    let (status, dec) = post(
        &format!("{base}/v1/decrypt"),
        &orders,
        &json!({"ciphertext": enc["ciphertext"]}),
    );
    assert_eq!(status, 200, "{dec}");
    assert_eq!(dec["plaintext"], plain);
    // A token nobody issued is refused.
    let (status, _) = post(&format!("{base}/v1/keys"), &token("guess"), &json!({"name": "x"}));
    assert_eq!(status, 401);

    // Audit and metrics come back through the worker to the conductor.
    wait_for("audit event on the conductor", SECS(30), || {
        worker_text(&c, &id)
            .contains("created key orders by orders")
            .then_some(())
    });
    wait_for("key-manager metrics in Prometheus", SECS(30), || {
        let text = c.prometheus();
        let series = format!(
            "aerekos_service_metric{{worker_id=\"{id}\",service=\"key-manager\",key=\"encrypts\"}}"
        );
        (metric(&text, &series) >= 1.0).then_some(())
    });

    // A new client key is a new version of the spec; deploying it restarts
    // key-manager with the new secrets, and its sealed keys survive: data
    // encrypted before the upgrade still decrypts.
    let billing = token("billing");
    let pid = pid_of(&c, "key-manager", &id);
    let (status, body) = c.get("/api/v1/services/key-manager");
    assert_eq!(status, 200, "{body}");
    let mut spec = json!({"name": "key-manager",
        "args": ["--listen", format!("127.0.0.1:{port}"), "--report-interval-ms", "500"],
        "restart": "always", "health": health(port),
        "secrets": {"client.orders": orders, "client.billing": billing}});
    spec["artifacts"] = json!({ std::env::consts::ARCH: upload_artifact(&c, &km) });
    create_service(&c, &spec);
    let (ok, out, err) = cli(&c, &["deploy", "key-manager", "--workers", &id]);
    assert!(ok, "{err}{out}");
    wait_for("key-manager restarted with v2", SECS(60), || {
        let p = pid_of(&c, "key-manager", &id);
        (p != 0 && p != pid && state_of(&c, "key-manager", &id) == "healthy").then_some(())
    });
    let (status, v) = post(&format!("{base}/v1/keys"), &billing, &json!({"name": "billing"}));
    assert_eq!(status, 201, "the new client key works: {v}");
    let (status, dec) = post(
        &format!("{base}/v1/decrypt"),
        &orders,
        &json!({"ciphertext": enc["ciphertext"]}),
    );
    assert_eq!(status, 200, "data from before the upgrade decrypts: {dec}");
    assert_eq!(dec["plaintext"], plain);

    // The client keys are never shown back by the conductor.
    for text in [
        c.get("/api/v1/services/key-manager").1.to_string(),
        worker_text(&c, &id),
        std::fs::read_to_string(c.data_dir.join("conductor.log")).unwrap_or_default(),
    ] {
        assert!(!text.contains(&orders) && !text.contains(&billing), "{text}");
    }
}
