//! Command-line and environment parsing for the `edge-worker` binary (hand
//! rolled: clap would double the binary), plus the `decode` subcommand.
//!
//! Every flag has an `AEREKOS_*` environment twin; a flag wins over its
//! variable. `--flag value` and `--flag=value` are both accepted.

use std::path::PathBuf;
use std::time::Duration;

use crate::WorkerConfig;

/// `--help` text.
pub const HELP: &str = "\
edge-worker: the aerekos agent for a Raspberry Pi

USAGE:
    edge-worker [OPTIONS]
    edge-worker decode [--secret HEX] [--worker ID] FILE|-

OPTIONS (each also from the environment variable shown):
    --conductor URL         conductor base URL, http://host:3000   AEREKOS_CONDUCTOR
                            (a comma list: an active conductor and
                            its standbys; the first that accepts a
                            connection is used)
    --token T               registration token (aer_...), used     AEREKOS_REGISTRATION_TOKEN
                            only for the first enrolment (ignored once an
                            identity is stored; AEREKOS_TOKEN, the CLI's API
                            token, is read too when the former is unset)
    --reenroll              enrol again with the stored identity   AEREKOS_REENROLL=1
                            (same id, fresh MQTT login)
    --state-dir DIR         identity and queue [/var/lib/aerekos   AEREKOS_STATE_DIR
                            if writable, else ./aerekos-worker]
    --interval D            metrics interval [10s]                 AEREKOS_INTERVAL
    --batch D               send the samples of D in one frame     AEREKOS_BATCH
                            (to a conductor that reads batches;
                            0: every sample at once) [5m]
    --label K=V             label, repeatable                      AEREKOS_LABELS (k=v,k2=v2)
    --queue-capacity N      frames kept while offline [720]        AEREKOS_QUEUE_CAPACITY
    --flush-interval D      queued frames written to disk after [30s]  AEREKOS_FLUSH_INTERVAL
    --hostname H            hostname override                      AEREKOS_HOSTNAME
    --machine-id M          /etc/machine-id override               AEREKOS_MACHINE_ID
    --mqtt-url U            broker override, mqtt://host:port[,…]  AEREKOS_MQTT_URL
    --local-api ADDR|off    local API for hosted services          AEREKOS_LOCAL_API
                            [127.0.0.1:3001; port 0: any free port]
    --allow-remote-exec     run commands the conductor sends       AEREKOS_ALLOW_REMOTE_EXEC=1
                            (`aerekos exec`; off by default)
    --release-key HEX       Ed25519 key agent releases must be     AEREKOS_RELEASE_KEY
                            signed with [the conductor's, pinned at enrolment]
    --host-root DIR         where the host's /sys and /proc are   AEREKOS_HOST_ROOT
                            (a container's bind mount) [/]
    --self-update M         may a signed release replace this      AEREKOS_SELF_UPDATE
                            binary: auto (not in a container),
                            always, never [auto]
    -h, --help              this text
    -V, --version           agent and wire-format versions

Durations: 500ms, 10s, 2m, 1h, or a plain number of seconds.
Log level: AEREKOS_LOG or RUST_LOG = error|warn|info|debug|trace [info].

decode prints a captured frame as JSON; with --secret (64 hex) it also
verifies the tag, otherwise the frame is shown unverified. A format-2 frame
does not carry its worker id: give it with --worker (the id in its topic).
";

/// The registration token's environment variable.
pub const TOKEN_ENV: &str = "AEREKOS_REGISTRATION_TOKEN";
/// Its former name, still read when [`TOKEN_ENV`] is unset (with a
/// warning): the `aerekos` CLI reads the same name as its API token, so a
/// shell that exports it for one breaks the other.
pub const LEGACY_TOKEN_ENV: &str = "AEREKOS_TOKEN";
/// Prefixes of the conductor's API tokens (`aek_`) and login sessions
/// (`aes_`): never a registration token (`aer_`).
const API_TOKEN_PREFIXES: [&str; 2] = ["aek_", "aes_"];

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cli {
    /// Run the agent, with the warnings to log once logging is set up.
    Run(Box<WorkerConfig>, Vec<String>),
    /// Decode a frame from a file (`-` = stdin).
    Decode {
        /// 64-hex secret to verify the tag with.
        secret: Option<String>,
        /// The worker id of the frame's topic (needed for format 2).
        worker: Option<String>,
        /// Input path or `-`.
        input: String,
    },
    /// Print [`HELP`].
    Help,
    /// Print the agent and wire-format versions.
    Version,
}

/// A command-line mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// An option this program does not have.
    #[error("unknown argument {0:?} (see --help)")]
    Unknown(String),
    /// An option given without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// Which flag or variable.
        what: String,
        /// The text given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
}

fn invalid(what: &str, value: &str, reason: impl Into<String>) -> CliError {
    CliError::Invalid {
        what: what.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses a duration: `500ms`, `10s`, `2m`, `1h`, or plain seconds (`10`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err("expected a number, e.g. 10s or 500ms".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| "duration too large".into())
}

/// Parses `key=value` (key non-empty).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err("expected key=value".into()),
    }
}

/// Parses arguments (without the program name). `env` looks up environment
/// variables; `default_state_dir` is called only if neither
/// `--state-dir` nor `AEREKOS_STATE_DIR` is given.
pub fn parse(
    args: Vec<String>,
    env: impl Fn(&str) -> Option<String>,
    default_state_dir: impl FnOnce() -> PathBuf,
) -> Result<Cli, CliError> {
    let mut it = args.into_iter();
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    let mut decode = false;
    let mut first = true;
    while let Some(arg) = it.next() {
        if first && arg == "decode" {
            decode = true;
            first = false;
            continue;
        }
        first = false;
        if arg == "-h" || arg == "--help" {
            return Ok(Cli::Help);
        }
        if arg == "-V" || arg == "--version" {
            return Ok(Cli::Version);
        }
        if arg == "-" || !arg.starts_with('-') {
            positional.push(arg);
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let known_run = [
            "--conductor",
            "--token",
            "--state-dir",
            "--interval",
            "--batch",
            "--label",
            "--queue-capacity",
            "--flush-interval",
            "--hostname",
            "--machine-id",
            "--mqtt-url",
            "--local-api",
            "--release-key",
            "--self-update",
            "--host-root",
        ];
        let known = if decode {
            &["--secret", "--worker"][..]
        } else {
            &known_run[..]
        };
        if !decode && (flag == "--reenroll" || flag == "--allow-remote-exec") && inline.is_none() {
            pairs.push((flag, None));
            continue;
        }
        if !known.contains(&flag.as_str()) {
            return Err(CliError::Unknown(arg));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| CliError::MissingValue(flag.clone()))?,
        };
        pairs.push((flag, Some(value)));
    }

    let flag = |name: &str| -> Option<String> {
        pairs
            .iter()
            .rev()
            .find(|(f, _)| f == name)
            .and_then(|(_, v)| v.clone())
    };

    if decode {
        let input = match positional.as_slice() {
            [one] => one.clone(),
            [] => return Err(CliError::MissingValue("decode FILE|-".into())),
            [_, extra, ..] => return Err(CliError::Unknown(extra.clone())),
        };
        return Ok(Cli::Decode {
            secret: flag("--secret"),
            worker: flag("--worker"),
            input,
        });
    }
    if let Some(p) = positional.into_iter().next() {
        return Err(CliError::Unknown(p));
    }

    // Flag first, then environment.
    let get = |name: &str, var: &str| flag(name).or_else(|| env(var).filter(|v| !v.is_empty()));
    let duration = |name: &str, var: &str| -> Result<Option<Duration>, CliError> {
        get(name, var)
            .map(|v| parse_duration(&v).map_err(|e| invalid(name, &v, e)))
            .transpose()
    };

    let state_dir = get("--state-dir", "AEREKOS_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(default_state_dir);
    let mut config = WorkerConfig::new(state_dir);
    config.conductor_url = get("--conductor", "AEREKOS_CONDUCTOR");
    let mut warnings = Vec::new();
    let (token, token_source) = registration_token(flag("--token"), &env);
    if token_source == LEGACY_TOKEN_ENV {
        warnings.push(format!(
            "the registration token was read from {LEGACY_TOKEN_ENV}, which the aerekos CLI \
             reads as its API token: use {TOKEN_ENV} instead"
        ));
    }
    config.token = token;
    config.reenroll = pairs.iter().any(|(f, _)| f == "--reenroll")
        || env("AEREKOS_REENROLL").is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
    config.allow_remote_exec = pairs.iter().any(|(f, _)| f == "--allow-remote-exec")
        || env("AEREKOS_ALLOW_REMOTE_EXEC")
            .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
    config.hostname = get("--hostname", "AEREKOS_HOSTNAME");
    config.machine_id = get("--machine-id", "AEREKOS_MACHINE_ID");
    config.mqtt_url = get("--mqtt-url", "AEREKOS_MQTT_URL");
    if let Some(key) = get("--release-key", "AEREKOS_RELEASE_KEY") {
        protocol::release::parse_public_key(&key)
            .map_err(|e| invalid("--release-key", &key, e.to_string()))?;
        config.release_key = Some(key);
    }
    // The binary can replace itself; an embedding program cannot.
    config.self_update = match get("--self-update", "AEREKOS_SELF_UPDATE") {
        Some(v) => v
            .parse()
            .map_err(|e: String| invalid("--self-update", &v, e))?,
        None => crate::SelfUpdate::Auto,
    };
    if let Some(root) = get("--host-root", "AEREKOS_HOST_ROOT") {
        config.host_root = PathBuf::from(root);
    }
    if let Some(d) = duration("--interval", "AEREKOS_INTERVAL")? {
        if d.is_zero() {
            return Err(invalid("--interval", "0", "must be positive"));
        }
        config.interval = d;
    }
    if let Some(d) = duration("--batch", "AEREKOS_BATCH")? {
        config.batch = d;
    }
    if let Some(d) = duration("--flush-interval", "AEREKOS_FLUSH_INTERVAL")? {
        config.flush_interval = d;
    }
    if let Some(v) = get("--queue-capacity", "AEREKOS_QUEUE_CAPACITY") {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| invalid("--queue-capacity", &v, "expected a whole number"))?;
        if n == 0 {
            return Err(invalid("--queue-capacity", &v, "must be at least 1"));
        }
        config.queue_capacity = n;
    }
    let label_flags: Vec<String> = pairs
        .iter()
        .filter(|(f, _)| f == "--label")
        .filter_map(|(_, v)| v.clone())
        .collect();
    let label_texts = if label_flags.is_empty() {
        env("AEREKOS_LABELS")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        label_flags
    };
    for text in label_texts {
        let label = parse_label(&text).map_err(|e| invalid("--label", &text, e))?;
        config.labels.push(label);
    }
    if let Some(url) = &config.conductor_url {
        if crate::conductor_urls::ConductorUrls::parse(url).is_none() {
            return Err(invalid(
                "--conductor",
                url,
                "expected https://host:port (or http:// on the conductor's own host), or a \
                 comma-separated list of them (an active conductor and its standbys)",
            ));
        }
    }
    if let Some(token) = &config.token {
        check_registration_token(token).map_err(|e| invalid(token_source, "<redacted>", e))?;
    }
    if let Some(url) = &config.mqtt_url {
        if crate::session::MqttUrl::parse_list(url).is_none() {
            return Err(invalid(
                "--mqtt-url",
                url,
                "expected mqtt://host:port or mqtts://host:port, or a comma-separated list of them",
            ));
        }
    }
    if let Some(v) = get("--local-api", "AEREKOS_LOCAL_API") {
        let v = v.trim();
        config.local_api = if v.eq_ignore_ascii_case("off") {
            None
        } else if v.parse::<std::net::SocketAddr>().is_ok() {
            Some(v.to_string())
        } else {
            return Err(invalid("--local-api", v, "expected ip:port or off"));
        };
    }
    Ok(Cli::Run(Box::new(config), warnings))
}

/// The registration token and where it came from: `--token`, else
/// [`TOKEN_ENV`], else [`LEGACY_TOKEN_ENV`] (empty values count as unset).
fn registration_token(
    flag: Option<String>,
    env: &impl Fn(&str) -> Option<String>,
) -> (Option<String>, &'static str) {
    if flag.is_some() {
        return (flag, "--token");
    }
    for var in [TOKEN_ENV, LEGACY_TOKEN_ENV] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            return (Some(v), var);
        }
    }
    (None, "--token")
}

/// Checks a registration token's form; an API or session token (given
/// where the registration token goes, e.g. from the CLI's `AEREKOS_TOKEN`)
/// is refused with what to use instead.
fn check_registration_token(token: &str) -> Result<(), String> {
    let t = token.trim();
    if API_TOKEN_PREFIXES.iter().any(|p| t.starts_with(p)) {
        return Err(
            "this is an API token (for the aerekos CLI and the HTTP API); the registration \
             token starts with aer_ (`conductor token rotate`, or \
             `POST /api/v1/registration-token/rotate` with an admin token)"
                .into(),
        );
    }
    protocol::RegistrationToken::parse(t)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `/var/lib/aerekos` if it is (or can be made) writable, else `./aerekos-worker`.
pub fn default_state_dir() -> PathBuf {
    let system = PathBuf::from("/var/lib/aerekos");
    if crate::state::ensure_dir(&system).is_ok() {
        let probe = system.join(".write-test");
        if std::fs::write(&probe, b"").is_ok() {
            let _ = std::fs::remove_file(&probe);
            return system;
        }
    }
    PathBuf::from("aerekos-worker")
}

/// The log level from `AEREKOS_LOG`, else `RUST_LOG`, as a plain level
/// name; anything else (including `RUST_LOG` directives) means `info`.
pub fn log_level(env: impl Fn(&str) -> Option<String>) -> tracing::Level {
    ["AEREKOS_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| env(v).and_then(|s| s.trim().parse::<tracing::Level>().ok()))
        .unwrap_or(tracing::Level::INFO)
}

/// Decodes a sealed frame to pretty JSON. With `secret` the tag is
/// verified (an error if it does not match); `worker` is its topic's worker
/// id (needed for format 2); returns `(json, verified)`. Built with the
/// default cargo feature `decode` (the smallest agent leaves the JSON form
/// of every frame type out: use `conductor decode` there).
#[cfg(not(feature = "decode"))]
pub fn decode_frame(
    _bytes: &[u8],
    _secret: Option<&str>,
    _worker: Option<&str>,
) -> Result<(String, bool), String> {
    Err(
        "this edge-worker was built without the frame decoder (cargo feature `decode`): \
         decode the capture with `conductor decode`"
            .into(),
    )
}

/// See the other `decode_frame` (the decoder is built in).
#[cfg(feature = "decode")]
pub fn decode_frame(
    bytes: &[u8],
    secret: Option<&str>,
    worker: Option<&str>,
) -> Result<(String, bool), String> {
    let opened =
        protocol::open_captured(bytes, worker).map_err(|e| format!("not a valid frame: {e}"))?;
    let (envelope, verified) = match secret {
        Some(hex) => {
            let secret = protocol::Secret::from_hex(hex).map_err(|e| e.to_string())?;
            let env = opened
                .verify(&secret)
                .map_err(|e| format!("verification failed: {e}"))?;
            (env, true)
        }
        None => (opened.into_unverified(), false),
    };
    let json = serde_json::to_string_pretty(&envelope).map_err(|e| e.to_string())?;
    Ok((json, verified))
}

/// `edge-worker decode`: reads `input` (`-` = stdin) and decodes it with
/// [`decode_frame`].
pub fn decode_input(
    input: &str,
    secret: Option<&str>,
    worker: Option<&str>,
) -> Result<(String, bool), String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = if input == "-" {
        std::io::stdin().read_to_end(&mut bytes).map(drop)
    } else {
        std::fs::read(input).map(|b| bytes = b)
    };
    read.map_err(|e| format!("cannot read {input}: {e}"))?;
    decode_frame(&bytes, secret, worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn run_cfg(a: &str, env: impl Fn(&str) -> Option<String>) -> WorkerConfig {
        match parse(args(a), env, || PathBuf::from("/default")).unwrap() {
            Cli::Run(c, _) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 7s "), Ok(Duration::from_secs(7)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn remote_exec_is_off_unless_asked_for() {
        assert!(!run_cfg("", no_env).allow_remote_exec);
        assert!(run_cfg("--allow-remote-exec", no_env).allow_remote_exec);
        let on = |k: &str| (k == "AEREKOS_ALLOW_REMOTE_EXEC").then(|| "1".to_string());
        assert!(run_cfg("", on).allow_remote_exec);
        let off = |k: &str| (k == "AEREKOS_ALLOW_REMOTE_EXEC").then(|| "0".to_string());
        assert!(!run_cfg("", off).allow_remote_exec);
        assert!(parse(args("--allow-remote-exec=1"), no_env, || "/d".into()).is_err());
    }

    #[test]
    fn self_update_mode() {
        use crate::SelfUpdate;
        assert_eq!(run_cfg("", no_env).self_update, SelfUpdate::Auto);
        assert_eq!(
            run_cfg("--self-update always", no_env).self_update,
            SelfUpdate::Always
        );
        assert_eq!(
            run_cfg("--self-update never", no_env).self_update,
            SelfUpdate::Never
        );
        let env = |k: &str| (k == "AEREKOS_SELF_UPDATE").then(|| "never".to_string());
        assert_eq!(run_cfg("", env).self_update, SelfUpdate::Never);
        // An embedded agent is not a command-line choice.
        assert!(parse(args("--self-update embedded"), no_env, || "/d".into()).is_err());
        assert!(parse(args("--self-update yes"), no_env, || "/d".into()).is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("site=lab"), Ok(("site".into(), "lab".into())));
        assert_eq!(parse_label("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert!(parse_label("=v").is_err());
        assert!(parse_label("novalue").is_err());
    }

    #[test]
    fn defaults() {
        let c = run_cfg("", no_env);
        // The command line's agent may replace itself; an embedded one
        // (`WorkerConfig::new`, the conductor's --local-worker) may not.
        assert_eq!(
            c,
            WorkerConfig {
                self_update: crate::SelfUpdate::Auto,
                ..WorkerConfig::new("/default")
            }
        );
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.batch, Duration::from_secs(300));
        assert_eq!(c.queue_capacity, 720);
        assert_eq!(c.flush_interval, Duration::from_secs(30));
    }

    #[test]
    fn flags() {
        let c = run_cfg(
            "--conductor http://c:3000 --token T --state-dir /s --interval 500ms \
             --label a=1 --label=b=2 --queue-capacity 10 --flush-interval=5s \
             --hostname h --machine-id m --mqtt-url mqtt://b:1884 --host-root /host \
             --batch 0",
            no_env,
        );
        assert_eq!(c.batch, Duration::ZERO);
        assert_eq!(c.conductor_url.as_deref(), Some("http://c:3000"));
        assert_eq!(c.token.as_deref(), Some("T"));
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(
            c.labels,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(c.queue_capacity, 10);
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.hostname.as_deref(), Some("h"));
        assert_eq!(c.machine_id.as_deref(), Some("m"));
        assert_eq!(c.mqtt_url.as_deref(), Some("mqtt://b:1884"));
        assert_eq!(c.local_api.as_deref(), Some("127.0.0.1:3001"));
        assert_eq!(c.host_root, PathBuf::from("/host"));
        assert_eq!(run_cfg("", no_env).host_root, PathBuf::from("/"));
    }

    #[test]
    fn local_api() {
        let c = run_cfg("--local-api 127.0.0.1:0", no_env);
        assert_eq!(c.local_api.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(run_cfg("--local-api=off", no_env).local_api, None);
        let env = |k: &str| (k == "AEREKOS_LOCAL_API").then(|| "OFF".to_string());
        assert_eq!(run_cfg("", env).local_api, None);
        let c = run_cfg("--local-api [::1]:4000", env);
        assert_eq!(c.local_api.as_deref(), Some("[::1]:4000"), "the flag wins");
        let p = |a: &str| parse(args(a), no_env, || PathBuf::from("/d"));
        assert!(matches!(
            p("--local-api localhost"),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(p("--local-api"), Err(CliError::MissingValue(_))));
    }

    #[test]
    fn env_and_flag_precedence() {
        let env = |k: &str| match k {
            "AEREKOS_CONDUCTOR" => Some("http://env:3000".to_string()),
            "AEREKOS_REGISTRATION_TOKEN" => Some("envtoken".to_string()),
            "AEREKOS_STATE_DIR" => Some("/env".to_string()),
            "AEREKOS_INTERVAL" => Some("2".to_string()),
            "AEREKOS_LABELS" => Some("x=1, y=2".to_string()),
            "AEREKOS_QUEUE_CAPACITY" => Some("5".to_string()),
            _ => None,
        };
        let c = run_cfg("", env);
        assert_eq!(c.conductor_url.as_deref(), Some("http://env:3000"));
        assert_eq!(c.state_dir, PathBuf::from("/env"));
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.labels.len(), 2);
        assert_eq!(c.queue_capacity, 5);
        let c = run_cfg("--token flag --interval 3s --label z=9", env);
        assert_eq!(c.token.as_deref(), Some("flag"));
        assert_eq!(c.interval, Duration::from_secs(3));
        assert_eq!(c.labels, vec![("z".into(), "9".into())]);
    }

    /// `parse` with `vars` as the whole environment.
    fn parse_with(a: &str, vars: &[(&str, &str)]) -> Result<Cli, CliError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        parse(args(a), env, || PathBuf::from("/d"))
    }

    #[test]
    fn the_registration_token_variable_wins_over_the_old_name_which_warns() {
        let run = |a: &str, vars: &[(&str, &str)]| match parse_with(a, vars) {
            Ok(Cli::Run(c, warnings)) => (c.token, warnings),
            other => panic!("{other:?}"),
        };
        let (new, old) = ("aer_new", "aer_old");
        // The new name alone, or both: the new one, silently.
        assert_eq!(run("", &[(TOKEN_ENV, new)]), (Some(new.into()), vec![]));
        assert_eq!(
            run("", &[(TOKEN_ENV, new), (LEGACY_TOKEN_ENV, old)]),
            (Some(new.into()), vec![])
        );
        // The old name alone still works, with one warning naming the new.
        let (token, warnings) = run("", &[(LEGACY_TOKEN_ENV, old)]);
        assert_eq!(token.as_deref(), Some(old));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(TOKEN_ENV), "{}", warnings[0]);
        // An empty new name counts as unset.
        assert_eq!(
            run("", &[(TOKEN_ENV, ""), (LEGACY_TOKEN_ENV, old)]).0,
            Some(old.into())
        );
        // The flag wins over both, and the old name unused says nothing.
        assert_eq!(
            run(
                "--token aer_flag",
                &[(TOKEN_ENV, new), (LEGACY_TOKEN_ENV, old)]
            ),
            (Some("aer_flag".into()), vec![])
        );
        assert_eq!(run("", &[]), (None, vec![]));
    }

    #[test]
    fn an_api_token_given_as_the_registration_token_is_refused_with_what_to_use() {
        let fp = "ab".repeat(32);
        for token in ["aek_0123abcd", "aes_0123abcd", &format!("aek_0123.{fp}")] {
            for (a, vars) in [
                (format!("--token {token}"), vec![]),
                (String::new(), vec![(TOKEN_ENV, token)]),
                (String::new(), vec![(LEGACY_TOKEN_ENV, token)]),
            ] {
                let e = parse_with(&a, &vars).unwrap_err().to_string();
                assert!(
                    e.contains("this is an API token") && e.contains("aer_"),
                    "{a} {vars:?}: {e}"
                );
                assert!(!e.contains("0123"), "the token is not echoed: {e}");
            }
        }
        // Which source it came from is named.
        let e = parse_with("", &[(LEGACY_TOKEN_ENV, "aek_1")]).unwrap_err();
        assert!(e.to_string().contains(LEGACY_TOKEN_ENV), "{e}");
        // A registration token, with or without the CA fingerprint, is fine.
        for token in ["aer_0123", &format!("aer_0123.{fp}")] {
            assert!(parse_with("", &[(TOKEN_ENV, token)]).is_ok(), "{token}");
        }
    }

    #[test]
    fn errors() {
        let p = |a: &str| parse(args(a), no_env, || PathBuf::from("/d"));
        assert!(matches!(p("--bogus"), Err(CliError::Unknown(_))));
        assert!(matches!(p("stray"), Err(CliError::Unknown(_))));
        assert!(matches!(p("--token"), Err(CliError::MissingValue(_))));
        assert!(matches!(p("--interval 0"), Err(CliError::Invalid { .. })));
        assert!(matches!(
            p("--interval soon"),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            p("--queue-capacity 0"),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            p("--queue-capacity -1"),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(p("--label nokey"), Err(CliError::Invalid { .. })));
        assert!(matches!(
            p("--conductor c:3000"),
            Err(CliError::Invalid { .. })
        ));
        assert!(matches!(
            p("--mqtt-url ws://x"),
            Err(CliError::Invalid { .. })
        ));
        assert!(p("--mqtt-url mqtts://x").is_ok(), "MQTT over TLS");
        let cut_short = format!("--token aer_{}.{}", "ab".repeat(32), "cd".repeat(31));
        match p(&cut_short) {
            Err(CliError::Invalid { value, reason, .. }) => {
                assert_eq!(value, "<redacted>", "the token is not echoed");
                assert!(reason.contains("cut short"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p("--interval 1s --help"), Ok(Cli::Help));
        assert_eq!(p("-h"), Ok(Cli::Help));
        assert_eq!(p("--version"), Ok(Cli::Version));
        assert!(run_cfg("--reenroll --interval 1s", |_| None).reenroll);
        assert!(!run_cfg("--interval 1s", |_| None).reenroll);
        assert!(run_cfg("", |k| (k == "AEREKOS_REENROLL").then(|| "1".to_string())).reenroll);
    }

    #[test]
    fn decode_subcommand() {
        let p = |a: &str| parse(args(a), no_env, || PathBuf::from("/d"));
        assert_eq!(
            p("decode -"),
            Ok(Cli::Decode {
                secret: None,
                worker: None,
                input: "-".into()
            })
        );
        assert_eq!(
            p("decode --secret ab --worker w-1 f.bin"),
            Ok(Cli::Decode {
                secret: Some("ab".into()),
                worker: Some("w-1".into()),
                input: "f.bin".into()
            })
        );
        assert!(p("decode").is_err());
        assert!(p("decode a b").is_err());
        assert!(p("decode --token x f").is_err());
    }

    #[cfg(feature = "decode")]
    #[test]
    fn decode_frames() {
        let secret = protocol::Secret::from_bytes([5; 32]);
        let env = protocol::Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: protocol::frame::bounded("w-1"),
            seq: 42,
            sent_at_ms: 0,
            body: protocol::Body::Command(protocol::Command {
                id: 1,
                action: protocol::Action::Ping,
            }),
        };
        let bytes = protocol::seal(&secret, &env).unwrap();
        let (json, verified) = decode_frame(&bytes, None, None).unwrap();
        assert!(!verified);
        assert!(json.contains("\"seq\": 42"), "{json}");
        let (_, verified) = decode_frame(&bytes, Some(&secret.to_hex()), None).unwrap();
        assert!(verified);
        let wrong = protocol::Secret::from_bytes([6; 32]).to_hex();
        assert!(decode_frame(&bytes, Some(&wrong), None).is_err());
        assert!(decode_frame(b"junk", None, None).is_err());
        // Format 2 needs the topic's worker id.
        let compact = protocol::Envelope {
            version: protocol::FORMAT_V2,
            ..env
        };
        let bytes = protocol::seal(&secret, &compact).unwrap();
        let e = decode_frame(&bytes, Some(&secret.to_hex()), None).unwrap_err();
        assert!(e.contains("worker id"), "{e}");
        let (json, verified) = decode_frame(&bytes, Some(&secret.to_hex()), Some("w-1")).unwrap();
        assert!(
            verified && json.contains("\"worker_id\": \"w-1\""),
            "{json}"
        );
    }

    #[test]
    fn log_levels() {
        let env = |k: &str| (k == "RUST_LOG").then(|| "debug".to_string());
        assert_eq!(log_level(env), tracing::Level::DEBUG);
        let env = |k: &str| match k {
            "AEREKOS_LOG" => Some("WARN".to_string()),
            "RUST_LOG" => Some("trace".to_string()),
            _ => None,
        };
        assert_eq!(log_level(env), tracing::Level::WARN);
        let env = |k: &str| (k == "RUST_LOG").then(|| "edge_worker=debug".to_string());
        assert_eq!(log_level(env), tracing::Level::INFO);
        assert_eq!(log_level(no_env), tracing::Level::INFO);
    }
}
