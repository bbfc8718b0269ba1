//! The service in the container tests' image (`images/test-service/`,
//! `edge-worker/tests/container.rs`): a static binary alone in a `FROM
//! scratch` image.
//!
//! * prints `start args=<args> greeting=<$GREETING>` on stdout and `ready` on
//!   stderr, then `tick <n>` on stdout every second;
//! * serves HTTP on `$PORT` (default 8080): `GET /` answers `ok`,
//!   `GET /exit/<code>` makes the process exit with `<code>`.
//!
//! Standard library only, so the tests build it in a second with plain
//! `rustc --target x86_64-unknown-linux-musl` (no dependency graph to build
//! for the musl target). Run it on the host with
//! `cargo run -p edge-worker --example ctr_test_service`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let greeting = std::env::var("GREETING").unwrap_or_default();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    println!("start args={} greeting={greeting}", args.join(","));
    eprintln!("ready");
    std::thread::spawn(|| {
        for n in 1u64.. {
            println!("tick {n}");
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {port}: {e}");
            std::process::exit(2);
        }
    };
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let n = conn.read(&mut buf).unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]);
        let path = req.split(' ').nth(1).unwrap_or("/");
        let exit = path
            .strip_prefix("/exit/")
            .and_then(|c| c.parse::<i32>().ok());
        let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let _ = conn.flush();
        drop(conn);
        if let Some(code) = exit {
            println!("exiting with {code}");
            std::process::exit(code);
        }
    }
}
