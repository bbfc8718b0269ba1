//! Encrypt/decrypt throughput of key-manager, in process (the crypto plus
//! the key lookup) and over HTTP on loopback (one keep-alive client, and
//! four concurrent ones), for 64 B and 4 KiB payloads.
//!
//! `cargo run --release -p aerekos-key-manager --bin km_bench [-- --secs 2]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use key_manager::crypto::{MasterKey, MasterSource, SecretKey};
use key_manager::{Audit, Clients, Kms, Store};
use serde_json::{json, Value};

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Runs `f` repeatedly for `secs`; ops per second.
fn rate(secs: f64, mut f: impl FnMut() -> bool) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..16 {
            if !f() {
                return 0.0;
            }
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> Option<Value> {
    let mut r = agent
        .post(url)
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(body)
        .ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    r.body_mut().read_json().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    let dir = std::env::temp_dir().join(format!("km-bench-{}", std::process::id()));
    let master = match SecretKey::random() {
        Ok(k) => MasterKey::new(k, MasterSource::Explicit),
        Err(e) => return eprintln!("km_bench: {e}"),
    };
    let store = match Store::open(&dir, master) {
        Ok(s) => s,
        Err(e) => return eprintln!("km_bench: {e}"),
    };
    let kms = Arc::new(Kms::new(
        store,
        Clients::from_pairs([("bench", TOKEN)]),
        Audit::stderr_only("key-manager"),
    ));
    if let Err(e) = kms.create("bench", "bench", None) {
        return eprintln!("km_bench: {e}");
    }
    let server =
        match key_manager::SPEC.serve("127.0.0.1:0", 4, key_manager::http::handler(kms.clone())) {
            Ok(s) => s,
            Err(e) => return eprintln!("km_bench: {e}"),
        };
    let base = format!("http://{}", server.addr());
    println!(
        "key-manager bench: XChaCha20-Poly1305, {secs} s per cell, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<8} {:<8} {:>14} {:>14} {:>9} {:>16}",
        "payload", "op", "in-process/s", "HTTP 1 cl/s", "ratio", "HTTP 4 cl/s"
    );
    for size in [64usize, 4096] {
        let pt = vec![0x5au8; size];
        let ct = match kms.encrypt("bench", "bench", &pt, b"") {
            Ok(e) => e.ciphertext,
            Err(e) => return eprintln!("km_bench: {e}"),
        };
        let enc_local = rate(secs, || kms.encrypt("bench", "bench", &pt, b"").is_ok());
        let dec_local = rate(secs, || kms.decrypt("bench", &ct, b"").is_ok());
        let enc_body = json!({"plaintext": B64.encode(&pt)});
        let dec_body = json!({"ciphertext": B64.encode(&ct)});
        let enc_url = format!("{base}/v1/keys/bench/encrypt");
        let dec_url = format!("{base}/v1/decrypt");
        let a = agent();
        let enc_http = rate(secs, || post(&a, &enc_url, &enc_body).is_some());
        let dec_http = rate(secs, || post(&a, &dec_url, &dec_body).is_some());
        let concurrent = |url: &str, body: &Value| -> f64 {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (url, body) = (url.to_string(), body.clone());
                    std::thread::spawn(move || {
                        let a = agent();
                        rate(secs, || post(&a, &url, &body).is_some())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        };
        let enc_http4 = concurrent(&enc_url, &enc_body);
        let dec_http4 = concurrent(&dec_url, &dec_body);
        for (op, local, http, http4) in [
            ("encrypt", enc_local, enc_http, enc_http4),
            ("decrypt", dec_local, dec_http, dec_http4),
        ] {
            let ratio = if http > 0.0 { local / http } else { f64::NAN };
            println!(
                "{:<8} {:<8} {:>14.0} {:>14.0} {:>8.1}x {:>16.0}",
                format!("{size} B"),
                op,
                local,
                http,
                ratio,
                http4
            );
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
