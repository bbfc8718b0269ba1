//! Addresses: what a conductor advertises for a bound socket, what counts
//! as this host, the refusals of plain (non-TLS) connections from other
//! hosts, and whether an address accepts connections. A leaf module (std only), used by the broker and the HTTP server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Plain (non-TLS) connections refused from other hosts: counters for
/// Prometheus, and a per-peer log limiter so a scanner cannot flood the log.
#[derive(Debug, Default)]
pub struct PlainRefusals {
    /// Refused plain HTTP requests.
    pub http: AtomicU64,
    /// Refused plain MQTT connections.
    pub mqtt: AtomicU64,
    /// (protocol, peer) → when last logged.
    logged: Mutex<HashMap<(bool, std::net::IpAddr), Instant>>,
}

impl PlainRefusals {
    /// Counts one refusal of `what` (`http` or `mqtt`) from `peer`; `true`
    /// when it should be logged (the first of that kind from this peer in a
    /// minute).
    pub fn refuse(&self, what: &str, peer: std::net::IpAddr) -> bool {
        let mqtt = what == "mqtt";
        let counter = if mqtt { &self.mqtt } else { &self.http };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() > 10_000 {
            logged.retain(|_, t| now.duration_since(*t).as_secs() < 60);
        }
        match logged.get(&(mqtt, peer)) {
            Some(t) if now.duration_since(*t).as_secs() < 60 => false,
            _ => {
                logged.insert((mqtt, peer), now);
                true
            }
        }
    }
}

/// Whether `ip` is this host's loopback (also `::ffff:127.x.y.z`).
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether a plain (non-TLS, `secure` false) HTTP request from `ip` is
/// refused: plain HTTP is served to loopback peers only, unless
/// `insecure_plain`. The one rule for every HTTP listener of the conductor
/// (the API's, a standby's forwarding one).
pub fn plain_refused(secure: bool, insecure_plain: bool, ip: std::net::IpAddr) -> bool {
    !secure && !insecure_plain && !is_loopback(ip)
}

/// This machine's hostname (`/proc/sys/kernel/hostname`), if it has one.
pub fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

/// The address to advertise for a bound socket (0.0.0.0 → 127.0.0.1).
pub fn advertised(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// How long [`accepts`] waits for one address.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `host:port` (a name, an IPv4 address or a bracketed IPv6 one)
/// accepts a TCP connection within [`PROBE_TIMEOUT`] on any of its
/// addresses. Blocking.
pub fn accepts(host_port: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    host_port
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.any(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok()))
}
