//! Embedded MQTT broker (rumqttd 0.20 as patched in `vendor/rumqttd`, MQTT
//! 3.1.1 server) with a credential-checking auth hook.
//!
//! Allowed logins:
//! * the conductor itself: username `conductor`, random password kept in the
//!   settings table;
//! * enrolled, non-revoked workers: username = worker id, sha256(password)
//!   matches the stored hash, **and** client id = worker id;
//! * an observer (MQTT Explorer etc.): username `observer`, random password
//!   (shown by `GET /api/v1/mqtt`), whose client id is neither a worker id nor
//!   starts with `conductor`.
//!
//! Authorisation ([`Credentials::authorize`], through the vendored
//! rumqttd's hook): the observer publishes nothing; a worker publishes only
//! its own worker-side topics and reads only its own commands; refusals are
//! counted ([`DeniedCounters`]) and logged once per client. A refused
//! publish disconnects the client (MQTT 3.1.1 has no other answer); a
//! refused subscribe gets return code 0x80.
//!
//! Listeners ([`Listeners`]): plain MQTT (1883) accepts loopback peers only
//! unless `--insecure-plain`; MQTT over TLS (8883) accepts everyone.
//!
//! Limits (read before relying on this):
//! * The login hook runs only at CONNECT. Revoking a worker
//!   ([`Credentials::remove_worker`]) therefore also closes its live
//!   connection (the vendored patch's `Disconnector`); with an external
//!   broker the conductor cannot, and a revoked worker stays connected
//!   (its frames refused) until it drops.
//! * rumqttd cannot be stopped: [`start`] runs it on a detached thread that
//!   lives until process exit. On conductor shutdown [`Credentials::close`]
//!   makes the hook refuse every new login; established connections stay
//!   until the process exits.
//! * rumqttd cannot report the port of a port-0 bind, so [`pick_port`]
//!   chooses a free port first (a tiny race with other processes exists).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rumqttd::Access;
use sha2::{Digest, Sha256};

use crate::crypto::ct_eq;

/// Username the conductor's own client logs in with.
pub const CONDUCTOR_USER: &str = "conductor";
/// Username of the read-only-by-convention observer login.
pub const OBSERVER_USER: &str = "observer";

/// Broker errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Could not find or use a port.
    #[error("mqtt listen {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker did not start listening in time.
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
    /// Thread spawn failed.
    #[error("cannot start broker thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Default)]
struct Table {
    conductor: Option<[u8; 32]>,
    observer: Option<[u8; 32]>,
    workers: HashMap<String, [u8; 32]>,
    closed: bool,
    /// Closes a revoked worker's live connection: the auth hook runs only at
    /// CONNECT, and rumqttd has no ACLs, so a revoked worker left connected
    /// could go on reading every topic. `None` with an external broker.
    disconnector: Option<rumqttd::Disconnector>,
}

/// Who a refused MQTT request came from (a Prometheus label).
pub const DENIED_WHO: [&str; 3] = ["observer", "worker", "other"];
/// What was refused (a Prometheus label).
pub const DENIED_ACTION: [&str; 2] = ["publish", "subscribe"];

/// Publishes and subscribes the embedded broker refused, by
/// ([`DENIED_WHO`], [`DENIED_ACTION`]), plus which clients were already
/// logged (one line per client, so a misbehaving one cannot flood the log).
#[derive(Debug, Default, Clone)]
pub struct DeniedCounters(Arc<DeniedInner>);

#[derive(Debug, Default)]
struct DeniedInner {
    counts: [[std::sync::atomic::AtomicU64; 2]; 3],
    /// Bounded: cleared when it reaches 10,000 (a client may then be logged again).
    logged: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl DeniedCounters {
    /// Counts one refusal; `true` if this client was not logged before.
    pub fn count(&self, who: usize, action: usize, client_id: &str) -> bool {
        if let Some(c) = self.0.counts.get(who).and_then(|row| row.get(action)) {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut logged = self.0.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() >= 10_000 {
            logged.clear();
        }
        logged.insert(client_id.to_string())
    }

    /// The count for ([`DENIED_WHO`] index, [`DENIED_ACTION`] index).
    pub fn get(&self, who: usize, action: usize) -> u64 {
        self.0
            .counts
            .get(who)
            .and_then(|row| row.get(action))
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The broker's login table, shared with enrolment and revocation.
#[derive(Clone, Default)]
pub struct Credentials(Arc<RwLock<Table>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

fn digest(password: &str) -> [u8; 32] {
    Sha256::digest(password.as_bytes()).into()
}

/// Parses a sha256 hex string into bytes.
fn from_hex32(hex: &str) -> Option<[u8; 32]> {
    protocol::Secret::from_hex(hex).ok().map(|s| *s.as_bytes())
}

impl Credentials {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the conductor and observer passwords.
    pub fn set_service_logins(&self, conductor_password: &str, observer_password: &str) {
        let mut t = self.write();
        t.conductor = Some(digest(conductor_password));
        t.observer = Some(digest(observer_password));
    }

    /// Allows (or updates) a worker login given the sha256 hex of its password.
    pub fn set_worker(&self, worker_id: &str, password_sha256_hex: &str) {
        if let Some(h) = from_hex32(password_sha256_hex) {
            self.write().workers.insert(worker_id.to_string(), h);
        }
    }

    /// Refuses a worker's login from now on and, on the embedded broker,
    /// closes its connection if it has one (its client id is its worker id).
    pub fn remove_worker(&self, worker_id: &str) {
        let disconnector = {
            let mut t = self.write();
            t.workers.remove(worker_id);
            t.disconnector.clone()
        };
        if let Some(d) = disconnector {
            if !d.disconnect(worker_id) {
                tracing::warn!(
                    worker_id,
                    "embedded broker gone: cannot close the connection"
                );
            }
        }
    }

    /// Refuses every new login (conductor shut down).
    pub fn close(&self) {
        self.write().closed = true;
    }

    /// The authorisation decision for a connected client (the embedded
    /// broker asks for every PUBLISH, SUBSCRIBE filter and will):
    ///
    /// * the conductor may do anything;
    /// * the observer may subscribe to any filter and publish nothing (so the
    ///   retained `status` and JSON mirror that MQTT tools show are the
    ///   workers' and the conductor's own);
    /// * a worker may publish only its own worker-side topics and subscribe
    ///   only to its own `cmd` and `cmd/stored`
    ///   ([`protocol::topic::worker_may_publish`], [`worker_may_subscribe`](protocol::topic::worker_may_subscribe));
    /// * anyone else: nothing.
    ///
    /// The login check ([`Credentials::check`]) already made a worker's
    /// client id equal its username, so the username is who it is.
    pub fn authorize(username: Option<&str>, access: &Access<'_>) -> Result<(), (usize, usize)> {
        let action = match access {
            Access::Publish { .. } => 0,
            Access::Subscribe { .. } => 1,
        };
        let (allowed, who) = match username {
            Some(CONDUCTOR_USER) => (true, 2),
            Some(OBSERVER_USER) => (matches!(access, Access::Subscribe { .. }), 0),
            Some(worker) if protocol::topic::is_valid_worker_id(worker) => (
                match access {
                    Access::Publish { topic, .. } => {
                        protocol::topic::worker_may_publish(worker, topic)
                    }
                    Access::Subscribe { filter } => {
                        protocol::topic::worker_may_subscribe(worker, filter)
                    }
                },
                1,
            ),
            _ => (false, 2),
        };
        if allowed {
            Ok(())
        } else {
            Err((who, action))
        }
    }

    /// The auth decision.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        let t = self.read();
        if t.closed {
            return false;
        }
        let given = digest(password);
        match username {
            CONDUCTOR_USER => t.conductor.is_some_and(|h| ct_eq(&h, &given)),
            OBSERVER_USER => {
                !client_id.starts_with(CONDUCTOR_USER)
                    && !t.workers.contains_key(client_id)
                    && t.observer.is_some_and(|h| ct_eq(&h, &given))
            }
            worker => {
                client_id == worker && t.workers.get(worker).is_some_and(|h| ct_eq(h, &given))
            }
        }
    }
}

/// Resolves the listen address, choosing a free port if it is 0.
pub fn pick_port(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let l = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen.to_string(),
        source,
    })?;
    let port = l
        .local_addr()
        .map_err(|source| BrokerError::Bind {
            addr: listen.to_string(),
            source,
        })?
        .port();
    drop(l);
    Ok(SocketAddr::new(listen.ip(), port))
}

/// Where the embedded broker listens, and what it refuses.
#[derive(Clone)]
pub struct Listeners {
    /// Plain MQTT (a concrete port). Loopback peers only unless `insecure_plain`.
    pub plain: SocketAddr,
    /// MQTT over TLS: a concrete address and the server configuration.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Accept plain MQTT from other hosts too.
    pub insecure_plain: bool,
    /// Counts (and rate-limits the log of) refused plain connections.
    pub refusals: Arc<crate::net::PlainRefusals>,
    /// Counts refused publishes and subscribes.
    pub denied: DeniedCounters,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("plain", &self.plain)
            .field("tls", &self.tls.as_ref().map(|(a, _)| a))
            .field("insecure_plain", &self.insecure_plain)
            .finish_non_exhaustive()
    }
}

fn connection_settings(
    creds: &Credentials,
    denied: &DeniedCounters,
) -> rumqttd::ConnectionSettings {
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Larger than MAX_FRAME_LEN so oversized frames reach the conductor
        // and are counted, instead of silently disconnecting the sender.
        max_payload_size: 64 * 1024,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        external_authorization: None,
        dynamic_filters: true,
    };
    let hook = creds.clone();
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = hook.check(&client_id, &user, &pass);
        if !ok {
            tracing::debug!(client_id = %client_id, username = %user, "mqtt login refused");
        }
        async move { ok }
    });
    let denied = denied.clone();
    connections.set_authorization_handler(move |who: &rumqttd::Identity<'_>, access| {
        match Credentials::authorize(who.username, &access) {
            Ok(()) => true,
            Err((w, a)) => {
                if denied.count(w, a, who.client_id) {
                    tracing::warn!(
                        client_id = %who.client_id,
                        username = who.username.unwrap_or(""),
                        ?access,
                        "MQTT {} refused (logged once per client; counted in aerekos_mqtt_denied_total)",
                        DENIED_ACTION[a]
                    );
                }
                false
            }
        }
    });
    connections
}

/// The embedded broker's connection limit: 100,000 (issue 19's target is
/// 50,000 workers on one conductor). The process's open-file limit is the
/// other ceiling: `main` raises the soft limit to the hard one.
pub const MAX_CONNECTIONS: usize = 100_000;

/// Starts rumqttd on the listeners on a detached thread and waits until it
/// completes an MQTT handshake for the conductor's login
/// (`conductor_password`) on the plain listener.
pub fn start(
    listeners: Listeners,
    creds: Credentials,
    conductor_password: &str,
) -> Result<(), BrokerError> {
    let mut servers = HashMap::new();
    let connections = connection_settings(&creds, &listeners.denied);
    let mut plain = rumqttd::ServerSettings {
        name: "aerekos-v4".into(),
        listen: listeners.plain,
        tls: None,
        peer_filter: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    if !listeners.insecure_plain {
        let refusals = listeners.refusals.clone();
        plain.set_peer_filter(move |peer: SocketAddr| {
            if crate::net::is_loopback(peer.ip()) {
                return true;
            }
            if refusals.refuse("mqtt", peer.ip()) {
                tracing::warn!(
                    %peer,
                    "plain MQTT refused from another host: use MQTT over TLS (mqtts://, the \
                     worker's default once enrolled with a pinned token), or start the \
                     conductor with --insecure-plain on a trusted network"
                );
            }
            false
        });
    }
    servers.insert("1".to_string(), plain);
    if let Some((listen, config)) = &listeners.tls {
        servers.insert(
            "2".to_string(),
            rumqttd::ServerSettings {
                name: "aerekos-v4-tls".into(),
                listen: *listen,
                tls: Some(rumqttd::TlsConfig::Provided(config.clone())),
                peer_filter: None,
                next_connection_delay_ms: 1,
                connections,
            },
        );
    }
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // Workers plus the conductor's own and observers' sessions.
            // The router's tables are reserved (not touched) for this many:
            // address space, not memory, until connections arrive.
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: 10 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(servers),
        ..Default::default()
    };
    // `Broker::new` starts the router thread; `start` then runs the
    // listeners on this one until the process exits.
    let mut broker = rumqttd::Broker::new(config);
    creds.write().disconnector = Some(broker.disconnector());
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(BrokerError::Thread)?;
    let target = crate::net::advertised(listeners.plain);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if mqtt_handshake(target, conductor_password).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(listeners.plain))
}

/// One MQTT 3.1.1 CONNECT → CONNACK → DISCONNECT exchange as the conductor
/// (client id `conductor-probe`): a readiness check that, unlike a bare TCP
/// connect, leaves no "connection closed" error in the broker's log.
fn mqtt_handshake(target: SocketAddr, password: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let field = |out: &mut Vec<u8>, s: &[u8]| -> std::io::Result<()> {
        let len = u16::try_from(s.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "MQTT string field over 65535 bytes",
            )
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(s);
        Ok(())
    };
    // Variable header: protocol name, level 4, flags (username, password,
    // clean session), keep-alive 5 s; payload: client id, username, password.
    let mut body = Vec::new();
    field(&mut body, b"MQTT")?;
    body.extend_from_slice(&[4, 0b1100_0010, 0, 5]);
    field(&mut body, b"conductor-probe")?;
    field(&mut body, CONDUCTOR_USER.as_bytes())?;
    field(&mut body, password.as_bytes())?;
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        // fits: len % 128 < 128.
        #[allow(clippy::cast_possible_truncation)]
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(&packet)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    stream.write_all(&[0xe0, 0x00])?;
    if connack[0] == 0x20 && connack[3] == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("CONNACK {connack:02x?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_rules() {
        let c = Credentials::default();
        c.set_service_logins("cpass", "opass");
        let h = protocol::hex_string(&digest("wpass"));
        c.set_worker("w-000000000001", &h);
        assert!(c.check("conductor", CONDUCTOR_USER, "cpass"));
        assert!(!c.check("conductor", CONDUCTOR_USER, "opass"));
        assert!(c.check("explorer", OBSERVER_USER, "opass"));
        assert!(!c.check("w-000000000001", OBSERVER_USER, "opass"));
        assert!(!c.check("conductor-x", OBSERVER_USER, "opass"));
        assert!(c.check("w-000000000001", "w-000000000001", "wpass"));
        assert!(!c.check("other", "w-000000000001", "wpass"));
        assert!(!c.check("w-000000000001", "w-000000000001", "nope"));
        c.remove_worker("w-000000000001");
        assert!(!c.check("w-000000000001", "w-000000000001", "wpass"));
        c.close();
        assert!(!c.check("conductor", CONDUCTOR_USER, "cpass"));
    }
}
