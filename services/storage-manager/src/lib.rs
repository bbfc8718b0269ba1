//! # aerekos storage-manager
//!
//! An S3-compatible object store hosted on an aerekos worker as a process
//! service. Real S3 clients (boto3, the AWS CLI, rclone, s3cmd) work
//! against it with path-style addressing. See `README.md` beside this
//! crate for the supported API, configuration, on-disk formats and limits.
//!
//! * [`sigv4`]: AWS Signature V4 signing and verification (header auth,
//!   presigned URLs, aws-chunked chunk signatures) — usable by other crates.
//! * [`client`]: a small blocking S3 client — usable by other crates
//!   (db-manager stores backups with it).
//! * [`http`]: the S3 API on tiny_http, streaming bodies both ways.
//! * [`store`]: buckets and objects on disk (atomic, fsynced before the
//!   answer) with an in-memory index.
//! * [`crypt`] and [`kms`]: objects encrypted at rest in 64 KiB
//!   XChaCha20-Poly1305 chunks under per-object data keys from key-manager.
//! * [`chunked`]: payload checks (signed SHA-256, aws-chunked decoding).
//! * Worker integration ([`run`]): access keys and the key-manager token
//!   from the service's secrets (re-read every refresh interval), settings
//!   from its config, capacity metrics and bucket audit events to the
//!   conductor through the worker's local API.

pub mod chunked;
pub mod client;
pub mod crypt;
pub mod http;
pub mod kms;
pub mod sigv4;
pub mod store;
pub mod timefmt;
pub mod xml;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use client::{ClientError, S3Client};
pub use http::{AccessKeys, S3Server, S3Service};
pub use sigv4::Credentials;
pub use store::{Limits, Store};

use service_runtime::audit::{self, Audit, ReportIntervals, Reported};
use service_runtime::options::{listen_address, CommonOptions};
use service_runtime::{Clients, LocalClient};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "STORAGE_MANAGER_LISTEN";
/// Default key-manager URL.
pub const DEFAULT_KMS_URL: &str = "http://127.0.0.1:7300";
/// Default key-manager key name.
pub const DEFAULT_KMS_KEY: &str = "storage-manager";
const SERVICE: &str = "storage-manager";

/// Why storage-manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad command line or configuration.
    #[error("{0}")]
    Usage(String),
    /// The local API failed.
    #[error(transparent)]
    Local(#[from] service_runtime::LocalError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Command-line options: the flags every service takes (see
/// [`service_runtime::options`]).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--listen`, `--data-dir`, `--threads`, `--report-interval-ms`,
    /// `--refresh-interval-ms`.
    pub common: CommonOptions,
}

/// Usage text.
pub const USAGE: &str = "usage: storage-manager [--listen ADDR] [--data-dir DIR] [--threads N]
                       [--report-interval-ms MS] [--refresh-interval-ms MS]
Runs under an edge-worker (needs AEREKOS_API and AEREKOS_TOKEN).
  --listen ADDR   default: $STORAGE_MANAGER_LISTEN, the config value `listen`, 127.0.0.1:9000
  --data-dir DIR  where buckets and objects live (default: the working directory)
Config: encryption (on|off), kms_url, kms_key, max_object_size, max_part_size, min_part_size,
        virtual_host_domain.
Secrets: access_keys (AKID:secret,...), access_key.<AKID>, kms_token.";

impl Options {
    /// Parses `args` (without the program name). `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, StartError> {
        let common = CommonOptions::parse(args, USAGE).map_err(|e| StartError::Usage(e.0))?;
        Ok(common.map(|common| Options { common }))
    }
}

fn size_setting(
    config: &BTreeMap<String, String>,
    name: &str,
    default: u64,
) -> Result<u64, StartError> {
    match config.get(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                StartError::Usage(format!(
                    "config {name}: not a positive number of bytes: {v:?}"
                ))
            }),
    }
}

/// Reads limits from the config.
pub fn limits_from_config(config: &BTreeMap<String, String>) -> Result<Limits, StartError> {
    let d = Limits::default();
    let l = Limits {
        max_object_size: size_setting(config, "max_object_size", d.max_object_size)?,
        max_part_size: size_setting(config, "max_part_size", d.max_part_size)?,
        min_part_size: size_setting(config, "min_part_size", d.min_part_size)?,
    };
    if l.min_part_size > l.max_part_size {
        return Err(StartError::Usage(
            "config: min_part_size is over max_part_size".into(),
        ));
    }
    Ok(l)
}

/// Disk space of the filesystem holding `dir`: (free, total) bytes.
pub fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

struct Reporter {
    svc: Arc<S3Service>,
    audit: Arc<Audit>,
}

impl Reported for Reporter {
    fn metrics(&self) -> BTreeMap<&'static str, i64> {
        let u = self.svc.store.usage();
        let s = &self.svc.stats;
        let n = |c: &std::sync::atomic::AtomicU64| audit::sample(c.load(Ordering::Relaxed));
        let (free, total) = disk_space(self.svc.store.root()).unwrap_or((0, 0));
        [
            ("buckets", audit::sample(u.buckets)),
            ("objects", audit::sample(u.objects)),
            ("bytes_stored", audit::sample(u.bytes)),
            ("uploads", audit::sample(u.uploads)),
            ("disk_free_bytes", audit::sample(free)),
            ("disk_total_bytes", audit::sample(total)),
            ("puts", n(&s.puts)),
            ("gets", n(&s.gets)),
            ("deletes", n(&s.deletes)),
            ("bytes_in", n(&s.bytes_in)),
            ("bytes_out", n(&s.bytes_out)),
            ("denied", n(&s.denied)),
            ("errors", n(&s.errors)),
            ("kms_errors", n(&s.kms_errors)),
            ("audit_dropped", audit::sample(self.audit.dropped())),
        ]
        .into_iter()
        .collect()
    }

    fn denied(&self) -> u64 {
        self.svc.stats.denied.load(Ordering::Relaxed)
    }

    fn set_clients(&self, _clients: Clients) -> bool {
        // S3 access keys are not bearer clients; they are refreshed by
        // `refresh_secrets`.
        false
    }
}

/// Installs the access keys and key-manager token from `secrets`.
fn apply_secrets(svc: &S3Service, secrets: &BTreeMap<String, String>, first: bool) {
    let (keys, warnings) = AccessKeys::from_secrets(secrets);
    let ids = keys.ids().collect::<Vec<_>>().join(", ");
    if svc.set_keys(keys) || first {
        for w in warnings {
            eprintln!("{SERVICE}: {w}");
        }
        eprintln!("{SERVICE}: access keys: [{ids}]");
    }
    if let (Some(kms), Some(t)) = (svc.store.kms(), secrets.get("kms_token")) {
        kms.set_token(t);
    }
}

/// Starts storage-manager under an edge-worker and serves until killed.
pub fn run(opts: Options) -> Result<(), StartError> {
    let local = LocalClient::from_env()?;
    let secrets = local.secrets_with_retry()?;
    let config = local.config().unwrap_or_default();
    let limits = limits_from_config(&config)?;
    let encryption = match config.get("encryption").map(|s| s.trim()) {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(StartError::Usage(format!(
                "config encryption: expected on or off, got {other:?}"
            )))
        }
    };
    let kms = if encryption {
        let token = secrets.get("kms_token").ok_or_else(|| {
            StartError::Usage(
                "encryption is on but the secret kms_token (a key-manager client token) is not set; \
                 set it, or set the config encryption=off to store plaintext"
                    .into(),
            )
        })?;
        let url = config
            .get("kms_url")
            .map_or(DEFAULT_KMS_URL, String::as_str);
        let key = config
            .get("kms_key")
            .map_or(DEFAULT_KMS_KEY, String::as_str);
        Some(Arc::new(kms::KeyManager::new(url, key, token)))
    } else {
        None
    };
    let data_dir = opts.common.data_dir_or_cwd()?;
    let store = Store::open(&data_dir, limits, kms.clone())?;
    let (audit, audit_rx) = Audit::channel(SERVICE);
    let audit = Arc::new(audit);
    let sink = audit.clone();
    let svc = Arc::new(
        S3Service::new(
            store,
            AccessKeys::default(),
            Arc::new(move |t| sink.send(t)),
        )
        .with_virtual_host_domain(config.get("virtual_host_domain").cloned()),
    );
    apply_secrets(&svc, &secrets, true);
    if svc.keys.read().map(|k| k.is_empty()).unwrap_or(true) {
        eprintln!(
            "{SERVICE}: no access keys in the secrets (`access_keys` or `access_key.<AKID>`): \
             every request will be refused until some are added"
        );
    }
    let intervals = ReportIntervals::from_ms(opts.common.report_ms, opts.common.refresh_ms);
    // The reporter's own client refresh is not used (see `Reporter`).
    let reporter_intervals = ReportIntervals {
        report: intervals.report,
        refresh: Duration::from_secs(365 * 24 * 3600),
    };
    audit::spawn_reporter(
        SERVICE,
        local.clone(),
        Arc::new(Reporter {
            svc: svc.clone(),
            audit: audit.clone(),
        }),
        audit_rx,
        reporter_intervals,
    )?;
    {
        let (svc, local) = (svc.clone(), local.clone());
        std::thread::Builder::new()
            .name("sm-secrets".into())
            .spawn(move || loop {
                std::thread::sleep(intervals.refresh);
                match local.secrets() {
                    Ok(s) => apply_secrets(&svc, &s, false),
                    Err(e) => eprintln!("{SERVICE}: secrets not refreshed (kept): {e}"),
                }
            })?;
    }
    let listen = listen_address(opts.common.listen, ENV_LISTEN, &config, DEFAULT_LISTEN);
    let server = http::serve(
        &listen,
        svc.clone(),
        opts.common.threads.unwrap_or(http::DEFAULT_THREADS),
    )?;
    let u = svc.store.usage();
    println!(
        "{SERVICE}: listening on http://{} ({} buckets, {} objects, encryption {})",
        server.addr(),
        u.buckets,
        u.objects,
        match &kms {
            Some(k) => format!("on with key-manager key {}", k.key_name()),
            None => "off".into(),
        }
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    server.wait();
    Ok(())
}
