//! `db_bench`: queries per second for a point SELECT and a single-row
//! INSERT, measured in the same run three ways:
//!
//! 1. **rusqlite** directly (the baseline): one connection, WAL,
//!    `synchronous=FULL`, cached statements;
//! 2. **engine**: db-manager's [`db_manager::Database`] in process
//!    (sandboxed connections, parameter binding, JSON value mapping);
//! 3. **HTTP**: the real db-manager server on loopback, with 1 and 4
//!    concurrent keep-alive clients (ureq), JSON both ways.
//!
//! Prints each figure and its ratio to the baseline. INSERTs are one
//! transaction each, fsynced (`synchronous=FULL`), so they measure the
//! disk as much as db-manager.
//!
//! `cargo run --release -p aerekos-db-manager --bin db_bench [-- --secs 2]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use db_manager::engine::{Access, Database, Limits, Statement};
use db_manager::Manager;
use serde_json::{json, Value};
use service_runtime::{Audit, Clients};

const ROWS: i64 = 10_000;
const ADMIN: &str = "bench-admin-token-0123456789";

/// A scratch directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rng(u64);

impl Rng {
    // fits: the value is below ROWS (10 000).
    #[allow(clippy::cast_possible_wrap)]
    fn id(&mut self) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % ROWS as u64) as i64 + 1
    }
}

/// Runs `op` until `secs` elapse; returns ops/s.
fn rate(secs: f64, mut op: impl FnMut(u64)) -> f64 {
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        op(n);
        n += 1;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Runs `op` on `threads` threads until `secs` elapse; returns total ops/s.
fn rate_threads(secs: f64, threads: usize, op: impl Fn(usize, u64) + Send + Sync + 'static) -> f64 {
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (op, stop, count) = (op.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(t, n);
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn setup(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS kv(id INTEGER PRIMARY KEY, v TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS log(id INTEGER PRIMARY KEY, worker INTEGER, body TEXT);",
    )?;
    conn.execute_batch("BEGIN")?;
    {
        let mut st = conn.prepare("INSERT OR REPLACE INTO kv VALUES (?, ?)")?;
        for i in 1..=ROWS {
            st.execute(rusqlite::params![i, format!("value-{i:08}")])?;
        }
    }
    conn.execute_batch("COMMIT")
}

fn post(agent: &ureq::Agent, url: &str, token: &str, body: &Value) -> Result<Value, String> {
    let mut resp = agent
        .post(url)
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let v: Value = resp.body_mut().read_json().map_err(|e| e.to_string())?;
    if code >= 300 {
        return Err(format!("{code}: {v}"));
    }
    Ok(v)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut secs = 2.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => {
                secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--secs needs a number")?
            }
            _ => return Err(format!("unknown argument {a}; usage: db_bench [--secs S]").into()),
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!("db_bench-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;

    // Set up the three ways first, so the INSERT rounds can interleave.
    let base_path = dir.path().join("baseline.sqlite");
    let conn = rusqlite::Connection::open(&base_path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    setup(&conn)?;
    let db = Database::open("bench", &dir.path().join("engine.sqlite"))?;
    {
        let c = rusqlite::Connection::open(dir.path().join("engine.sqlite"))?;
        setup(&c)?;
    }
    let mgr = Arc::new(Manager::open(
        &dir.path().join("server"),
        Clients::from_pairs([("bench", ADMIN)]),
        None,
        Audit::stderr_only("db-manager"),
    )?);
    let (_, rw, ro) = mgr.create("bench", "bench")?;
    let server =
        db_manager::SPEC.serve("127.0.0.1:0", 8, db_manager::http::handler(mgr.clone()))?;
    let url = format!("http://{}/v1/databases/bench/query", server.addr());
    let a = agent();
    post(
        &a,
        &url,
        &rw,
        &json!({"sql": "CREATE TABLE kv(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"}),
    )?;
    post(
        &a,
        &url,
        &rw,
        &json!({"sql": "CREATE TABLE log(id INTEGER PRIMARY KEY, worker INTEGER, body TEXT)"}),
    )?;
    post(
        &a,
        &url,
        &rw,
        &json!({"sql": "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?) INSERT INTO kv SELECT i, printf('value-%08d', i) FROM s", "params": [ROWS]}),
    )?;
    let failures = Arc::new(AtomicU64::new(0));
    let acked_inserts = Arc::new(AtomicU64::new(0));
    // Keep-alive clients, one agent each, kept for the whole run.
    let agents1: Arc<Vec<ureq::Agent>> = Arc::new((0..1).map(|_| agent()).collect());
    let agents4: Arc<Vec<ureq::Agent>> = Arc::new((0..4).map(|_| agent()).collect());
    // Open the five connections before measuring, so connection set-up is
    // not measured. (One after the other: upstream tiny_http could leave a
    // connection unserved while several opened at the same instant; the
    // vendored copy fixes that, see vendor/README.md.)
    for a in agents4.iter().chain(agents1.iter()) {
        post(a, &url, &ro, &json!({"sql": "SELECT 1"}))?;
    }
    let http = |agents: &Arc<Vec<ureq::Agent>>, secs: f64, token: &str, insert: bool| {
        let (url, agents, token, failures, acked) = (
            url.clone(),
            agents.clone(),
            token.to_string(),
            failures.clone(),
            acked_inserts.clone(),
        );
        rate_threads(secs, agents.len(), move |t, n| {
            let body = if insert {
                json!({"sql": "INSERT INTO log(worker, body) VALUES (?, ?)", "params": [t, format!("event {n}")]})
            } else {
                let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) << 32) ^ n);
                json!({"sql": "SELECT id, v FROM kv WHERE id = ?", "params": [r.id()]})
            };
            match post(&agents[t], &url, &token, &body) {
                Ok(_) if insert => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("db_bench: request failed: {e}");
                }
            }
        })
    };
    let limits = Limits::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Point SELECTs (CPU bound): one run each.
    let base_select = rate(secs, |_| {
        let mut st = conn
            .prepare_cached("SELECT id, v FROM kv WHERE id = ?")
            .expect("prepare");
        let _: Option<(i64, String)> = st
            .query_row([rng.id()], |r| Ok((r.get(0)?, r.get(1)?)))
            .ok();
    });
    let engine_select = rate(secs, |_| {
        let st = Statement {
            sql: "SELECT id, v FROM kv WHERE id = ?".into(),
            params: json!([rng.id()]),
        };
        db.query(Access::ReadOnly, &st, limits).expect("select");
    });
    let http_select_1 = http(&agents1, secs, &ro, false);
    let http_select_4 = http(&agents4, secs, &ro, false);

    // INSERTs are bound by the disk's fsync rate, which drifts with other
    // work on the machine: interleave the four cases in short rounds.
    const ROUNDS: usize = 4;
    let round = secs / ROUNDS as f64;
    let mut ins = [0f64; 4];
    let mut n = 0u64;
    for _ in 0..ROUNDS {
        ins[0] += rate(round, |_| {
            n += 1;
            let mut st = conn
                .prepare_cached("INSERT INTO log(worker, body) VALUES (?, ?)")
                .expect("prepare");
            st.execute(rusqlite::params![0, format!("event {n}")])
                .expect("insert");
        }) / ROUNDS as f64;
        ins[1] += rate(round, |_| {
            n += 1;
            let st = Statement {
                sql: "INSERT INTO log(worker, body) VALUES (?, ?)".into(),
                params: json!([0, format!("event {n}")]),
            };
            db.query(Access::ReadWrite, &st, limits).expect("insert");
        }) / ROUNDS as f64;
        ins[2] += http(&agents1, round, &rw, true) / ROUNDS as f64;
        ins[3] += http(&agents4, round, &rw, true) / ROUNDS as f64;
    }
    // Every acknowledged insert is really there.
    let stored = post(&a, &url, &ro, &json!({"sql": "SELECT count(*) FROM log"}))?;
    drop(server);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("db_bench: {secs} s per figure, {cores} cores, {ROWS} rows, WAL + synchronous=FULL");
    println!("{:<34} {:>12} {:>14}", "case", "queries/s", "vs rusqlite");
    let line = |name: &str, v: f64, base: f64| {
        println!("{name:<34} {v:>12.0} {:>13.2}x", v / base);
    };
    line(
        "point SELECT  rusqlite (baseline)",
        base_select,
        base_select,
    );
    line(
        "point SELECT  engine in process",
        engine_select,
        base_select,
    );
    line("point SELECT  HTTP, 1 client", http_select_1, base_select);
    line("point SELECT  HTTP, 4 clients", http_select_4, base_select);
    line("INSERT        rusqlite (baseline)", ins[0], ins[0]);
    line("INSERT        engine in process", ins[1], ins[0]);
    line("INSERT        HTTP, 1 client", ins[2], ins[0]);
    line("INSERT        HTTP, 4 clients", ins[3], ins[0]);
    println!(
        "INSERT rounds interleaved ({ROUNDS} x {round:.2} s per case); rows in the HTTP table: {} (acknowledged over HTTP: {}); failed HTTP requests: {}",
        stored["rows"][0][0],
        acked_inserts.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    Ok(())
}
