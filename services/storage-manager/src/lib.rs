//! # aerekos storage-manager
//!
//! An S3-compatible object store hosted on an aerekos worker as a process
//! service. Real S3 clients (boto3, the AWS CLI, rclone, s3cmd) work
//! against it with path-style addressing. See `README.md` beside this
//! crate for the supported API, configuration, on-disk formats and limits.
//!
//! * [`sigv4`]: AWS Signature V4 verification (header auth, presigned
//!   URLs, aws-chunked chunk signatures) on the signing code of the `s3`
//!   crate ([`s3::sigv4`], re-exported there).
//! * [`client`], [`timefmt`], [`xml`]: the `s3` crate's S3 client, time
//!   formats and XML, re-exported (other services use the `s3` crate
//!   itself: db-manager stores backups with its client).
//! * [`http`]: the S3 API on tiny_http, streaming bodies both ways.
//! * [`grants`]: per-bucket permissions of access keys (`read` or
//!   `read-write` per bucket name or `prefix*`; keys without grants keep
//!   full access), enforced on every request by [`http`].
//! * [`store`]: buckets and objects on disk (atomic, fsynced before the
//!   answer) with an in-memory index.
//! * [`crypt`] and [`kms`]: objects encrypted at rest in 64 KiB
//!   XChaCha20-Poly1305 chunks under per-object data keys from key-manager.
//! * [`chunked`]: payload checks (signed SHA-256, aws-chunked decoding).
//! * Worker integration ([`StorageManager`], run by
//!   [`service_runtime::boot()`]): access keys and the key-manager token from
//!   the service's secrets (re-read every refresh interval), settings from
//!   its config, capacity metrics and bucket audit events to the conductor
//!   through the worker's local API.
//! * Abandoned multipart uploads expire: uploads neither completed nor
//!   aborted [`DEFAULT_MULTIPART_EXPIRY_HOURS`] after they were initiated
//!   (`--multipart-expiry-hours`, `$STORAGE_MANAGER_MULTIPART_EXPIRY_HOURS`
//!   or the config `multipart_expiry_hours`; `0` keeps them forever) are
//!   removed with their parts at start and by a sweep every
//!   [`sweep_interval`] ([`Store::expire_uploads`]).

pub mod chunked;
pub mod crypt;
pub mod grants;
pub mod http;
pub mod kms;
pub mod sigv4;
pub mod store;

pub use s3::{client, timefmt, xml};

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
pub use service_runtime::boot::StartError;
use service_runtime::boot::{Context, Service, Spec, Started};
use service_runtime::options::UsageError;
use service_runtime::Clients;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9000";
/// Env var overriding the listen address.
pub const ENV_LISTEN: &str = "STORAGE_MANAGER_LISTEN";
/// Default key-manager URL.
pub const DEFAULT_KMS_URL: &str = "http://127.0.0.1:7300";
/// Default key-manager key name.
pub const DEFAULT_KMS_KEY: &str = "storage-manager";
/// Env var setting the multipart upload expiry (hours).
pub const ENV_MULTIPART_EXPIRY: &str = "STORAGE_MANAGER_MULTIPART_EXPIRY_HOURS";
/// Default multipart upload expiry: 7 days, as S3's usual
/// `AbortIncompleteMultipartUpload` lifecycle rule.
pub const DEFAULT_MULTIPART_EXPIRY_HOURS: u64 = 7 * 24;
const SERVICE: &str = SPEC.name;

/// Usage text.
pub const USAGE: &str = "usage: storage-manager [--listen ADDR] [--data-dir DIR] [--threads N]
                       [--report-interval-ms MS] [--refresh-interval-ms MS]
                       [--multipart-expiry-hours H]
Runs under an edge-worker (needs AEREKOS_API and AEREKOS_TOKEN).
  --listen ADDR   default: $STORAGE_MANAGER_LISTEN, the config value `listen`, 127.0.0.1:9000
  --data-dir DIR  where buckets and objects live (default: the working directory)
  --multipart-expiry-hours H  remove multipart uploads neither completed nor aborted H hours
                  (decimals allowed; 0 = never) after they began; default:
                  $STORAGE_MANAGER_MULTIPART_EXPIRY_HOURS, the config value
                  `multipart_expiry_hours`, 168 (7 days)
Config: encryption (on|off), kms_url, kms_key, max_object_size, max_part_size, min_part_size,
        virtual_host_domain, multipart_expiry_hours.
Secrets: access_keys (AKID:secret,... or JSON with per-key bucket grants, see the README),
         access_key.<AKID>, kms_token.";

/// storage-manager's own flags, besides the ones every service takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `--multipart-expiry-hours`, in seconds (`Some(0)`: never expire).
    pub multipart_expiry_secs: Option<u64>,
}

/// Parses a multipart expiry in hours (a non-negative decimal number, `0`
/// for never) into seconds, rounded up (a positive value is at least 1 s).
pub fn parse_expiry_hours(v: &str) -> Result<u64, String> {
    let h: f64 = v
        .trim()
        .parse()
        .ok()
        .filter(|h: &f64| h.is_finite() && *h >= 0.0 && *h <= 1e9)
        .ok_or_else(|| format!("not a number of hours (0 or more, decimals allowed): {v:?}"))?;
    // In range: 0 ..= 3.6e12 (checked above), a whole number after ceil.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    Ok((h * 3600.0).ceil() as u64)
}

/// The multipart expiry in seconds (0: never): the flag, else
/// `$STORAGE_MANAGER_MULTIPART_EXPIRY_HOURS`, else the config
/// `multipart_expiry_hours`, else [`DEFAULT_MULTIPART_EXPIRY_HOURS`].
pub fn multipart_expiry(
    flag: Option<u64>,
    env: Option<&str>,
    config: &BTreeMap<String, String>,
) -> Result<u64, StartError> {
    if let Some(secs) = flag {
        return Ok(secs);
    }
    if let Some(v) = env {
        return parse_expiry_hours(v)
            .map_err(|e| StartError::Usage(format!("${ENV_MULTIPART_EXPIRY}: {e}")));
    }
    match config.get("multipart_expiry_hours") {
        Some(v) => parse_expiry_hours(v)
            .map_err(|e| StartError::Usage(format!("config multipart_expiry_hours: {e}"))),
        None => Ok(DEFAULT_MULTIPART_EXPIRY_HOURS * 3600),
    }
}

/// How often the expiry sweep runs for an expiry of `secs`: a quarter of
/// it, between 1 s and 1 h (so an upload is removed at most 25% or an hour
/// after it expires).
pub fn sweep_interval(secs: u64) -> Duration {
    Duration::from_secs((secs / 4).clamp(1, 3600))
}

/// One expiry sweep of `store` now, logged when it removed anything.
fn sweep_uploads(store: &Store, max_age: u64) {
    let e = store.expire_uploads(s3::timefmt::now(), max_age);
    if e.uploads > 0 {
        eprintln!(
            "{SERVICE}: removed {} multipart upload(s) older than {max_age} s, neither completed nor aborted ({} bytes freed)",
            e.uploads, e.bytes
        );
    }
}

/// How storage-manager starts: the flags every service takes (see
/// [`service_runtime::options`]) and `--multipart-expiry-hours`.
pub const SPEC: Spec = Spec {
    name: "storage-manager",
    usage: USAGE,
    extra_flags: &["--multipart-expiry-hours"],
    env_listen: ENV_LISTEN,
    default_listen: DEFAULT_LISTEN,
    thread_prefix: "sm-http",
    default_threads: 8,
};

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

/// Installs the access keys and key-manager token from `secrets`. Malformed
/// bucket grants are an error at start; on a refresh (`first` false) they
/// keep the current keys, with the error logged.
fn apply_secrets(
    svc: &S3Service,
    secrets: &BTreeMap<String, String>,
    first: bool,
) -> Result<(), StartError> {
    if let (Some(kms), Some(t)) = (svc.store.kms(), secrets.get("kms_token")) {
        kms.set_token(t);
    }
    let (keys, warnings) = match AccessKeys::from_secrets(secrets) {
        Ok(k) => k,
        Err(e) if first => return Err(StartError::Usage(format!("secret {e}"))),
        Err(e) => {
            eprintln!(
                "{SERVICE}: access keys not refreshed (the current ones are kept): secret {e}"
            );
            return Ok(());
        }
    };
    let described = keys.describe();
    if svc.set_keys(keys) || first {
        for w in warnings {
            eprintln!("{SERVICE}: {w}");
        }
        eprintln!("{SERVICE}: access keys: [{described}]");
    }
    Ok(())
}

/// storage-manager as a service [`service_runtime::boot()`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StorageManager;

impl Service for StorageManager {
    const SPEC: Spec = SPEC;
    type Flags = Flags;

    fn flag(flags: &mut Flags, flag: &str, value: String) -> Result<(), UsageError> {
        // `--multipart-expiry-hours`, the only extra flag.
        flags.multipart_expiry_secs =
            Some(parse_expiry_hours(&value).map_err(|e| UsageError(format!("{flag}: {e}")))?);
        Ok(())
    }

    /// Limits and encryption from the config, the object store in the data
    /// directory, access keys and the key-manager token from the secrets
    /// (re-read every refresh interval by a thread of its own), abandoned
    /// multipart uploads swept at start and then periodically.
    fn start(ctx: Context, flags: Flags) -> Result<Started, StartError> {
        let (secrets, config, intervals) = (&ctx.secrets, &ctx.config, ctx.intervals);
        let limits = limits_from_config(config)?;
        let env_expiry = std::env::var(ENV_MULTIPART_EXPIRY).ok();
        let expiry = multipart_expiry(flags.multipart_expiry_secs, env_expiry.as_deref(), config)?;
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
        let data_dir = ctx.common.data_dir_or_cwd()?;
        let store = Store::open(&data_dir, limits, kms.clone()).map_err(StartError::service)?;
        let audit = Arc::new(ctx.audit);
        let sink = audit.clone();
        let svc = Arc::new(
            S3Service::new(
                store,
                AccessKeys::default(),
                Arc::new(move |t| sink.send(t)),
            )
            .with_virtual_host_domain(config.get("virtual_host_domain").cloned()),
        );
        if expiry > 0 {
            sweep_uploads(&svc.store, expiry);
            let svc = svc.clone();
            std::thread::Builder::new()
                .name("sm-expiry".into())
                .spawn(move || loop {
                    std::thread::sleep(sweep_interval(expiry));
                    sweep_uploads(&svc.store, expiry);
                })?;
        }
        apply_secrets(&svc, secrets, true)?;
        if svc.keys.read().map(|k| k.is_empty()).unwrap_or(true) {
            eprintln!(
                "{SERVICE}: no access keys in the secrets (`access_keys` or `access_key.<AKID>`): \
                 every request will be refused until some are added"
            );
        }
        {
            let (svc, local) = (svc.clone(), ctx.local.clone());
            std::thread::Builder::new()
                .name("sm-secrets".into())
                .spawn(move || loop {
                    std::thread::sleep(intervals.refresh);
                    match local.secrets() {
                        Ok(s) => {
                            let _ = apply_secrets(&svc, &s, false);
                        }
                        Err(e) => eprintln!("{SERVICE}: secrets not refreshed (kept): {e}"),
                    }
                })?;
        }
        let summary_svc = svc.clone();
        Ok(Started {
            handler: http::handler(svc.clone()),
            reported: Arc::new(Reporter { svc, audit }),
            // The reporter's own client refresh is not used (see `Reporter`).
            report_intervals: ReportIntervals {
                report: intervals.report,
                refresh: Duration::from_secs(365 * 24 * 3600),
            },
            summary: Box::new(move || {
                let u = summary_svc.store.usage();
                format!(
                    "{} buckets, {} objects, {} multipart uploads ({}), encryption {}",
                    u.buckets,
                    u.objects,
                    u.uploads,
                    if expiry == 0 {
                        "kept until completed or aborted".to_string()
                    } else {
                        format!("expiring after {expiry} s")
                    },
                    match &kms {
                        Some(k) => format!("on with key-manager key {}", k.key_name()),
                        None => "off".into(),
                    }
                )
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn parse(a: &[&str]) -> Result<Option<service_runtime::Options<Flags>>, StartError> {
        service_runtime::boot::parse::<StorageManager>(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn multipart_expiry_from_the_flag_env_config_or_default() {
        let o = parse(&["--multipart-expiry-hours=0.5", "--threads", "2"])
            .unwrap()
            .unwrap();
        assert_eq!(o.flags.multipart_expiry_secs, Some(1800));
        assert_eq!(o.common.threads, Some(2));
        assert_eq!(
            parse(&["--multipart-expiry-hours", "0"])
                .unwrap()
                .unwrap()
                .flags
                .multipart_expiry_secs,
            Some(0)
        );
        match parse(&["--multipart-expiry-hours=soon"]) {
            Err(StartError::Usage(m)) => {
                assert!(
                    m.starts_with("--multipart-expiry-hours: not a number of hours"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_expiry_hours("0.0001").unwrap(), 1);
        assert_eq!(parse_expiry_hours(" 168 ").unwrap(), 604_800);
        for bad in ["-1", "NaN", "inf", "", "1h"] {
            assert!(parse_expiry_hours(bad).is_err(), "{bad}");
        }
        let config: BTreeMap<String, String> =
            [("multipart_expiry_hours".to_string(), "2".to_string())].into();
        let none = BTreeMap::new();
        assert_eq!(multipart_expiry(Some(60), Some("1"), &config).unwrap(), 60);
        assert_eq!(multipart_expiry(None, Some("1"), &config).unwrap(), 3600);
        assert_eq!(multipart_expiry(None, None, &config).unwrap(), 7200);
        assert_eq!(multipart_expiry(None, None, &none).unwrap(), 604_800);
        assert!(matches!(
            multipart_expiry(None, Some("x"), &none),
            Err(StartError::Usage(m)) if m.contains(ENV_MULTIPART_EXPIRY)
        ));
        assert_eq!(sweep_interval(604_800), Duration::from_secs(3600));
        assert_eq!(sweep_interval(2), Duration::from_secs(1));
        assert_eq!(sweep_interval(40), Duration::from_secs(10));
    }

    #[test]
    fn malformed_grants_refuse_start_and_keep_the_current_keys_on_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::default(), None).unwrap();
        let svc = S3Service::new(store, AccessKeys::default(), Arc::new(|_| {}));
        let keys = |grants: &str| -> BTreeMap<String, String> {
            [(
                "access_keys".to_string(),
                format!(r#"{{"AKIDAPP1": {{"secret": "app1-secret", "buckets": {grants}}}}}"#),
            )]
            .into()
        };
        apply_secrets(&svc, &keys(r#"{"backups": "read"}"#), true).unwrap();
        let bad = keys(r#"{"backups": "write"}"#);
        match apply_secrets(&svc, &bad, true) {
            Err(StartError::Usage(m)) => assert!(
                m.contains("access key AKIDAPP1: the permission on \"backups\"")
                    && !m.contains("app1-secret"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        apply_secrets(&svc, &bad, false).unwrap();
        let k = svc.keys.read().unwrap().clone();
        let access = k.access("AKIDAPP1").unwrap();
        assert!(access.allows("backups", grants::Perm::Read), "kept");
        assert!(!access.allows("other", grants::Perm::Read), "never widened");
    }
}
