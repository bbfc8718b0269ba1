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
use conductor::store::partitions::{partition_name, Width};
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
    use conductor::store::{Store, StoreError, WriteOp};
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fence");
    let mut store = Store::open_postgres(&url).unwrap();
    store.insert_worker(&test_worker("w-000000000001")).unwrap();
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

// Time-partitioned metrics tables (store::partitions).

const DAY: u64 = 86_400_000;
const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The UTC day of `ms`.
fn day(ms: u64) -> i64 {
    i64::try_from(ms / DAY).unwrap()
}

/// `table`'s partition for a UTC day.
fn part(table: &str, day: i64) -> String {
    let lo = day * i64::try_from(DAY).unwrap();
    partition_name(table, lo, Width::Day).unwrap()
}

/// `table`'s partition for the UTC hour holding `ms`.
fn part_hour(table: &str, ms: u64) -> String {
    let lo = i64::try_from(ms - ms % HOUR).unwrap();
    partition_name(table, lo, Width::Hour).unwrap()
}

/// `table`'s partitions but DEFAULT, as PostgreSQL has their bounds:
/// (from, to, name), by `from`.
fn bounds(pg: &test_support::postgres::Postgres, db: &str, table: &str) -> Vec<(u64, u64, String)> {
    let out = pg.psql(
        db,
        &format!(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = '{table}'::regclass"
        ),
    );
    let mut parts: Vec<(u64, u64, String)> = out
        .lines()
        .filter(|l| !l.ends_with("|DEFAULT"))
        .map(|l| {
            // name|FOR VALUES FROM ('1') TO ('2')
            let (name, bound) = l.split_once('|').unwrap();
            let nums: Vec<u64> = bound
                .split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(nums.len(), 2, "{l}");
            (nums[0], nums[1], name.to_owned())
        })
        .collect();
    parts.sort();
    parts
}

/// Every partition in `parts` starts where one of its width does (an hour
/// at an hour, a day at midnight UTC).
fn assert_aligned(parts: &[(u64, u64, String)]) {
    for (lo, hi, name) in parts {
        assert_eq!(lo % (hi - lo), 0, "{name} [{lo}, {hi}) is not aligned");
    }
}

/// Whether `[lo, hi)` is wholly covered by the partitions in `parts`.
fn covered(parts: &[(u64, u64, String)], lo: u64, hi: u64) -> bool {
    let mut at = lo;
    for (a, b, _) in parts {
        if *a <= at && at < *b {
            at = *b;
        }
    }
    at >= hi
}

/// A metrics frame received at `at` (one raw row, one minute row).
fn sample(worker: &str, at: u64, seq: u64) -> conductor::store::WriteOp {
    conductor::store::WriteOp::Metrics {
        worker_id: worker.into(),
        received_at_ms: at,
        seq,
        blob: seq.to_be_bytes().to_vec(),
        rollup: conductor::store::Rollup {
            cpu: 100 * seq,
            ..conductor::store::Rollup::default()
        },
    }
}

/// `table`'s partitions, by name.
fn partitions(pg: &test_support::postgres::Postgres, db: &str, table: &str) -> Vec<String> {
    let out = pg.psql(
        db,
        &format!(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = '{table}'::regclass ORDER BY 1"
        ),
    );
    out.lines().map(str::to_owned).collect()
}

fn count(pg: &test_support::postgres::Postgres, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql).parse().unwrap()
}

fn test_worker(id: &str) -> conductor::store::WorkerRow {
    conductor::store::WorkerRow {
        id: id.into(),
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
    }
}

#[test]
fn a_fresh_postgres_store_writes_metrics_into_todays_partition() {
    use conductor::store::Store;
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("fresh");
    let mut store = Store::open_postgres(&url).unwrap();
    let now = now_ms();
    let today = day(now);
    for table in ["metrics_raw", "metrics_minute"] {
        assert_eq!(
            pg.psql(
                "fresh",
                &format!("SELECT relkind FROM pg_class WHERE relname = '{table}'")
            ),
            "p",
            "{table} is partitioned"
        );
        let mut want: Vec<String> = if table == "metrics_raw" {
            // By hour (the default retention's width), from this one to
            // 24 hours after it.
            let this_hour = now - now % HOUR;
            (this_hour..=this_hour + 24 * HOUR)
                .step_by(usize::try_from(HOUR).unwrap())
                .map(|h| part_hour(table, h))
                .collect()
        } else {
            (today..=today + 2).map(|d| part(table, d)).collect()
        };
        want.push(format!("{table}_default"));
        want.sort();
        assert_eq!(partitions(&pg, "fresh", table), want);
    }
    store.insert_worker(&test_worker("w-1")).unwrap();
    store
        .apply_batch(&[sample("w-1", now, 1), sample("w-1", now + 1, 2)])
        .unwrap();
    assert_eq!(
        pg.psql(
            "fresh",
            "SELECT DISTINCT tableoid::regclass FROM metrics_raw"
        ),
        part_hour("metrics_raw", now)
    );
    assert_eq!(
        pg.psql(
            "fresh",
            "SELECT DISTINCT tableoid::regclass FROM metrics_minute"
        ),
        part("metrics_minute", today)
    );
    // The history queries read them; the minute upsert summed the two.
    assert_eq!(
        store
            .raw_metrics("w-1", now - HOUR, now + HOUR)
            .unwrap()
            .len(),
        2
    );
    let minutes = store.minute_metrics("w-1", now - HOUR, now + HOUR).unwrap();
    assert_eq!(minutes.iter().map(|m| m.n).sum::<u64>(), 2);
    // A second open takes no step again and makes the missing partitions
    // ahead (one is gone here), leaving the others.
    let had = partitions(&pg, "fresh", "metrics_raw");
    let last = now - now % HOUR + 24 * HOUR;
    pg.psql(
        "fresh",
        &format!("DROP TABLE {}", part_hour("metrics_raw", last)),
    );
    drop(Store::open_postgres(&url).unwrap());
    assert_eq!(
        pg.psql("fresh", "SELECT version, pg_steps FROM aerekos_schema"),
        format!("{}|1", conductor::store::MIGRATIONS.len())
    );
    assert_eq!(partitions(&pg, "fresh", "metrics_raw"), had);
    // Deleting the worker deletes its history in every partition.
    assert!(store.delete_worker("w-1").unwrap());
    assert_eq!(count(&pg, "fresh", "SELECT count(*) FROM metrics_raw"), 0);
    assert_eq!(
        count(&pg, "fresh", "SELECT count(*) FROM metrics_minute"),
        0
    );
}

#[test]
fn a_v9_postgres_database_is_converted_keeping_every_row() {
    use conductor::store::{sql::pg_ddl, Store, MIGRATIONS};
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let url = pg.create_database("old");
    // The database as a conductor from before partitioning left it: v9,
    // plain metrics tables.
    let mut schema = String::from(
        "CREATE TABLE aerekos_schema (version BIGINT NOT NULL);
         INSERT INTO aerekos_schema VALUES (9);
         CREATE TABLE aerekos_lease (epoch BIGINT NOT NULL, api_url TEXT);
         INSERT INTO aerekos_lease VALUES (0, NULL);",
    );
    for step in &MIGRATIONS[..9] {
        schema.push_str(&pg_ddl(step));
        schema.push(';');
    }
    pg.psql("old", &schema);
    assert_eq!(
        pg.psql(
            "old",
            "SELECT relkind FROM pg_class WHERE relname = 'metrics_raw'"
        ),
        "r"
    );
    // Rows over the last 6 days and tomorrow, several workers.
    let now = now_ms();
    let mut times = Vec::new();
    for k in 0..6 {
        for j in 0..4 {
            times.push(now - k * DAY - j * 5 * HOUR);
        }
    }
    times.push(now + DAY);
    let raw: Vec<String> = times
        .iter()
        .enumerate()
        .map(|(n, t)| format!("('w-{}', {t}, {n}, '\\x{n:04x}'::bytea)", n % 3))
        .collect();
    pg.psql(
        "old",
        &format!("INSERT INTO metrics_raw VALUES {}", raw.join(", ")),
    );
    let minute: Vec<String> = times
        .iter()
        .enumerate()
        .map(|(n, t)| {
            format!(
                "('w-{}', {}, 1, {n}, {n}, 5, 10, 7, NULL, 1, 2, 3, 4)",
                n % 3,
                t - t % 60_000
            )
        })
        .collect();
    pg.psql(
        "old",
        &format!(
            "INSERT INTO metrics_minute (worker_id, minute_ms, n, cpu_sum, cpu_max,
                mem_used_sum, mem_total, load1_sum, temp_max, disk_used, disk_total,
                rx_bps_sum, tx_bps_sum) VALUES {}",
            minute.join(", ")
        ),
    );
    let per_day = |table: &str, col: &str| {
        pg.psql(
            "old",
            &format!("SELECT {col} / 86400000, count(*) FROM {table} GROUP BY 1 ORDER BY 1"),
        )
    };
    let checksum = |table: &str| {
        pg.psql(
            "old",
            &format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"),
        )
    };
    let raw_days = per_day("metrics_raw", "received_at_ms");
    let minute_days = per_day("metrics_minute", "minute_ms");
    // 7 or 8 days, by the time of day.
    let days: std::collections::BTreeSet<u64> = times.iter().map(|t| t / DAY).collect();
    assert_eq!(raw_days.lines().count(), days.len(), "{raw_days}");
    assert!(days.len() >= 7);
    let (raw_sum, minute_sum) = (checksum("metrics_raw"), checksum("metrics_minute"));

    // Two conductors start at once: one converts, the other waits and
    // finds it done.
    let opened: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Store::open_postgres(&url))
        })
        .collect();
    let mut stores: Vec<Store> = opened
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();

    assert_eq!(
        pg.psql("old", "SELECT version, pg_steps FROM aerekos_schema"),
        format!("{}|1", MIGRATIONS.len())
    );
    for (table, col) in [
        ("metrics_raw", "received_at_ms"),
        ("metrics_minute", "minute_ms"),
    ] {
        assert_eq!(
            pg.psql(
                "old",
                &format!("SELECT relkind FROM pg_class WHERE relname = '{table}'")
            ),
            "p"
        );
        assert_eq!(
            pg.psql(
                "old",
                &format!("SELECT to_regclass('{table}_unpartitioned') IS NULL")
            ),
            "t"
        );
        assert_eq!(
            count(&pg, "old", &format!("SELECT count(*) FROM {table}_default")),
            0,
            "{table}: nothing in DEFAULT"
        );
        // Each row in the partition of its day.
        assert_eq!(
            count(
                &pg,
                "old",
                &format!(
                    "SELECT count(*) FROM {table} WHERE tableoid::regclass::text <> '{table}_p'
                     || to_char(timezone('UTC', to_timestamp({col} / 1000)), 'YYYYMMDD')"
                )
            ),
            0,
            "{table}: rows outside their day's partition"
        );
        // From now to the end of the window ahead is covered too: a day
        // past the hour for raw (by hour), the second day ahead for minute.
        let end = if table == "metrics_raw" {
            now - now % HOUR + 25 * HOUR
        } else {
            u64::try_from(day(now) + 3).unwrap() * DAY
        };
        assert!(covered(&bounds(&pg, "old", table), now, end), "{table}");
    }
    assert_eq!(per_day("metrics_raw", "received_at_ms"), raw_days);
    assert_eq!(per_day("metrics_minute", "minute_ms"), minute_days);
    assert_eq!(checksum("metrics_raw"), raw_sum);
    assert_eq!(checksum("metrics_minute"), minute_sum);
    // The store reads and writes the converted tables: the primary key
    // still makes a second sample in a minute an update.
    let store = &mut stores[0];
    let from = now - 7 * DAY;
    let total: usize = (0..3)
        .map(|w| {
            store
                .raw_metrics(&format!("w-{w}"), from, now + 2 * DAY)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(total, times.len());
    store.apply_batch(&[sample("w-0", times[0], 1000)]).unwrap();
    assert_eq!(
        pg.psql(
            "old",
            &format!(
                "SELECT n FROM metrics_minute WHERE worker_id = 'w-0' AND minute_ms = {}",
                times[0] - times[0] % 60_000
            )
        ),
        "2"
    );
}

/// A fresh store at `db` with 4 samples a day over the last 5 days (and
/// their day partitions, made after the rows went to DEFAULT: moved), a
/// sample in DEFAULT 10 days old and one 20 days ahead. The samples' times.
fn store_with_five_days(
    pg: &test_support::postgres::Postgres,
    db: &str,
    now: u64,
) -> (conductor::store::Store, Vec<u64>) {
    let mut store = conductor::store::Store::open_postgres(&pg.create_database(db)).unwrap();
    let mut times = Vec::new();
    for k in 0..5 {
        for j in 0..4 {
            times.push(now - k * DAY - j * 5 * HOUR);
        }
    }
    let ops: Vec<_> = times
        .iter()
        .zip(1..)
        .map(|(t, seq)| sample("w-1", *t, seq))
        .collect();
    store.apply_batch(&ops).unwrap();
    assert!(count(pg, db, "SELECT count(*) FROM metrics_raw_default") > 0);
    // The past days' partitions, made while DEFAULT holds their rows.
    // By day, but today's raw hours before this one (the open made the
    // rest of today's by hour).
    let made = store
        .prepare_metric_partitions(now - 5 * DAY, now, Width::Day)
        .unwrap();
    assert!(made >= 2 * 5, "5 past days, 2 tables: {made}");
    for k in 1..=5 {
        let d = day(now) - k;
        for table in ["metrics_raw", "metrics_minute"] {
            assert!(
                partitions(pg, db, table).contains(&part(table, d)),
                "{table} {d}"
            );
        }
    }
    let today = now - now % DAY;
    assert!(covered(&bounds(pg, db, "metrics_raw"), today, now));
    assert_eq!(
        count(pg, db, "SELECT count(*) FROM metrics_raw_default"),
        0,
        "moved out of DEFAULT"
    );
    assert_eq!(
        count(pg, db, "SELECT count(*) FROM metrics_minute_default"),
        0
    );
    assert_eq!(
        count(pg, db, "SELECT count(*) FROM metrics_raw"),
        u64::try_from(times.len()).unwrap()
    );
    // Making them again is a no-op.
    assert_eq!(
        store
            .prepare_metric_partitions(now - 5 * DAY, now, Width::Day)
            .unwrap(),
        0
    );
    let (old, ahead) = (now - 10 * DAY, now + 20 * DAY);
    store
        .apply_batch(&[sample("w-1", old, 900), sample("w-1", ahead, 901)])
        .unwrap();
    times.extend([old, ahead]);
    assert_eq!(count(pg, db, "SELECT count(*) FROM metrics_raw_default"), 2);
    (store, times)
}

/// The days from 6 back to 2 ahead that `table`'s partitions (of a day
/// or of hours) wholly cover.
fn days_present(
    pg: &test_support::postgres::Postgres,
    db: &str,
    table: &str,
    now: u64,
) -> Vec<i64> {
    let have = bounds(pg, db, table);
    (day(now) - 6..=day(now) + 2)
        .filter(|d| {
            let lo = u64::try_from(*d).unwrap() * DAY;
            covered(&have, lo, lo + DAY)
        })
        .collect()
}

#[test]
fn retention_drops_whole_partitions_before_the_cutoff() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let now = now_ms();
    let (mut store, times) = store_with_five_days(&pg, "ret", now);

    // A one-hour history query reads one partition, with the query's
    // literal values (planned for them) and as the store prepares it (a
    // generic plan, pruned when it starts).
    let from = (now / DAY - 1) * DAY + HOUR;
    let to = from + HOUR;
    let want = part("metrics_raw", day(from));
    let query = "SELECT received_at_ms, seq, frame FROM metrics_raw
         WHERE worker_id = $1 AND received_at_ms >= $2 AND received_at_ms <= $3
         ORDER BY received_at_ms, seq LIMIT $4";
    let scanned = |plan: &str| -> Vec<String> {
        let mut names: Vec<String> = plan
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| {
                *w == "metrics_raw_default"
                    || w.strip_prefix("metrics_raw_p").is_some_and(|d| {
                        (d.len() == 8 || d.len() == 10) && d.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let custom = pg.psql(
        "ret",
        &format!(
            "EXPLAIN (COSTS OFF) {}",
            query
                .replace("$1", "'w-1'")
                .replace("$2", &from.to_string())
                .replace("$3", &to.to_string())
                .replace("$4", "10000")
        ),
    );
    assert_eq!(scanned(&custom), vec![want.clone()], "{custom}");
    let generic = pg.psql(
        "ret",
        &format!(
            "SET plan_cache_mode = force_generic_plan;
             PREPARE q (text, bigint, bigint, bigint) AS {query};
             EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
                EXECUTE q ('w-1', {from}, {to}, 10000)"
        ),
    );
    assert_eq!(scanned(&generic), vec![want], "{generic}");
    assert!(generic.contains("Subplans Removed"), "{generic}");

    let cutoff = now - 5 * DAY / 2;
    // Only DEFAULT's old row (one per table) is deleted one by one.
    assert_eq!(store.sweep(cutoff, cutoff).unwrap(), 2);
    assert_aligned(&bounds(&pg, "ret", "metrics_raw"));
    assert_aligned(&bounds(&pg, "ret", "metrics_minute"));
    let cut_day = day(cutoff);
    let cut_day_from = cutoff - cutoff % DAY;
    let kept: Vec<i64> = (day(now) - 6..=day(now) + 2)
        .filter(|d| *d >= day(now) - 5 && *d >= cut_day)
        .collect();
    for (table, col) in [
        ("metrics_raw", "received_at_ms"),
        ("metrics_minute", "minute_ms"),
    ] {
        assert_eq!(days_present(&pg, "ret", table, now), kept, "{table}");
        // The dropped ones are gone, not detached.
        for d in day(now) - 5..cut_day {
            assert_eq!(
                pg.psql(
                    "ret",
                    &format!("SELECT to_regclass('{}') IS NULL", part(table, d))
                ),
                "t"
            );
        }
        // Older rows are left in the cut-off's own partition only (kept
        // whole), none before it.
        assert_eq!(
            count(
                &pg,
                "ret",
                &format!("SELECT count(*) FROM {table} WHERE {col} < {cut_day_from}")
            ),
            0,
            "{table}: rows older than the cut-off's day"
        );
        let in_cut_day = times
            .iter()
            .filter(|t| (cut_day_from..cutoff).contains(*t))
            .count();
        assert_eq!(
            count(
                &pg,
                "ret",
                &format!("SELECT count(*) FROM {table} WHERE {col} < {cutoff}")
            ),
            u64::try_from(in_cut_day).unwrap(),
            "{table}: the cut-off's day kept whole"
        );
        // Every newer one is there (the one 20 days ahead in DEFAULT too).
        let newer = times.iter().filter(|t| **t >= cut_day_from).count();
        assert_eq!(
            count(&pg, "ret", &format!("SELECT count(*) FROM {table}")),
            u64::try_from(newer).unwrap(),
            "{table}"
        );
        assert_eq!(
            count(&pg, "ret", &format!("SELECT count(*) FROM {table}_default")),
            1,
            "{table}: the old row in DEFAULT deleted, the future one kept"
        );
    }
    // At least the days 4 and 5 back were dropped.
    assert!(kept.first().is_some_and(|d| *d >= day(now) - 3), "{kept:?}");
}

#[test]
fn a_fenced_store_drops_nothing_on_retention() {
    use conductor::store::lease::{Fence, Lease};
    use conductor::store::{Store, StoreError};
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let now = now_ms();
    let (mut store, times) = store_with_five_days(&pg, "fenced_ret", now);
    let url = pg.database("fenced_ret");
    let all = u64::try_from(times.len()).unwrap();
    let before = (
        days_present(&pg, "fenced_ret", "metrics_raw", now),
        days_present(&pg, "fenced_ret", "metrics_minute", now),
    );
    let unchanged = |why: &str| {
        assert_eq!(
            (
                days_present(&pg, "fenced_ret", "metrics_raw", now),
                days_present(&pg, "fenced_ret", "metrics_minute", now),
            ),
            before,
            "{why}: partitions dropped"
        );
        assert_eq!(
            count(&pg, "fenced_ret", "SELECT count(*) FROM metrics_raw"),
            all,
            "{why}: rows deleted"
        );
        assert_eq!(
            count(&pg, "fenced_ret", "SELECT count(*) FROM metrics_minute"),
            all,
            "{why}"
        );
    };
    let cutoff = now - 5 * DAY / 2;

    // The ingest writer's fence (the connection retention runs on).
    let fence = Fence::default();
    store.set_fence(fence.clone());
    assert!(matches!(
        store.sweep(cutoff, cutoff),
        Err(StoreError::Fenced)
    ));
    unchanged("no lease");
    let first = Lease::try_take(&url, "https://a.test:3000")
        .unwrap()
        .unwrap();
    fence.hold(first.epoch());
    // Another conductor takes the lease; this one has not noticed yet.
    drop(first);
    let second = wait_for("the lease taken over", T, || {
        Lease::try_take(&url, "https://a.test:3000").unwrap()
    });
    assert_eq!(second.epoch(), 2);
    assert!(matches!(
        store.sweep(cutoff, cutoff),
        Err(StoreError::Fenced)
    ));
    unchanged("lost lease, writer's fence");

    // The API connection's fence (`fence_writes`).
    let mut api = Store::open_postgres(&url).unwrap();
    let api_fence = Fence::default();
    api_fence.hold(1);
    api.fence_writes(api_fence.clone());
    assert!(matches!(api.sweep(cutoff, cutoff), Err(StoreError::Fenced)));
    unchanged("lost lease, connection's fence");

    // Under the current epoch, the same sweep drops.
    fence.hold(second.epoch());
    store.sweep(cutoff, cutoff).unwrap();
    assert_ne!(
        days_present(&pg, "fenced_ret", "metrics_raw", now),
        before.0
    );
}

#[test]
fn raw_partitions_are_hours_dropped_whole_and_their_width_follows_the_retention() {
    let Some(pg) = test_support::postgres::Postgres::start() else {
        return;
    };
    let db = "hourly";
    let mut store = conductor::store::Store::open_postgres(&pg.create_database(db)).unwrap();
    let now = now_ms();
    // A sample every 20 minutes over the last 30 hours, in hour partitions.
    store
        .prepare_metric_partitions(now - 30 * HOUR, now, Width::Hour)
        .unwrap();
    let times: Vec<u64> = (0..90).map(|k| now - k * 20 * 60_000).collect();
    let ops: Vec<_> = times
        .iter()
        .zip(1..)
        .map(|(t, seq)| sample("w-1", *t, seq))
        .collect();
    store.apply_batch(&ops).unwrap();
    assert_eq!(
        count(&pg, db, "SELECT count(*) FROM metrics_raw_default"),
        0
    );
    let hours_before = bounds(&pg, db, "metrics_raw");
    assert!(
        hours_before.iter().all(|(a, b, _)| b - a == HOUR),
        "raw partitions are hours: {hours_before:?}"
    );

    // The default raw retention, 24 h; the minute rows stay.
    let cutoff = now - 24 * HOUR;
    let deleted = store.sweep(cutoff, now - 7 * DAY).unwrap();
    let raw = bounds(&pg, db, "metrics_raw");
    assert!(
        raw.iter().all(|(_, b, _)| *b > cutoff),
        "a partition wholly older than the cut-off is left: {raw:?}"
    );
    assert!(covered(&raw, cutoff, now), "{raw:?}");
    // The dropped ones are gone, not detached.
    for (a, b, name) in hours_before.iter().filter(|(_, b, _)| *b <= cutoff) {
        assert_eq!(
            pg.psql(db, &format!("SELECT to_regclass('{name}') IS NULL")),
            "t",
            "{name} [{a}, {b})"
        );
    }
    // Nothing was deleted row by row: the ~6 hours before the cut-off's
    // went with their partitions, the cut-off's own hour is kept whole.
    assert_eq!(deleted, 0, "rows deleted one by one");
    let cut_hour_from = cutoff - cutoff % HOUR;
    let in_cut_hour = times
        .iter()
        .filter(|t| (cut_hour_from..cutoff).contains(*t))
        .count();
    assert_eq!(
        count(
            &pg,
            db,
            &format!("SELECT count(*) FROM metrics_raw WHERE received_at_ms < {cutoff}")
        ),
        u64::try_from(in_cut_hour).unwrap()
    );
    let kept = times.iter().filter(|t| **t >= cut_hour_from).count();
    assert_eq!(
        count(&pg, db, "SELECT count(*) FROM metrics_raw"),
        u64::try_from(kept).unwrap()
    );
    assert!(times.len() - kept >= 15, "most older rows went by drop");
    assert_eq!(
        count(&pg, db, "SELECT count(*) FROM metrics_minute"),
        u64::try_from(times.len()).unwrap(),
        "minute rows kept"
    );

    // A retention past 2 days: the partitions made from now on are days.
    let ahead = u64::try_from(day(now) + 2).unwrap() * DAY;
    let raw_from = |from: u64| -> Vec<(u64, u64, String)> {
        bounds(&pg, db, "metrics_raw")
            .into_iter()
            .filter(|(a, _, _)| *a >= from)
            .collect()
    };
    let drop_raw_from = |from: u64| {
        for (_, _, name) in raw_from(from) {
            pg.psql(db, &format!("DROP TABLE {name}"));
        }
    };
    drop_raw_from(ahead);
    store.sweep(now - 30 * DAY, now - 30 * DAY).unwrap();
    assert_aligned(&bounds(&pg, db, "metrics_raw"));
    assert_aligned(&bounds(&pg, db, "metrics_minute"));
    assert_eq!(
        raw_from(ahead),
        vec![(ahead, ahead + DAY, part("metrics_raw", day(ahead)))]
    );
    // And back to 24 h: hours again, for the next 24.
    let later = now - now % HOUR + 12 * HOUR;
    drop_raw_from(later);
    store.sweep(cutoff, now - 7 * DAY).unwrap();
    assert_aligned(&bounds(&pg, db, "metrics_raw"));
    let hourly = raw_from(later);
    assert_eq!(hourly.len(), 13, "{hourly:?}");
    assert!(hourly.iter().all(|(a, b, _)| b - a == HOUR), "{hourly:?}");
    assert!(covered(&hourly, later, now - now % HOUR + 25 * HOUR));
    assert_eq!(hourly[0].2, part_hour("metrics_raw", later));
    // The minute table (7 days) is made by day.
    let minute_ahead: Vec<_> = bounds(&pg, db, "metrics_minute")
        .into_iter()
        .filter(|(a, _, _)| *a >= ahead)
        .collect();
    assert_eq!(
        minute_ahead,
        vec![(ahead, ahead + DAY, part("metrics_minute", day(ahead)))]
    );
}
