//! Fleet simulator: N simulated workers in one process against a real
//! conductor process, to find where ingest stops keeping up.
//!
//! ```sh
//! cargo run --release -p aerekos-e2e --bin fleet_sim -- \
//!     [--workers 1000,5000,10000] [--interval-s 10] [--broker embedded|mosquitto|nats|both] \
//!     [--duration-s 60] [--vanish 100] [--enrol-threads 16] [--sim-threads 2] \
//!     [--nagle] [--subscribe-mirrors] [--conductor-bin PATH] [--json FILE]
//! ```
//!
//! The simulated workers set TCP_NODELAY like the edge-worker; `--nagle`
//! leaves Nagle on (`--tcp-nodelay`, the old opt-in, is still accepted);
//! `--subscribe-mirrors` adds an observer subscription to
//! `aerekos/v1/+/json/#`. Both are A/B switches for the findings in the
//! report, not defaults.
//!
//! Without `--workers`/`--interval-s` it runs 1,000 / 5,000 / 10,000
//! workers at 10 s and 1,000 at 1 s, on both brokers. Each scenario gets a
//! fresh conductor (and Mosquitto), started with
//! `AEREKOS_RATE_LIMIT_BURST=0` so enrolment from one IP is not throttled.
//!
//! Every simulated worker does what an edge-worker does on the wire: it
//! enrols over HTTP with the registration token (concurrently, timed),
//! connects with its own MQTT login and a retained `offline` last will,
//! publishes `online`, subscribes to its `cmd` topic, sends a sealed Birth,
//! then a sealed Metrics frame every interval (seq increasing, first tick at
//! a random offset so the fleet is spread over the interval), and answers
//! sealed Ping commands with a sealed Reply.
//!
//! Measured over the window (`--duration-s`, after all workers are online
//! and one interval of warm-up):
//! * conductor CPU (`/proc/<pid>/stat` utime+stime; 100 % = one core),
//!   RSS (VmRSS) and peak RSS (VmHWM); Mosquitto's and the simulator's own
//!   CPU alongside, since all share the machine; the conductor's busiest
//!   threads (`/proc/<pid>/task/*/stat`);
//! * frames/s accepted: the delta of `aerekos_frames_accepted_total`
//!   (Prometheus `/metrics`) over the window;
//! * ingest latency: for a sample of up to 200 workers, the conductor's
//!   receive stamp (`received_at_ms`, taken when ingest opens the frame, in
//!   the retained JSON mirror it publishes for every accepted metrics frame,
//!   read by an observer subscription) minus the send time the simulator put
//!   in the frame (`sent_at_ms`, stamped just before the publish). Same host,
//!   same wall clock. It covers client queue, broker routing, the
//!   conductor's MQTT session queue and the ingest loop up to the open;
//!   frames whose mirror was dropped are not sampled (counted as
//!   `aerekos_mirror_dropped_total`);
//! * command round trip: `POST /api/v1/workers/{id}/commands {"action":"ping"}`
//!   back to back (100 ms apart) to random workers, timed as the HTTP call;
//!
//! and over the whole run: frames lost = frames the simulator handed to its
//! MQTT clients (births, metrics, replies) − `aerekos_frames_accepted_total`
//! after a drain. Then `--vanish` workers close their sockets without a
//! DISCONNECT ("drop": the broker sees EOF and publishes the last will) and
//! as many go silent (socket open, nothing sent or read: a power cut; only
//! the broker's keep-alive or the conductor's liveness clock notices); the
//! API is polled until each is `offline`; the delay is from the moment each
//! vanished.
//!
//! The simulator shares the machine (and its cores) with the conductor:
//! its own CPU is printed so the reader can tell who starved whom.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is a failure report

#[path = "fleet_sim/probe.rs"]
mod probe;
#[path = "fleet_sim/sim.rs"]
mod sim;
#[path = "fleet_sim/target.rs"]
mod target;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::TopicKind;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use sim::{now_ms, Ctl, Rng, SentLog, Stats, Vanished};
use target::{enrol_all, BrokerKind, Target};

/// Most workers whose frames are timed for the ingest latency.
const LATENCY_SAMPLE: usize = 200;
/// Concurrent MQTT handshakes.
const CONNECT_GATE: usize = 256;

#[derive(Debug, Clone)]
struct Args {
    scenarios: Vec<(usize, u64)>,
    brokers: Vec<BrokerKind>,
    duration: Duration,
    vanish: usize,
    enrol_threads: usize,
    sim_threads: usize,
    conductor_bin: Option<PathBuf>,
    json: Option<PathBuf>,
    nodelay: bool,
    subscribe_mirrors: bool,
}

const USAGE: &str = "usage: fleet_sim [--workers 1000,5000,10000] [--interval-s 10[,1]] \
[--broker embedded|mosquitto|nats|both] [--duration-s 60] [--vanish 100] [--enrol-threads 16] \
[--sim-threads 2] [--nagle] [--subscribe-mirrors] [--conductor-bin PATH] [--json FILE]
Without --workers and --interval-s: 1000/5000/10000 workers at 10 s and 1000 at 1 s.";

fn parse_args() -> Result<Args, String> {
    let mut workers: Option<Vec<usize>> = None;
    let mut intervals: Option<Vec<u64>> = None;
    let mut a = Args {
        scenarios: Vec::new(),
        brokers: vec![BrokerKind::Embedded, BrokerKind::Mosquitto],
        duration: Duration::from_secs(60),
        vanish: 100,
        enrol_threads: 16,
        sim_threads: 2,
        conductor_bin: None,
        json: None,
        nodelay: true,
        subscribe_mirrors: false,
    };
    fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
        v.split(',')
            .map(|x| x.trim().parse::<T>())
            .collect::<Result<Vec<T>, _>>()
            .map_err(|_| format!("{flag}: bad list {v:?}"))
    }
    fn one<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("{flag}: bad value {v:?}"))
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        if flag == "--tcp-nodelay" || flag == "--nagle" {
            a.nodelay = flag == "--tcp-nodelay";
            continue;
        }
        if flag == "--subscribe-mirrors" {
            a.subscribe_mirrors = true;
            continue;
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--workers" => workers = Some(list(&flag, &v)?),
            "--interval-s" => intervals = Some(list(&flag, &v)?),
            "--broker" => {
                a.brokers = match v.as_str() {
                    "embedded" => vec![BrokerKind::Embedded],
                    "mosquitto" => vec![BrokerKind::Mosquitto],
                    "nats" => vec![BrokerKind::Nats],
                    "both" => vec![BrokerKind::Embedded, BrokerKind::Mosquitto],
                    _ => {
                        return Err(format!(
                            "--broker: embedded, mosquitto, nats or both\n{USAGE}"
                        ))
                    }
                }
            }
            "--duration-s" => a.duration = Duration::from_secs(one(&flag, &v)?),
            "--vanish" => a.vanish = one(&flag, &v)?,
            "--enrol-threads" => a.enrol_threads = one(&flag, &v)?,
            "--sim-threads" => a.sim_threads = one(&flag, &v)?,
            "--conductor-bin" => a.conductor_bin = Some(PathBuf::from(v)),
            "--json" => a.json = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    a.scenarios = match (workers, intervals) {
        (None, None) => vec![(1000, 10), (5000, 10), (10_000, 10), (1000, 1)],
        (w, i) => {
            let w = w.unwrap_or_else(|| vec![1000, 5000, 10_000]);
            let i = i.unwrap_or_else(|| vec![10]);
            i.iter()
                .flat_map(|iv| w.iter().map(move |n| (*n, *iv)))
                .collect()
        }
    };
    if a.scenarios.iter().any(|(n, i)| *n == 0 || *i == 0) {
        return Err("--workers and --interval-s must be > 0".into());
    }
    Ok(a)
}

/// Everything measured in one scenario.
#[derive(Debug, Default, Clone)]
struct Outcome {
    workers: usize,
    interval_s: u64,
    broker: String,
    enrol_s: f64,
    enrol_retries: u64,
    enrol_failed: usize,
    connect_s: Option<f64>,
    connected: u64,
    online_s: Option<f64>,
    online_at_window_end: u64,
    window_s: f64,
    conductor_cpu: f64,
    broker_cpu: Option<f64>,
    sim_cpu: f64,
    rss_mib: f64,
    hwm_mib: f64,
    broker_rss_mib: Option<f64>,
    frames_per_s: f64,
    expected_per_s: f64,
    ingest: (Option<f64>, Option<f64>, usize),
    visible: (Option<f64>, Option<f64>, usize),
    cmd: (Option<f64>, Option<f64>, usize),
    cmd_mqtt: (Option<f64>, Option<f64>, usize),
    cmd_sent: usize,
    sent: u64,
    acked: u64,
    stored: u64,
    accepted: u64,
    lost: i64,
    rejected: u64,
    rejected_reasons: String,
    queue_full: u64,
    disconnects: u64,
    mirror_dropped: u64,
    vanish_n: usize,
    drop_offline: (Option<f64>, Option<f64>, usize),
    silent_offline: (Option<f64>, Option<f64>, usize),
    threads: Vec<(String, f64)>,
    broker_threads: Vec<(String, f64)>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A Prometheus counter sample as a count.
// fits: counters are whole and non-negative, far below 2^53 (and an `as`
// from f64 saturates).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn count(v: f64) -> u64 {
    v as u64
}

/// Sum of every `aerekos_frames_rejected_total{…}` sample.
fn rejected_total(prom: &str) -> u64 {
    count(
        prom.lines()
            .filter(|l| l.starts_with("aerekos_frames_rejected_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>(),
    )
}

/// Non-zero rejection counters, `reason=n` joined by spaces.
fn rejected_reasons(prom: &str) -> String {
    prom.lines()
        .filter_map(|l| l.strip_prefix("aerekos_frames_rejected_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once('"')?;
            let n = rest.rsplit_once(' ')?.1.parse::<f64>().ok()?;
            (n > 0.0).then(|| format!("{reason}={n}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn accepted_total(prom: &str) -> u64 {
    count(e2e::metric(prom, "aerekos_frames_accepted_total"))
}

/// Latency samples: `(sent_at_ms, conductor stamp − sent, observer receipt − sent)`.
type Latencies = Mutex<Vec<(u64, f64, f64)>>;

/// Subscribes to the JSON mirror of the sampled workers (and, with
/// `all_mirrors`, to every mirror topic) and turns each mirror of a sampled
/// frame into a latency sample.
async fn observe(
    t_mqtt: std::net::SocketAddr,
    login: Option<(String, String)>,
    ids: Vec<String>,
    all_mirrors: bool,
    log: Arc<SentLog>,
    lat: Arc<Latencies>,
    stop: Arc<AtomicBool>,
) {
    let mut opts = MqttOptions::new(
        format!("fleet-sim-observer-{}", std::process::id()),
        t_mqtt.ip().to_string(),
        t_mqtt.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(opts, 64);
    // Never cancelled mid-poll: the task simply ends with the runtime.
    while !stop.load(Ordering::Relaxed) {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if all_mirrors {
                    let all = format!("{}/+/json/#", protocol::topic::ROOT);
                    let _ = client.try_subscribe(all, QoS::AtMostOnce);
                }
                for chunk in ids.chunks(50) {
                    let filters = chunk.iter().map(|id| {
                        SubscribeFilter::new(
                            protocol::topic::topic(id, TopicKind::JsonMetrics),
                            QoS::AtMostOnce,
                        )
                    });
                    let _ = client.try_subscribe_many(filters);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let seen = now_ms() as f64;
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                let (Some(id), Some(seq), Some(rx)) = (
                    v["worker_id"].as_str(),
                    v["seq"].as_u64(),
                    v["received_at_ms"].as_u64(),
                ) else {
                    continue;
                };
                let sent = log
                    .lock()
                    .ok()
                    .and_then(|mut l| l.remove(&(id.to_string(), seq)));
                if let Some(sent) = sent {
                    if let Ok(mut l) = lat.lock() {
                        l.push((sent, rx as f64 - sent as f64, seen - sent as f64));
                    }
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Pings random workers back to back until `deadline`: the HTTP round
/// trips (ms) of the answered ones, the conductor's own publish-to-reply
/// `round_trip_ms` of each, and how many were sent.
fn ping_loop(t: &Target, ids: &[String], deadline: Instant) -> (Vec<f64>, Vec<f64>, usize) {
    let mut rng = Rng::new(now_ms());
    let mut rtts = Vec::new();
    let mut inner = Vec::new();
    let mut sent = 0;
    while Instant::now() < deadline && !ids.is_empty() {
        // fits: below ids.len().
        #[allow(clippy::cast_possible_truncation)]
        let id = &ids[rng.below(ids.len() as u64) as usize];
        let started = Instant::now();
        let (status, body) = t.post(
            &format!("/api/v1/workers/{id}/commands"),
            &json!({"action": "ping"}),
        );
        let took = started.elapsed().as_secs_f64() * 1000.0;
        sent += 1;
        if status == 200 && body["status"] == "ok" {
            rtts.push(took);
            if let Some(rt) = body["round_trip_ms"].as_f64() {
                inner.push(rt);
            }
        } else if sent - rtts.len() <= 3 {
            eprintln!("  ping {id}: HTTP {status} {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (rtts, inner, sent)
}

/// Polls `GET /api/v1/workers` (one request a round, every 100 ms) until
/// every worker of each group is `offline` (or `timeout`); per group, the
/// delay of each worker from its own vanish instant, in seconds.
fn offline_delays(
    t: &Target,
    groups: &[&[String]],
    vanished: &Vanished,
    timeout: Duration,
) -> Vec<Vec<f64>> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<HashSet<&str>> = groups
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    let mut delays: Vec<Vec<f64>> = vec![Vec::new(); groups.len()];
    let (mut rounds, started) = (0u64, Instant::now());
    while pending.iter().any(|p| !p.is_empty()) && Instant::now() < deadline {
        rounds += 1;
        let (_, body) = t.get("/api/v1/workers");
        let now = Instant::now();
        for w in body["workers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if w["status"] != "offline" {
                continue;
            }
            let Some(id) = w["id"].as_str() else { continue };
            for (g, p) in pending.iter_mut().enumerate() {
                if p.remove(id) {
                    let since = vanished.lock().ok().and_then(|v| v.get(id).copied());
                    delays[g].push(
                        since.map_or(0.0, |s| now.saturating_duration_since(s).as_secs_f64()),
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "offline poll: {rounds} rounds of GET /api/v1/workers in {:.1} s ({:.0} ms a round)",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() * 1000.0 / rounds.max(1) as f64
    );
    delays
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn run_scenario(args: &Args, n: usize, interval_s: u64, broker: BrokerKind) -> Outcome {
    let interval = Duration::from_secs(interval_s);
    let mut o = Outcome {
        workers: n,
        interval_s,
        broker: broker.label().into(),
        expected_per_s: n as f64 / interval_s as f64,
        ..Default::default()
    };
    let bin = args
        .conductor_bin
        .clone()
        .unwrap_or_else(|| e2e::bin("conductor"));
    println!(
        "\n== {n} workers, {interval_s} s interval, {} broker ==",
        broker.label()
    );
    let t = Target::start(broker, &bin);
    let cpid = t.conductor.pid();
    let bpid = t.broker.as_ref().map(|m| m.pid());
    let token = t.registration_token();

    // Enrolment, concurrently.
    let enrolled = enrol_all(&t, &token, n, args.enrol_threads);
    o.enrol_s = enrolled.elapsed.as_secs_f64();
    o.enrol_retries = enrolled.retries;
    o.enrol_failed = enrolled.failed;
    println!(
        "enrolled {} in {:.1} s ({:.0}/s, {} retries, {} failed)",
        enrolled.idents.len(),
        o.enrol_s,
        enrolled.idents.len() as f64 / o.enrol_s.max(1e-9),
        enrolled.retries,
        enrolled.failed
    );
    let idents = enrolled.idents;
    let n_ok = idents.len();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.sim_threads.max(1))
        .thread_name("fleet-sim")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stats = Arc::new(Stats::default());
    let sent_log: Arc<SentLog> = Arc::default();
    let vanished: Arc<Vanished> = Arc::default();
    let lat: Arc<Latencies> = Arc::default();
    let stop_observer = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Semaphore::new(CONNECT_GATE));
    let every = (n_ok / LATENCY_SAMPLE).max(1);
    let sampled: Vec<String> = idents
        .iter()
        .step_by(every)
        .take(LATENCY_SAMPLE)
        .map(|i| i.id.clone())
        .collect();
    let sampled_set: HashSet<&String> = sampled.iter().collect();
    rt.spawn(observe(
        t.mqtt,
        t.observer(),
        sampled.clone(),
        args.subscribe_mirrors,
        sent_log.clone(),
        lat.clone(),
        stop_observer.clone(),
    ));

    let mut rng = Rng::new(now_ms());
    let mut ctls: Vec<(String, mpsc::UnboundedSender<Ctl>)> = Vec::with_capacity(n_ok);
    for ident in &idents {
        let (tx, rx) = mpsc::unbounded_channel();
        ctls.push((ident.id.clone(), tx));
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let first_tick = Duration::from_millis(rng.below(interval_ms));
        rt.spawn(sim::run(sim::WorkerParams {
            ident: ident.clone(),
            interval,
            first_tick,
            sampled: sampled_set.contains(&ident.id).then(|| sent_log.clone()),
            stats: stats.clone(),
            vanished: vanished.clone(),
            gate: gate.clone(),
            ctl: rx,
            nodelay: args.nodelay,
        }));
    }
    o.connect_s = wait_until(Duration::from_secs(300), || {
        usize::try_from(Stats::get(&stats.connected)).unwrap_or(usize::MAX) >= n_ok
    });
    o.connected = Stats::get(&stats.connected);
    println!(
        "connected {}/{n_ok} in {}",
        o.connected,
        o.connect_s
            .map_or("(timed out)".into(), |s| format!("{s:.1} s"))
    );
    o.online_s = wait_until(Duration::from_secs(120), || {
        let online = t.health()["workers_online"].as_u64().unwrap_or(0);
        usize::try_from(online).unwrap_or(usize::MAX) >= n_ok
    })
    .map(|s| s + o.connect_s.unwrap_or(0.0));
    println!(
        "all online (conductor) {}",
        o.online_s.map_or_else(
            || format!(
                "NOT reached: {} online",
                t.health()["workers_online"].as_u64().unwrap_or(0)
            ),
            |s| format!("after {s:.1} s")
        )
    );

    // Warm-up: one interval plus a second, so every worker is past its first tick.
    std::thread::sleep(interval + Duration::from_secs(1));

    // Measurement window.
    let prom0 = t.prometheus();
    let acc0 = accepted_total(&prom0);
    let (c0, s0, b0) = (
        probe::cpu_ticks(cpid),
        probe::self_ticks(),
        bpid.map(probe::cpu_ticks),
    );
    let th0 = probe::thread_ticks(cpid);
    let bth0 = bpid.map(probe::thread_ticks);
    let t0 = Instant::now();
    let t0_ms = now_ms();
    let pingable: Vec<String> = ctls.iter().map(|(id, _)| id.clone()).collect();
    let deadline = t0 + args.duration;
    let (rtts, inner, cmd_sent) = ping_loop(&t, &pingable, deadline);
    if let Some(left) = deadline.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    let window = t0.elapsed().as_secs_f64();
    let t1_ms = now_ms();
    let (c1, s1, b1) = (
        probe::cpu_ticks(cpid),
        probe::self_ticks(),
        bpid.map(probe::cpu_ticks),
    );
    let th1 = probe::thread_ticks(cpid);
    let bth1 = bpid.map(probe::thread_ticks);
    let prom1 = t.prometheus();
    let acc1 = accepted_total(&prom1);
    let pct = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / probe::TICKS_PER_S / window * 100.0;
    o.window_s = window;
    o.conductor_cpu = pct(c0, c1);
    o.sim_cpu = pct(s0, s1);
    o.broker_cpu = b0.zip(b1).map(|(a, b)| pct(a, b));
    let (rss, hwm) = probe::rss(cpid);
    o.rss_mib = mib(rss);
    o.hwm_mib = mib(hwm);
    o.broker_rss_mib = bpid.map(|p| mib(probe::rss(p).0));
    o.frames_per_s = acc1.saturating_sub(acc0) as f64 / window;
    o.threads = probe::thread_profile(&th0, &th1, window);
    o.broker_threads = bth0
        .zip(bth1)
        .map(|(a, b)| probe::thread_profile(&a, &b, window))
        .unwrap_or_default();
    o.online_at_window_end = t.health()["workers_online"].as_u64().unwrap_or(0);
    {
        let l = lat.lock().map(|l| l.clone()).unwrap_or_default();
        let in_window: Vec<&(u64, f64, f64)> = l
            .iter()
            .filter(|(s, _, _)| *s >= t0_ms && *s <= t1_ms)
            .collect();
        o.ingest = probe::p50_p99(in_window.iter().map(|x| x.1).collect());
        o.visible = probe::p50_p99(in_window.iter().map(|x| x.2).collect());
    }
    o.cmd = probe::p50_p99(rtts);
    o.cmd_mqtt = probe::p50_p99(inner);
    o.cmd_sent = cmd_sent;
    println!(
        "window {window:.1} s: conductor CPU {:.1} %, {:.0} frames/s accepted (expected {:.0}), \
         ingest p50/p99 {}/{} ms, ping p50/p99 {}/{} ms ({}/{} answered)",
        o.conductor_cpu,
        o.frames_per_s,
        o.expected_per_s,
        ms(o.ingest.0),
        ms(o.ingest.1),
        ms(o.cmd.0),
        ms(o.cmd.1),
        o.cmd.2,
        o.cmd_sent
    );

    // Vanish: the last `v` workers drop their sockets, the `v` before them go silent.
    // Only workers the API shows online can be seen going offline.
    let online: HashSet<String> = t.get("/api/v1/workers").1["workers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|w| w["status"] == "online")
        .filter_map(|w| w["id"].as_str().map(str::to_string))
        .collect();
    let candidates: Vec<usize> = (0..n_ok)
        .rev()
        .filter(|i| online.contains(&ctls[*i].0))
        .take(2 * args.vanish.min(n_ok / 4))
        .collect();
    let v = candidates.len() / 2;
    o.vanish_n = v;
    if v < args.vanish.min(n_ok / 4) {
        println!("only {} workers online: vanishing {v} + {v}", online.len());
    }
    let (drop_idx, silent_idx) = candidates.split_at(v);
    let silent_idx = &silent_idx[..v];
    for i in drop_idx {
        let _ = ctls[*i].1.send(Ctl::Drop);
    }
    for i in silent_idx {
        let _ = ctls[*i].1.send(Ctl::Silent);
    }
    if v > 0 {
        let ids =
            |idx: &[usize]| -> Vec<String> { idx.iter().map(|i| ctls[*i].0.clone()).collect() };
        let (drop_ids, silent_ids) = (ids(drop_idx), ids(silent_idx));
        let timeout = (interval * 6).max(Duration::from_secs(60));
        // Both groups vanished together; poll them together.
        let mut d = offline_delays(&t, &[&drop_ids, &silent_ids], &vanished, timeout);
        o.silent_offline = p50_max(d.pop().unwrap_or_default());
        o.drop_offline = p50_max(d.pop().unwrap_or_default());
    }

    // Stop sending, drain, count.
    for (_, tx) in &ctls {
        let _ = tx.send(Ctl::StopMetrics);
    }
    // Drained: nothing accepted and no `Stored` acknowledgement for 3 s
    // (longer than the conductor's 2 s acknowledgement interval).
    let mut last = ((u64::MAX, u64::MAX), Instant::now());
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < drain_deadline {
        let acc = (
            t.health()["frames_accepted"].as_u64().unwrap_or(0),
            Stats::get(&stats.stored),
        );
        if acc != last.0 {
            last = (acc, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let prom = t.prometheus();
    o.accepted = accepted_total(&prom);
    o.rejected = rejected_total(&prom);
    o.rejected_reasons = rejected_reasons(&prom);
    o.mirror_dropped = count(e2e::metric(&prom, "aerekos_mirror_dropped_total"));
    o.sent = Stats::get(&stats.handed);
    o.acked = Stats::get(&stats.acked);
    o.stored = Stats::get(&stats.stored);
    o.queue_full = Stats::get(&stats.queue_full);
    o.disconnects = Stats::get(&stats.disconnects);
    // fits: frame counts of one run, far below 2^63.
    #[allow(clippy::cast_possible_wrap)]
    let lost = o.sent as i64 - o.accepted as i64;
    o.lost = lost;

    for (_, tx) in &ctls {
        let _ = tx.send(Ctl::Shutdown);
    }
    stop_observer.store(true, Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(3));
    drop(t);
    o
}

/// `(p50, max, n)` of offline delays (the slowest is the one a user waits for).
fn p50_max(v: Vec<f64>) -> (Option<f64>, Option<f64>, usize) {
    let (p50, _, n) = probe::p50_p99(v.clone());
    (p50, v.into_iter().reduce(f64::max), n)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

fn table(results: &[Outcome]) {
    let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
    let col = |f: &dyn Fn(&Outcome) -> String| results.iter().map(f).collect::<Vec<_>>();
    rows.push((
        "workers @ interval",
        col(&|o| format!("{} @ {} s", o.workers, o.interval_s)),
    ));
    rows.push(("broker", col(&|o| o.broker.clone())));
    rows.push((
        "enrol: s (per s)",
        col(&|o| {
            format!(
                "{:.1} ({:.0}/s)",
                o.enrol_s,
                o.workers as f64 / o.enrol_s.max(1e-9)
            )
        }),
    ));
    rows.push(("MQTT connect all: s", col(&|o| secs(o.connect_s))));
    rows.push(("all online (API): s", col(&|o| secs(o.online_s))));
    rows.push((
        "online at window end",
        col(&|o| format!("{}/{}", o.online_at_window_end, o.workers)),
    ));
    rows.push(("window: s", col(&|o| format!("{:.0}", o.window_s))));
    rows.push((
        "conductor CPU %",
        col(&|o| format!("{:.1}", o.conductor_cpu)),
    ));
    rows.push((
        "broker CPU % (external)",
        col(&|o| {
            o.broker_cpu
                .map_or("(in conductor)".into(), |c| format!("{c:.1}"))
        }),
    ));
    rows.push(("simulator CPU %", col(&|o| format!("{:.1}", o.sim_cpu))));
    rows.push((
        "conductor RSS / HWM MiB",
        col(&|o| format!("{:.0} / {:.0}", o.rss_mib, o.hwm_mib)),
    ));
    rows.push((
        "broker RSS MiB (external)",
        col(&|o| o.broker_rss_mib.map_or("-".into(), |r| format!("{r:.0}"))),
    ));
    rows.push((
        "frames/s accepted (exp.)",
        col(&|o| format!("{:.0} ({:.0})", o.frames_per_s, o.expected_per_s)),
    ));
    rows.push((
        "ingest p50 / p99 ms",
        col(&|o| format!("{} / {}", ms(o.ingest.0), ms(o.ingest.1))),
    ));
    rows.push(("  latency samples", col(&|o| o.ingest.2.to_string())));
    rows.push((
        "visible p50 / p99 ms",
        col(&|o| format!("{} / {}", ms(o.visible.0), ms(o.visible.1))),
    ));
    rows.push((
        "cmd RTT p50 / p99 ms",
        col(&|o| format!("{} / {}", ms(o.cmd.0), ms(o.cmd.1))),
    ));
    rows.push((
        "  of which MQTT p50 / p99",
        col(&|o| format!("{} / {}", ms(o.cmd_mqtt.0), ms(o.cmd_mqtt.1))),
    ));
    rows.push((
        "  pings answered",
        col(&|o| format!("{}/{}", o.cmd.2, o.cmd_sent)),
    ));
    rows.push(("frames sent", col(&|o| o.sent.to_string())));
    rows.push(("  broker-acked", col(&|o| o.acked.to_string())));
    rows.push(("  conductor-acked (Stored)", col(&|o| o.stored.to_string())));
    rows.push(("  accepted", col(&|o| o.accepted.to_string())));
    rows.push(("frames lost", col(&|o| o.lost.to_string())));
    rows.push((
        "  rejected",
        col(&|o| {
            if o.rejected_reasons.is_empty() {
                o.rejected.to_string()
            } else {
                format!("{} ({})", o.rejected, o.rejected_reasons)
            }
        }),
    ));
    rows.push(("  mirror dropped", col(&|o| o.mirror_dropped.to_string())));
    rows.push((
        "disconnects / q-full",
        col(&|o| format!("{} / {}", o.disconnects, o.queue_full)),
    ));
    rows.push((
        "offline, drop: p50 s",
        col(&|o| offline_cell(o.drop_offline, o.interval_s, o.vanish_n)),
    ));
    rows.push((
        "offline, silent: p50 s",
        col(&|o| offline_cell(o.silent_offline, o.interval_s, o.vanish_n)),
    ));
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..results.len())
        .map(|c| {
            rows.iter()
                .map(|r| r.1[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!();
    for (label, cells) in &rows {
        let mut line = format!("{label:<w0$}");
        for (c, cell) in cells.iter().enumerate() {
            line.push_str(&format!(" | {cell:>w$}", w = widths[c]));
        }
        println!("{line}");
    }
    println!("\nbusiest threads over the window (% of one core):");
    for o in results {
        let top: Vec<String> = o
            .threads
            .iter()
            .take(6)
            .map(|(n, p)| format!("{n} {p:.1}"))
            .collect();
        let mut line = format!(
            "  {} @ {} s {}: conductor: {}",
            o.workers,
            o.interval_s,
            o.broker,
            top.join(", ")
        );
        if !o.broker_threads.is_empty() {
            let b: Vec<String> = o
                .broker_threads
                .iter()
                .take(2)
                .map(|(n, p)| format!("{n} {p:.1}"))
                .collect();
            line.push_str(&format!("; {}: {}", o.broker, b.join(", ")));
        }
        println!("{line}");
    }
}

fn offline_cell(v: (Option<f64>, Option<f64>, usize), interval_s: u64, n: usize) -> String {
    match v.0 {
        None if n == 0 => "-".into(),
        None => format!("none of {n}"),
        Some(p50) => {
            let max = v.1.map_or(String::new(), |m| format!(", max {m:.1}"));
            format!(
                "{p50:.1} ({:.2}×iv{max}) {}/{n}",
                p50 / interval_s as f64,
                v.2
            )
        }
    }
}

fn to_json(o: &Outcome) -> Value {
    let q = |v: (Option<f64>, Option<f64>, usize)| json!({"p50": v.0, "p99": v.1, "n": v.2});
    json!({
        "workers": o.workers,
        "interval_s": o.interval_s,
        "broker": o.broker,
        "enrol_s": o.enrol_s,
        "enrol_retries": o.enrol_retries,
        "enrol_failed": o.enrol_failed,
        "connect_s": o.connect_s,
        "connected": o.connected,
        "online_s": o.online_s,
        "online_at_window_end": o.online_at_window_end,
        "window_s": o.window_s,
        "conductor_cpu_percent": o.conductor_cpu,
        "broker_cpu_percent": o.broker_cpu,
        "sim_cpu_percent": o.sim_cpu,
        "rss_mib": o.rss_mib,
        "hwm_mib": o.hwm_mib,
        "frames_per_s": o.frames_per_s,
        "expected_per_s": o.expected_per_s,
        "ingest_ms": q(o.ingest),
        "visible_ms": q(o.visible),
        "cmd_rtt_ms": q(o.cmd),
        "cmd_mqtt_ms": q(o.cmd_mqtt),
        "cmd_sent": o.cmd_sent,
        "sent": o.sent,
        "acked": o.acked,
        "stored": o.stored,
        "accepted": o.accepted,
        "lost": o.lost,
        "rejected": o.rejected,
        "rejected_reasons": o.rejected_reasons,
        "queue_full": o.queue_full,
        "disconnects": o.disconnects,
        "mirror_dropped": o.mirror_dropped,
        "vanish": o.vanish_n,
        "offline_drop_s": {"p50": o.drop_offline.0, "max": o.drop_offline.1, "n": o.drop_offline.2},
        "offline_silent_s": {"p50": o.silent_offline.0, "max": o.silent_offline.1, "n": o.silent_offline.2},
        "threads": o.threads.iter().take(10).map(|(n, p)| json!([n, p])).collect::<Vec<_>>(),
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (soft, hard) = probe::raise_nofile();
    let biggest = args.scenarios.iter().map(|s| s.0).max().unwrap_or(0) as u64;
    println!(
        "fleet_sim: open-file limit {} (hard {}); scenarios {:?} × {:?}; window {:?}",
        soft.map_or("unlimited".into(), |s| s.to_string()),
        hard.map_or("unlimited".into(), |s| s.to_string()),
        args.scenarios,
        args.brokers.iter().map(|b| b.label()).collect::<Vec<_>>(),
        args.duration
    );
    if soft.is_some_and(|s| s < biggest + 1000) {
        eprintln!(
            "warning: {biggest} connections need more than the open-file limit {soft:?} allows"
        );
    }
    let mut results = Vec::new();
    for &(n, iv) in &args.scenarios {
        for &b in &args.brokers {
            results.push(run_scenario(&args, n, iv, b));
            table(&results);
            if let Some(path) = &args.json {
                let v: Vec<Value> = results.iter().map(to_json).collect();
                let _ = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
    }
}
