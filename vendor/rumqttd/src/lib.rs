use std::fmt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    filter::EnvFilter,
    fmt::{
        format::{Format, Pretty},
        Layer,
    },
    layer::Layered,
    reload::Handle,
    Registry,
};

pub use link::alerts;
pub use link::local;
pub use link::meters;
pub use router::{Alert, Forward, IncomingMeter, Meter, Notification, OutgoingMeter, Router};
use segments::Storage;
pub use server::{Broker, Disconnector, LinkType, Server};

pub use self::router::shared_subs::Strategy;

/// aerekos patch: the rustls that `TlsConfig::Provided` takes, so that callers
/// build their `ServerConfig` with the same rustls version as the broker.
#[cfg(feature = "use-rustls")]
pub use tokio_rustls::rustls;

// aerekos patch: tests of the aerekos patches (vendor/README.md).
#[cfg(test)]
mod aerekos_tests;
mod link;
pub mod protocol;
mod router;
mod segments;
mod server;

pub type ConnectionId = usize;
pub type RouterId = usize;
pub type NodeId = usize;
pub type Topic = String;
pub type Filter = String;
pub type TopicId = usize;
pub type Offset = (u64, u64);
pub type Cursor = (u64, u64);

pub type ClientId = String;
pub type AuthUser = String;
pub type AuthPass = String;
pub type AuthHandler = Arc<
    dyn Fn(ClientId, AuthUser, AuthPass) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// aerekos patch: who sent a packet, as given to the authorisation hook
/// (`ConnectionSettings::set_authorization_handler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The client id of the CONNECT, or the one the broker assigned when it
    /// was empty; without the tenant prefix.
    pub client_id: &'a str,
    /// The user name of the CONNECT, if it had one.
    pub username: Option<&'a str>,
    /// The tenant of the client certificate (feature `verify-client-cert`).
    pub tenant_id: Option<&'a str>,
}

/// aerekos patch: what a client asks to do, as given to the authorisation hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// A PUBLISH to `topic` (a v5 topic alias resolved to its topic), or the
    /// will message of a CONNECT (checked at connect time).
    Publish { topic: &'a str, retain: bool },
    /// One filter of a SUBSCRIBE, as sent (`$share/group/filter` included).
    Subscribe { filter: &'a str },
}

/// aerekos patch: the authorisation hook, called for every PUBLISH, every
/// SUBSCRIBE filter and the will of every CONNECT of remote clients.
pub type AuthorizationHandler = Arc<dyn Fn(&Identity<'_>, Access<'_>) -> bool + Send + Sync>;

/// aerekos patch: the peer filter of a server, called with each accepted
/// connection's peer address.
pub type PeerFilter = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct Config {
    pub id: usize,
    pub router: RouterConfig,
    pub v4: Option<HashMap<String, ServerSettings>>,
    pub v5: Option<HashMap<String, ServerSettings>>,
    pub ws: Option<HashMap<String, ServerSettings>>,
    pub cluster: Option<ClusterSettings>,
    pub console: Option<ConsoleSettings>,
    pub bridge: Option<BridgeConfig>,
    pub prometheus: Option<PrometheusSetting>,
    pub metrics: Option<HashMap<MetricType, MetricSettings>>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct PrometheusSetting {
    #[deprecated(note = "Use listen instead")]
    port: Option<u16>,
    listen: Option<SocketAddr>,
    // How frequently to update metrics
    interval: u64,
}

// TODO: Change names without _ until config-rs issue is resolved
// https://github.com/mehcode/config-rs/issues/369
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(untagged)]
pub enum TlsConfig {
    Rustls {
        capath: Option<String>,
        certpath: String,
        keypath: String,
    },
    NativeTls {
        pkcs12path: String,
        pkcs12pass: String,
    },
    /// aerekos patch: a rustls `ServerConfig` built by the caller (its own
    /// certificate resolver, client verifier, protocol versions); not in
    /// config files. Build it with [`rustls`] (the re-export).
    #[cfg(feature = "use-rustls")]
    #[serde(skip)]
    Provided(Arc<tokio_rustls::rustls::ServerConfig>),
}

impl TlsConfig {
    // Returns true only if all of the file paths inside `TlsConfig` actually exists on file system.
    // NOTE: This doesn't verify if certificate files are in required format or not.
    pub fn validate_paths(&self) -> bool {
        match self {
            TlsConfig::Rustls {
                capath,
                certpath,
                keypath,
            } => {
                let ca = capath.is_none() || capath.as_ref().is_some_and(|v| Path::new(v).exists());

                ca && [certpath, keypath].iter().all(|v| Path::new(v).exists())
            }
            TlsConfig::NativeTls { pkcs12path, .. } => Path::new(pkcs12path).exists(),
            #[cfg(feature = "use-rustls")]
            TlsConfig::Provided(_) => true,
        }
    }
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ServerSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub next_connection_delay_ms: u64,
    pub connections: ConnectionSettings,
    /// aerekos patch: see [`ServerSettings::set_peer_filter`].
    #[serde(skip)]
    pub peer_filter: Option<PeerFilter>,
}

// aerekos patch: by hand for `peer_filter` (was derived).
impl fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSettings")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("next_connection_delay_ms", &self.next_connection_delay_ms)
            .field("connections", &self.connections)
            .field("peer_filter", &self.peer_filter.is_some())
            .finish()
    }
}

impl ServerSettings {
    /// aerekos patch: `filter(peer)` is called in the accept loop right after
    /// each accept, before TLS and before any MQTT byte is read; `false`
    /// closes the socket at once and the server goes on accepting. It runs on
    /// the accept loop: keep it cheap.
    pub fn set_peer_filter<F>(&mut self, filter: F)
    where
        F: Fn(SocketAddr) -> bool + Send + Sync + 'static,
    {
        self.peer_filter = Some(Arc::new(filter));
    }

    /// aerekos patch: see [`ConnectionSettings::set_authorization_handler`].
    pub fn set_authorization_handler<F>(&mut self, authorize: F)
    where
        F: Fn(&Identity<'_>, Access<'_>) -> bool + Send + Sync + 'static,
    {
        self.connections.set_authorization_handler(authorize)
    }

    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.connections.set_auth_handler(auth_fn)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct BridgeConfig {
    pub name: String,
    pub addr: String,
    pub qos: u8,
    pub sub_path: Filter,
    pub reconnection_delay: u64,
    pub ping_delay: u64,
    pub connections: ConnectionSettings,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ConnectionSettings {
    pub connection_timeout_ms: u16,
    pub max_payload_size: usize,
    pub max_inflight_count: usize,
    pub auth: Option<HashMap<String, String>>,
    #[serde(skip)]
    pub external_auth: Option<AuthHandler>,
    #[serde(default)]
    pub dynamic_filters: bool,
    /// aerekos patch: see [`ConnectionSettings::set_authorization_handler`].
    #[serde(skip)]
    pub external_authorization: Option<AuthorizationHandler>,
}

impl ConnectionSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.external_auth = Some(Arc::new(move |client_id, username, password| {
            let auth = auth_fn(client_id, username, password).into_future();
            Box::pin(auth)
        }));
    }

    /// aerekos patch: `authorize(identity, access)` decides, for remote
    /// clients, each PUBLISH, each filter of a SUBSCRIBE and the will of each
    /// CONNECT (upstream has no ACLs). It is called on the connection's task
    /// for every such packet, synchronously: keep it cheap and non-blocking.
    ///
    /// - a refused SUBSCRIBE filter gets return code 0x80 (failure) in the
    ///   SUBACK and never reaches the router; the other filters of the same
    ///   SUBSCRIBE are handled as usual;
    /// - a refused PUBLISH is dropped (not routed, not retained, no PUBACK)
    ///   and the client is disconnected, with the packets it sent after it;
    /// - a refused will (checked as `Access::Publish` of its topic and retain
    ///   flag) refuses the connection: CONNACK "not authorized" (3.1.1 return
    ///   code 5, v5 reason 0x87), then close.
    ///
    /// Not set: upstream behaviour, everything is allowed. Local links
    /// (`Broker::link`) are not checked.
    pub fn set_authorization_handler<F>(&mut self, authorize: F)
    where
        F: Fn(&Identity<'_>, Access<'_>) -> bool + Send + Sync + 'static,
    {
        self.external_authorization = Some(Arc::new(authorize));
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_inflight_count", &self.max_inflight_count)
            .field("auth", &self.auth)
            .field("external_auth", &self.external_auth.is_some())
            .field("dynamic_filters", &self.dynamic_filters)
            // aerekos patch
            .field("external_authorization", &self.external_authorization.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Id with which this node connects to other nodes of the mesh
    pub node_id: NodeId,
    /// Address on which this broker is listening for mesh connections
    pub listen: String,
    /// Address of clusters that this node has to initiate connection
    pub seniors: Vec<(ConnectionId, String)>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RouterConfig {
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub custom_segment: Option<HashMap<String, SegmentConfig>>,
    pub initialized_filters: Option<Vec<Filter>>,
    // defaults to Round Robin
    #[serde(default)]
    pub shared_subscriptions_strategy: Strategy,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}

type ReloadHandle = Handle<EnvFilter, Layered<Layer<Registry, Pretty, Format<Pretty>>, Registry>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConsoleSettings {
    pub listen: String,
    #[serde(skip)]
    filter_handle: Option<ReloadHandle>,
}

impl ConsoleSettings {
    pub fn set_filter_reload_handle(&mut self, handle: ReloadHandle) {
        self.filter_handle.replace(handle);
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub enum Transport {
    #[serde(rename = "tcp")]
    #[default]
    Tcp,
    #[serde(rename = "tls")]
    Tls {
        ca: PathBuf,
        client_auth: Option<ClientAuth>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientAuth {
    certs: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, Clone, Hash, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Meters,
    Alerts,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct MetricSettings {
    push_interval: u64,
}
