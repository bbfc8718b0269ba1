//! The conductor's own MQTT client (rumqttc), the same code path for the
//! embedded broker and an external one (e.g. Mosquitto).
//!
//! It connects with the stable client id `conductor` and `clean_session =
//! false`, so a persistent broker queues QoS 1 frames while the conductor
//! restarts. [`crate::subscriber::run_loop`] drives it: subscription,
//! dispatch to ingest, reconnects.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions};

/// Client id of the conductor's session.
pub const CLIENT_ID: &str = "conductor";

/// Where and how the conductor connects.
#[derive(Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// The other nodes of a broker cluster (`mqtt_url`'s list form), tried
    /// in turn after a connection error; empty for one broker.
    pub more: Vec<(String, u16)>,
    /// Login.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// The conductor session's client id: [`CLIENT_ID`], or on NATS in
    /// operator mode one derived from the account seed
    /// ([`crate::nats_auth::FleetAccount::client_id`]), which workers cannot
    /// guess and so cannot take over.
    pub client_id: String,
    /// MQTT over TLS (an external `mqtts://` broker).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("more", &self.more)
            .field("username", &self.username)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The client configuration for an external `mqtts://` broker: its CA
/// (`ca_pem`, from `--mqtt-ca`) or else the system's roots.
pub fn tls_client_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::tls::root_store(ca_pem).map_err(|e| match ca_pem {
        None => format!("{e}: give the broker's CA with --mqtt-ca"),
        Some(_) => e,
    })?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Options for a session with `s`' broker as `client_id`: its address,
/// TLS, a 15 s keep-alive; the caller adds the login and session kind.
pub fn options(s: &MqttSettings, client_id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, s.host.clone(), s.port);
    opts.set_keep_alive(Duration::from_secs(15));
    if let Some(c) = &s.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(c.clone()),
        ));
    }
    opts
}

/// The client and its event loop for `opts` (nothing connects until
/// polled). Commands are small and their round trip is user-visible: no
/// Nagle.
pub fn connect(opts: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, capacity);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Builds the conductor's own client and its event loop (nothing connects
/// until polled), and the options for every node of the broker (the first
/// is the event loop's): [`crate::subscriber::run_loop`] moves to the next
/// one after a connection error. `manual_acks`: publishes are PubAcked by
/// the loop once committed, not on receipt.
pub fn client(s: &MqttSettings, manual_acks: bool) -> (AsyncClient, EventLoop, Vec<MqttOptions>) {
    let nodes = std::iter::once((s.host.clone(), s.port)).chain(s.more.iter().cloned());
    let all: Vec<MqttOptions> = nodes
        .map(|(host, port)| {
            let mut opts = options(
                &MqttSettings {
                    host,
                    port,
                    ..s.clone()
                },
                &s.client_id,
            );
            opts.set_clean_session(false);
            opts.set_manual_acks(manual_acks);
            // Larger than MAX_FRAME_LEN so oversized frames arrive and are counted.
            opts.set_max_packet_size(128 * 1024, 128 * 1024);
            if let Some(u) = &s.username {
                opts.set_credentials(u.clone(), s.password.clone().unwrap_or_default());
            }
            opts
        })
        .collect();
    let (client, eventloop) = connect(all[0].clone(), 1024);
    (client, eventloop, all)
}
