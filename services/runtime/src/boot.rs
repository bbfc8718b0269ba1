//! One start-up for every service: a service's `main` is
//! `service_runtime::boot::<TheService>()`.
//!
//! [`boot`] parses the command line ([`parse`]: the flags of
//! [`crate::options`] plus the service's own, [`Spec::extra_flags`]), then
//! [`run`]s the service:
//!
//! 1. connects to the worker's local API ([`LocalClient::from_env`]) and
//!    reads the service's secrets (retrying while the worker starts) and
//!    config;
//! 2. opens the audit queue ([`Audit::channel`]) and hands all of it to
//!    [`Service::start`], which builds the service and says how to answer
//!    requests, what the reporter thread reports, and what to print once
//!    listening;
//! 3. starts the reporter thread ([`crate::audit::spawn_reporter`]: audit
//!    events, metrics, denied-request summaries, client-key refresh);
//! 4. binds the listen address ([`listen_address`]: `--listen`, else the
//!    service's env var, else the config value `listen`, else its default)
//!    and serves with [`HttpServer`] on `--threads` request threads (else
//!    [`Spec::default_threads`]);
//! 5. prints `<name>: listening on http://ADDR (<summary>)` on stdout (what
//!    the worker's and the tests' readiness checks wait for), and serves
//!    until the process is killed.
//!
//! Logging is stderr, every line prefixed with the service name; there is
//! nothing else to set up. No signal handler is installed: SIGTERM and
//! SIGKILL end the process with their default action, as they always did.
//! Exit codes: 0 after `--help` (the usage on stdout), 2 for a bad command
//! line, 1 if the service cannot start (`<name>: <why>` on stderr).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;

use crate::audit::{self, Audit, ReportIntervals, Reported};
use crate::listen::{HttpServer, RequestHandler, ServeError};
use crate::local::{LocalClient, LocalError};
use crate::options::{listen_address, CommonOptions, UsageError};

/// What a service is called, how it is started and where it listens by
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The name: prefixes every log line, names the audit queue and the
    /// reporter thread (`key-manager`).
    pub name: &'static str,
    /// The usage text, printed for `--help` and after command-line errors
    /// that need it.
    pub usage: &'static str,
    /// The service's own value flags, besides the common ones
    /// (`--backup-interval-ms`); each value goes to [`Service::flag`].
    pub extra_flags: &'static [&'static str],
    /// The environment variable naming the listen address
    /// (`KEY_MANAGER_LISTEN`).
    pub env_listen: &'static str,
    /// The listen address without a flag, variable or config value.
    pub default_listen: &'static str,
    /// Request threads are named `<thread_prefix>-<i>` (`km-http`).
    pub thread_prefix: &'static str,
    /// Request threads without `--threads`.
    pub default_threads: usize,
}

impl Spec {
    /// Binds `listen` and answers requests with `handler` on `threads`
    /// request threads named after this service.
    pub fn serve(
        &self,
        listen: &str,
        threads: usize,
        handler: RequestHandler,
    ) -> Result<HttpServer, ServeError> {
        HttpServer::start(self.name, self.thread_prefix, listen, threads, handler)
    }
}

/// A service's command line: the flags every service takes and its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options<F = ()> {
    /// `--listen`, `--data-dir`, `--threads`, `--report-interval-ms`,
    /// `--refresh-interval-ms` (see [`crate::options`]).
    pub common: CommonOptions,
    /// The service's own flags ([`Service::Flags`]).
    pub flags: F,
}

/// Why a service could not start. The text is what the user reads after
/// `<name>: `.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad command line or configuration.
    #[error("{0}")]
    Usage(String),
    /// The local API failed.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] ServeError),
    /// A thread could not be started (or the working directory, the
    /// default data directory, could not be read).
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The service itself could not start (its store, its keys, ...).
    #[error(transparent)]
    Service(Box<dyn std::error::Error + Send + Sync>),
}

impl StartError {
    /// A [`StartError::Service`] from the service's own error (or message).
    pub fn service(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StartError {
        StartError::Service(e.into())
    }
}

/// What [`run`] hands [`Service::start`]: what the worker told the service
/// and where its audit events go. `Debug` names the secrets, never their
/// values.
pub struct Context {
    /// The worker's local API.
    pub local: LocalClient,
    /// The service's secrets, as read at start.
    pub secrets: BTreeMap<String, String>,
    /// The service's config, as read at start (empty if it could not be
    /// read).
    pub config: BTreeMap<String, String>,
    /// The common command-line flags.
    pub common: CommonOptions,
    /// `--report-interval-ms` and `--refresh-interval-ms`, or the defaults.
    pub intervals: ReportIntervals,
    /// The audit sink; [`run`] hands its queue to the reporter thread.
    pub audit: Audit,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("local", &self.local)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .field("common", &self.common)
            .field("intervals", &self.intervals)
            .finish_non_exhaustive()
    }
}

/// What [`Service::start`] gives back: how to answer requests and what to
/// report.
pub struct Started {
    /// Answers one request.
    pub handler: RequestHandler,
    /// What the reporter thread reports and where refreshed client keys go.
    pub reported: Arc<dyn Reported>,
    /// The reporter thread's intervals (usually [`Context::intervals`]).
    pub report_intervals: ReportIntervals,
    /// The text in parentheses after `listening on http://ADDR`, made once
    /// the address is bound.
    pub summary: Box<dyn FnOnce() -> String>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("report_intervals", &self.report_intervals)
            .finish_non_exhaustive()
    }
}

/// A service [`boot`] can run.
pub trait Service {
    /// Name, usage, listen defaults, request threads.
    const SPEC: Spec;
    /// The service's own flags (values of [`Spec::extra_flags`]).
    type Flags: Default;

    /// Takes the `value` of `flag`, one of [`Spec::extra_flags`], in
    /// command-line order; an error stops the parse. Services without
    /// extra flags are never asked.
    fn flag(flags: &mut Self::Flags, flag: &str, value: String) -> Result<(), UsageError> {
        let _ = (flags, value);
        Err(UsageError(format!("unknown argument {flag}")))
    }

    /// Builds the service from what the worker handed over (and may start
    /// its own threads); [`run`] then starts the reporter and serves.
    fn start(ctx: Context, flags: Self::Flags) -> Result<Started, StartError>;
}

/// Parses `args` (without the program name) for `S`: `Ok(None)` for
/// `--help`; a bad command line is a [`StartError::Usage`] carrying `S`'s
/// usage text where the user needs it.
pub fn parse<S: Service>(
    args: impl IntoIterator<Item = String>,
) -> Result<Option<Options<S::Flags>>, StartError> {
    let spec = S::SPEC;
    let mut flags = S::Flags::default();
    let common = CommonOptions::parse_with(args, spec.usage, spec.extra_flags, |flag, value| {
        S::flag(&mut flags, flag, value)
    })
    .map_err(|e| StartError::Usage(e.0))?;
    Ok(common.map(|common| Options { common, flags }))
}

/// Starts `S` under an edge-worker (see the module docs) and serves until
/// the process is killed.
pub fn run<S: Service>(opts: Options<S::Flags>) -> Result<(), StartError> {
    let spec = S::SPEC;
    let local = LocalClient::from_env()?;
    let secrets = local.secrets_with_retry()?;
    let config = local.config().unwrap_or_default();
    let listen = listen_address(
        opts.common.listen.clone(),
        spec.env_listen,
        &config,
        spec.default_listen,
    );
    let threads = opts.common.threads.unwrap_or(spec.default_threads);
    let intervals = ReportIntervals::from_ms(opts.common.report_ms, opts.common.refresh_ms);
    let (audit, audit_rx) = Audit::channel(spec.name);
    let ctx = Context {
        local: local.clone(),
        secrets,
        config,
        common: opts.common,
        intervals,
        audit,
    };
    let started = S::start(ctx, opts.flags)?;
    audit::spawn_reporter(
        spec.name,
        local,
        started.reported,
        audit_rx,
        started.report_intervals,
    )?;
    let server = spec.serve(&listen, threads, started.handler)?;
    println!(
        "{}: listening on http://{} ({})",
        spec.name,
        server.addr(),
        (started.summary)()
    );
    let _ = std::io::stdout().flush();
    server.wait();
    Ok(())
}

/// A service's whole `main`: [`parse`] the process's arguments, print the
/// usage for `--help`, [`run`]; exits 2 on a bad command line and 1 if the
/// service cannot start, with `<name>: <why>` on stderr.
pub fn boot<S: Service>() {
    let name = S::SPEC.name;
    let opts = match parse::<S>(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", S::SPEC.usage);
            return;
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run::<S>(opts) {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const USAGE: &str = "usage: test-service [--listen ADDR] [--every MS]";

    #[derive(Debug, Default, PartialEq, Eq)]
    struct Flags {
        every: Option<u64>,
    }

    struct WithFlag;

    impl Service for WithFlag {
        const SPEC: Spec = Spec {
            name: "test-service",
            usage: USAGE,
            extra_flags: &["--every"],
            env_listen: "AEREKOS_RUNTIME_TEST_BOOT_LISTEN",
            default_listen: "127.0.0.1:0",
            thread_prefix: "test-http",
            default_threads: 1,
        };
        type Flags = Flags;

        fn flag(flags: &mut Flags, flag: &str, value: String) -> Result<(), UsageError> {
            flags.every = Some(crate::options::number(flag, &value)?);
            Ok(())
        }

        fn start(_: Context, _: Flags) -> Result<Started, StartError> {
            Err(StartError::Usage("not started in tests".into()))
        }
    }

    struct Plain;

    impl Service for Plain {
        const SPEC: Spec = Spec {
            extra_flags: &[],
            ..WithFlag::SPEC
        };
        type Flags = ();

        fn start(_: Context, _: ()) -> Result<Started, StartError> {
            Err(StartError::Usage("not started in tests".into()))
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn usage_error(e: StartError) -> String {
        match e {
            StartError::Usage(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn common_and_own_flags_in_one_parse() {
        let o = parse::<WithFlag>(args(&["--every=7", "--threads", "2", "--listen=a:1"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.flags, Flags { every: Some(7) });
        assert_eq!(o.common.threads, Some(2));
        assert_eq!(o.common.listen.as_deref(), Some("a:1"));
        assert_eq!(parse::<WithFlag>(args(&["--help"])).unwrap(), None);
        let o = parse::<Plain>(args(&["--data-dir", "/d"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.common.data_dir, Some("/d".into()));
    }

    #[test]
    fn command_line_errors_are_usage_errors_with_the_services_usage() {
        let err = |a: &[&str]| usage_error(parse::<WithFlag>(args(a)).unwrap_err());
        assert_eq!(err(&["--every=soon"]), "--every: not a number: soon");
        assert_eq!(err(&["--every"]), format!("--every needs a value\n{USAGE}"));
        assert_eq!(
            err(&["--never=1"]),
            format!("unknown argument --never=1\n{USAGE}")
        );
        // Another service's flag is unknown here.
        let e = usage_error(parse::<Plain>(args(&["--every=1"])).unwrap_err());
        assert_eq!(e, format!("unknown argument --every=1\n{USAGE}"));
    }

    #[test]
    fn start_errors_read_as_before() {
        let e = StartError::service(std::io::Error::other("store: locked"));
        assert_eq!(e.to_string(), "store: locked");
        assert_eq!(
            StartError::service("backups: no bucket").to_string(),
            "backups: no bucket"
        );
        let e = StartError::from(std::io::Error::other("no threads"));
        assert_eq!(e.to_string(), "cannot start a thread: no threads");
        let e = StartError::from(LocalError::Env("AEREKOS_API"));
        assert!(e.to_string().starts_with("AEREKOS_API is not set"), "{e}");
    }

    #[test]
    fn spec_serve_names_threads_and_binds() {
        let handler: RequestHandler = Arc::new(|req: tiny_http::Request| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = req.respond(tiny_http::Response::from_string(name));
        });
        let server = WithFlag::SPEC.serve("127.0.0.1:0", 1, handler).unwrap();
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("test-http-0"), "{out}");
    }
}
