//! TLS to the conductor: the fleet CA pinned by its fingerprint on first
//! contact, then trusted alone for the API and the broker.
//!
//! * **First contact** ([`pin_conductor_ca`]): the registration token carries
//!   the SHA-256 of the conductor's CA certificate
//!   ([`protocol::registration`]). The worker opens a TLS connection and
//!   accepts it only if the chain the conductor presents holds a
//!   certificate with that fingerprint **and** the leaf verifies against it
//!   for the host name it dialled. A man in the middle with any other
//!   certificate is refused before a byte of the token is sent.
//! * **From then on** ([`Trust`]): the CA is stored in the state dir
//!   ([`CA_FILE`], 0600) and is the only root for HTTPS (enrolment,
//!   manifests, artifacts) and MQTT over TLS. The conductor may renew its
//!   server certificate at will; a different CA is refused with
//!   [`explain`]'s message. An external broker's own CA, when the conductor
//!   hands one out at enrolment, is kept in [`BROKER_CA_FILE`].
//!
//! Built with the default cargo feature `tls` (rustls with the `ring`
//! provider). Without it (`--no-default-features`, the smallest agent) every
//! `https://` or `mqtts://` URL is refused with [`TlsError::NotBuilt`], and
//! plain HTTP/MQTT works only towards a conductor that accepts it (its
//! loopback, or `--insecure-plain`).
//!
//! Limits: TLS 1.3 and 1.2 (an external broker may lack 1.3); no client
//! certificates (workers authenticate with their MQTT login and frame
//! HMACs); no revocation checks (the pinned CA signs only conductors).

use std::path::Path;

use protocol::Fingerprint;

/// The pinned conductor CA in the state dir (PEM).
pub const CA_FILE: &str = "ca.pem";
/// An external broker's CA in the state dir (PEM), when it is not the conductor's.
pub const BROKER_CA_FILE: &str = "mqtt-ca.pem";

/// Why a TLS connection or its set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// This agent was built without TLS.
    #[error("{0} needs TLS, and this edge-worker was built without it (cargo feature `tls`)")]
    NotBuilt(String),
    /// First contact: no certificate in the chain has the token's fingerprint.
    #[error(
        "the conductor at {host} presented certificates {presented:?}, none with the CA fingerprint \
         {expected} from the registration token: a man in the middle, or a token from another \
         conductor. Nothing was sent."
    )]
    FingerprintMismatch {
        /// Host dialled.
        host: String,
        /// What the token pins.
        expected: Fingerprint,
        /// Fingerprints of what was presented.
        presented: Vec<String>,
    },
    /// The certificate does not verify (name, dates, signature).
    #[error("TLS to {host} failed: {message}")]
    Handshake {
        /// Host dialled.
        host: String,
        /// Explanation.
        message: String,
    },
    /// A PEM file in the state dir is unusable.
    #[error("{path}: {message}")]
    BadPem {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Network failure; worth retrying.
    #[error("cannot reach {host}: {source}")]
    Io {
        /// Host dialled.
        host: String,
        /// Why.
        source: std::io::Error,
    },
}

impl TlsError {
    /// Whether retrying later can help (network trouble, not trust).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TlsError::Io { .. })
    }
}

/// Turns a TLS error text from ureq or rumqttc into a sentence a person can
/// act on.
pub fn explain(error: &str) -> String {
    if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        format!(
            "{error}: the server's certificate is not signed by the CA this worker pinned at \
             enrolment ({CA_FILE} in its state dir) — a man in the middle, or the conductor's CA \
             was replaced (enrol again with a new token and --reenroll)"
        )
    } else if error.contains("NotValidForName") {
        format!(
            "{error}: the conductor's certificate does not name the host this worker dials; \
             start the conductor with --tls-san <that name>"
        )
    } else {
        error.to_string()
    }
}

/// Splits `https://host[:port][/…]` into host and port (443 by default).
pub fn https_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.is_empty() || hostport.contains('@') {
        return None;
    }
    if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        if h.is_empty() {
            return None;
        }
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().ok()?),
        None => (hostport.to_string(), 443),
    };
    // `https://:3000` (found by the `enrolment` fuzz target) names no host.
    (!host.is_empty()).then_some((host, port))
}

#[cfg(feature = "tls")]
pub use imp::*;

#[cfg(not(feature = "tls"))]
pub use none::*;

#[cfg(not(feature = "tls"))]
mod none {
    use super::*;

    /// Trust anchors for TLS; never built without the `tls` feature.
    #[derive(Debug, Clone)]
    pub enum Trust {}

    impl Trust {
        /// Loads the pinned CA, if any: without TLS there is nothing to load.
        pub fn load(_state_dir: &Path) -> Result<Option<Trust>, TlsError> {
            Ok(None)
        }

        /// Never called: no `Trust` exists without TLS.
        pub fn fingerprint(&self) -> Fingerprint {
            match *self {}
        }
    }

    /// A CA in an enrolment response cannot be used without TLS.
    pub fn der_of_pem(_pem: &str) -> Result<Vec<u8>, TlsError> {
        Err(TlsError::NotBuilt("an external broker's CA".into()))
    }

    /// First contact over TLS is impossible without TLS.
    pub fn pin_conductor_ca(url: &str, _fp: &Fingerprint) -> Result<Vec<u8>, TlsError> {
        Err(TlsError::NotBuilt(url.to_string()))
    }

    /// Stores nothing: there is no CA to store.
    pub fn save_ca(_state_dir: &Path, _file: &str, _der: &[u8]) -> Result<(), TlsError> {
        Err(TlsError::NotBuilt("storing a CA".into()))
    }

    /// An HTTP agent; `https://` URLs fail in ureq (no TLS provider).
    pub fn http_agent(
        _trust: Option<&Trust>,
        config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    ) -> ureq::Agent {
        config.build().into()
    }
}

#[cfg(feature = "tls")]
mod imp {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

    /// The provider everywhere in aerekos: `ring`.
    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// What this worker trusts: the conductor's CA (and an external broker's).
    #[derive(Clone)]
    pub struct Trust {
        /// The conductor CA, DER.
        conductor_ca: CertificateDer<'static>,
        /// The broker's CA when it is not the conductor's.
        broker_ca: Option<CertificateDer<'static>>,
    }

    impl std::fmt::Debug for Trust {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Trust")
                .field(
                    "conductor_ca",
                    &Fingerprint::of_der(self.conductor_ca.as_ref()),
                )
                .field(
                    "broker_ca",
                    &self
                        .broker_ca
                        .as_ref()
                        .map(|c| Fingerprint::of_der(c.as_ref())),
                )
                .finish()
        }
    }

    fn read_pem(path: &Path) -> Result<Option<CertificateDer<'static>>, TlsError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TlsError::BadPem {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        match CertificateDer::from_pem_slice(&bytes) {
            Ok(c) if !c.as_ref().is_empty() => Ok(Some(c)),
            Ok(_) => Err(TlsError::BadPem {
                path: path.display().to_string(),
                message: "an empty certificate".into(),
            }),
            Err(e) => Err(TlsError::BadPem {
                path: path.display().to_string(),
                message: format!("no certificate: {e}"),
            }),
        }
    }

    impl Trust {
        /// The CA(s) stored in `state_dir`, if a conductor CA was pinned.
        pub fn load(state_dir: &Path) -> Result<Option<Trust>, TlsError> {
            let Some(conductor_ca) = read_pem(&state_dir.join(CA_FILE))? else {
                return Ok(None);
            };
            Ok(Some(Trust {
                conductor_ca,
                broker_ca: read_pem(&state_dir.join(BROKER_CA_FILE))?,
            }))
        }

        /// The conductor CA's fingerprint.
        pub fn fingerprint(&self) -> Fingerprint {
            Fingerprint::of_der(self.conductor_ca.as_ref())
        }

        /// The rustls client configuration for MQTT over TLS.
        pub fn mqtt_client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
            let ca = self.broker_ca.as_ref().unwrap_or(&self.conductor_ca);
            client_config(ca.clone())
        }
    }

    fn client_config(ca: CertificateDer<'static>) -> Result<Arc<ClientConfig>, TlsError> {
        let bad = |e: rustls::Error| TlsError::BadPem {
            path: CA_FILE.into(),
            message: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(bad)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(bad)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Writes a CA certificate as PEM into the state dir (0600, atomic).
    pub fn save_ca(state_dir: &Path, file: &str, der: &[u8]) -> Result<(), TlsError> {
        let path = state_dir.join(file);
        let tmp = state_dir.join(format!("{file}.tmp"));
        let pem = pem_of(der);
        let r = (|| {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(state_dir)?.sync_all()
        })();
        r.map_err(|e| TlsError::BadPem {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// PEM text of a DER certificate (base64, 64 columns).
    fn pem_of(der: &[u8]) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                b64.push(if i <= chunk.len() {
                    B64[((n >> (18 - 6 * i)) & 63) as usize]
                } else {
                    b'='
                });
            }
        }
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    /// Parses the PEM an enrolment response carries (an external broker's CA).
    pub fn der_of_pem(pem: &str) -> Result<Vec<u8>, TlsError> {
        let bad = |message: String| TlsError::BadPem {
            path: "mqtt_ca_pem (enrolment response)".into(),
            message,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map(|c| c.as_ref().to_vec())
            .map_err(|e| bad(e.to_string()))?;
        if der.is_empty() {
            return Err(bad("an empty certificate".into()));
        }
        Ok(der)
    }

    /// An HTTP agent from `config` that trusts only the pinned CA for
    /// `https://` (no public roots are built in).
    pub fn http_agent(
        trust: Option<&Trust>,
        config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    ) -> ureq::Agent {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots = match trust {
            Some(t) => RootCerts::Specific(Arc::new(vec![Certificate::from_der(
                t.conductor_ca.as_ref(),
            )
            .to_owned()])),
            // No CA pinned: nothing verifies, so https:// fails closed.
            None => RootCerts::Specific(Arc::new(Vec::new())),
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(roots)
            .unversioned_rustls_crypto_provider(provider())
            .build();
        config.tls_config(tls).build().into()
    }

    /// Accepts a chain only if it holds the pinned certificate and the leaf
    /// verifies against it (name, dates, signatures); remembers the CA.
    #[derive(Debug)]
    struct Pinning {
        expected: Fingerprint,
        provider: Arc<CryptoProvider>,
        /// The pinned certificate once a chain passed; the fingerprints seen otherwise.
        outcome: Mutex<Result<CertificateDer<'static>, Vec<String>>>,
    }

    impl ServerCertVerifier for Pinning {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let chain = || std::iter::once(end_entity).chain(intermediates);
            let Some(ca) = chain().find(|c| Fingerprint::of_der(c.as_ref()) == self.expected)
            else {
                let seen = chain()
                    .map(|c| Fingerprint::of_der(c.as_ref()).to_string())
                    .collect();
                if let Ok(mut o) = self.outcome.lock() {
                    *o = Err(seen);
                }
                return Err(rustls::Error::General("CA fingerprint mismatch".into()));
            };
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone().into_owned())?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            let verified = webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?;
            if let Ok(mut o) = self.outcome.lock() {
                *o = Ok(ca.clone().into_owned());
            }
            Ok(verified)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// First contact: completes a TLS handshake with the conductor at
    /// `url` (`https://host:port`) accepting only a chain that holds the
    /// certificate `expected` names, and returns that certificate (DER).
    /// Blocking: call from `spawn_blocking`.
    pub fn pin_conductor_ca(url: &str, expected: &Fingerprint) -> Result<Vec<u8>, TlsError> {
        let (host, port) = https_host_port(url).ok_or_else(|| TlsError::Handshake {
            host: url.to_string(),
            message: "not an https://host:port URL".into(),
        })?;
        let io = |source| TlsError::Io {
            host: host.clone(),
            source,
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| TlsError::Handshake {
            host: host.clone(),
            message: format!("not a host name: {e}"),
        })?;
        let pinning = Arc::new(Pinning {
            expected: *expected,
            provider: provider(),
            outcome: Mutex::new(Err(Vec::new())),
        });
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Handshake {
                host: host.clone(),
                message: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(pinning.clone())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| {
            TlsError::Handshake {
                host: host.clone(),
                message: e.to_string(),
            }
        })?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map_err(io)?
            .next()
            .ok_or_else(|| {
                io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                ))
            })?;
        let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let result = conn.complete_io(&mut sock);
        let outcome = pinning
            .outcome
            .lock()
            .map(|o| o.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        match (result, outcome) {
            (Ok(_), Ok(ca)) => {
                conn.send_close_notify();
                let _ = conn.complete_io(&mut sock);
                Ok(ca.as_ref().to_vec())
            }
            (_, Err(presented)) if !presented.is_empty() => Err(TlsError::FingerprintMismatch {
                host,
                expected: *expected,
                presented,
            }),
            (Err(e), _) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(TlsError::Handshake {
                    message: explain(&e.to_string()),
                    host,
                })
            }
            (Err(e), _) => Err(io(e)),
            (Ok(_), Err(_)) => Err(TlsError::Handshake {
                host,
                message: "the handshake ended without a verified certificate".into(),
            }),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn pem_round_trips() {
            for len in [1usize, 2, 3, 4, 47, 48, 49, 300] {
                let der: Vec<u8> = (0..len)
                    .map(|i| u8::try_from(i * 31 % 251).unwrap())
                    .collect();
                let pem = pem_of(&der);
                assert_eq!(der_of_pem(&pem).unwrap(), der, "{len}");
                assert!(pem.lines().all(|l| l.len() <= 64));
            }
            assert!(der_of_pem("not pem").is_err());
            let empty = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
            assert!(der_of_pem(empty).is_err(), "an empty certificate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_split() {
        assert_eq!(https_host_port("https://c:3000"), Some(("c".into(), 3000)));
        assert_eq!(
            https_host_port("https://c.example/api"),
            Some(("c.example".into(), 443))
        );
        assert_eq!(
            https_host_port("https://[::1]:3000/"),
            Some(("::1".into(), 3000))
        );
        assert_eq!(https_host_port("http://c:3000"), None);
        assert_eq!(https_host_port("https://u@c:3000"), None);
        assert_eq!(https_host_port("https://c:x"), None);
        assert_eq!(https_host_port("https://:3000"), None);
        assert_eq!(https_host_port("https://[]:3000"), None);
    }

    #[test]
    fn explanations_name_the_fix() {
        assert!(explain("invalid peer certificate: UnknownIssuer").contains("man in the middle"));
        assert!(explain("invalid peer certificate: NotValidForName").contains("--tls-san"));
        assert_eq!(explain("connection refused"), "connection refused");
    }
}
