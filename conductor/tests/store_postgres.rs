//! The conductor on PostgreSQL (`--store postgres://`), against a real
//! server this test starts and kills: frames accepted while the server is
//! down are held and committed once it is back, each exactly once, and
//! acknowledged (`Stored`) only after they are committed.
#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use protocol::topic::{topic, TopicKind};
use protocol::{Action, Body};
use rumqttc::QoS;

const T: Duration = Duration::from_secs(30);

#[test]
fn frames_accepted_while_postgres_is_down_are_stored_once_when_it_is_back() {
    let Some(mut pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start_with(conductor::Config {
        store: Some(url.clone()),
        ..test_config(dir.path())
    });
    let e = c.enroll_new("pg-worker");

    // The worker's own connection: it publishes sealed frames and records
    // the highest `Stored` the conductor acknowledges.
    let acked = Arc::new(AtomicU64::new(0));
    let (id, secret, seen) = (e.id.clone(), e.secret.clone(), acked.clone());
    let on_publish: OnPublish = Box::new(move |_, p| {
        let Ok(opened) = protocol::open(&p.payload, &id) else {
            return;
        };
        if let Ok(env) = opened.verify(&secret) {
            if let Body::Command(cmd) = env.body {
                if let Action::Stored(n) = cmd.action {
                    seen.fetch_max(n, Ordering::SeqCst);
                }
            }
        }
    });
    let (client, _t) = connect(
        c.started.mqtt_addr,
        &e.id,
        &e.username,
        &e.password,
        Some(on_publish),
    )
    .unwrap();
    client
        .subscribe(topic(&e.id, TopicKind::Stored), QoS::AtLeastOnce)
        .unwrap();
    let publish = |seq: u64| {
        let frame = seal(
            &e.secret,
            &e.id,
            seq,
            metrics(u16::try_from(100 + seq).unwrap()),
        );
        client
            .publish(
                topic(&e.id, TopicKind::Metrics),
                QoS::AtLeastOnce,
                false,
                frame,
            )
            .unwrap();
    };
    let stored = |pg: &test_support::postgres::Postgres| -> (u64, u64) {
        let row = pg.psql(
            "fleet",
            "SELECT count(*), count(DISTINCT seq) FROM metrics_raw",
        );
        let (a, b) = row.split_once('|').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };

    for seq in 1..=10 {
        publish(seq);
    }
    wait_for("10 frames stored", T, || {
        (stored(&pg) == (10, 10)).then_some(())
    });
    wait_for("Stored(10)", T, || {
        (acked.load(Ordering::SeqCst) == 10).then_some(())
    });

    pg.kill();
    let before = c.accepted();
    for seq in 11..=20 {
        publish(seq);
    }
    wait_for("10 more frames accepted", T, || {
        (c.accepted() >= before + 10).then_some(())
    });
    // Held, not acknowledged: nothing of them is stored yet.
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        acked.load(Ordering::SeqCst),
        10,
        "frames acknowledged while the store was down"
    );

    pg.start_again();
    wait_for("all 20 frames stored", T, || {
        (stored(&pg) == (20, 20)).then_some(())
    });
    wait_for("Stored(20)", T, || {
        (acked.load(Ordering::SeqCst) == 20).then_some(())
    });
    // The conductor took its lease again after the restart (epoch 1 → 2).
    assert_eq!(pg.psql("fleet", "SELECT epoch FROM aerekos_lease"), "2");
    let health = c.get("/api/v1/health");
    assert_eq!(
        (&health["store"], &health["lease_epoch"]),
        (&serde_json::json!("postgres"), &serde_json::json!(2))
    );
    assert!(c.prometheus().contains("\naerekos_store_lease_epoch 2\n"));
    // The API reads through the reconnected store.
    assert_eq!(c.worker(&e.id)["metrics"]["seq"], 20);
    assert_eq!(
        pg.psql(
            "fleet",
            &format!("SELECT replay_highest FROM workers WHERE id = '{}'", e.id)
        ),
        "20"
    );
    c.stop();
}

#[test]
fn two_conductors_migrate_one_database_at_once() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("shared");
    let opened: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || conductor::store::Store::open_postgres(&url))
        })
        .collect();
    for t in opened {
        let s = t.join().unwrap().unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            i64::try_from(conductor::store::MIGRATIONS.len()).unwrap()
        );
    }
    assert_eq!(
        pg.psql("shared", "SELECT count(*) FROM aerekos_schema"),
        "1"
    );
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let port = test_support::free_port();
    let err = conductor::store::Store::open_postgres(&format!(
        "postgres://aerekos:s3cret@127.0.0.1:{port}/fleet"
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("postgres: "), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(err.is_unavailable(), "{err:?}");
    let bad = conductor::store::StoreLocation::parse(
        Some("mysql://root:pw@db/fleet"),
        std::path::Path::new("/tmp"),
    )
    .unwrap_err();
    assert!(
        bad.contains("expected sqlite or a postgres:// URL"),
        "{bad}"
    );
    assert!(!bad.contains(":pw@"), "{bad}");
}

#[test]
fn one_lease_per_database_released_with_its_session() {
    use conductor::store::lease::Lease;
    let Some(mut pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("lease");
    // The lease's epoch is in the store's schema.
    drop(conductor::store::Store::open_postgres(&url).unwrap());
    let first = Lease::try_take(&url, "https://a.test:3000")
        .unwrap()
        .expect("a free lease");
    first.check().unwrap();
    assert_eq!(
        pg.psql("lease", "SELECT api_url FROM aerekos_lease"),
        "https://a.test:3000",
        "the holder's API URL is in the lease row, for the standbys"
    );
    first.record_url("https://a.test:3443").unwrap();
    assert_eq!(
        pg.psql("lease", "SELECT api_url FROM aerekos_lease"),
        "https://a.test:3443"
    );
    assert!(
        Lease::try_take(&url, "https://a.test:3000")
            .unwrap()
            .is_none(),
        "a second conductor stands by"
    );
    drop(first);
    let second = wait_for("the lease free again", T, || {
        Lease::try_take(&url, "https://a.test:3000").unwrap()
    });
    second.check().unwrap();
    // The server goes away: the holder finds out at its next check and
    // does not take a new session (which would not hold the lock).
    pg.kill();
    let err = second.check().unwrap_err();
    assert!(
        matches!(err, conductor::store::StoreError::PgPinnedLost) || err.is_unavailable(),
        "{err:?}"
    );
    pg.start_again();
    assert!(second.check().is_err(), "a lost lease stays lost");
    assert!(Lease::try_take(&url, "https://a.test:3000")
        .unwrap()
        .is_some());
}

#[test]
fn a_batch_fenced_with_an_old_epoch_writes_nothing() {
    use conductor::store::lease::{Fence, Lease};
    use conductor::store::{Store, StoreError, WorkerRow, WriteOp};
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fence");
    let mut store = Store::open_postgres(&url).unwrap();
    store
        .insert_worker(&WorkerRow {
            id: "w-000000000001".into(),
            machine_id: "m".into(),
            hostname: "h".into(),
            secret_hex: "00".repeat(32),
            mqtt_password_sha256: "x".into(),
            labels_json: "{}".into(),
            inventory_json: None,
            board_json: None,
            enrolled_at_ms: 1,
            last_seen_ms: None,
            last_ip: None,
            revoked: false,
            replay_highest: 0,
            replay_bitmap: 0,
            cmd_seq: 0,
            status: "online".into(),
        })
        .unwrap();
    let seen = |seq: u64| {
        vec![WriteOp::Seen {
            worker_id: "w-000000000001".into(),
            highest: seq,
            bitmap: 1,
            last_seen_ms: seq,
        }]
    };
    let fence = Fence::default();
    store.set_fence(fence.clone());
    assert!(
        matches!(store.apply_batch(&seen(1)), Err(StoreError::Fenced)),
        "no lease, no write"
    );
    let first = Lease::try_take(&url, "https://a.test:3000")
        .unwrap()
        .unwrap();
    fence.hold(first.epoch());
    store.apply_batch(&seen(2)).unwrap();
    // Another conductor takes the lease; this one has not noticed yet.
    drop(first);
    let second = wait_for("the lease taken over", T, || {
        Lease::try_take(&url, "https://a.test:3000").unwrap()
    });
    assert_eq!(second.epoch(), 2);
    assert!(matches!(
        store.apply_batch(&seen(3)),
        Err(StoreError::Fenced)
    ));
    assert_eq!(
        pg.psql(
            "fence",
            "SELECT replay_highest FROM workers WHERE id = 'w-000000000001'"
        ),
        "2",
        "the fenced batch changed nothing"
    );
    fence.stop();
    assert!(store.fence_stopped());
}

#[test]
fn while_the_server_is_down_calls_fail_fast_between_reconnects() {
    use conductor::store::{Store, StoreError};
    let Some(mut pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("down");
    let store = Store::open_postgres(&url).unwrap();
    assert_eq!(store.setting("k").unwrap(), None);
    pg.kill();
    // The broken connection, then a refused connect: a real attempt.
    let first = store.setting("k").unwrap_err();
    assert!(first.is_unavailable(), "{first:?}");
    let err = wait_for("a refused connect", T, || match store.setting("k") {
        Err(StoreError::PgDown) => None,
        Err(e) => Some(e),
        Ok(v) => panic!("answered {v:?} while down"),
    });
    assert!(err.is_unavailable(), "{err:?}");
    // Right after it: no attempt, an immediate PgDown.
    let started = std::time::Instant::now();
    assert!(matches!(store.setting("k"), Err(StoreError::PgDown)));
    assert!(started.elapsed() < Duration::from_millis(100));
    pg.start_again();
    wait_for("back", T, || store.setting("k").ok());
}

/// A CA and a server certificate for `names` signed by it: (CA PEM,
/// server chain PEM, server key PEM).
fn ca_and_server(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_pem = issuer.pem();
    (
        ca_pem.clone(),
        format!("{}{ca_pem}", cert.pem()),
        key.serialize_pem(),
    )
}

/// Whether the session behind `url` is encrypted (`pg_stat_ssl`).
fn session_uses_tls(url: &str) -> Result<bool, conductor::store::StoreError> {
    let db = conductor::store::sql::Db::Postgres(conductor::store::sql::PgConn::connect(url)?);
    db.query_row(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
        |r| r.get::<bool>(0),
    )
}

#[test]
fn tls_to_postgres_is_verified_as_sslmode_asks() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fleet");
    let dir = tempfile::tempdir().unwrap();
    // Before TLS is on: the default (prefer) connects in the clear, and
    // require refuses a server without TLS.
    assert!(!session_uses_tls(&url).unwrap());
    let e = session_uses_tls(&format!("{url}?sslmode=require")).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");

    let (ca_pem, chain, key) = ca_and_server(&["127.0.0.1"]);
    pg.enable_tls(&chain, &key);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let ca = ca.display();
    // verify-full: the server's certificate is checked, the session
    // encrypted; the default and require encrypt too.
    assert!(session_uses_tls(&format!("{url}?sslmode=verify-full&sslrootcert={ca}")).unwrap());
    assert!(session_uses_tls(&url).unwrap());
    assert!(session_uses_tls(&format!("{url}?sslmode=require")).unwrap());
    assert!(!session_uses_tls(&format!("{url}?sslmode=disable")).unwrap());

    // Another CA: refused, saying why.
    let (other_ca, _, _) = ca_and_server(&["127.0.0.1"]);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, other_ca).unwrap();
    let e = session_uses_tls(&format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        other.display()
    ))
    .unwrap_err();
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    // A root given with require checks the chain too (libpq's rule).
    let e = session_uses_tls(&format!(
        "{url}?sslmode=require&sslrootcert={}",
        other.display()
    ))
    .unwrap_err();
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");

    // The right CA, a certificate for another name: verify-full refuses,
    // verify-ca (chain only) accepts.
    let (ca2_pem, chain2, key2) = ca_and_server(&["db.example"]);
    pg.enable_tls(&chain2, &key2);
    let ca2 = dir.path().join("ca2.pem");
    std::fs::write(&ca2, ca2_pem).unwrap();
    let e = session_uses_tls(&format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        ca2.display()
    ))
    .unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");
    assert!(session_uses_tls(&format!(
        "{url}?sslmode=verify-ca&sslrootcert={}",
        ca2.display()
    ))
    .unwrap());

    // The conductor itself on a verified TLS store.
    pg.enable_tls(&chain, &key);
    let store = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let c = Conductor::start_with(conductor::Config {
        store: Some(store),
        ..test_config(dir.path())
    });
    let e = c.enroll_new("tls-store-worker");
    let n = pg.psql(
        "fleet",
        &format!("SELECT count(*) FROM workers WHERE id = '{}'", e.id),
    );
    assert_eq!(n, "1");
    let encrypted = pg.psql(
        "fleet",
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = 'fleet' AND s.ssl AND a.pid <> pg_backend_pid()",
    );
    assert_ne!(encrypted, "0", "the conductor's sessions use TLS");
}

#[test]
fn the_api_connections_writes_are_fenced_too() {
    use conductor::store::lease::{Fence, Lease};
    use conductor::store::{Store, StoreError};
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fence_api");
    let mut store = Store::open_postgres(&url).unwrap();
    store.set_settings(&[("k", "before")]).unwrap();
    let fence = Fence::default();
    store.fence_writes(fence.clone());
    // No lease held: neither a transaction nor a lone statement writes;
    // reads go on.
    assert!(matches!(
        store.set_settings(&[("k", "no lease")]),
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.set_all_status("offline"),
        Err(StoreError::Fenced)
    ));
    assert_eq!(store.setting("k").unwrap().as_deref(), Some("before"));

    let first = Lease::try_take(&url, "https://a.test:3000")
        .unwrap()
        .unwrap();
    fence.hold(first.epoch());
    store.set_settings(&[("k", "held")]).unwrap();
    store.set_all_status("offline").unwrap();
    assert_eq!(store.setting("k").unwrap().as_deref(), Some("held"));

    // Another conductor takes the lease; this one has not noticed yet.
    drop(first);
    let second = wait_for("the lease taken over", T, || {
        Lease::try_take(&url, "https://a.test:3000").unwrap()
    });
    assert_eq!(second.epoch(), 2);
    assert!(matches!(
        store.set_settings(&[("k", "stale")]),
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.set_all_status("online"),
        Err(StoreError::Fenced)
    ));
    assert_eq!(
        pg.psql("fence_api", "SELECT v FROM settings WHERE k = 'k'"),
        "held",
        "the fenced writes changed nothing"
    );
    // The connection is usable after a fenced write (no transaction left
    // open): reads work, and a write under the current epoch commits.
    assert_eq!(store.setting("k").unwrap().as_deref(), Some("held"));
    fence.hold(second.epoch());
    store.set_settings(&[("k", "second")]).unwrap();
    assert_eq!(store.setting("k").unwrap().as_deref(), Some("second"));
}
