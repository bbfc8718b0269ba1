//! Bytes on the wire per sample: what one enrolled edge-worker costs a
//! metered link (LTE), at the IP level, both directions, TCP/IP and MQTT
//! overhead included, next to Debian's prometheus-node-exporter scraped at
//! the same interval the way Prometheus scrapes it, in the same run.
//!
//! ```sh
//! cargo run --release -p aerekos-e2e --bin wire_bytes -- [--interval-s 10] [--batch-s 300] [--samples 60]
//! cargo run --release -p aerekos-e2e --bin wire_bytes -- --interval-s 1 --batch-s 30 --samples 90
//! ```
//!
//! `--batch-s` is the agents' `--batch` (0: every sample at once, as
//! before batches; default 30 intervals, the agent's default shape). The
//! second line is the first scaled down ten times: the same 30 samples per
//! batch, one ping per batch (the keep-alive is the batch period) and one
//! `Stored` per batch, so the bytes per sample are the defaults' in 2 min
//! instead of 15. The monthly figure is always for the default 10 s
//! interval (`--month-interval-s` changes it): bytes per sample × samples
//! a month.
//!
//! One conductor (embedded broker, TLS on as by default) and two real
//! workers at `--interval-s`: one enrolled over plain HTTP with the token's
//! secret only, so it is handed `mqtt://` (its bytes are broken down by
//! what they carry), and one with the full token (CA pinned), so it talks
//! MQTT over TLS like a remote worker. Once both are online with stored
//! metrics (enrolment, birth and the switch to frame format 2 are behind
//! them), `tcpdump -i lo` captures the broker's two ports and the
//! exporter's for `(samples + 1) × interval`.
//!
//! Only the workers' own connections are counted: each is found by the
//! worker process's socket (`/proc/<pid>/fd` and `/proc/net/tcp`), not by
//! port, because the conductor's own MQTT client is connected to the same
//! broker port on the same loopback; the plain one is checked by the
//! topics it carries (all `aerekos/v1/<its id>/…`). Each flow's window is
//! `samples × interval` long and starts half an interval before its first
//! sample in the capture (the worker's first metrics PUBLISH or TLS record,
//! the scraper's first request), so it holds `samples` whole samples.
//! Bytes are IP total lengths (IPv4 total length, IPv6 payload + 40): what
//! a link carries less its own framing.
//!
//! The breakdown of the plain link classifies each TCP segment by the
//! first MQTT packet in it (a segment holding several is counted once,
//! under its first; the number of such segments is printed).

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::pcap::{tcp_segments, Segment};
use e2e::*;

/// Seconds in the month the monthly figures are for (30 days).
const MONTH_S: f64 = 30.0 * 86_400.0;

struct Args {
    interval_s: u64,
    /// The agents' `--batch`, seconds (0: off).
    batch_s: u64,
    samples: u64,
    /// The interval the monthly figure is for.
    month_interval_s: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        interval_s: 10,
        batch_s: u64::MAX,
        samples: 60,
        month_interval_s: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{what} needs a value"))
                .and_then(|v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0 || what == "--batch-s")
                        .ok_or_else(|| format!("{what}: {v:?} is not a positive whole number"))
                })
        };
        match name.as_str() {
            "--interval-s" => args.interval_s = value("--interval-s")?,
            "--samples" => args.samples = value("--samples")?,
            "--batch-s" => args.batch_s = value("--batch-s")?,
            "--month-interval-s" => args.month_interval_s = value("--month-interval-s")?,
            "-h" | "--help" => {
                println!(
                    "usage: wire_bytes [--interval-s 10] [--batch-s 30 × interval] [--samples 60] \
                     [--month-interval-s 10]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.interval_s > 3_600 || args.samples > 10_000 {
        return Err("--interval-s at most 3600, --samples at most 10000".into());
    }
    if args.batch_s == u64::MAX {
        args.batch_s = 30 * args.interval_s;
    }
    if args.batch_s > 86_400 {
        return Err("--batch-s at most 86400".into());
    }
    Ok(args)
}

fn first_file(paths: &[&'static str]) -> Option<&'static str> {
    paths.iter().copied().find(|p| Path::new(p).is_file())
}

/// The established TCP connections of process `pid`: (local, remote), from
/// its descriptors and `/proc/net/tcp{,6}`.
fn connections_of(pid: u32) -> Vec<(SocketAddr, SocketAddr)> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    // /proc prints the in-memory (network order) address as host-order
    // 32-bit words, in hex.
    let addr = |text: &str| -> Option<SocketAddr> {
        let (ip, port) = text.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let words: Vec<u32> = (0..ip.len() / 8)
            .map(|i| {
                ip.get(i * 8..i * 8 + 8)
                    .and_then(|w| u32::from_str_radix(w, 16).ok())
            })
            .collect::<Option<_>>()?;
        let ip = match words.as_slice() {
            [w] => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
            [a, b, c, d] => {
                let mut bytes = [0u8; 16];
                for (chunk, w) in bytes.chunks_mut(4).zip([a, b, c, d]) {
                    chunk.copy_from_slice(&w.to_ne_bytes());
                }
                let v6 = Ipv6Addr::from(bytes);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    };
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(remote), Some(&"01"), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(9))
            else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            if let (Some(l), Some(r)) = (addr(local), addr(remote)) {
                out.push((l, r));
            }
        }
    }
    out
}

/// The one connection `pid` holds to `port`: its local address.
fn the_connection_to(pid: u32, port: u16) -> Result<SocketAddr, String> {
    let found: Vec<SocketAddr> = connections_of(pid)
        .into_iter()
        .filter(|(_, r)| r.port() == port)
        .map(|(l, _)| l)
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        other => Err(format!(
            "process {pid} holds {} connections to port {port}: {other:?}",
            other.len()
        )),
    }
}

// ---- a Prometheus-like scraper: one kept-alive HTTP/1.1 connection ----

const SCRAPE_REQUEST_HEADERS: &str = "User-Agent: Prometheus/2.45\r\n\
     Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1\r\n\
     Accept-Encoding: gzip\r\n\
     X-Prometheus-Scrape-Timeout-Seconds: 10\r\n";

/// The largest response body the scraper reads.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, Clone)]
struct Scrape {
    status: u16,
    body: usize,
    encoding: String,
}

struct Scraper {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    connections: u32,
}

impl Scraper {
    fn new(addr: SocketAddr) -> Scraper {
        Scraper {
            addr,
            conn: None,
            connections: 0,
        }
    }

    /// One scrape on the kept-alive connection (opened if there is none,
    /// and once more if the kept one turned out closed).
    fn scrape(&mut self) -> Result<Scrape, String> {
        let reused = self.conn.is_some();
        match self.try_scrape() {
            Ok(s) => Ok(s),
            Err(_) if reused => {
                self.conn = None;
                self.try_scrape()
            }
            Err(e) => Err(e),
        }
    }

    fn try_scrape(&mut self) -> Result<Scrape, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_read_timeout(Some(Duration::from_secs(15)))
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.connections += 1;
            self.conn = Some(BufReader::new(s));
        }
        let addr = self.addr;
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{SCRAPE_REQUEST_HEADERS}\r\n");
        let result = read_exchange(conn, request.as_bytes());
        match &result {
            Ok((_, close)) if !close => {}
            _ => self.conn = None,
        }
        result.map(|(s, _)| s)
    }
}

/// Sends `request` and reads one response; the response and whether the
/// server closes the connection after it.
fn read_exchange(
    conn: &mut BufReader<TcpStream>,
    request: &[u8],
) -> Result<(Scrape, bool), String> {
    conn.get_mut()
        .write_all(request)
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    let mut read_line = |conn: &mut BufReader<TcpStream>| -> Result<String, String> {
        line.clear();
        let n = conn
            .by_ref()
            .take(16 << 10)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let status_line = read_line(conn)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let (mut length, mut chunked, mut close, mut encoding) = (None, false, false, String::new());
    for _ in 0..200 {
        let h = read_line(conn)?;
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("Content-Length {value:?}"))?,
                );
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "content-encoding" => encoding = value.to_string(),
            _ => {}
        }
    }
    let mut body = 0usize;
    let mut skip = |conn: &mut BufReader<TcpStream>, n: usize| -> Result<(), String> {
        body = body.saturating_add(n);
        if body > MAX_BODY {
            return Err(format!("a body over {MAX_BODY} B"));
        }
        let n64 = u64::try_from(n).map_err(|e| e.to_string())?;
        let got = std::io::copy(&mut conn.by_ref().take(n64), &mut std::io::sink())
            .map_err(|e| format!("read body: {e}"))?;
        if got == n64 {
            Ok(())
        } else {
            Err("connection closed in the body".into())
        }
    };
    if chunked {
        loop {
            let size_line = read_line(conn)?;
            let hex = size_line.split(';').next().unwrap_or_default().trim();
            let size =
                usize::from_str_radix(hex, 16).map_err(|_| format!("chunk size {size_line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(conn)?.is_empty() {}
                break;
            }
            skip(conn, size)?;
            if !read_line(conn)?.is_empty() {
                return Err("no CRLF after a chunk".into());
            }
        }
    } else if let Some(n) = length {
        skip(conn, n)?;
    } else {
        return Err("a response with neither Content-Length nor chunked encoding".into());
    }
    Ok((
        Scrape {
            status,
            body,
            encoding,
        },
        close,
    ))
}

/// A scrape's time and outcome.
type Scraped = (SystemTime, Result<Scrape, String>);

/// Scrapes `addr` every `interval` (from now) until `stop`; each scrape's
/// time and outcome, and the connections opened.
fn scrape_loop(mut scraper: Scraper, interval: Duration, stop: &AtomicBool) -> (Vec<Scraped>, u32) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut k = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let due = start + interval * k;
        while Instant::now() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        out.push((SystemTime::now(), scraper.scrape()));
        k += 1;
    }
    (out, scraper.connections)
}

// ---- counting ----

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// Whether `s` is on the connection between `a` and `b` (either direction).
fn on(s: &Segment<'_>, a: SocketAddr, b: SocketAddr) -> bool {
    (s.src == a && s.dst == b) || (s.src == b && s.dst == a)
}

/// Bytes and packets of a set of segments.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    packets: u64,
    bytes: u64,
}

impl Count {
    fn add(&mut self, s: &Segment<'_>) {
        self.packets += 1;
        self.bytes += u64::try_from(s.ip_len).unwrap_or(u64::MAX);
    }
}

/// One flow's figures over its window.
struct Flow {
    name: String,
    total: Count,
    window_s: f64,
    /// Samples (scrapes) the window holds by length.
    samples: f64,
}

impl Flow {
    fn per_sample(&self) -> f64 {
        self.total.bytes as f64 / self.samples
    }
}

/// The window `[start, start + len)` for a flow whose first sample in the
/// capture is the first of `segs` matching `first` at or after `after`:
/// it starts half an interval before that sample.
fn window_of<'a>(
    segs: &[&Segment<'a>],
    after: u64,
    interval_ns: u64,
    len_ns: u64,
    mut first: impl FnMut(&Segment<'a>) -> bool,
) -> Option<(u64, u64)> {
    let anchor = segs
        .iter()
        .find(|s| s.ts_ns >= after && first(s))
        .map(|s| s.ts_ns)?;
    let start = anchor.saturating_sub(interval_ns / 2);
    Some((start, start + len_ns))
}

/// An MQTT fixed header at the start of `b`: (packet type, whole packet
/// length), when `b` holds the whole header.
fn mqtt_header(b: &[u8]) -> Option<(u8, usize)> {
    let kind = b.first()? >> 4;
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((kind, 2 + i + len));
        }
    }
    None
}

/// The topic of an MQTT PUBLISH at the start of `b`.
fn publish_topic(b: &[u8]) -> Option<String> {
    let (_, total) = mqtt_header(b)?;
    let mut at = 1;
    while b.get(at)? & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let n = usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    if at + 2 + n > total {
        return None;
    }
    String::from_utf8(b.get(at + 2..at + 2 + n)?.to_vec()).ok()
}

/// How many whole MQTT packets `b` holds back to back (0 when it does not
/// start at, or end on, a packet boundary).
fn mqtt_packets_in(b: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while at < b.len() {
        match b.get(at..).and_then(mqtt_header) {
            Some((_, len)) if len > 0 => {
                at += len;
                n += 1;
            }
            _ => return 0,
        }
    }
    if at == b.len() {
        n
    } else {
        0
    }
}

/// Categories of the plain link's breakdown, in print order.
#[derive(Default)]
struct Breakdown {
    rows: Vec<(String, Count)>,
    multi: u64,
    multi_kinds: BTreeSet<String>,
    foreign_topics: BTreeSet<String>,
    metrics_publishes: u64,
    topics_up: BTreeSet<String>,
}

impl Breakdown {
    fn add(&mut self, label: &str, s: &Segment<'_>) {
        match self.rows.iter_mut().find(|(l, _)| l == label) {
            Some((_, c)) => c.add(s),
            None => {
                let mut c = Count::default();
                c.add(s);
                self.rows.push((label.to_string(), c));
            }
        }
    }
}

fn mqtt_name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "AUTH/reserved",
    }
}

/// Classifies the plain worker link's segments; `worker` is its end.
fn classify(segs: &[&Segment<'_>], worker: SocketAddr, id: &str) -> Breakdown {
    let mut b = Breakdown::default();
    let own = format!("aerekos/v1/{id}/");
    for s in segs {
        let up = s.src == worker;
        let from = if up {
            "worker → broker"
        } else {
            "broker → worker"
        };
        if s.payload_len == 0 {
            if s.syn() || s.fin_or_rst() {
                b.add(&format!("TCP SYN/FIN/RST {from}"), s);
            } else {
                b.add(&format!("pure TCP ACK (no payload) {from}"), s);
            }
            continue;
        }
        let Some((kind, _)) = mqtt_header(s.payload) else {
            b.add(&format!("other {from} (not an MQTT packet start)"), s);
            continue;
        };
        let n = mqtt_packets_in(s.payload);
        if n > 1 {
            b.multi += 1;
            let mut at = 0;
            let mut kinds = Vec::new();
            while let Some((k, len)) = s.payload.get(at..).and_then(mqtt_header) {
                kinds.push(mqtt_name(k));
                at += len.max(1);
            }
            b.multi_kinds.insert(kinds.join("+"));
        }
        let label = match kind {
            3 => {
                let topic = publish_topic(s.payload).unwrap_or_default();
                if !topic.starts_with(&own) {
                    b.foreign_topics.insert(topic.clone());
                }
                let leaf = topic.strip_prefix(&own).unwrap_or(&topic).to_string();
                if up {
                    b.topics_up.insert(leaf.clone());
                    if leaf == "metrics" {
                        b.metrics_publishes += 1;
                    }
                }
                let what = if leaf == "cmd/stored" {
                    " (the conductor's Stored acknowledgement)".to_string()
                } else {
                    String::new()
                };
                format!("MQTT PUBLISH {from} on …/{leaf}{what}")
            }
            4 => format!("MQTT PUBACK {from}"),
            12 | 13 => format!("MQTT {} {from}", mqtt_name(kind)),
            k => format!("other: MQTT {} {from}", mqtt_name(k)),
        };
        b.add(&label, s);
    }
    b
}

/// Polls `check` every 100 ms until it returns `Some`; an error after `timeout`.
fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_tcpdump(
    tcpdump: &str,
    dir: &Path,
    name: &str,
    filter: &str,
) -> Result<(Proc, std::path::PathBuf), String> {
    let cap = dir.join(format!("{name}.pcap"));
    let mut cmd = Command::new(tcpdump);
    cmd.args(["-i", "lo", "-U", "-n", "-Z", "root", "-w"])
        .arg(&cap)
        .arg(filter);
    let mut dump = Proc::spawn(cmd, dir.join(format!("{name}.log")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dump.output().contains("listening on") {
        if !dump.alive() || Instant::now() > deadline {
            return Err(format!(
                "tcpdump did not start capturing on lo (root or CAP_NET_RAW needed):\n{}",
                dump.tail(5)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((dump, cap))
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("wire_bytes: {e}");
        std::process::exit(2);
    });
    // Errors come back here, after the processes they started are gone
    // (their handles dropped): the release profile aborts on a panic.
    if let Err(e) = run(&args) {
        eprintln!("wire_bytes: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let interval = Duration::from_secs(args.interval_s);
    let tcpdump = first_file(&["/usr/bin/tcpdump", "/usr/sbin/tcpdump", "/sbin/tcpdump"])
        .ok_or("tcpdump is not installed (apt-get install tcpdump)")?;
    let ne_bin = first_file(&[
        "/usr/bin/prometheus-node-exporter",
        "/usr/sbin/prometheus-node-exporter",
    ])
    .ok_or(
        "prometheus-node-exporter is not installed (apt-get install prometheus-node-exporter)",
    )?;
    let dir = tempfile::tempdir().map_err(|e| format!("a temp dir: {e}"))?;

    // The conductor (TLS on, as by default) and the two workers.
    let c = Conductor::start(&dir.path().join("conductor"));
    let mqtts = c
        .mqtts
        .ok_or("the conductor has no MQTT-over-TLS listener")?;
    let token = c.registration_token();
    let secret_only = token.split('.').next().unwrap_or_default().to_string();
    let start_worker = |name: &str, token: &str| {
        let mut opts = WorkerOpts::named(name);
        opts.interval_ms = args.interval_s * 1_000;
        opts.batch_ms = Some(args.batch_s * 1_000);
        let mut w = Worker::start(&dir.path().join(name), &c.url(), Some(token), opts);
        let id = w.wait_id();
        (w, id)
    };
    let (plain, plain_id) = start_worker("wire-plain", &secret_only);
    let (tls, tls_id) = start_worker("wire-tls", &token);
    for (w, id, scheme, port) in [
        (&plain, &plain_id, "mqtt", c.mqtt.port()),
        (&tls, &tls_id, "mqtts", mqtts.port()),
    ] {
        let st: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(w.state_dir.join("state.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        let url = st["mqtt_url"].as_str().unwrap_or_default();
        if url != format!("{scheme}://127.0.0.1:{port}") {
            return Err(format!(
                "worker {id} was handed {url:?}, not {scheme}:// on port {port}"
            ));
        }
    }
    println!(
        "conductor: embedded broker, plain MQTT on port {}, MQTT over TLS on port {}; \
         workers at a {} s interval, batches of {} s: {plain_id} (plain), {tls_id} (TLS)",
        c.mqtt.port(),
        mqtts.port(),
        args.interval_s,
        args.batch_s
    );
    // Online with metrics stored, twice: enrolment, birth and the switch
    // to frame format 2 (after the first `Stored`) are behind them.
    let batch = Duration::from_secs(args.batch_s);
    let timeout = interval * 4 + batch + Duration::from_secs(30);
    for id in [&plain_id, &tls_id] {
        wait_until(
            &format!("worker {id} online with stored metrics"),
            timeout,
            || (c.status_of(id) == "online" && c.raw_history(id).len() >= 2).then_some(()),
        )?;
    }

    // node_exporter, scraped from now on at the same interval on one
    // kept-alive connection.
    let ne_port = free_port();
    let ne_addr = SocketAddr::from(([127, 0, 0, 1], ne_port));
    let mut ne_cmd = Command::new(ne_bin);
    ne_cmd.arg(format!("--web.listen-address=127.0.0.1:{ne_port}"));
    let ne = Proc::spawn(ne_cmd, dir.path().join("node_exporter.log"));
    wait_until("node_exporter to serve", Duration::from_secs(20), || {
        Scraper::new(ne_addr)
            .scrape()
            .ok()
            .filter(|s| s.status == 200)
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || scrape_loop(Scraper::new(ne_addr), interval, &stop))
    };
    std::thread::sleep(Duration::from_secs(1));

    // The workers' own connections to the broker (not the conductor's).
    let plain_end = the_connection_to(plain.proc.pid(), c.mqtt.port())?;
    let tls_end = the_connection_to(tls.proc.pid(), mqtts.port())?;

    let filter = format!(
        "tcp port {} or tcp port {} or tcp port {ne_port}",
        c.mqtt.port(),
        mqtts.port()
    );
    let (mut dump, cap) = start_tcpdump(tcpdump, dir.path(), "wire", &filter)?;
    let capture_start = ns(SystemTime::now());
    // A flow's window starts at its first metrics frame, up to one batch
    // period after the capture does.
    let capture_for =
        interval * u32::try_from(args.samples + 1).unwrap_or(u32::MAX) + batch.max(interval);
    println!(
        "capturing {filter} on lo for {:.0} s ({} samples of {} s, plus a batch period and an interval to align each flow's window)…",
        capture_for.as_secs_f64() + 1.0,
        args.samples,
        args.interval_s
    );
    std::thread::sleep(capture_for + Duration::from_secs(1));
    dump.terminate();
    stop.store(true, Ordering::Relaxed);
    let (scrapes, ne_connections) = scraper.join().map_err(|_| "the scraper thread panicked")?;
    let dump_log = dump.output();
    let plain_after = the_connection_to(plain.proc.pid(), c.mqtt.port());
    let tls_after = the_connection_to(tls.proc.pid(), mqtts.port());
    if plain_after.as_ref().ok() != Some(&plain_end) || tls_after.as_ref().ok() != Some(&tls_end) {
        return Err(format!(
            "a worker reconnected during the capture: plain {plain_end} -> {plain_after:?}, TLS {tls_end} -> {tls_after:?}"
        ));
    }
    drop(ne);

    let raw = fs::read(&cap).map_err(|e| format!("the capture {}: {e}", cap.display()))?;
    let segs = tcp_segments(&raw).map_err(|e| format!("the capture: {e}"))?;
    if segs.is_empty() {
        return Err(format!(
            "the capture is empty ({} bytes); tcpdump said:\n{dump_log}",
            raw.len()
        ));
    }
    let dropped = dump_log
        .lines()
        .find(|l| l.contains("dropped by kernel"))
        .unwrap_or("")
        .trim()
        .to_string();

    let interval_ns = args.interval_s * 1_000_000_000;
    let len_ns = interval_ns * args.samples;
    let after = capture_start + interval_ns / 2;
    let in_window = |w: (u64, u64), pick: &dyn Fn(&Segment<'_>) -> bool| -> Vec<&Segment<'_>> {
        segs.iter()
            .filter(|s| s.ts_ns >= w.0 && s.ts_ns < w.1 && pick(s))
            .collect()
    };
    let count = |v: &[&Segment<'_>]| {
        let mut c = Count::default();
        for s in v {
            c.add(s);
        }
        c
    };
    let window_s = len_ns as f64 / 1e9;
    let samples = args.samples as f64;
    let mut flows = Vec::new();

    // Plain worker.
    let broker = SocketAddr::from(([127, 0, 0, 1], c.mqtt.port()));
    let plain_all: Vec<&Segment<'_>> = segs.iter().filter(|s| on(s, plain_end, broker)).collect();
    let own_metrics = format!("aerekos/v1/{plain_id}/metrics");
    let plain_w = window_of(&plain_all, after, interval_ns, len_ns, |s| {
        s.src == plain_end
            && mqtt_header(s.payload).is_some_and(|(k, _)| k == 3)
            && publish_topic(s.payload).as_deref() == Some(own_metrics.as_str())
    })
    .ok_or("no metrics PUBLISH of the plain worker in the capture")?;
    let plain_segs = in_window(plain_w, &|s| on(s, plain_end, broker));
    let breakdown = classify(&plain_segs, plain_end, &plain_id);
    if !breakdown.foreign_topics.is_empty() {
        return Err(format!(
            "the connection taken for the worker's carries other topics: {:?}",
            breakdown.foreign_topics
        ));
    }
    let others_plain = in_window(plain_w, &|s| {
        (s.src.port() == c.mqtt.port() || s.dst.port() == c.mqtt.port())
            && !on(s, plain_end, broker)
    });
    let other_conns: BTreeSet<u16> = others_plain
        .iter()
        .map(|s| {
            if s.src.port() == c.mqtt.port() {
                s.dst.port()
            } else {
                s.src.port()
            }
        })
        .collect();
    flows.push(Flow {
        name: "edge-worker, plain MQTT".into(),
        total: count(&plain_segs),
        window_s,
        samples,
    });

    // TLS worker.
    let broker_tls = SocketAddr::from(([127, 0, 0, 1], mqtts.port()));
    let tls_all: Vec<&Segment<'_>> = segs.iter().filter(|s| on(s, tls_end, broker_tls)).collect();
    let tls_w = window_of(&tls_all, after, interval_ns, len_ns, |s| {
        s.src == tls_end && s.payload_len > 0
    });
    let (tls_segs, others_tls) = match tls_w {
        Some(w) => (
            in_window(w, &|s| on(s, tls_end, broker_tls)),
            in_window(w, &|s| {
                (s.src.port() == mqtts.port() || s.dst.port() == mqtts.port())
                    && !on(s, tls_end, broker_tls)
            }),
        ),
        None => return Err("no TLS record from the TLS worker in the capture".into()),
    };
    flows.push(Flow {
        name: "edge-worker, MQTT over TLS (default)".into(),
        total: count(&tls_segs),
        window_s,
        samples,
    });

    // node_exporter.
    let ne_all: Vec<&Segment<'_>> = segs
        .iter()
        .filter(|s| s.src.port() == ne_port || s.dst.port() == ne_port)
        .collect();
    let ne_w = window_of(&ne_all, after, interval_ns, len_ns, |s| {
        s.dst.port() == ne_port && s.payload_len > 0
    })
    .ok_or("no scrape of node_exporter in the capture")?;
    let ne_segs = in_window(ne_w, &|s| {
        s.src.port() == ne_port || s.dst.port() == ne_port
    });
    let ne_requests = ne_segs
        .iter()
        .filter(|s| s.dst.port() == ne_port && s.payload.starts_with(b"GET "))
        .count();
    let ne_conns: BTreeSet<u16> = ne_segs
        .iter()
        .map(|s| {
            if s.src.port() == ne_port {
                s.dst.port()
            } else {
                s.src.port()
            }
        })
        .collect();
    flows.push(Flow {
        name: "node_exporter, scraped (gzip, keep-alive)".into(),
        total: count(&ne_segs),
        window_s,
        samples,
    });
    if flows.iter().any(|f| f.total.packets == 0) {
        return Err("a flow has no packets in its window".into());
    }

    // ---- report ----
    let per_month = MONTH_S / args.month_interval_s as f64;
    let ne_per_sample = flows.last().map_or(1.0, Flow::per_sample);
    println!(
        "\n== bytes on the wire per sample at a {} s interval (IP level: IP+TCP headers and payload, both directions; \
         {} samples = {:.0} s per flow) ==",
        args.interval_s, args.samples, window_s
    );
    println!(
        "| link | bytes/sample | packets/sample | B/s | MB/month at {} s (30 d, 10^6 B) | ratio to node_exporter |",
        args.month_interval_s
    );
    println!("|---|---|---|---|---|---|");
    for f in &flows {
        let b = f.per_sample();
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.3} | {:.3} |",
            f.name,
            b,
            f.total.packets as f64 / f.samples,
            f.total.bytes as f64 / f.window_s,
            b * per_month / 1e6,
            b / ne_per_sample
        );
    }

    println!(
        "\n== the plain link by what it carries (each TCP segment under the first MQTT packet in it) =="
    );
    let plain_total = flows.first().map_or(Count::default(), |f| f.total);
    println!("| what | packets | bytes | bytes/sample | packets/sample | share of bytes |");
    println!("|---|---|---|---|---|---|");
    for (label, n) in &breakdown.rows {
        println!(
            "| {label} | {} | {} | {:.1} | {:.2} | {:.1} % |",
            n.packets,
            n.bytes,
            n.bytes as f64 / samples,
            n.packets as f64 / samples,
            100.0 * n.bytes as f64 / plain_total.bytes.max(1) as f64
        );
    }
    println!(
        "| total | {} | {} | {:.1} | {:.2} | 100 % |",
        plain_total.packets,
        plain_total.bytes,
        plain_total.bytes as f64 / samples,
        plain_total.packets as f64 / samples
    );
    println!(
        "segments holding more than one MQTT packet: {}{}",
        breakdown.multi,
        if breakdown.multi_kinds.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                breakdown
                    .multi_kinds
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );

    println!("\n== checks ==");
    println!(
        "plain worker: its connection {plain_end} -> {broker} (found by its process' socket, the same after the capture); \
         topics it published: {:?}, all under aerekos/v1/{plain_id}/; metrics PUBLISHes in the window: {} (expected {})",
        breakdown.topics_up,
        breakdown.metrics_publishes,
        if args.batch_s == 0 {
            args.samples
        } else {
            args.samples / (args.batch_s / args.interval_s).clamp(1, 64)
        }
    );
    println!(
        "excluded on the plain broker port in that window: {} packets, {} B on {} other connection(s) (the conductor's own MQTT client)",
        others_plain.len(),
        count(&others_plain).bytes,
        other_conns.len()
    );
    println!(
        "TLS worker: its connection {tls_end} -> {broker_tls}; other connections on the TLS port in its window: {} packets",
        others_tls.len()
    );
    let ok_scrapes = scrapes
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|s| s.status == 200))
        .count();
    let failed: Vec<&String> = scrapes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let last_ok = scrapes.iter().rev().find_map(|(_, r)| r.as_ref().ok());
    println!(
        "node_exporter: requests in the window: {ne_requests} (expected {}); {} scrape(s) in all, {ok_scrapes} answered 200, \
         {} failed{}; {} connection(s) opened in all, {} seen in the window; last response body {} B{}",
        args.samples,
        scrapes.len(),
        failed.len(),
        failed.first().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        ne_connections,
        ne_conns.len(),
        last_ok.map_or(0, |s| s.body),
        last_ok
            .map(|s| if s.encoding.is_empty() { String::new() } else { format!(" ({})", s.encoding) })
            .unwrap_or_default()
    );
    if !dropped.is_empty() {
        println!("tcpdump: {dropped}");
    }
    Ok(())
}
