//! `test-service`: the service the end-to-end tests deploy (as a command, as
//! an uploaded artifact for x86_64 and aarch64, and in a container image).
//! std only, no dependencies, so it links for every target.
//!
//! ```text
//! test-service [--port N] [--listen ADDR] [--unhealthy-if-exists PATH] [--always-unhealthy]
//!              [--exit-after-ms N] [--tick-ms N] [--tag TEXT]
//! ```
//! * Serves HTTP on ADDR:N (default 127.0.0.1; 0 = any port; the port is printed):
//!   `GET /healthz` → 200 `ok` (503 while PATH exists or with
//!   `--always-unhealthy`), `GET /info` → `tag=<TEXT> pid=<pid>
//!   config=<keys> secret_sha=<hex of the first secret's length+bytes sum>`.
//! * Prints `tick <n> <tag>` every tick (default 500 ms) to stdout.
//! * With `AEREKOS_API` and `AEREKOS_TOKEN` set (the worker's local API),
//!   reads its config and secrets once, posts an event `started <tag>`, and
//!   posts a metric `ticks=<n>` every 10 ticks.
//! * `--exit-after-ms N` exits with status 3 after N ms (a crash).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Opts {
    port: u16,
    listen: String,
    unhealthy_if_exists: Option<PathBuf>,
    always_unhealthy: bool,
    exit_after_ms: Option<u64>,
    tick_ms: u64,
    tag: String,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        tick_ms: 500,
        listen: "127.0.0.1".into(),
        ..Opts::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--port" => o.port = val()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--unhealthy-if-exists" => o.unhealthy_if_exists = Some(PathBuf::from(val()?)),
            "--always-unhealthy" => o.always_unhealthy = true,
            "--exit-after-ms" => {
                o.exit_after_ms = Some(
                    val()?
                        .parse()
                        .map_err(|e| format!("--exit-after-ms: {e}"))?,
                )
            }
            "--tick-ms" => o.tick_ms = val()?.parse().map_err(|e| format!("--tick-ms: {e}"))?,
            "--tag" => o.tag = val()?,
            "--listen" => o.listen = val()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// One HTTP/1.1 request to the local API; returns (status, body).
fn local_api(method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let base = std::env::var("AEREKOS_API").ok()?;
    let token = std::env::var("AEREKOS_TOKEN").ok()?;
    let host = base.strip_prefix("http://")?.trim_end_matches('/');
    let mut s = TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn serve(listener: TcpListener, opts: Arc<Opts>, info: Arc<Mutex<String>>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        });
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        // Drain headers.
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => break,
                Ok(_) if h == "\r\n" || h == "\n" => break,
                Ok(_) => {}
            }
        }
        let path = line.split(' ').nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/healthz" => {
                let sick = opts.always_unhealthy
                    || opts
                        .unhealthy_if_exists
                        .as_ref()
                        .is_some_and(|p| p.exists());
                if sick {
                    (503, "unhealthy".to_string())
                } else {
                    (200, "ok".to_string())
                }
            }
            "/info" => (200, info.lock().map(|s| s.clone()).unwrap_or_default()),
            _ => (404, "not found".to_string()),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn main() -> std::process::ExitCode {
    let opts = match parse() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("test-service: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind((opts.listen.as_str(), opts.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test-service: cannot bind port {}: {e}", opts.port);
            return std::process::ExitCode::from(2);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("test-service {} listening on {port}", opts.tag);
    let mut config_keys = String::from("-");
    let mut secret_sum = String::from("-");
    if let Some((200, body)) = local_api("GET", "/v1/config", None) {
        config_keys = body.replace(['\n', ' '], "");
    }
    if let Some((200, body)) = local_api("GET", "/v1/secrets", None) {
        // Prove the secret arrived without printing it.
        let sum: u64 = body.bytes().map(u64::from).sum();
        secret_sum = format!("{}:{sum}", body.len());
    }
    let _ = local_api(
        "POST",
        "/v1/events",
        Some(&format!("{{\"text\":\"started {}\"}}", opts.tag)),
    );
    let info = Arc::new(Mutex::new(format!(
        "tag={} pid={} config={config_keys} secret_sum={secret_sum}",
        opts.tag,
        std::process::id()
    )));
    {
        let (opts, info) = (opts.clone(), info.clone());
        std::thread::spawn(move || serve(listener, opts, info));
    }
    let started = std::time::Instant::now();
    let mut n: u64 = 0;
    loop {
        std::thread::sleep(Duration::from_millis(opts.tick_ms.max(10)));
        n += 1;
        println!("tick {n} {}", opts.tag);
        if n % 10 == 0 {
            let _ = local_api(
                "POST",
                "/v1/metrics",
                Some(&format!("{{\"samples\":{{\"ticks\":{n}}}}}")),
            );
        }
        if let Some(ms) = opts.exit_after_ms {
            if started.elapsed() >= Duration::from_millis(ms) {
                eprintln!("test-service {}: exiting with 3 as asked", opts.tag);
                return std::process::ExitCode::from(3);
            }
        }
    }
}
