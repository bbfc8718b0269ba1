//! db-manager end to end: a real worker local API (edge-worker's
//! `LocalApi`), the real `db-manager` binary as a child process, ureq
//! clients over loopback HTTP, and for backups the real `storage-manager`
//! binary (encryption off) reached through its own S3 API.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use service_runtime::harness::{
    http_agent, json_call, map, sibling_binary, LocalPublish, ServiceProcess, ServiceSpec, Worker,
    FAST_REPORTING,
};

const DBM: &str = "db-manager";
const SM: &str = "storage-manager";
const ADMIN: &str = "admin-token-5c2e9a71d04b3f86";
const S3_KEY: &str = "AKIDDBBACKUPS01";
const S3_SECRET: &str = "s3-secret-for-db-backups-9f3e1a";

/// A running service process.
type Proc = ServiceProcess;

/// A worker's local API with `services` registered.
fn worker_with(services: &[ServiceSpec]) -> Worker {
    Worker::start(7, "w-test", services)
}

/// Starts `service`'s binary `exe` with the worker's environment for it.
fn start_service(exe: &Path, worker: &Worker, service: &str, data: &Path, extra: &[&str]) -> Proc {
    let args: Vec<&str> = FAST_REPORTING.iter().chain(extra).copied().collect();
    Proc::start(exe, worker.env(service), data, &args)
}

/// Starts db-manager.
fn start_dbm(worker: &Worker, data: &Path, extra: &[&str]) -> Proc {
    start_service(
        Path::new(env!("CARGO_BIN_EXE_db-manager")),
        worker,
        DBM,
        data,
        extra,
    )
}

/// `method path` with an optional bearer token and body → (status, JSON).
fn call(
    p: &Proc,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    json_call(&http_agent(), &p.url, token, method, path, body)
}

/// An admin `POST path` with `body` → (status, JSON).
fn admin_post(p: &Proc, path: &str, body: Value) -> (u16, Value) {
    call(p, Some(ADMIN), "POST", path, Some(body))
}

fn admin(p: &Proc, method: &str, path: &str, body: Option<Value>) -> Value {
    let (code, v) = call(p, Some(ADMIN), method, path, body);
    assert!((200..300).contains(&code), "{method} {path}: {code} {v}");
    v
}

fn sql(p: &Proc, db: &str, token: &str, body: Value) -> (u16, Value) {
    call(
        p,
        Some(token),
        "POST",
        &format!("/v1/databases/{db}/query"),
        Some(body),
    )
}

fn sql_ok(p: &Proc, db: &str, token: &str, body: Value) -> Value {
    let (code, v) = sql(p, db, token, body.clone());
    assert_eq!(code, 200, "{body}: {v}");
    v
}

/// Creates `name`; returns (rw token, ro token).
fn create(p: &Proc, name: &str) -> (String, String) {
    let (code, v) = admin_post(p, "/v1/databases", json!({"name": name}));
    assert_eq!(code, 201, "{v}");
    (
        v["credentials"]["rw"].as_str().unwrap().to_string(),
        v["credentials"]["ro"].as_str().unwrap().to_string(),
    )
}

fn dbm_worker(config: &[(&str, &str)], secrets: &[(&str, &str)]) -> Worker {
    let mut s = map(&[("clients", &format!("ops:{ADMIN}"))]);
    s.extend(map(secrets));
    worker_with(&[(DBM, map(config), s)])
}

#[test]
fn databases_credentials_and_queries() {
    let data = tempfile::tempdir().unwrap();
    let mut worker = dbm_worker(&[], &[]);
    let p = start_dbm(&worker, data.path(), &[]);

    let (code, v) = call(&p, None, "GET", "/healthz", None);
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")));
    // Admin routes need an admin key.
    assert_eq!(call(&p, None, "GET", "/v1/databases", None).0, 401);
    assert_eq!(
        call(
            &p,
            Some("not-a-real-admin-token"),
            "GET",
            "/v1/databases",
            None
        )
        .0,
        401
    );

    let (rw, ro) = create(&p, "orders");
    let (rw2, _) = create(&p, "billing");
    assert_ne!(rw, ro);
    assert_eq!(rw.len(), 64);
    let (code, v) = admin_post(&p, "/v1/databases", json!({"name": "orders"}));
    assert_eq!(code, 409, "{v}");
    let (code, v) = admin_post(&p, "/v1/databases", json!({"name": "../etc"}));
    assert_eq!(code, 400, "{v}");
    let (code, _) = admin_post(&p, "/v1/databases", json!({"name": "x", "extra": 1}));
    assert_eq!(code, 400);
    let list = admin(&p, "GET", "/v1/databases", None);
    let names: Vec<&str> = list["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing", "orders"]);
    worker.wait_event(DBM, "created database orders by ops");

    // Schema, parameterised writes (positional and named), reads.
    sql_ok(
        &p,
        "orders",
        &rw,
        json!({"sql": "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, data BLOB)"}),
    );
    let v = sql_ok(
        &p,
        "orders",
        &rw,
        json!({"sql": "INSERT INTO items(name, qty, data) VALUES (?, ?, ?)", "params": ["bolt", 5, {"base64": "AAEC/w=="}]}),
    );
    assert_eq!(v["rows_affected"], 1);
    assert_eq!(v["last_insert_rowid"], 1);
    sql_ok(
        &p,
        "orders",
        &rw,
        json!({"sql": "INSERT INTO items(name, qty) VALUES (:name, :qty)", "params": {"name": "nut'); DROP TABLE items; --", "qty": 7}}),
    );
    let v = sql_ok(
        &p,
        "orders",
        &ro,
        json!({"sql": "SELECT id, name, qty, data FROM items WHERE qty >= ? ORDER BY id", "params": [5]}),
    );
    assert_eq!(v["columns"], json!(["id", "name", "qty", "data"]));
    assert_eq!(
        v["rows"],
        json!([[1, "bolt", 5, {"base64": "AAEC/w=="}], [2, "nut'); DROP TABLE items; --", 7, null]])
    );
    assert_eq!(v["truncated"], false);

    // Row limits.
    sql_ok(
        &p,
        "orders",
        &rw,
        json!({"sql": "WITH RECURSIVE s(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM s WHERE v < 50) INSERT INTO items(name, qty) SELECT 'n' || v, v FROM s"}),
    );
    let v = sql_ok(
        &p,
        "orders",
        &ro,
        json!({"sql": "SELECT id FROM items", "max_rows": 10}),
    );
    assert_eq!(v["rows"].as_array().unwrap().len(), 10);
    assert_eq!(v["truncated"], true);
    assert_eq!(
        sql(
            &p,
            "orders",
            &ro,
            json!({"sql": "SELECT 1", "max_rows": 1_000_000})
        )
        .0,
        400
    );

    // A runaway query is interrupted at its timeout; the service keeps serving.
    let t0 = Instant::now();
    let (code, v) = sql(
        &p,
        "orders",
        &ro,
        json!({"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", "timeout_ms": 300}),
    );
    assert_eq!(code, 408, "{v}");
    assert!(v["error"].as_str().unwrap().contains("300 ms"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let (code, v) = sql(
        &p,
        "orders",
        &rw,
        json!({"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) INSERT INTO items(qty) SELECT x FROM c", "timeout_ms": 300}),
    );
    assert_eq!(code, 408, "{v}");
    let v = sql_ok(
        &p,
        "orders",
        &ro,
        json!({"sql": "SELECT count(*) FROM items"}),
    );
    assert_eq!(v["rows"][0][0], 52, "the interrupted insert left nothing");
    let v = sql_ok(
        &p,
        "orders",
        &rw,
        json!({"sql": "UPDATE items SET qty = qty WHERE id = 1"}),
    );
    assert_eq!(v["rows_affected"], 1);
    assert!(v.get("last_insert_rowid").is_none(), "{v}");

    // The read-only credential cannot write: SQLite refuses it.
    for stmt in [
        "INSERT INTO items(qty) VALUES (1)",
        "DELETE FROM items",
        "CREATE TABLE t2(a)",
        "PRAGMA user_version = 3",
    ] {
        let (code, v) = sql(&p, "orders", &ro, json!({"sql": stmt}));
        assert_eq!(code, 403, "{stmt}: {v}");
    }
    // Wrong credential, another database's credential, an admin key: 401.
    for token in ["0".repeat(64).as_str(), rw2.as_str(), ADMIN] {
        let (code, v) = sql(&p, "orders", token, json!({"sql": "SELECT * FROM items"}));
        assert_eq!(code, 401, "{v}");
    }
    assert_eq!(
        call(
            &p,
            None,
            "POST",
            "/v1/databases/orders/query",
            Some(json!({"sql": "SELECT 1"}))
        )
        .0,
        401
    );
    assert_eq!(sql(&p, "nosuchdb", &rw, json!({"sql": "SELECT 1"})).0, 401);

    // No way out of the sandbox: ATTACH, VACUUM INTO, extensions, pragmas, transactions.
    let billing_file = data.path().join("databases/billing.sqlite");
    let escape = data.path().join("escape.sqlite");
    for stmt in [
        format!("ATTACH DATABASE '{}' AS b", billing_file.display()),
        format!("ATTACH DATABASE '{}' AS e", escape.display()),
        format!("VACUUM INTO '{}'", escape.display()),
        "SELECT load_extension('/tmp/evil')".to_string(),
        "PRAGMA synchronous = OFF".to_string(),
        "PRAGMA database_list".to_string(),
        "BEGIN".to_string(),
    ] {
        let (code, v) = sql(&p, "orders", &rw, json!({"sql": stmt}));
        assert_eq!(code, 400, "{stmt}: {v}");
    }
    assert!(!escape.exists());
    let (code, v) = sql(
        &p,
        "orders",
        &rw,
        json!({"sql": "SELECT 1; DROP TABLE items"}),
    );
    assert_eq!(code, 400);
    assert!(
        v["error"].as_str().unwrap().contains("one statement"),
        "{v}"
    );
    for (body, what) in [
        (
            json!({"sql": "SELECT ?", "params": []}),
            "missing parameter",
        ),
        (
            json!({"sql": "SELECT ?", "params": [[1, 2]]}),
            "array value",
        ),
        (
            json!({"sql": "SELECT :a", "params": {"b": 1}}),
            "wrong name",
        ),
        (json!({"sql": "SELEC 1"}), "syntax"),
        (json!({"sql": "SELECT 1", "bogus": true}), "unknown field"),
        (json!({"params": []}), "no sql"),
    ] {
        let (code, v) = sql(&p, "orders", &rw, body);
        assert_eq!(code, 400, "{what}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }

    // Unknown routes and wrong methods.
    assert_eq!(call(&p, Some(ADMIN), "GET", "/v1/nothing", None).0, 404);
    assert_eq!(call(&p, Some(ADMIN), "GET", "/nothing", None).0, 404);
    assert_eq!(
        call(&p, Some(ADMIN), "DELETE", "/v1/databases", None).0,
        405
    );
    assert_eq!(
        call(&p, Some(&rw), "GET", "/v1/databases/orders/query", None).0,
        405
    );
    assert_eq!(
        call(&p, Some(ADMIN), "GET", "/v1/databases/nosuch", None).0,
        404
    );
    assert_eq!(
        call(
            &p,
            Some(ADMIN),
            "POST",
            "/v1/databases/orders/credentials/xx/rotate",
            None
        )
        .0,
        404
    );

    // Oversized bodies: 413, and the service keeps serving.
    let big = "x".repeat(2 * 1024 * 1024);
    let (code, _) = sql(
        &p,
        "orders",
        &rw,
        json!({"sql": "SELECT ?", "params": [big]}),
    );
    assert_eq!(code, 413);
    sql_ok(&p, "orders", &ro, json!({"sql": "SELECT 1"}));

    // Batches are all or nothing.
    let (code, v) = call(
        &p,
        Some(&rw),
        "POST",
        "/v1/databases/orders/batch",
        Some(json!({"statements": [
            {"sql": "INSERT INTO items(id, qty) VALUES (1000, 1)"},
            {"sql": "INSERT INTO items(id, qty) VALUES (1000, 2)"}
        ]})),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["statement"], 1, "{v}");
    let v = sql_ok(
        &p,
        "orders",
        &ro,
        json!({"sql": "SELECT count(*) FROM items WHERE id = 1000"}),
    );
    assert_eq!(v["rows"][0][0], 0);
    let (code, v) = call(
        &p,
        Some(&rw),
        "POST",
        "/v1/databases/orders/batch",
        Some(json!({"statements": [
            {"sql": "INSERT INTO items(id, qty) VALUES (?, ?)", "params": [1000, 1]},
            {"sql": "UPDATE items SET qty = qty + 1 WHERE id = :id", "params": {"id": 1000}},
            {"sql": "SELECT qty FROM items WHERE id = 1000"}
        ]})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][2]["rows"], json!([[2]]));
    let (code, _) = call(
        &p,
        Some(&ro),
        "POST",
        "/v1/databases/orders/batch",
        Some(json!({"statements": [{"sql": "DELETE FROM items"}]})),
    );
    assert_eq!(code, 403);

    // Rotation: the old token stops working at once, the new one works.
    let v = admin(
        &p,
        "POST",
        "/v1/databases/orders/credentials/ro/rotate",
        None,
    );
    let ro_new = v["token"].as_str().unwrap().to_string();
    assert_eq!(sql(&p, "orders", &ro, json!({"sql": "SELECT 1"})).0, 401);
    sql_ok(&p, "orders", &ro_new, json!({"sql": "SELECT 1"}));
    worker.wait_event(DBM, "rotated the ro credential of database orders by ops");

    // Restart: databases, data and credentials persist.
    drop(p);
    let p = start_dbm(&worker, data.path(), &[]);
    let v = sql_ok(
        &p,
        "orders",
        &ro_new,
        json!({"sql": "SELECT count(*) FROM items"}),
    );
    assert_eq!(v["rows"][0][0], 53);
    assert_eq!(sql(&p, "orders", &ro, json!({"sql": "SELECT 1"})).0, 401);

    // Drop: gone, files removed, credential refused; the name can be reused empty.
    admin(&p, "DELETE", "/v1/databases/orders", None);
    assert_eq!(
        call(&p, Some(ADMIN), "GET", "/v1/databases/orders", None).0,
        404
    );
    assert_eq!(sql(&p, "orders", &rw, json!({"sql": "SELECT 1"})).0, 401);
    assert!(!data.path().join("databases/orders.sqlite").exists());
    worker.wait_event(DBM, "dropped database orders by ops");
    let (rw3, _) = create(&p, "orders");
    let (code, _) = sql(
        &p,
        "orders",
        &rw3,
        json!({"sql": "SELECT count(*) FROM items"}),
    );
    assert_eq!(code, 400, "a re-created database starts empty");

    // Metrics reach the worker.
    worker.wait_for("metrics", |pb| {
        matches!(pb, LocalPublish::Metrics { name, samples } if name == DBM
            && samples.iter().any(|s| s.key.as_str() == "queries" && s.value >= 2)
            && samples.iter().any(|s| s.key.as_str() == "databases" && s.value == 2))
    });
    let out = p.output();
    for secret in [ADMIN, &rw, &ro, &ro_new, &rw2, &rw3] {
        assert!(!out.contains(secret), "output leaks a token: {out}");
    }
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    let data = tempfile::tempdir().unwrap();
    let worker = dbm_worker(&[], &[]);
    let mut p = start_dbm(&worker, data.path(), &[]);
    let (rw, ro) = create(&p, "events");
    sql_ok(
        &p,
        "events",
        &rw,
        json!({"sql": "CREATE TABLE ev(writer INTEGER, seq INTEGER, body TEXT, PRIMARY KEY(writer, seq))"}),
    );
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (url, rw, acked, stop, total) = (
            p.url.clone(),
            rw.clone(),
            acked.clone(),
            stop.clone(),
            total.clone(),
        );
        writers.push(std::thread::spawn(move || {
            let a = http_agent();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    json_call(&a, &url, Some(&rw), "POST", "/v1/databases/events/query",
                        Some(json!({"sql": "INSERT INTO ev VALUES (?, ?, ?)", "params": [w, seq, "payload"]})))
                }));
                match r {
                    Ok((200, _)) => {
                        acked.lock().unwrap().push((w, seq));
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    // Connection refused/reset after the kill: stop.
                    _ => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while total.load(Ordering::Relaxed) < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    p.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 200,
        "only {} writes acknowledged",
        acked.len()
    );

    // Leftovers of an interrupted backup and an interrupted create are
    // removed at start; the catalog's databases are not.
    std::fs::write(
        data.path().join("tmp/backup-events-0000.sqlite"),
        b"partial",
    )
    .unwrap();
    std::fs::write(data.path().join("databases/ghost.sqlite"), b"orphan").unwrap();
    let p = start_dbm(&worker, data.path(), &[]);
    assert!(!data.path().join("tmp/backup-events-0000.sqlite").exists());
    assert!(!data.path().join("databases/ghost.sqlite").exists());
    let v = sql_ok(
        &p,
        "events",
        &ro,
        json!({"sql": "SELECT writer, seq FROM ev", "max_rows": 10000}),
    );
    let stored: std::collections::HashSet<(u64, u64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    let missing: Vec<_> = acked.iter().filter(|k| !stored.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let v = sql_ok(&p, "events", &ro, json!({"sql": "PRAGMA integrity_check"}));
    assert_eq!(v["rows"], json!([["ok"]]));
}

/// The storage-manager binary, built on first use into this target dir.
fn storage_manager_bin() -> std::path::PathBuf {
    sibling_binary("aerekos-storage-manager", "storage-manager")
}

/// An unencrypted storage-manager taking `S3_KEY`: its data dir, worker
/// and process (keep all three).
fn backup_store() -> (tempfile::TempDir, Worker, Proc) {
    let data = tempfile::tempdir().unwrap();
    let worker = worker_with(&[(
        SM,
        map(&[("encryption", "off")]),
        map(&[("access_keys", &format!("{S3_KEY}:{S3_SECRET}"))]),
    )]);
    let sm = start_service(&storage_manager_bin(), &worker, SM, data.path(), &[]);
    (data, worker, sm)
}

/// A db-manager worker backing up to `endpoint` with `S3_KEY`, and `config`.
fn backing_up_worker(endpoint: &str, config: &[(&str, &str)]) -> Worker {
    let mut all = vec![("backup_endpoint", endpoint)];
    all.extend_from_slice(config);
    dbm_worker(
        &all,
        &[
            ("backup_access_key", S3_KEY),
            ("backup_secret_key", S3_SECRET),
        ],
    )
}

#[test]
fn backups_through_storage_manager_and_restore() {
    let (_sm_data, _sm_worker, sm) = backup_store();
    let db_data = tempfile::tempdir().unwrap();
    let mut worker = backing_up_worker(&sm.url, &[("backup_bucket", "dbm-test")]);
    let p = start_dbm(&worker, db_data.path(), &["--backup-interval-ms", "1500"]);
    let (rw, ro) = create(&p, "shop");
    sql_ok(
        &p,
        "shop",
        &rw,
        json!({"sql": "CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT)"}),
    );
    for i in 1..=100 {
        sql_ok(
            &p,
            "shop",
            &rw,
            json!({"sql": "INSERT INTO orders VALUES (?, ?)", "params": [i, format!("item-{i}")]}),
        );
    }
    // Inserts continue while the backup runs.
    let next = Arc::new(AtomicU64::new(101));
    let stop = Arc::new(AtomicBool::new(false));
    let inserter = {
        let (url, rw, next, stop) = (p.url.clone(), rw.clone(), next.clone(), stop.clone());
        std::thread::spawn(move || {
            let a = http_agent();
            while !stop.load(Ordering::Relaxed) {
                let i = next.load(Ordering::Relaxed);
                let (code, v) = json_call(
                    &a,
                    &url,
                    Some(&rw),
                    "POST",
                    "/v1/databases/shop/query",
                    Some(
                        json!({"sql": "INSERT INTO orders VALUES (?, ?)", "params": [i, format!("item-{i}")]}),
                    ),
                );
                assert_eq!(code, 200, "{v}");
                next.store(i + 1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let acked_before = next.load(Ordering::Relaxed) - 1;
    let (code, v) = call(&p, Some(ADMIN), "POST", "/v1/databases/shop/backups", None);
    assert_eq!(code, 201, "{v}");
    let acked_after = next.load(Ordering::Relaxed);
    let key = v["backup"].as_str().unwrap().to_string();
    assert!(
        key.starts_with("shop/") && key.ends_with(".sqlite"),
        "{key}"
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    inserter.join().unwrap();
    worker.wait_event(DBM, "backed up database shop to shop/");

    // The object is really in storage-manager: fetch it with an S3 client.
    let s3 = s3::client::S3Client::new(
        &sm.url,
        s3::sigv4::Credentials {
            access_key: S3_KEY.into(),
            secret_key: S3_SECRET.into(),
        },
    )
    .unwrap();
    let mut bytes = Vec::new();
    s3.get_object("dbm-test", &key, &mut bytes).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    assert_eq!(v["bytes"].as_u64().unwrap(), bytes.len() as u64);

    // Damage the data, then restore.
    sql_ok(
        &p,
        "shop",
        &rw,
        json!({"sql": "DELETE FROM orders WHERE id % 2 = 0"}),
    );
    sql_ok(&p, "shop", &rw, json!({"sql": "CREATE TABLE junk(a)"}));
    let damaged = sql_ok(
        &p,
        "shop",
        &ro,
        json!({"sql": "SELECT count(*) FROM orders"}),
    )["rows"][0][0]
        .as_u64()
        .unwrap();
    // Readers keep going during the restore: every answer is a 200 with
    // either the old or the restored contents, never an error.
    let readers_stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (url, ro, stop) = (p.url.clone(), ro.clone(), readers_stop.clone());
            std::thread::spawn(move || {
                let a = http_agent();
                let mut counts = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (code, v) = json_call(
                        &a,
                        &url,
                        Some(&ro),
                        "POST",
                        "/v1/databases/shop/query",
                        Some(json!({"sql": "SELECT count(*) FROM orders"})),
                    );
                    assert_eq!(code, 200, "{v}");
                    counts.push(v["rows"][0][0].as_u64().unwrap());
                }
                counts
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let (code, v) = admin_post(&p, "/v1/databases/shop/restore", json!({"backup": key}));
    assert_eq!(code, 200, "{v}");
    std::thread::sleep(Duration::from_millis(100));
    readers_stop.store(true, Ordering::Relaxed);
    let seen: Vec<u64> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    assert!(seen.contains(&damaged), "no read before the restore");
    let restored = *seen.last().unwrap();
    assert!(
        seen.iter().all(|c| *c == damaged || *c == restored),
        "{damaged} {restored} {seen:?}"
    );
    assert!(restored > damaged);
    worker.wait_event(DBM, "restored database shop from");
    let v = sql_ok(
        &p,
        "shop",
        &ro,
        json!({"sql": "SELECT id, item FROM orders ORDER BY id", "max_rows": 10000}),
    );
    let rows = v["rows"].as_array().unwrap();
    // A consistent snapshot: ids 1..=n without gaps, n between what was
    // acknowledged before the backup started and after it ended.
    let n = rows.len() as u64;
    assert!(
        n >= acked_before && n <= acked_after,
        "{acked_before} <= {n} <= {acked_after}"
    );
    for (i, r) in rows.iter().enumerate() {
        let id = i as u64 + 1;
        assert_eq!(r, &json!([id, format!("item-{id}")]));
    }
    assert_eq!(
        sql(&p, "shop", &ro, json!({"sql": "SELECT * FROM junk"})).0,
        400
    );
    // Writes work after the restore.
    sql_ok(
        &p,
        "shop",
        &rw,
        json!({"sql": "INSERT INTO orders VALUES (?, 'after')", "params": [n + 1]}),
    );

    // A corrupt backup is refused and the database is untouched.
    s3.put_object_bytes("dbm-test", "shop/garbage.sqlite", &[0x42; 8192])
        .unwrap();
    let (code, v) = admin_post(
        &p,
        "/v1/databases/shop/restore",
        json!({"backup": "shop/garbage.sqlite"}),
    );
    assert_eq!(code, 422, "{v}");
    let (code, v) = admin_post(
        &p,
        "/v1/databases/shop/restore",
        json!({"backup": "other/x.sqlite"}),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = admin_post(
        &p,
        "/v1/databases/shop/restore",
        json!({"backup": "shop/missing.sqlite"}),
    );
    assert_eq!(code, 404, "{v}");
    let v = sql_ok(
        &p,
        "shop",
        &ro,
        json!({"sql": "SELECT count(*) FROM orders"}),
    );
    assert_eq!(v["rows"][0][0], n + 1);

    // Scheduled backups appear in the listing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = admin(&p, "GET", "/v1/databases/shop/backups", None);
        let list = v["backups"].as_array().unwrap();
        let real = list
            .iter()
            .filter(|b| b["backup"] != "shop/garbage.sqlite")
            .count();
        if real >= 2 {
            assert!(list.iter().any(|b| b["backup"] == key.as_str()));
            break;
        }
        assert!(Instant::now() < deadline, "no scheduled backup: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    worker.wait_event(DBM, "backed up database shop to shop/");
    let out = p.output();
    assert!(
        !out.contains(S3_SECRET) && !out.contains(&rw) && !out.contains(ADMIN),
        "{out}"
    );
}

#[test]
fn backups_unconfigured_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let worker = dbm_worker(&[], &[]);
    let p = start_dbm(&worker, data.path(), &[]);
    create(&p, "a");
    let (code, v) = call(&p, Some(ADMIN), "POST", "/v1/databases/a/backups", None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("backup_endpoint"),
        "{v}"
    );
    // A half-configured backup store refuses to start, and says why.
    let bad = dbm_worker(&[("backup_endpoint", "http://127.0.0.1:9")], &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_db-manager"))
        .env_clear()
        .envs(bad.env(DBM))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backup_access_key"), "{err}");
}

#[test]
fn backup_retention_keeps_the_newest() {
    let (_sm_data, _sm_worker, sm) = backup_store();
    let db_data = tempfile::tempdir().unwrap();
    let mut worker = backing_up_worker(
        &sm.url,
        &[("backup_bucket", "keep-test"), ("backup_keep", "2")],
    );
    let p = start_dbm(&worker, db_data.path(), &[]);
    create(&p, "k");
    // An object db-manager did not make is never deleted.
    let s3 = s3::client::S3Client::new(
        &sm.url,
        s3::sigv4::Credentials {
            access_key: S3_KEY.into(),
            secret_key: S3_SECRET.into(),
        },
    )
    .unwrap();
    s3.put_object_bytes("keep-test", "k/manual-copy.sqlite", b"x")
        .unwrap();
    let mut made = Vec::new();
    for _ in 0..4 {
        let v = admin(&p, "POST", "/v1/databases/k/backups", None);
        made.push(v["backup"].as_str().unwrap().to_string());
        // Keys carry a one-second timestamp: keep them in order.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let v = admin(&p, "GET", "/v1/databases/k/backups", None);
    let listed: Vec<&str> = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup"].as_str().unwrap())
        .collect();
    let mut expected = vec!["k/manual-copy.sqlite", made[2].as_str(), made[3].as_str()];
    expected.sort();
    assert_eq!(listed, expected);
    worker.wait_event(DBM, "deleted 1 old backups of database k (keeping 2)");
}
