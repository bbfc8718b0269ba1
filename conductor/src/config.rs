//! Conductor configuration.
//!
//! Precedence, lowest first: built-in defaults < `--config file.toml` <
//! environment variables `AEREKOS_*` < command-line flags. [`Config::resolve`]
//! implements the three upper layers as a pure function so it can be tested
//! without touching the process environment.
//!
//! Secrets (`admin_password`, passwords inside `mqtt_url`,
//! `worker_mqtt_password`) are redacted by [`Config::to_redacted_toml`].

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How long frames sealed with a worker's previous secret are accepted
/// after it switched to the rotated one, by default (`secret_grace`): a
/// day, well beyond the two hours of frames its outbox holds by default.
pub const SECRET_GRACE_MS: u64 = 24 * 3_600_000;

/// The discovery prefix Home Assistant listens on by default
/// (`homeassistant_prefix`).
pub const HOMEASSISTANT_PREFIX: &str = "homeassistant";

/// Errors while building a [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is not valid TOML for [`Config`].
    #[error("config file: {0}")]
    File(#[from] toml::de::Error),
    /// An environment variable or flag has an unusable value.
    #[error("{name}: {message}")]
    Invalid {
        /// Setting (env var or field) name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Printing the effective config failed.
    #[error("cannot render config: {0}")]
    Render(#[from] toml::ser::Error),
}

/// Effective conductor configuration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding `conductor.db` and `runtime.json`.
    pub data_dir: String,
    /// Where the store lives: `None` or `sqlite` is `<data_dir>/conductor.db`;
    /// a `postgres://user:pass@host:port/db` URL is a PostgreSQL server
    /// (several conductors can share one). Artifacts, TLS material and
    /// `runtime.json` stay in `data_dir` either way.
    pub store: Option<String>,
    /// HTTP listen address (`127.0.0.1:0` picks a free port).
    pub http_listen: String,
    /// The URL other conductors on the shared store reach this one's API
    /// by (a standby forwards requests there): `http://` or `https://`,
    /// a host and a port, no path. `None`: [`Config::advertise_url`]'s
    /// default from `tls` and `http_listen`.
    pub advertise_url: Option<String>,
    /// Embedded broker listen address (port 0 picks a free port). Unused with `mqtt_url`.
    pub mqtt_listen: String,
    /// External broker `mqtt://user:pass@host:port`, or the nodes of a
    /// broker cluster `mqtt://user:pass@a:1883,b:1883,c:1883` (tried in
    /// turn, by the conductor and by the workers); `None` = embedded rumqttd.
    pub mqtt_url: Option<String>,
    /// MQTT URL (or comma-separated URLs) handed to workers; default: the
    /// enrol request's Host + the MQTT port, or `mqtt_url`'s nodes.
    pub mqtt_public_url: Option<String>,
    /// Username handed to workers when an external broker is used.
    pub worker_mqtt_username: Option<String>,
    /// Password handed to workers when an external broker is used.
    pub worker_mqtt_password: Option<String>,
    /// How long raw metrics samples are kept (`24h`, `90m`, `7d`, `30s`).
    /// On PostgreSQL up to an hour longer (a day past 2 days): retention
    /// drops whole partitions (`store::partitions`).
    pub raw_retention: String,
    /// With a shared store and an external broker: how long the active
    /// conductor stays cut off from every broker node before it releases
    /// the store lease (and stops) for a conductor that reaches the bus.
    pub bus_stepdown: String,
    /// How long one-minute rollups are kept (on PostgreSQL up to a day
    /// longer, as `raw_retention`).
    pub minute_retention: String,
    /// Liveness interval assumed until a worker's Birth says otherwise; also
    /// the interval handed out at enrolment.
    pub default_interval_ms: u32,
    /// Initial admin password; only used when the admin user is first created.
    #[serde(skip_serializing)]
    pub admin_password: Option<String>,
    /// Enrol/login rate limit: burst per client IP (0 disables limiting).
    pub rate_limit_burst: u32,
    /// Enrol/login rate limit: seconds to refill one attempt.
    pub rate_limit_refill_s: u32,
    /// Largest artifact `POST /api/v1/artifacts` accepts, bytes (413 beyond).
    pub max_artifact_bytes: u64,
    /// Seconds the API waits for a client's next bytes (an idle keep-alive
    /// connection, or a request that stops mid-way) before closing the
    /// connection, so idle clients do not hold server threads for good;
    /// 0 waits forever. Per read: a slow but steady upload is not cut.
    pub http_read_timeout_s: u32,
    /// Serve HTTPS (on the HTTP port, beside plain HTTP for loopback) and
    /// MQTT over TLS ([`Config::mqtts_listen`]). Off: plain only (behind a
    /// TLS-terminating proxy on this host).
    pub tls: bool,
    /// Operator certificate chain (PEM) instead of the fleet CA's.
    pub tls_cert: Option<String>,
    /// Operator private key (PEM), with `tls_cert`.
    pub tls_key: Option<String>,
    /// Extra DNS names or IP addresses for the fleet server certificate.
    pub tls_san: Vec<String>,
    /// Accept plain HTTP and MQTT from non-loopback addresses (a trusted LAN,
    /// the old behaviour). Off: they are refused with a log line.
    pub insecure_plain: bool,
    /// Embedded broker's MQTT-over-TLS listen address (port 0 picks one).
    pub mqtts_listen: String,
    /// CA certificate (PEM) that an external `mqtts://` broker's chain ends
    /// in; handed to workers with the broker URL.
    pub mqtt_ca: Option<String>,
    /// Bearer token `/metrics` requires (it lists hostnames); `None`: open.
    pub metrics_token: Option<String>,
    /// How long frames sealed with a worker's previous secret are still
    /// accepted after it switched to a rotated one (`24h`, `90m`, …).
    pub secret_grace: String,
    /// The external broker is a Mosquitto with the dynamic-security plugin
    /// and the conductor's login is its admin: the conductor gives each
    /// worker its own login and ACLs there, and removes them on revocation
    /// (`conductor mosquitto-config` prints the broker config).
    pub mqtt_dynsec: bool,
    /// The external broker is a NATS cluster in operator mode (`conductor
    /// nats-auth`): the fleet account's seed file. The conductor signs its
    /// own login and one per worker with it ([`crate::nats_auth`]).
    pub nats_account_seed: Option<String>,
    /// How long a worker's NATS login is valid (`24h`, `10m`, at least
    /// 10 s): the agent asks for a fresh one when the broker refuses it, so
    /// this is also how long a revoked worker can still connect.
    pub nats_login_ttl: String,
    /// How often the alert rules are evaluated (`5s`, `500ms`).
    pub alert_interval: String,
    /// The Ed25519 public key (64 hex digits) agent releases are signed
    /// with (`aerekos release-key generate`); handed to workers at
    /// enrolment, which pin it. `None`: agent self-update is off.
    pub release_key: Option<String>,
    /// Publish retained Home Assistant MQTT discovery configs: every
    /// worker a device with sensors ([`crate::homeassistant`]).
    pub homeassistant_discovery: bool,
    /// The Home Assistant discovery prefix (its `discovery_prefix`).
    pub homeassistant_prefix: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_redacted_toml() {
            Ok(s) => f.write_str(&s),
            Err(_) => f.write_str("Config(<unrenderable>)"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "aerekos-data".into(),
            store: None,
            http_listen: "0.0.0.0:3000".into(),
            advertise_url: None,
            mqtt_listen: "0.0.0.0:1883".into(),
            mqtt_url: None,
            mqtt_public_url: None,
            worker_mqtt_username: None,
            worker_mqtt_password: None,
            raw_retention: "24h".into(),
            bus_stepdown: "20s".into(),
            minute_retention: "7d".into(),
            default_interval_ms: 10_000,
            admin_password: None,
            rate_limit_burst: 10,
            rate_limit_refill_s: 6,
            max_artifact_bytes: 256 << 20,
            http_read_timeout_s: 60,
            tls: true,
            tls_cert: None,
            tls_key: None,
            tls_san: Vec::new(),
            insecure_plain: false,
            mqtts_listen: "0.0.0.0:8883".into(),
            mqtt_ca: None,
            metrics_token: None,
            mqtt_dynsec: false,
            nats_account_seed: None,
            nats_login_ttl: "24h".into(),
            secret_grace: "24h".into(),
            alert_interval: "5s".into(),
            release_key: None,
            homeassistant_discovery: false,
            homeassistant_prefix: HOMEASSISTANT_PREFIX.into(),
        }
    }
}

/// Values given on the command line; `None` = not given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<String>,
    /// `--store`
    pub store: Option<String>,
    /// `--http-listen`
    pub http_listen: Option<String>,
    /// `--advertise-url`
    pub advertise_url: Option<String>,
    /// `--mqtt-listen`
    pub mqtt_listen: Option<String>,
    /// `--mqtt-url`
    pub mqtt_url: Option<String>,
    /// `--mqtt-public-url`
    pub mqtt_public_url: Option<String>,
    /// `--raw-retention`
    pub raw_retention: Option<String>,
    /// `--bus-stepdown`
    pub bus_stepdown: Option<String>,
    /// `--minute-retention`
    pub minute_retention: Option<String>,
    /// `--default-interval-ms`
    pub default_interval_ms: Option<u32>,
    /// `--no-tls`
    pub no_tls: bool,
    /// `--tls-cert`
    pub tls_cert: Option<String>,
    /// `--tls-key`
    pub tls_key: Option<String>,
    /// `--tls-san` (repeatable; added to the file's and env's)
    pub tls_san: Vec<String>,
    /// `--insecure-plain`
    pub insecure_plain: bool,
    /// `--mqtts-listen`
    pub mqtts_listen: Option<String>,
    /// `--mqtt-ca`
    pub mqtt_ca: Option<String>,
    /// `--metrics-token`
    pub metrics_token: Option<String>,
    /// `--mqtt-dynsec`
    pub mqtt_dynsec: bool,
    /// `--nats-account-seed`
    pub nats_account_seed: Option<String>,
    /// `--nats-login-ttl`
    pub nats_login_ttl: Option<String>,
    /// `--release-key`
    pub release_key: Option<String>,
    /// `--homeassistant-discovery`
    pub homeassistant_discovery: bool,
    /// `--homeassistant-prefix`
    pub homeassistant_prefix: Option<String>,
}

/// An external broker URL, split up.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl BrokerUrl {
    /// Parses `mqtt://[user[:pass]@]host[:port]` (also `tcp://`; port
    /// 1883) or `mqtts://…` (also `ssl://`; port 8883).
    pub fn parse(url: &str) -> Result<BrokerUrl, ConfigError> {
        let bad = |m: &str| ConfigError::Invalid {
            name: "mqtt_url".into(),
            message: m.into(),
        };
        let (tls, rest) = if let Some(r) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (true, r)
        } else {
            let r = url
                .strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(|| bad("must start with mqtt:// or mqtts://"))?;
            (false, r)
        };
        let rest = rest.trim_end_matches('/');
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let (username, password) = match creds {
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(c.to_string()), None),
            },
            None => (None, None),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host:port"))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(BrokerUrl {
            host,
            port: port.unwrap_or(if tls { 8883 } else { 1883 }),
            username,
            password,
            tls,
        })
    }
}

impl BrokerUrl {
    /// Parses `mqtt_url`'s list form, the nodes of one broker cluster:
    /// `mqtt://user:pass@a:1883,b:1883,mqtts://…`. Like a libpq host list,
    /// an element without a scheme takes the first element's scheme and
    /// login; an element with a scheme but no login takes the first's
    /// login. All elements use TLS or none does.
    pub fn parse_list(urls: &str) -> Result<Vec<BrokerUrl>, ConfigError> {
        // A comma inside a login (`mqtt://u:pa,ss@host`) leaves an element
        // with an '@' and no scheme: that is one URL, not a list.
        if urls
            .split(',')
            .skip(1)
            .any(|p| !p.contains("://") && p.contains('@'))
        {
            return Ok(vec![BrokerUrl::parse(urls)?]);
        }
        let mut out: Vec<BrokerUrl> = Vec::new();
        for part in urls.split(',').map(str::trim) {
            let Some(first) = out.first() else {
                out.push(BrokerUrl::parse(part)?);
                continue;
            };
            let mut url = if part.contains("://") {
                BrokerUrl::parse(part)?
            } else {
                let scheme = if first.tls { "mqtts" } else { "mqtt" };
                BrokerUrl::parse(&format!("{scheme}://{part}"))?
            };
            if url.username.is_none() {
                url.username.clone_from(&first.username);
                url.password.clone_from(&first.password);
            }
            if url.tls != first.tls {
                return Err(ConfigError::Invalid {
                    name: "mqtt_url".into(),
                    message: "the nodes of a list all use mqtts:// or all mqtt://".into(),
                });
            }
            out.push(url);
        }
        Ok(out)
    }
}

/// Splits `host[:port]` / `[v6][:port]`.
pub(crate) fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{h}]"), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((s.to_string(), None)),
    }
}

/// Parses `30s`, `90m`, `24h`, `7d` (or plain milliseconds) into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (s, 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

impl Config {
    /// Builds the effective config: defaults < `file_toml` < `env` < `flags`.
    pub fn resolve(
        file_toml: Option<&str>,
        env: &HashMap<String, String>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut c: Config = match file_toml {
            Some(t) => toml::from_str(t)?,
            None => Config::default(),
        };
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let num = |k: &str, v: String| -> Result<u32, ConfigError> {
            v.trim().parse().map_err(|_| ConfigError::Invalid {
                name: k.into(),
                message: format!("not a number: {v:?}"),
            })
        };
        macro_rules! env_str {
            ($field:ident, $key:literal) => {
                if let Some(v) = get($key) {
                    c.$field = v;
                }
            };
        }
        macro_rules! env_opt {
            ($field:ident, $key:literal) => {
                if let Some(v) = get($key) {
                    c.$field = Some(v);
                }
            };
        }
        env_str!(data_dir, "AEREKOS_DATA_DIR");
        env_opt!(store, "AEREKOS_STORE");
        env_str!(http_listen, "AEREKOS_HTTP_LISTEN");
        env_opt!(advertise_url, "AEREKOS_ADVERTISE_URL");
        env_str!(mqtt_listen, "AEREKOS_MQTT_LISTEN");
        env_opt!(mqtt_url, "AEREKOS_MQTT_URL");
        env_opt!(mqtt_public_url, "AEREKOS_MQTT_PUBLIC_URL");
        env_opt!(worker_mqtt_username, "AEREKOS_WORKER_MQTT_USERNAME");
        env_opt!(worker_mqtt_password, "AEREKOS_WORKER_MQTT_PASSWORD");
        env_str!(raw_retention, "AEREKOS_RAW_RETENTION");
        env_str!(bus_stepdown, "AEREKOS_BUS_STEPDOWN");
        env_str!(minute_retention, "AEREKOS_MINUTE_RETENTION");
        env_opt!(admin_password, "AEREKOS_ADMIN_PASSWORD");
        if let Some(v) = get("AEREKOS_DEFAULT_INTERVAL_MS") {
            c.default_interval_ms = num("AEREKOS_DEFAULT_INTERVAL_MS", v)?;
        }
        if let Some(v) = get("AEREKOS_RATE_LIMIT_BURST") {
            c.rate_limit_burst = num("AEREKOS_RATE_LIMIT_BURST", v)?;
        }
        if let Some(v) = get("AEREKOS_RATE_LIMIT_REFILL_S") {
            c.rate_limit_refill_s = num("AEREKOS_RATE_LIMIT_REFILL_S", v)?;
        }
        if let Some(v) = get("AEREKOS_HTTP_READ_TIMEOUT_S") {
            c.http_read_timeout_s = num("AEREKOS_HTTP_READ_TIMEOUT_S", v)?;
        }
        let flag = |k: &str, v: String| -> Result<bool, ConfigError> {
            match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::Invalid {
                    name: k.into(),
                    message: format!("not true/false: {v:?}"),
                }),
            }
        };
        if let Some(v) = get("AEREKOS_TLS") {
            c.tls = flag("AEREKOS_TLS", v)?;
        }
        if let Some(v) = get("AEREKOS_MQTT_DYNSEC") {
            c.mqtt_dynsec = flag("AEREKOS_MQTT_DYNSEC", v)?;
        }
        if let Some(v) = get("AEREKOS_HOMEASSISTANT_DISCOVERY") {
            c.homeassistant_discovery = flag("AEREKOS_HOMEASSISTANT_DISCOVERY", v)?;
        }
        env_str!(homeassistant_prefix, "AEREKOS_HOMEASSISTANT_PREFIX");
        if let Some(v) = get("AEREKOS_INSECURE_PLAIN") {
            c.insecure_plain = flag("AEREKOS_INSECURE_PLAIN", v)?;
        }
        env_opt!(tls_cert, "AEREKOS_TLS_CERT");
        env_opt!(tls_key, "AEREKOS_TLS_KEY");
        if let Some(v) = get("AEREKOS_TLS_SAN") {
            c.tls_san.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        env_str!(mqtts_listen, "AEREKOS_MQTTS_LISTEN");
        env_opt!(mqtt_ca, "AEREKOS_MQTT_CA");
        env_opt!(metrics_token, "AEREKOS_METRICS_TOKEN");
        env_str!(secret_grace, "AEREKOS_SECRET_GRACE");
        env_str!(alert_interval, "AEREKOS_ALERT_INTERVAL");
        env_opt!(release_key, "AEREKOS_RELEASE_KEY");
        env_opt!(nats_account_seed, "AEREKOS_NATS_ACCOUNT_SEED");
        if let Some(v) = get("AEREKOS_NATS_LOGIN_TTL") {
            c.nats_login_ttl = v.to_string();
        }
        if let Some(v) = get("AEREKOS_MAX_ARTIFACT_BYTES") {
            c.max_artifact_bytes = v.trim().parse().map_err(|_| ConfigError::Invalid {
                name: "AEREKOS_MAX_ARTIFACT_BYTES".into(),
                message: format!("not a number: {v:?}"),
            })?;
        }
        let f = flags.clone();
        if let Some(v) = f.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = f.store {
            c.store = Some(v);
        }
        if let Some(v) = f.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = f.advertise_url {
            c.advertise_url = Some(v);
        }
        if let Some(v) = f.mqtt_listen {
            c.mqtt_listen = v;
        }
        if let Some(v) = f.mqtt_url {
            c.mqtt_url = Some(v);
        }
        if let Some(v) = f.mqtt_public_url {
            c.mqtt_public_url = Some(v);
        }
        if let Some(v) = f.raw_retention {
            c.raw_retention = v;
        }
        if let Some(v) = f.bus_stepdown {
            c.bus_stepdown = v;
        }
        if let Some(v) = f.minute_retention {
            c.minute_retention = v;
        }
        if let Some(v) = f.default_interval_ms {
            c.default_interval_ms = v;
        }
        if f.no_tls {
            c.tls = false;
        }
        if f.insecure_plain {
            c.insecure_plain = true;
        }
        if f.mqtt_dynsec {
            c.mqtt_dynsec = true;
        }
        if let Some(v) = f.tls_cert {
            c.tls_cert = Some(v);
        }
        if let Some(v) = f.tls_key {
            c.tls_key = Some(v);
        }
        c.tls_san.extend(f.tls_san);
        if let Some(v) = f.mqtts_listen {
            c.mqtts_listen = v;
        }
        if let Some(v) = f.mqtt_ca {
            c.mqtt_ca = Some(v);
        }
        if let Some(v) = f.metrics_token {
            c.metrics_token = Some(v);
        }
        if let Some(v) = f.release_key {
            c.release_key = Some(v);
        }
        if let Some(v) = f.nats_account_seed {
            c.nats_account_seed = Some(v);
        }
        if let Some(v) = f.nats_login_ttl {
            c.nats_login_ttl = v;
        }
        if f.homeassistant_discovery {
            c.homeassistant_discovery = true;
        }
        if let Some(v) = f.homeassistant_prefix {
            c.homeassistant_prefix = v;
        }
        if let Some(k) = &mut c.release_key {
            *k = k.trim().to_ascii_lowercase();
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks values that would otherwise fail late.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name: &str, message: String| ConfigError::Invalid {
            name: name.into(),
            message,
        };
        self.http_listen
            .parse::<SocketAddr>()
            .map_err(|e| bad("http_listen", e.to_string()))?;
        if self.mqtt_url.is_none() {
            self.mqtt_listen
                .parse::<SocketAddr>()
                .map_err(|e| bad("mqtt_listen", e.to_string()))?;
        }
        if let Some(u) = &self.advertise_url {
            check_advertise_url(u).map_err(|m| bad("advertise_url", format!("{u:?}: {m}")))?;
        }
        if let Some(u) = &self.mqtt_url {
            BrokerUrl::parse_list(u)?;
        }
        if self.mqtt_url.is_none() && self.tls {
            self.mqtts_listen
                .parse::<SocketAddr>()
                .map_err(|e| bad("mqtts_listen", e.to_string()))?;
        }
        if self.mqtt_dynsec && self.mqtt_url.is_none() {
            return Err(bad(
                "mqtt_dynsec",
                "needs an external broker (mqtt_url); the embedded one enforces the same rules itself"
                    .into(),
            ));
        }
        if parse_duration_ms(&self.nats_login_ttl).is_none_or(|ms| ms < 10_000) {
            return Err(bad(
                "nats_login_ttl",
                format!("{:?}: a duration of at least 10s", self.nats_login_ttl),
            ));
        }
        if self.nats_account_seed.is_some() && (self.mqtt_url.is_none() || self.mqtt_dynsec) {
            return Err(bad(
                "nats_account_seed",
                "needs an external NATS broker (mqtt_url) and no mqtt_dynsec".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(bad(
                "tls_cert",
                "tls_cert and tls_key must be given together".into(),
            ));
        }
        for name in &self.tls_san {
            if name.parse::<std::net::IpAddr>().is_err()
                && (name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b)))
            {
                return Err(bad(
                    "tls_san",
                    format!("not a DNS name or IP address: {name:?}"),
                ));
            }
        }
        if self.metrics_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(bad(
                "metrics_token",
                "at least 16 characters (it guards hostnames and addresses)".into(),
            ));
        }
        if let Some(u) = &self.mqtt_public_url {
            let urls =
                BrokerUrl::parse_list(u).map_err(|e| bad("mqtt_public_url", e.to_string()))?;
            if urls.iter().any(|u| u.username.is_some()) {
                return Err(bad(
                    "mqtt_public_url",
                    "no login in it: workers get theirs at enrolment".into(),
                ));
            }
        }
        for (name, v) in [
            ("raw_retention", &self.raw_retention),
            ("bus_stepdown", &self.bus_stepdown),
            ("minute_retention", &self.minute_retention),
            ("secret_grace", &self.secret_grace),
            ("alert_interval", &self.alert_interval),
        ] {
            if parse_duration_ms(v).is_none() {
                return Err(bad(name, format!("not a duration: {v:?}")));
            }
        }
        if let Some(k) = &self.release_key {
            protocol::release::parse_public_key(k)
                .map_err(|e| bad("release_key", e.to_string()))?;
        }
        let p = self.homeassistant_prefix.trim().trim_end_matches('/');
        if p.is_empty()
            || p.contains(['+', '#', '\0'])
            || p.starts_with('$')
            || p.split('/').any(str::is_empty)
            || p == "aerekos"
            || p.starts_with("aerekos/")
        {
            return Err(bad(
                "homeassistant_prefix",
                format!("{p:?}: not a plain topic prefix (no wildcard, no empty level, outside aerekos/)"),
            ));
        }
        if self.default_interval_ms < 100 {
            return Err(bad("default_interval_ms", "must be ≥ 100".into()));
        }
        Ok(())
    }

    /// The URL other conductors reach this one's API by: `advertise_url`,
    /// else `https://` (`http://` without TLS), the HTTP listen address's
    /// IP when it is a specific one, else this machine's hostname (in
    /// Docker the container's short id, a network alias there), and the
    /// listen port (0 until bound: the caller puts the bound one in).
    pub fn advertise_url(&self) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim().trim_end_matches('/').to_string();
        }
        let scheme = if self.tls { "https" } else { "http" };
        let listen = self.http_listen.parse::<SocketAddr>().ok();
        let port = listen.map_or(0, |a| a.port());
        let host = match listen.map(|a| a.ip()) {
            Some(std::net::IpAddr::V4(ip)) if !ip.is_unspecified() => ip.to_string(),
            Some(std::net::IpAddr::V6(ip)) if !ip.is_unspecified() => format!("[{ip}]"),
            _ => crate::net::hostname().unwrap_or_else(|| "localhost".into()),
        };
        format!("{scheme}://{host}:{port}")
    }

    /// [`Config::advertise_url`] with `bound_port` in place of a listen
    /// port 0.
    pub fn advertise_url_at(&self, bound_port: u16) -> String {
        let url = self.advertise_url();
        match url.strip_suffix(":0") {
            Some(base) if self.advertise_port_unknown() => format!("{base}:{bound_port}"),
            _ => url,
        }
    }

    /// Whether [`Config::advertise_url`] is the default with a listen port
    /// 0, to be completed with the bound port.
    pub fn advertise_port_unknown(&self) -> bool {
        self.advertise_url.is_none()
            && self
                .http_listen
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.port() == 0)
    }

    /// [`Config::bus_stepdown`] in ms (validated in [`Config::validate`]).
    pub fn bus_stepdown_ms(&self) -> u64 {
        parse_duration_ms(&self.bus_stepdown).unwrap_or(20_000)
    }

    /// Raw sample retention in ms (validated in [`Config::validate`]).
    pub fn raw_retention_ms(&self) -> u64 {
        parse_duration_ms(&self.raw_retention).unwrap_or(86_400_000)
    }

    /// The previous secret's grace after a rotation, ms.
    pub fn secret_grace_ms(&self) -> u64 {
        parse_duration_ms(&self.secret_grace).unwrap_or(SECRET_GRACE_MS)
    }

    /// How long a worker's NATS login is valid, ms.
    pub fn nats_login_ttl_ms(&self) -> u64 {
        parse_duration_ms(&self.nats_login_ttl).unwrap_or(24 * 3_600_000)
    }

    /// How often the alert rules are evaluated, ms.
    pub fn alert_interval_ms(&self) -> u64 {
        parse_duration_ms(&self.alert_interval).unwrap_or(5_000)
    }

    /// The release public key's bytes (validated in [`Config::validate`]).
    pub fn release_key_bytes(&self) -> Option<[u8; 32]> {
        self.release_key
            .as_deref()
            .and_then(|k| protocol::release::parse_public_key(k).ok())
    }

    /// Minute rollup retention in ms.
    pub fn minute_retention_ms(&self) -> u64 {
        parse_duration_ms(&self.minute_retention).unwrap_or(7 * 86_400_000)
    }

    /// The effective config as TOML, with secrets replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        let mut c = self.clone();
        if let Some(u) = &c.mqtt_url {
            c.mqtt_url = Some(redact_url(u));
        }
        if let Some(u) = &c.store {
            c.store = Some(redact_url(u));
        }
        if c.worker_mqtt_password.is_some() {
            c.worker_mqtt_password = Some("<redacted>".into());
        }
        if c.metrics_token.is_some() {
            c.metrics_token = Some("<redacted>".into());
        }
        c.admin_password = None;
        Ok(toml::to_string(&c)?)
    }
}

/// Why `u` is not a usable `--advertise-url`: an `http://` or `https://`
/// URL with a host, no login, no path (beyond `/`), no query.
fn check_advertise_url(u: &str) -> Result<(), String> {
    let u = u.trim();
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or("not an http:// or https:// URL")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains(['/', '?', '#']) {
        return Err("no path, query or fragment: the conductor's own paths are appended".into());
    }
    if authority.contains('@') {
        return Err("no login in it".into());
    }
    if authority.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err("a space or control character in it".into());
    }
    let uri: ureq::http::Uri = u.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    // What follows the host: nothing, or `:<port>`.
    let after_host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    match after_host.strip_prefix(':') {
        Some(p) if p.parse::<u16>().is_err() => return Err(format!("not a port number: {p:?}")),
        None if !after_host.is_empty() => return Err(format!("{after_host:?} after the host")),
        _ => {}
    }
    Ok(())
}

/// Replaces the password in `scheme://user:pass@host` with `<redacted>`,
/// in every URL of a comma-separated list (`mqtt_url`'s cluster form).
pub fn redact_url(u: &str) -> String {
    // Each URL starts at an element with a scheme; elements without one
    // (bare `host:port`, or the tail of a login with a comma in it)
    // belong to the URL before them.
    let mut urls: Vec<String> = Vec::new();
    for part in u.split(',') {
        match urls.last_mut() {
            Some(last) if !part.contains("://") => {
                last.push(',');
                last.push_str(part);
            }
            _ => urls.push(part.to_string()),
        }
    }
    let redact_one = |u: &str| {
        if let Some((scheme, rest)) = u.split_once("://") {
            if let Some((creds, host)) = rest.rsplit_once('@') {
                let user = creds.split_once(':').map_or(creds, |(u, _)| u);
                return format!("{scheme}://{user}:<redacted>@{host}");
            }
        }
        u.to_string()
    };
    urls.iter()
        .map(|u| redact_one(u))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_defaults_file_env_flags() {
        let file = r#"
            data_dir = "/from/file"
            http_listen = "127.0.0.1:4000"
            mqtt_listen = "127.0.0.1:1999"
            raw_retention = "2h"
        "#;
        let mut env = HashMap::new();
        env.insert(
            "AEREKOS_HTTP_LISTEN".to_string(),
            "127.0.0.1:5000".to_string(),
        );
        env.insert("AEREKOS_RAW_RETENTION".to_string(), "3h".to_string());
        env.insert(
            "AEREKOS_DEFAULT_INTERVAL_MS".to_string(),
            "2000".to_string(),
        );
        let flags = Overrides {
            raw_retention: Some("4h".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(Some(file), &env, &flags).unwrap();
        assert_eq!(c.data_dir, "/from/file"); // file over default
        assert_eq!(c.mqtt_listen, "127.0.0.1:1999");
        assert_eq!(c.http_listen, "127.0.0.1:5000"); // env over file
        assert_eq!(c.default_interval_ms, 2000); // env over default
        assert_eq!(c.raw_retention, "4h"); // flag over env over file
        assert_eq!(c.minute_retention, "7d"); // default
        assert_eq!(c.raw_retention_ms(), 4 * 3_600_000);

        let d = Config::resolve(None, &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(d, Config::default());
    }

    #[test]
    fn broker_lists() {
        let nodes = |u: &str| {
            BrokerUrl::parse_list(u).map(|v| {
                v.iter()
                    .map(|n| format!("{n:?} {:?}:{:?}", n.username, n.password))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            nodes("mqtt://c:pw@a:1,b:2, mqtt://d:other@e:3").unwrap(),
            [
                r#"mqtt://a:1 Some("c"):Some("pw")"#,
                r#"mqtt://b:2 Some("c"):Some("pw")"#,
                r#"mqtt://e:3 Some("d"):Some("other")"#,
            ]
        );
        assert_eq!(
            nodes("mqtts://a,b").unwrap(),
            ["mqtts://a:8883 None:None", "mqtts://b:8883 None:None"]
        );
        assert!(nodes("mqtt://a,mqtts://b").is_err(), "mixed TLS");
        assert!(nodes("mqtt://a,").is_err(), "an empty element");
        // A comma in a password is not a list.
        assert_eq!(
            nodes("mqtt://u:pa,ss@h:9").unwrap(),
            [r#"mqtt://h:9 Some("u"):Some("pa,ss")"#]
        );
    }

    #[test]
    fn rejects_bad_values_and_redacts() {
        let mut env = HashMap::new();
        env.insert("AEREKOS_DEFAULT_INTERVAL_MS".to_string(), "x".to_string());
        assert!(Config::resolve(None, &env, &Overrides::default()).is_err());
        assert!(
            Config::resolve(Some("bogus = 1"), &HashMap::new(), &Overrides::default()).is_err()
        );

        let c = Config {
            mqtt_url: Some("mqtt://conductor:s3cret@broker:1884".into()),
            worker_mqtt_password: Some("w0rker".into()),
            admin_password: Some("adm1n".into()),
            ..Config::default()
        };
        let t = c.to_redacted_toml().unwrap();
        assert!(
            !t.contains("s3cret") && !t.contains("w0rker") && !t.contains("adm1n"),
            "{t}"
        );
        let c = Config {
            metrics_token: Some("m3trics-t0ken-long-enough".into()),
            ..Config::default()
        };
        assert!(!c.to_redacted_toml().unwrap().contains("m3trics"));
        let u = BrokerUrl::parse("mqtts://broker").unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        assert_eq!(format!("{u:?}"), "mqtts://broker:8883");
        let u = BrokerUrl::parse("mqtt://conductor:s3cret@broker:1884").unwrap();
        assert!(!u.tls);
        assert_eq!((u.host.as_str(), u.port), ("broker", 1884));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(
            redact_url("mqtt://c:s3cret@a:1,b:2"),
            "mqtt://c:<redacted>@a:1,b:2"
        );
        assert_eq!(
            redact_url("mqtt://c:s3cret@a:1,mqtt://d:0ther@b:2,mqtt://e:3"),
            "mqtt://c:<redacted>@a:1,mqtt://d:<redacted>@b:2,mqtt://e:3"
        );
        assert_eq!(
            redact_url("postgres://u:p@h/db"),
            "postgres://u:<redacted>@h/db"
        );
        assert_eq!(redact_url("mqtt://h:1"), "mqtt://h:1");
        assert_eq!(parse_duration_ms("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_duration_ms("nope"), None);
    }

    #[test]
    fn the_release_key_is_64_hex_digits_from_file_env_or_flag() {
        let key = "AB".repeat(32);
        let c = Config::resolve(
            Some(&format!("release_key = \"{key}\"")),
            &HashMap::new(),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.release_key.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(c.release_key_bytes(), Some([0xab; 32]));
        let mut env = HashMap::new();
        env.insert("AEREKOS_RELEASE_KEY".to_string(), "cd".repeat(32));
        let flags = Overrides {
            release_key: Some("ef".repeat(32)),
            ..Overrides::default()
        };
        assert_eq!(
            Config::resolve(None, &env, &Overrides::default())
                .unwrap()
                .release_key_bytes(),
            Some([0xcd; 32])
        );
        assert_eq!(
            Config::resolve(None, &env, &flags)
                .unwrap()
                .release_key_bytes(),
            Some([0xef; 32])
        );
        env.insert("AEREKOS_RELEASE_KEY".to_string(), "abc".into());
        let e = Config::resolve(None, &env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("release_key") && e.contains("64 hex"), "{e}");
        assert_eq!(Config::default().release_key_bytes(), None);
    }

    #[test]
    fn the_nats_account_seed_comes_from_env_or_flag_and_needs_an_external_broker() {
        let mut env = HashMap::new();
        env.insert("AEREKOS_NATS_ACCOUNT_SEED".to_string(), "/s/env.nk".into());
        env.insert(
            "AEREKOS_MQTT_URL".to_string(),
            "mqtt://n1:1883,n2:1883".into(),
        );
        let c = Config::resolve(None, &env, &Overrides::default()).unwrap();
        assert_eq!(c.nats_account_seed.as_deref(), Some("/s/env.nk"));
        let flags = Overrides {
            nats_account_seed: Some("/s/flag.nk".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(None, &env, &flags).unwrap();
        assert_eq!(c.nats_account_seed.as_deref(), Some("/s/flag.nk"));
        assert_eq!(c.nats_login_ttl_ms(), 24 * 3_600_000);
        env.insert("AEREKOS_NATS_LOGIN_TTL".to_string(), "90s".into());
        let c = Config::resolve(None, &env, &Overrides::default()).unwrap();
        assert_eq!(c.nats_login_ttl_ms(), 90_000);
        env.insert("AEREKOS_NATS_LOGIN_TTL".to_string(), "5s".into());
        let e = Config::resolve(None, &env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats_login_ttl"), "{e}");
        env.remove("AEREKOS_NATS_LOGIN_TTL");
        env.remove("AEREKOS_MQTT_URL");
        let e = Config::resolve(None, &env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats_account_seed"), "{e}");
    }

    #[test]
    fn the_advertise_url_defaults_from_tls_and_the_listen_address_and_is_checked() {
        let c = |listen: &str, tls: bool| Config {
            http_listen: listen.into(),
            tls,
            ..Config::default()
        };
        assert_eq!(
            c("10.0.0.5:3000", true).advertise_url(),
            "https://10.0.0.5:3000"
        );
        assert_eq!(
            c("[fd00::5]:3000", false).advertise_url(),
            "http://[fd00::5]:3000"
        );
        let host = crate::net::hostname().unwrap_or_else(|| "localhost".into());
        assert_eq!(
            c("0.0.0.0:3000", true).advertise_url(),
            format!("https://{host}:3000")
        );
        let zero = c("127.0.0.1:0", true);
        assert!(zero.advertise_port_unknown());
        assert_eq!(zero.advertise_url_at(4321), "https://127.0.0.1:4321");
        let env = HashMap::from([(
            "AEREKOS_ADVERTISE_URL".to_string(),
            "https://conductor-a.lan:3000/".to_string(),
        )]);
        let given = Config::resolve(None, &env, &Overrides::default()).unwrap();
        assert_eq!(given.advertise_url_at(4321), "https://conductor-a.lan:3000");
        assert!(!given.advertise_port_unknown());
        let flag = Overrides {
            advertise_url: Some("http://b:3001".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::resolve(None, &env, &flag).unwrap().advertise_url(),
            "http://b:3001",
            "a flag over the environment"
        );
        for bad in [
            "conductor-a:3000",
            "ftp://a:3000",
            "https://",
            "https://a:3000/api",
            "https://a:3000?x=1",
            "https://user:pw@a:3000",
            "https://a:port",
            "https://a:",
        ] {
            let flags = Overrides {
                advertise_url: Some(bad.into()),
                ..Overrides::default()
            };
            let e = Config::resolve(None, &HashMap::new(), &flags)
                .expect_err(bad)
                .to_string();
            assert!(e.starts_with("advertise_url:"), "{bad}: {e}");
        }
    }
}
