//! TLS for the API and dashboard (HTTPS on the HTTP port) and the embedded
//! broker (MQTT over TLS): the fleet CA the conductor makes itself, or the
//! operator's own certificate.
//!
//! **Fleet CA** (the default): at first start the conductor creates, under
//! `<data_dir>/tls/`, a CA (`ca.pem`, mode 0644; `ca.key`, 0600; ECDSA P-256,
//! [`CA_VALIDITY_DAYS`]) and a server certificate it signs (`server.pem` =
//! leaf + CA, `server.key` 0600, [`SERVER_VALIDITY_DAYS`]) naming the host:
//! its hostname, `<hostname>.local`, `localhost`, the loopback addresses,
//! the listen addresses (every local interface address when listening on
//! `0.0.0.0`/`::`) and each `--tls-san`. The CA's SHA-256 fingerprint goes
//! into the registration token ([`protocol::registration`]): a worker pins
//! it, so nothing has to be copied to a Pi.
//!
//! **Renewal without restarts**: [`Tls::refresh`] (run every
//! [`REFRESH_EVERY`]) issues a new server certificate from the same CA when
//! the current one has less than [`RENEW_BEFORE_DAYS`] left or the host's
//! names changed (a new DHCP address), and swaps it in for new handshakes;
//! established sessions are not touched and workers need nothing (they
//! trust the CA, not the leaf). The CA itself is never rotated automatically:
//! replacing it means new tokens (workers keep the CA they stored).
//!
//! **Operator certificate** (`--tls-cert`, `--tls-key`): a PEM chain and key
//! read at start and re-read by [`Tls::refresh`] when either file's
//! modification time changes (certbot renewals). The fingerprint a token
//! carries is then the one of the last certificate in that chain.
//!
//! **Read-only** ([`Tls::load_existing`]): a standby on a shared store
//! that shares the data directory with the active conductor must never
//! create TLS material (two conductors making a CA at once would split the
//! fleet). It loads the server chain and key the active one made (or the
//! operator's pair), creates nothing, and re-reads the files when they
//! change ([`Tls::refresh`]); until they exist it has none.
//!
//! Limits: keys are ECDSA P-256 (fleet) or whatever rustls's `ring` provider
//! loads (operator: RSA, ECDSA, Ed25519); files are written atomically
//! (temp, fsync, rename); a damaged `ca.pem`/`ca.key` stops the start with
//! the path in the error instead of silently making a new CA (every enrolled
//! worker would lose trust in the conductor).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use protocol::Fingerprint;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Directory under the data dir.
pub const TLS_DIR: &str = "tls";
/// The fleet CA certificate (public).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The fleet CA key (0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The server chain: leaf, then the CA.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server key (0600).
pub const SERVER_KEY_FILE: &str = "server.key";
/// Lifetime of the fleet CA.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Lifetime of a server certificate the fleet CA issues.
pub const SERVER_VALIDITY_DAYS: i64 = 90;
/// A server certificate with less than this left is renewed.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// How often [`Tls::refresh`] runs.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3600);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the key or the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// Only one of `--tls-cert` and `--tls-key` was given.
    #[error("--tls-cert and --tls-key must be given together")]
    HalfOperatorPair,
}

/// What [`Tls::load_or_create`] needs to know.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// Operator chain (PEM) instead of the fleet CA.
    pub cert: Option<PathBuf>,
    /// Operator key (PEM).
    pub key: Option<PathBuf>,
    /// Extra names (DNS names or IP addresses) for the fleet server certificate.
    pub extra_names: Vec<String>,
    /// The addresses the conductor listens on (HTTP, MQTT over TLS).
    pub listen: Vec<IpAddr>,
}

/// The TLS material in use: a cheap handle, shared by the HTTP server, the
/// broker and the API (fingerprint, CA PEM).
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.current();
        f.debug_struct("Tls")
            .field("ca_fingerprint", &c.ca_fingerprint)
            .field("names", &c.names)
            .field("not_after", &c.not_after)
            .finish_non_exhaustive()
    }
}

struct Inner {
    source: Source,
    settings: TlsSettings,
    /// What every new handshake is given. Replaced whole by `refresh`
    /// (one short write lock; readers clone the `Arc`): a handshake never
    /// sees a leaf from one generation with a key from another.
    current: RwLock<Arc<Current>>,
}

enum Source {
    /// Our own CA, able to issue server certificates.
    Fleet {
        dir: PathBuf,
        ca_key_pem: String,
        ca_pem: String,
    },
    /// The operator's files, re-read when they change.
    Operator { cert: PathBuf, key: PathBuf },
    /// Another conductor's fleet server chain and key, loaded read-only:
    /// re-read when they change, never written.
    ReadOnly { cert: PathBuf, key: PathBuf },
}

/// One generation of the server certificate.
#[derive(Debug)]
pub struct Current {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// The last certificate of the chain (the fleet CA), DER.
    pub ca_der: CertificateDer<'static>,
    /// SHA-256 of `ca_der`: what a registration token pins.
    pub ca_fingerprint: Fingerprint,
    /// The names the leaf is valid for (fleet) or empty (operator: not parsed).
    pub names: Vec<String>,
    /// End of the leaf's validity, seconds since the epoch.
    pub not_after: i64,
    /// Operator files' modification times when loaded.
    modified: Option<(SystemTime, SystemTime)>,
}

impl Tls {
    /// Loads the fleet CA from `<data_dir>/tls/` (creating it and a server
    /// certificate on first start), or the operator's pair.
    pub fn load_or_create(data_dir: &Path, settings: TlsSettings) -> Result<Tls, TlsError> {
        let (source, current) = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                let current = load_operator(cert, key)?;
                (
                    Source::Operator {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    current,
                )
            }
            (None, None) => {
                let dir = data_dir.join(TLS_DIR);
                std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
                let (ca_pem, ca_key_pem) = load_or_create_ca(&dir)?;
                let names = host_names(&settings);
                let current = match load_fleet_server(&dir, &ca_pem, &names)? {
                    Some(c) => c,
                    None => issue_server(&dir, &ca_pem, &ca_key_pem, &names)?,
                };
                (
                    Source::Fleet {
                        dir,
                        ca_key_pem,
                        ca_pem,
                    },
                    current,
                )
            }
            _ => return Err(TlsError::HalfOperatorPair),
        };
        Ok(Tls {
            inner: Arc::new(Inner {
                source,
                settings,
                current: RwLock::new(Arc::new(current)),
            }),
        })
    }

    /// Loads the TLS material that exists, creating nothing: the
    /// operator's pair, or the fleet server chain (`server.pem`, whose
    /// last certificate is the fleet CA) and key under `<data_dir>/tls/`.
    /// `Ok(None)` while the fleet files are not there yet (no conductor
    /// has created them). An error for files that are there but unusable
    /// (also a chain and a key from two generations, read mid-renewal).
    pub fn load_existing(data_dir: &Path, settings: TlsSettings) -> Result<Option<Tls>, TlsError> {
        let (source, current) = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => (
                Source::Operator {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                load_operator(cert, key)?,
            ),
            (None, None) => {
                let dir = data_dir.join(TLS_DIR);
                let (cert, key) = (dir.join(SERVER_CERT_FILE), dir.join(SERVER_KEY_FILE));
                if !cert.exists() || !key.exists() || !dir.join(CA_CERT_FILE).exists() {
                    return Ok(None);
                }
                let current = load_operator(&cert, &key)?;
                (Source::ReadOnly { cert, key }, current)
            }
            _ => return Err(TlsError::HalfOperatorPair),
        };
        Ok(Some(Tls {
            inner: Arc::new(Inner {
                source,
                settings,
                current: RwLock::new(Arc::new(current)),
            }),
        }))
    }

    /// The generation in use.
    pub fn current(&self) -> Arc<Current> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CA fingerprint a registration token carries.
    pub fn ca_fingerprint(&self) -> Fingerprint {
        self.current().ca_fingerprint
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        match &self.inner.source {
            Source::Fleet { ca_pem, .. } => ca_pem.clone(),
            Source::Operator { .. } | Source::ReadOnly { .. } => to_pem(&self.current().ca_der),
        }
    }

    /// Whether the certificate is the conductor's own (fleet CA).
    pub fn is_fleet_ca(&self) -> bool {
        matches!(
            self.inner.source,
            Source::Fleet { .. } | Source::ReadOnly { .. }
        )
    }

    /// A rustls server configuration whose certificate follows renewals.
    /// `alpn`: the protocols to offer (`http/1.1` for the API; none for MQTT).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.inner.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// Renews the fleet server certificate when it is due or the host's
    /// names changed; re-reads operator files that changed. Returns what
    /// was done, for the log (`None`: nothing).
    pub fn refresh(&self) -> Result<Option<String>, TlsError> {
        self.refresh_at(now_s())
    }

    fn refresh_at(&self, now: i64) -> Result<Option<String>, TlsError> {
        let old = self.current();
        let (next, why) = match &self.inner.source {
            Source::Fleet {
                dir,
                ca_key_pem,
                ca_pem,
            } => {
                let names = host_names(&self.inner.settings);
                let due = old.not_after - now < RENEW_BEFORE_DAYS * 86_400;
                if !due && names == old.names {
                    return Ok(None);
                }
                let why = if due {
                    format!(
                        "server certificate renewed (it expired at {})",
                        old.not_after
                    )
                } else {
                    format!("server certificate re-issued for the names {names:?}")
                };
                (issue_server(dir, ca_pem, ca_key_pem, &names)?, why)
            }
            Source::Operator { cert, key } | Source::ReadOnly { cert, key } => {
                let modified = (mtime(cert)?, mtime(key)?);
                if old.modified == Some(modified) {
                    return Ok(None);
                }
                (
                    load_operator(cert, key)?,
                    format!("reloaded {} and {}", cert.display(), key.display()),
                )
            }
        };
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(Some(why))
    }
}

/// The crypto provider everywhere in aerekos: `ring`.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trust roots: the certificates of `pem` (one or more), or the system's
/// when `None`. An error when there are none.
pub fn root_store(pem: Option<&str>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
                roots.add(cert).map_err(|e| e.to_string())?;
            }
            if roots.is_empty() {
                return Err("no certificate in the file".into());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found".into());
            }
        }
    }
    Ok(roots)
}

#[derive(Debug)]
struct Resolver(Arc<Inner>);

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Inner")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .key
                .clone(),
        )
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn mtime(path: &Path) -> Result<SystemTime, TlsError> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(io_at(path))
}

fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Writes `contents` to `path` atomically with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(io_at(path))
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io_at(path))
}

fn load_or_create_ca(dir: &Path) -> Result<(String, String), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let ca_pem = read_text(&cert_path)?;
            let key_pem = read_text(&key_path)?;
            // Both must parse and belong together: checked here, not at the
            // first renewal months later.
            let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
                path: key_path.clone(),
                what: format!("not a usable CA key: {e}"),
            })?;
            Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
            Ok((ca_pem, key_pem))
        }
        (false, false) => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            let mut id = [0u8; 4];
            getrandom::fill(&mut id).map_err(|e| TlsError::Io {
                path: key_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(
                DnType::CommonName,
                format!("aerekos fleet CA {}", protocol::hex_string(&id)),
            );
            params
                .distinguished_name
                .push(DnType::OrganizationName, "aerekos");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
            let cert = params.self_signed(&key)?;
            let key_pem = key.serialize_pem();
            // Key first: a crash between the two leaves a key without a
            // certificate, which the next start reports instead of using.
            write_file(&key_path, key_pem.as_bytes(), 0o600)?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "created the fleet CA");
            Ok((cert.pem(), key_pem))
        }
        (true, false) | (false, true) => Err(TlsError::Pem {
            path: dir.to_path_buf(),
            what: format!(
                "only one of {CA_CERT_FILE} and {CA_KEY_FILE} is there: restore the other \
                 (workers trust this CA) or move both away to make a new CA (every worker \
                 must then enrol again)"
            ),
        }),
    }
}

/// The names the fleet server certificate must carry, sorted and unique.
fn host_names(settings: &TlsSettings) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && rcgen::string::Ia5String::try_from(h).is_ok() {
            names.push(h.to_string());
            if !h.contains('.') {
                names.push(format!("{h}.local"));
            }
        }
    }
    let wildcard = settings.listen.iter().any(IpAddr::is_unspecified);
    for ip in &settings.listen {
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
    }
    if wildcard {
        if let Ok(addrs) = if_addrs::get_if_addrs() {
            for a in addrs {
                let ip = a.ip();
                // Link-local IPv6 needs a zone; no client names the host by it.
                if let IpAddr::V6(v6) = ip {
                    if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                        continue;
                    }
                }
                names.push(ip.to_string());
            }
        }
    }
    names.extend(settings.extra_names.iter().map(|n| n.trim().to_string()));
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

fn san_of(name: &str) -> Result<SanType, rcgen::Error> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

fn issue_server(
    dir: &Path,
    ca_pem: &str,
    ca_key_pem: &str,
    names: &[String],
) -> Result<Current, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "aerekos conductor");
    params.subject_alt_names = names
        .iter()
        .map(|n| san_of(n))
        .collect::<Result<Vec<_>, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(SERVER_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    let chain = format!("{}{ca_pem}", cert.pem());
    write_file(
        &dir.join(SERVER_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&dir.join(SERVER_CERT_FILE), chain.as_bytes(), 0o644)?;
    let current = certified(
        &dir.join(SERVER_CERT_FILE),
        chain.as_bytes(),
        key.serialize_pem().as_bytes(),
        &dir.join(SERVER_KEY_FILE),
    )?;
    tracing::info!(names = ?names, not_after = current.not_after, "issued the server certificate");
    Ok(current)
}

/// The stored fleet server certificate, if it is usable as it is: signed
/// by this CA, not due for renewal, for exactly `names`.
fn load_fleet_server(
    dir: &Path,
    ca_pem: &str,
    names: &[String],
) -> Result<Option<Current>, TlsError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let (Ok(chain), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) else {
        return Ok(None);
    };
    let Ok(current) = certified(&cert_path, &chain, &key, &key_path) else {
        tracing::warn!(path = %cert_path.display(), "unusable server certificate: issuing a new one");
        return Ok(None);
    };
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: dir.join(CA_CERT_FILE),
        what: e.to_string(),
    })?;
    let fresh = current.not_after - now_s() >= RENEW_BEFORE_DAYS * 86_400;
    Ok((current.ca_der == ca_der && fresh && current.names == names).then_some(current))
}

fn load_operator(cert: &Path, key: &Path) -> Result<Current, TlsError> {
    let chain = std::fs::read(cert).map_err(io_at(cert))?;
    let key_pem = std::fs::read(key).map_err(io_at(key))?;
    let mut current = certified(cert, &chain, &key_pem, key)?;
    current.modified = Some((mtime(cert)?, mtime(key)?));
    Ok(current)
}

/// Parses a PEM chain and key into what rustls serves.
fn certified(
    cert_path: &Path,
    chain_pem: &[u8],
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Current, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: e.to_string(),
        })?;
    let (Some(leaf), Some(last)) = (chain.first(), chain.last()) else {
        return Err(TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: "no certificate in the file".into(),
        });
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: format!("unreadable certificate: {e}"),
        })?;
    let not_after = parsed.validity().not_after.timestamp();
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        names.push(IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        names.push(IpAddr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    names.sort();
    names.dedup();
    let ca_der = last.clone();
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_path_buf(),
        what: format!("no private key: {e}"),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Pem {
            path: key_path.to_path_buf(),
            what: format!("unusable private key: {e}"),
        })?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| TlsError::Pem {
        path: key_path.to_path_buf(),
        what: format!("the key does not belong to {}: {e}", cert_path.display()),
    })?;
    Ok(Current {
        key: Arc::new(key),
        ca_fingerprint: Fingerprint::of_der(ca_der.as_ref()),
        ca_der,
        names,
        not_after,
        modified: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn settings() -> TlsSettings {
        TlsSettings {
            extra_names: vec!["conductor.example".into(), "10.1.2.3".into()],
            listen: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn first_start_makes_a_ca_and_a_server_certificate_later_starts_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::load_or_create(dir.path(), settings()).unwrap();
        let tdir = dir.path().join(TLS_DIR);
        let mode = |f: &str| {
            std::fs::metadata(tdir.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(SERVER_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        let c = tls.current();
        for n in ["conductor.example", "10.1.2.3", "localhost", "127.0.0.1"] {
            assert!(c.names.contains(&n.to_string()), "{n} in {:?}", c.names);
        }
        let ca_der = CertificateDer::from_pem_slice(
            std::fs::read(tdir.join(CA_CERT_FILE)).unwrap().as_slice(),
        )
        .unwrap();
        assert_eq!(c.ca_fingerprint, Fingerprint::of_der(&ca_der));
        assert_eq!(c.key.cert.len(), 2, "leaf + CA");
        let days_left = (c.not_after - now_s()) / 86_400;
        assert!((SERVER_VALIDITY_DAYS - 1..=SERVER_VALIDITY_DAYS).contains(&days_left));

        // A restart reuses the CA and the server certificate as they are.
        let again = Tls::load_or_create(dir.path(), settings()).unwrap();
        assert_eq!(again.ca_fingerprint(), c.ca_fingerprint);
        assert_eq!(again.current().key.cert[0], c.key.cert[0]);
        assert_eq!(again.ca_pem(), tls.ca_pem());

        // New names: same CA, new leaf.
        let mut s = settings();
        s.extra_names.push("pi.example".into());
        let renamed = Tls::load_or_create(dir.path(), s).unwrap();
        assert_eq!(renamed.ca_fingerprint(), c.ca_fingerprint);
        assert_ne!(renamed.current().key.cert[0], c.key.cert[0]);
        assert!(renamed.current().names.contains(&"pi.example".to_string()));
    }

    #[test]
    fn a_read_only_load_creates_nothing_and_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Tls::load_existing(dir.path(), settings())
            .unwrap()
            .is_none());
        assert!(
            !dir.path().join(TLS_DIR).exists(),
            "nothing created by a read-only load"
        );
        let made = Tls::load_or_create(dir.path(), settings()).unwrap();
        let loaded = Tls::load_existing(dir.path(), settings()).unwrap().unwrap();
        assert_eq!(loaded.ca_fingerprint(), made.ca_fingerprint());
        let pem = |t: &Tls| t.ca_pem().replace('\r', "").trim().to_string();
        assert_eq!(pem(&loaded), pem(&made));
        let files = || {
            let mut f: Vec<_> = std::fs::read_dir(dir.path().join(TLS_DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            f.sort();
            f
        };
        let before = files();
        // The active one renews: the read-only copy follows, writing nothing.
        made.refresh_at(now_s() + (SERVER_VALIDITY_DAYS - 1) * 86_400)
            .unwrap()
            .unwrap();
        let bumped = SystemTime::now() + Duration::from_secs(5);
        for f in [SERVER_CERT_FILE, SERVER_KEY_FILE] {
            std::fs::File::options()
                .write(true)
                .open(dir.path().join(TLS_DIR).join(f))
                .unwrap()
                .set_modified(bumped)
                .unwrap();
        }
        assert!(loaded.refresh().unwrap().is_some());
        assert_eq!(loaded.current().not_after, made.current().not_after);
        assert_eq!(files(), before);
    }

    #[test]
    fn refresh_renews_only_when_due_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::load_or_create(dir.path(), settings()).unwrap();
        let first = tls.current();
        assert_eq!(tls.refresh().unwrap(), None, "fresh: nothing to do");
        // 61 days later the 90-day certificate has 29 left: renewed.
        let later = now_s() + 61 * 86_400;
        let why = tls.refresh_at(later).unwrap().expect("renewed");
        assert!(why.contains("renewed"), "{why}");
        let second = tls.current();
        assert_ne!(second.key.cert[0], first.key.cert[0]);
        assert_eq!(second.ca_fingerprint, first.ca_fingerprint);
        assert!(second.not_after >= first.not_after);
        // The renewed certificate is on disk for the next start.
        let restarted = Tls::load_or_create(dir.path(), settings()).unwrap();
        assert_eq!(restarted.current().key.cert[0], second.key.cert[0]);
    }

    #[test]
    fn a_half_missing_ca_stops_the_start_instead_of_making_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        Tls::load_or_create(dir.path(), settings()).unwrap();
        std::fs::remove_file(dir.path().join(TLS_DIR).join(CA_KEY_FILE)).unwrap();
        let e = Tls::load_or_create(dir.path(), settings()).unwrap_err();
        assert!(e.to_string().contains("only one of"), "{e}");
        std::fs::write(dir.path().join(TLS_DIR).join(CA_KEY_FILE), "garbage").unwrap();
        let e = Tls::load_or_create(dir.path(), settings()).unwrap_err();
        assert!(e.to_string().contains("CA key"), "{e}");
    }

    #[test]
    fn operator_certificates_are_loaded_and_reloaded_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let write_pair = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![cn.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
            Fingerprint::of_der(cert.der())
        };
        let fp1 = write_pair("one.example");
        let s = TlsSettings {
            cert: Some(dir.path().join("c.pem")),
            key: Some(dir.path().join("k.pem")),
            ..Default::default()
        };
        let tls = Tls::load_or_create(dir.path(), s.clone()).unwrap();
        assert!(!tls.is_fleet_ca());
        assert_eq!(tls.ca_fingerprint(), fp1);
        assert!(!dir.path().join(TLS_DIR).exists(), "no fleet CA made");
        assert_eq!(tls.refresh().unwrap(), None);
        std::thread::sleep(Duration::from_millis(20));
        let fp2 = write_pair("two.example");
        assert!(tls.refresh().unwrap().is_some());
        assert_eq!(tls.ca_fingerprint(), fp2);
        assert_eq!(tls.current().names, vec!["two.example".to_string()]);

        // A key that is not the certificate's.
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("k.pem"), other.serialize_pem()).unwrap();
        let e = Tls::load_or_create(dir.path(), s.clone()).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let half = TlsSettings { key: None, ..s };
        assert!(matches!(
            Tls::load_or_create(dir.path(), half),
            Err(TlsError::HalfOperatorPair)
        ));
    }
}
