//! End-to-end: the fleet services (services/) deployed the way a user
//! deploys them: their binaries uploaded to the conductor as artifacts,
//! specs with client keys in `secrets`, deployed to a worker, then used over
//! the network by real clients. Audit events and metrics come back to the
//! conductor through the worker's local API.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

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
    let (c, w, id) = conductor_and_worker(dir, "services-host");
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
    let km = fleet_service_bin("aerekos-key-manager", "key-manager");
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
    let (status, v) = post(
        &format!("{base}/v1/keys"),
        &orders,
        &json!({"name": "orders"}),
    );
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
    let (status, _) = post(
        &format!("{base}/v1/keys"),
        &token("guess"),
        &json!({"name": "x"}),
    );
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
    let (status, v) = post(
        &format!("{base}/v1/keys"),
        &billing,
        &json!({"name": "billing"}),
    );
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
        assert!(
            !text.contains(&orders) && !text.contains(&billing),
            "{text}"
        );
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn key_storage_and_db_managers_deployed_together_back_up_and_restore_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _worker, id) = start_one(dir.path());
    let (km_port, sm_port, db_port) = (free_port(), free_port(), free_port());
    let storage_kms = token("storage");
    let ops = token("ops");
    let (db_akid, db_secret) = ("AKIDDBBACKUP", token("db-secret"));
    let (app_akid, app_secret) = ("AKIDAPP", token("app-secret"));

    // key-manager first: storage-manager encrypts every object under its
    // data keys.
    deploy_artifact(
        &c,
        &id,
        &fleet_service_bin("aerekos-key-manager", "key-manager"),
        json!({"name": "key-manager",
               "args": ["--listen", format!("127.0.0.1:{km_port}")],
               "restart": "always", "health": health(km_port),
               "secrets": {"client.storage": storage_kms}}),
    );
    deploy_artifact(
        &c,
        &id,
        &fleet_service_bin("aerekos-storage-manager", "storage-manager"),
        json!({"name": "storage-manager",
               "args": ["--listen", format!("127.0.0.1:{sm_port}"), "--report-interval-ms", "500"],
               "restart": "always", "health": health(sm_port),
               "config": {"kms_url": format!("http://127.0.0.1:{km_port}"), "kms_key": "objects"},
               "secrets": {"access_keys": format!("{db_akid}:{db_secret},{app_akid}:{app_secret}"),
                           "kms_token": storage_kms}}),
    );
    deploy_artifact(
        &c,
        &id,
        &fleet_service_bin("aerekos-db-manager", "db-manager"),
        json!({"name": "db-manager",
               "args": ["--listen", format!("127.0.0.1:{db_port}"), "--report-interval-ms", "500"],
               "restart": "always", "health": health(db_port),
               "config": {"backup_endpoint": format!("http://127.0.0.1:{sm_port}"),
                          "backup_bucket": "db-backups"},
               "secrets": {"client.ops": ops,
                           "backup_access_key": db_akid, "backup_secret_key": db_secret}}),
    );

    // An admin creates a database; an application writes and reads it with
    // the credentials db-manager issued.
    let db = format!("http://127.0.0.1:{db_port}/v1/databases");
    let (status, created) = post(&db, &ops, &json!({"name": "orders"}));
    assert_eq!(status, 201, "{created}");
    let rw = created["credentials"]["rw"].as_str().unwrap().to_string();
    let ro = created["credentials"]["ro"].as_str().unwrap().to_string();
    let query = format!("{db}/orders/query");
    let (status, v) = post(
        &query,
        &rw,
        &json!({"sql": "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL)"}),
    );
    assert_eq!(status, 200, "{v}");
    for name in ["bolt", "nut", "washer"] {
        let (status, v) = post(
            &query,
            &rw,
            &json!({"sql": "INSERT INTO items(name) VALUES (?)", "params": [name]}),
        );
        assert_eq!(status, 200, "{v}");
    }
    let count = |bearer: &str| {
        let (status, v) = post(
            &query,
            bearer,
            &json!({"sql": "SELECT count(*) FROM items"}),
        );
        assert_eq!(status, 200, "{v}");
        v["rows"][0][0].as_i64().unwrap()
    };
    assert_eq!(count(&ro), 3);
    let (status, _) = post(&query, &ro, &json!({"sql": "DELETE FROM items"}));
    assert_eq!(status, 403, "the read-only credential cannot write");

    // An on-demand backup lands in storage-manager, encrypted at rest.
    let (status, backup) = post(&format!("{db}/orders/backups"), &ops, &json!({}));
    assert_eq!(status, 201, "{backup}");
    let key = backup["backup"].as_str().unwrap().to_string();
    let s3 = storage_manager::S3Client::new(
        &format!("http://127.0.0.1:{sm_port}"),
        storage_manager::Credentials::new(app_akid, &app_secret),
    )
    .unwrap();
    let listed = s3.list_all("db-backups", "orders/").unwrap();
    assert!(
        listed.iter().any(|o| o.key == key && o.size > 0),
        "backup {key} listed by another S3 client: {:?}",
        listed.iter().map(|o| &o.key).collect::<Vec<_>>()
    );
    let mut snapshot = Vec::new();
    s3.get_object("db-backups", &key, &mut snapshot).unwrap();
    assert!(snapshot.starts_with(b"SQLite format 3\0"), "a SQLite file");
    let sm_pid = pid_of(&c, "storage-manager", &id);
    let sm_dir = std::fs::read_link(format!("/proc/{sm_pid}/cwd")).unwrap();
    let on_disk = files_under(&sm_dir);
    assert!(
        !on_disk.is_empty(),
        "storage-manager keeps files in {}",
        sm_dir.display()
    );
    for f in &on_disk {
        let bytes = std::fs::read(f).unwrap_or_default();
        assert!(
            !bytes.windows(16).any(|w| w == b"SQLite format 3\0"),
            "{} holds the backup in plain text",
            f.display()
        );
    }

    // Data lost after the backup comes back with a restore.
    let (status, v) = post(&query, &rw, &json!({"sql": "DELETE FROM items"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(count(&ro), 0);
    let (status, v) = post(
        &format!("{db}/orders/restore"),
        &ops,
        &json!({"backup": key}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(count(&ro), 3, "restored rows");

    // Audit events and capacity metrics reach the conductor.
    for text in [
        "created database orders by ops",
        "backed up database orders",
        "restored database orders",
        "created bucket db-backups",
    ] {
        wait_for(
            &format!("event {text:?} on the conductor"),
            SECS(30),
            || worker_text(&c, &id).contains(text).then_some(()),
        );
    }
    wait_for("storage-manager capacity in Prometheus", SECS(30), || {
        let text = c.prometheus();
        let series = |key: &str| {
            format!(
                "aerekos_service_metric{{worker_id=\"{id}\",service=\"storage-manager\",key=\"{key}\"}}"
            )
        };
        (metric(&text, &series("bytes_stored")) > 0.0
            && metric(&text, &series("disk_total_bytes")) > 0.0)
            .then_some(())
    });
    // No credential shows up in what the conductor shows or logs.
    let shown = [
        c.get("/api/v1/services").1.to_string(),
        c.get("/api/v1/services/db-manager").1.to_string(),
        worker_text(&c, &id),
        std::fs::read_to_string(c.data_dir.join("conductor.log")).unwrap_or_default(),
    ]
    .concat();
    for secret in [&ops, &rw, &ro, &db_secret, &app_secret, &storage_kms] {
        assert!(!shown.contains(secret.as_str()), "a credential leaked");
    }
}
