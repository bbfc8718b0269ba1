//! TLS to PostgreSQL, set on the `--store` URL the way libpq reads it:
//! `postgres://user:pass@db.example:5432/fleet?sslmode=verify-full&sslrootcert=/etc/aerekos/pg-ca.pem`.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as libpq's) | when the server offers it, else plain | not checked (checked like `verify-ca` when `sslrootcert` is given) |
//! | `require` | always (refused if the server has none) | as for `prefer` |
//! | `verify-ca` | always | signed by a root in `sslrootcert` |
//! | `verify-full` | always | signed by such a root and naming the host connected to (a DNS name or an IP address in its SANs) |
//!
//! `sslrootcert` is a PEM file of one or more CA certificates; without it
//! (or with `sslrootcert=system`) `verify-ca` and `verify-full` use the
//! system's roots. That differs from libpq, which reads
//! `~/.postgresql/root.crt`: name the file. TLS is rustls with `ring`
//! (TLS 1.2 and 1.3), as everywhere in the conductor; client certificates
//! (`sslcert`, `sslkey`) are not supported (refused with a clear error, not
//! ignored). Channel binding is not offered (SCRAM without `-PLUS`).
//!
//! Only the URL form carries these: a key=value connection string goes to
//! tokio-postgres as it is (which knows `sslmode` `disable`, `prefer` and
//! `require`, and connects without TLS here).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`, the modes this conductor knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it.
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, the chain checked against the roots.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

/// Where and how to connect: the tokio-postgres configuration (the TLS
/// parameters taken out) and the TLS connector, if any.
#[derive(Clone)]
pub struct PgTarget {
    /// What tokio-postgres connects with; its `ssl_mode` is `Disable`,
    /// `Prefer` or `Require`, matching `tls` (`None` only with `Disable`
    /// or a key=value string).
    pub config: tokio_postgres::Config,
    /// The rustls connector for the mode.
    pub tls: Option<MakeRustls>,
    /// The mode asked for.
    pub mode: SslMode,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("mode", &self.mode)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Reads `url`: its TLS parameters here, the rest by tokio-postgres.
    /// Errors name the parameter (never the password).
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !is_url {
            let config = url.parse().map_err(|e| format!("{e}"))?;
            return Ok(PgTarget {
                config,
                tls: None,
                mode: SslMode::Disable,
            });
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let mut mode = SslMode::Prefer;
        let mut root: Option<String> = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(v)?;
            match k {
                "sslmode" => {
                    mode = match value.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode={other}: expected disable, prefer, require, verify-ca \
                                 or verify-full"
                            ))
                        }
                    }
                }
                "sslrootcert" => root = Some(value),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                    return Err(format!(
                        "{k}: client certificates and CRLs are not supported (use a password, \
                         and sslmode=verify-full with sslrootcert)"
                    ))
                }
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
        let verifier: Option<Arc<dyn ServerCertVerifier>> = match mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require if root.is_none() => {
                Some(Arc::new(Unverified(crate::tls::provider())))
            }
            SslMode::VerifyFull => Some(webpki(root.as_deref())?),
            SslMode::Prefer | SslMode::Require | SslMode::VerifyCa => {
                Some(Arc::new(ChainOnly(webpki(root.as_deref())?)))
            }
        };
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let tls = match verifier {
            None => None,
            Some(v) => {
                let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .dangerous()
                    .with_custom_certificate_verifier(v)
                    .with_no_client_auth();
                Some(MakeRustls(Arc::new(config)))
            }
        };
        Ok(PgTarget { config, tls, mode })
    }
}

/// The standard verifier (chain and name) over the roots in `file`, or the
/// system's.
fn webpki(file: Option<&str>) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let pem = match file {
        None | Some("system") => None,
        Some(path) => {
            Some(std::fs::read_to_string(path).map_err(|e| format!("sslrootcert={path}: {e}"))?)
        }
    };
    let roots = crate::tls::root_store(pem.as_deref())
        .map_err(|e| format!("sslrootcert={}: {e}", file.unwrap_or("system")))?;
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| format!("sslrootcert: {e}"))?;
    Ok(v)
}

/// `verify-ca`: the chain checked, the name not (libpq's meaning).
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encrypted against a
/// passive listener, the certificate taken as it comes (libpq's meaning;
/// the handshake's signatures are still checked).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `%XX` escapes of a query value decoded (`+` stays `+`, as libpq reads it).
fn percent_decode(v: &str) -> Result<String, String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {v:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{v:?} is not UTF-8 once decoded"))
}

/// tokio-postgres' TLS hook over tokio-rustls.
#[derive(Clone, Debug)]
pub struct MakeRustls(Arc<rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

/// One handshake to the server named `name`.
#[derive(Debug)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let tls = connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// The TLS session tokio-postgres talks through.
#[derive(Debug)]
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_are_read_and_taken_out() {
        let t = PgTarget::parse("postgres://u:p@h:5/db").unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
        assert!(t.tls.is_some());
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let t =
            PgTarget::parse("postgres://u:p@h:5/db?application_name=x&sslmode=disable").unwrap();
        assert_eq!(t.mode, SslMode::Disable);
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = PgTarget::parse("postgresql://h/db?sslmode=verify-full").unwrap();
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(t.config.get_dbname(), Some("db"));
        let kv = PgTarget::parse("host=h dbname=db").unwrap();
        assert!(kv.tls.is_none());
    }

    #[test]
    fn bad_tls_parameters_are_named() {
        for (url, says) in [
            ("postgres://h/db?sslmode=maybe", "sslmode=maybe"),
            ("postgres://h/db?sslcert=/c.pem", "sslcert"),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert=/nonexistent/ca.pem",
            ),
            ("postgres://h/db?sslrootcert=%zz", "bad %-escape"),
        ] {
            let e = PgTarget::parse(url).map(|_| ()).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let url = format!(
            "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
            empty.display()
        );
        let e = PgTarget::parse(&url).map(|_| ()).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("%2Fetc%2Fca.pem").unwrap(), "/etc/ca.pem");
        assert_eq!(percent_decode("a+b").unwrap(), "a+b");
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
    }
}
