//! `aerekos`: the conductor's API from a shell. Every command is one or two
//! API calls. `--output json` (or `AEREKOS_OUTPUT=json`, or the older
//! `--json`) prints the API's JSON as returned, pretty-printed, and nothing
//! else on stdout, so scripts can pipe it to `jq`; `--output table` (the
//! default) prints a short human summary: a table for lists, `KEY value`
//! lines for one object, a line for an action. `logs`, `exec` and `shell`
//! stream the remote output as it comes in either mode.
//! `aerekos completions bash|zsh|fish|elvish|powershell` prints a shell
//! completion script.
//!
//! Connection: `--url` / `AEREKOS_URL` (default `http://127.0.0.1:3000`, the
//! conductor's loopback; `https://conductor:3000` from elsewhere), `--cacert`
//! / `AEREKOS_CACERT` (the conductor's `<data-dir>/tls/ca.pem`: only that CA
//! is trusted for `https://`; without it the public web roots are) and
//! `--token` / `AEREKOS_TOKEN` (an API token from `aerekos token create`,
//! `POST /api/v1/tokens` or the dashboard's settings, or the output of
//! `aerekos login`). A token's role (`admin`, `operator`, `viewer`) decides
//! which commands it may run; a refused one exits 1 with the conductor's
//! 403 message naming the role needed.
//!
//! Exit status: 0 on success, 1 on an API or transport error (the API's
//! `error` message is printed to stderr) or a reverted `agent rollout
//! --wait`, 2 on a usage error (clap).
//! Limits: JSON responses are read up to 16 MiB; `logs --follow` streams
//! until the conductor ends the response.

pub mod agent;
mod alerts;
pub mod exec;
pub mod shell;
mod tokens;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

/// Most bytes of a JSON response the CLI reads.
const MAX_JSON: u64 = 16 << 20;

/// How results are printed (`--output`, `AEREKOS_OUTPUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// For people: a table for lists, `KEY value` lines for one object.
    #[default]
    Table,
    /// The API's JSON as returned, pretty-printed, and nothing else on stdout.
    Json,
}

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "aerekos",
    version,
    about = "Drive an aerekos conductor from the shell"
)]
pub struct Cli {
    /// Conductor base URL.
    #[arg(long, env = "AEREKOS_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// The conductor's CA certificate (PEM, `<data-dir>/tls/ca.pem`) to
    /// trust for https:// (default: the public web roots).
    #[arg(long, env = "AEREKOS_CACERT")]
    pub cacert: Option<PathBuf>,
    /// API token (Bearer).
    #[arg(long, env = "AEREKOS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How to print results: `table` for people, `json` (the API's answer,
    /// pretty-printed) for scripts.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "AEREKOS_OUTPUT",
        default_value_t = Output::Table
    )]
    pub output: Output,
    /// Same as `--output json` (and wins over it).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

impl Cli {
    /// The output format asked for: `--json` is `--output json`.
    pub fn format(&self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Sign in as a user; prints a session token (`export AEREKOS_TOKEN=$(…)`).
    Login {
        /// User name.
        #[arg(long, default_value = "admin")]
        username: String,
        /// Read the password from stdin (one line) instead of AEREKOS_PASSWORD.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List workers.
    Workers,
    /// One worker: inventory, status, latest metrics.
    Worker {
        /// Worker id.
        id: String,
    },
    /// Set a worker's labels (replaces them): `aerekos labels w-1 site=shop model=pi5`.
    Labels {
        /// Worker id.
        id: String,
        /// `key=value` pairs.
        labels: Vec<String>,
    },
    /// Round-trip a Ping command to a worker.
    Ping {
        /// Worker id.
        id: String,
    },
    /// Give a worker a new frame secret, sealed under its current one (no
    /// re-enrolment; frames in flight under the old one are still accepted).
    RotateSecret {
        /// Worker id.
        id: String,
    },
    /// Artifacts: uploaded binaries addressed by SHA-256.
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Alerts: rules, webhook receivers, what fired and when.
    #[command(subcommand)]
    Alert(alerts::AlertCmd),
    /// API tokens and their roles (admin, operator, viewer).
    #[command(subcommand)]
    Token(tokens::TokenCmd),
    /// The agent release signing key (offline; no conductor needed).
    #[command(subcommand)]
    ReleaseKey(agent::ReleaseKeyCmd),
    /// Agent self-update: signed releases and rolling them out.
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// List service specs with their deployment and state.
    Services,
    /// Service specs.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Place a service on workers and/or labels (starts it there).
    Deploy {
        /// Service name.
        name: String,
        /// Worker ids, comma separated.
        #[arg(long, value_delimiter = ',')]
        workers: Vec<String>,
        /// Label selector `key=value` (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Spec version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// Install it stopped.
        #[arg(long)]
        stopped: bool,
    },
    /// Roll a deployed service to another version in waves.
    Rollout {
        /// Service name.
        name: String,
        /// Target version.
        #[arg(long)]
        version: u32,
        /// Workers in the first (canary) wave.
        #[arg(long)]
        canary: Option<u32>,
        /// Canary wave as a percentage of the targets.
        #[arg(long)]
        canary_percent: Option<u32>,
        /// Seconds each wave must stay healthy.
        #[arg(long)]
        settle: Option<u32>,
    },
    /// A service's rollout history.
    Rollouts {
        /// Service name.
        name: String,
    },
    /// Remove a service from every worker.
    Undeploy {
        /// Service name.
        name: String,
    },
    /// Start a service on one worker.
    Start {
        /// Worker id.
        worker: String,
        /// Service name.
        name: String,
    },
    /// Stop a service on one worker.
    Stop {
        /// Worker id.
        worker: String,
        /// Service name.
        name: String,
    },
    /// Restart a service on one worker.
    Restart {
        /// Worker id.
        worker: String,
        /// Service name.
        name: String,
    },
    /// Run a command on a worker (`aerekos exec w-1 -- uname -a`) or on every
    /// worker with a label (`aerekos exec --label site=shop -- uptime`);
    /// exits with the remote exit code. Needs the agent's
    /// `--allow-remote-exec` and the worker label `remote-exec=allow`.
    Exec {
        /// Worker id (or `--label`).
        worker: Option<String>,
        /// Every worker with this label `key=value` (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        /// Stop (and kill the command) after this many output bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_output: u32,
        /// The command and its arguments, after `--` (run without a shell).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// An interactive terminal on a worker (admin tokens only; allowed where
    /// remote exec is): `aerekos shell w-1`, or `aerekos shell w-1 -- htop`.
    Shell {
        /// Worker id.
        worker: String,
        /// The conductor ends the session after this many seconds without a
        /// keystroke or output (default 900).
        #[arg(long)]
        idle_timeout: Option<u32>,
        /// The program and its arguments, after `--` (default: the worker's
        /// login shell).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// The remote exec and shell audit, newest first: who ran what where, and how it ended.
    ExecLog {
        /// At most this many sessions.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print a shell completion script (offline): `aerekos completions bash >
    /// /etc/bash_completion.d/aerekos`; zsh: `_aerekos` in a directory on
    /// `$fpath`; fish: `~/.config/fish/completions/aerekos.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// A service's output on one worker: the tail, then optionally follow.
    Logs {
        /// Worker id.
        worker: String,
        /// Service name.
        name: String,
        /// Bytes from the end of the log.
        #[arg(long, default_value_t = 16384)]
        tail: u32,
        /// Keep streaming new output for this many seconds.
        #[arg(long, short, default_value_t = 0)]
        follow: u32,
    },
}

/// `aerekos artifact …`
#[derive(Debug, Subcommand)]
pub enum ArtifactCmd {
    /// Upload a binary for one architecture; prints its SHA-256.
    Upload {
        /// The file.
        file: PathBuf,
        /// Architecture as workers report it (`aarch64`, `x86_64`, `armv7l`).
        #[arg(long)]
        arch: String,
        /// A label for people (default: the file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List artifacts.
    List,
    /// Delete an artifact no spec uses.
    Rm {
        /// SHA-256 (hex).
        sha256: String,
    },
}

/// `aerekos service …`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Store a new version of a spec from a JSON file (`-` for stdin).
    Create {
        /// JSON spec file, as `POST /api/v1/services` takes it.
        file: PathBuf,
    },
    /// One service: spec, deployment, desired vs actual per worker.
    Show {
        /// Service name.
        name: String,
    },
}

/// A failed call: the API's message, or a transport error.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The conductor answered with an error status.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's `error` field (or the body).
        message: String,
    },
    /// Could not talk to the conductor.
    #[error("cannot reach the conductor: {0}")]
    Transport(#[from] ureq::Error),
    /// Local I/O (reading a file, writing stdout).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Bad argument value.
    #[error("{0}")]
    Usage(String),
    /// `aerekos exec`: the remote command's exit status, to exit with
    /// (nothing to print: the command's output said it all).
    #[error("the remote command exited with status {0}")]
    Exited(u8),
    /// What was asked did not succeed (an agent rollout was reverted).
    #[error("{0}")]
    Failed(String),
}

/// An API client bound to one conductor and token.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Roots for `https://`: the conductor's CA, or the public web roots.
    roots: ureq::tls::RootCerts,
}

fn agent(timeout: Duration, roots: &ureq::tls::RootCerts) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(roots.clone())
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .tls_config(tls)
        .build()
        .into()
}

/// The roots `--cacert` names (PEM, every certificate in the file).
pub fn ca_roots(pem: &[u8]) -> Result<ureq::tls::RootCerts, CliError> {
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(CliError::Usage(
            "--cacert: no certificate in the file (expected the conductor's tls/ca.pem)".into(),
        ));
    }
    Ok(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
}

impl Client {
    /// A client for `base` (e.g. `https://pi:3000`) trusting the public web
    /// roots for `https://`.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::with_roots(base, token, ureq::tls::RootCerts::WebPki)
    }

    /// A client for `base` trusting `roots` for `https://` ([`ca_roots`]).
    pub fn with_roots(base: &str, token: Option<String>, roots: ureq::tls::RootCerts) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent: agent(Duration::from_secs(60), &roots),
            roots,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, CliError> {
        let mut resp = resp?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_string()?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            Err(CliError::Api { status, message })
        }
    }

    /// `GET /api/v1{path}`.
    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let mut req = self.agent.get(self.url(path));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.call())
    }

    /// `DELETE /api/v1{path}`.
    pub fn delete(&self, path: &str) -> Result<Value, CliError> {
        let mut req = self.agent.delete(self.url(path));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(req.call())
    }

    /// `POST`/`PUT` JSON to `/api/v1{path}`.
    pub fn send(&self, method: &str, path: &str, body: &Value) -> Result<Value, CliError> {
        let url = self.url(path);
        let mut req = match method {
            "PUT" => self.agent.put(url),
            _ => self.agent.post(url),
        };
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(
            req.header("Content-Type", "application/json")
                .send(body.to_string()),
        )
    }

    /// Uploads a file as an artifact.
    pub fn upload(&self, file: File, arch: &str, name: &str) -> Result<Value, CliError> {
        let url = format!(
            "{}?arch={}&name={}",
            self.url("/artifacts"),
            query_escape(arch),
            query_escape(name)
        );
        let mut req = agent(Duration::from_secs(3600), &self.roots).post(url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(
            req.header("Content-Type", "application/octet-stream")
                .send(file),
        )
    }

    /// Streams a log response to `out` as it arrives.
    pub fn logs(
        &self,
        worker: &str,
        name: &str,
        tail: u32,
        follow: u32,
        out: &mut dyn Write,
    ) -> Result<(), CliError> {
        let url = self.url(&format!(
            "/workers/{worker}/services/{name}/logs?tail={tail}&follow={follow}"
        ));
        let mut req = agent(Duration::from_secs(u64::from(follow) + 60), &self.roots).get(url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let mut resp = req.call()?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Self::finish(Ok(resp)).map(|_| ());
        }
        let mut reader = resp.body_mut().as_reader();
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
    }
}

fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_pairs(pairs: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CliError::Usage(format!("expected key=value, got {p:?}"))),
        })
        .collect()
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// What is printed for the API's answer `v`: the JSON pretty-printed
/// (`json`), or `human(v)` (`table`); one trailing newline either way.
pub fn render(output: Output, v: &Value, human: &dyn Fn(&Value) -> String) -> String {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(v).unwrap_or_default(),
        Output::Table => human(v),
    };
    format!("{}\n", text.trim_end())
}

/// The completion script for `shell`, generated from the command line's
/// definition (every subcommand, flag and value list).
pub fn completion_script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "aerekos", &mut script);
    script
}

/// Runs one command, printing to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let format = cli.format();
    match cli.command {
        Cmd::Completions { shell } => {
            out.write_all(&completion_script(shell))?;
            return Ok(());
        }
        Cmd::ReleaseKey(cmd) => return agent::run_key(cmd, out, format),
        _ => {}
    }
    let client = match &cli.cacert {
        Some(path) => Client::with_roots(
            &cli.url,
            cli.token.clone(),
            ca_roots(&std::fs::read(path)?)?,
        ),
        None => Client::new(&cli.url, cli.token.clone()),
    };
    let print = |out: &mut dyn Write, v: &Value, human: &dyn Fn(&Value) -> String| {
        out.write_all(render(format, v, human).as_bytes())
    };
    match cli.command {
        Cmd::Login {
            username,
            password_stdin,
        } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim_end_matches(['\r', '\n']).to_string()
            } else {
                std::env::var("AEREKOS_PASSWORD").map_err(|_| {
                    CliError::Usage("set AEREKOS_PASSWORD or pass --password-stdin".into())
                })?
            };
            let v = client.send(
                "POST",
                "/login",
                &json!({"username": username, "password": password}),
            )?;
            print(out, &v, &|v| s(v, "token").to_string())?;
        }
        Cmd::Workers => {
            let v = client.get("/workers")?;
            print(out, &v, &workers_table)?;
        }
        Cmd::Worker { id } => {
            let v = client.get(&format!("/workers/{id}"))?;
            print(out, &v, &worker_detail)?;
        }
        Cmd::Labels { id, labels } => {
            let v = client.send(
                "PUT",
                &format!("/workers/{id}/labels"),
                &json!(parse_pairs(&labels)?),
            )?;
            print(out, &v, &|_| "labels set".into())?;
        }
        Cmd::RotateSecret { id } => {
            let v = client.send("POST", &format!("/workers/{id}/rotate-secret"), &json!({}))?;
            print(out, &v, &|v| {
                format!("{}: {}", s(v, "state"), s(v, "detail"))
            })?;
        }
        Cmd::Ping { id } => {
            let v = client.send(
                "POST",
                &format!("/workers/{id}/commands"),
                &json!({"action": "ping"}),
            )?;
            print(out, &v, &|v| {
                format!(
                    "{} {} ({} ms)",
                    s(v, "status"),
                    s(v, "detail"),
                    v.get("rtt_ms").map_or("-".into(), Value::to_string)
                )
            })?;
        }
        Cmd::Artifact(ArtifactCmd::Upload { file, arch, name }) => {
            let label = name.unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let f = File::open(&file)?;
            let v = client.upload(f, &arch, &label)?;
            print(out, &v, &|v| s(v, "sha256").to_string())?;
        }
        Cmd::Artifact(ArtifactCmd::List) => {
            let v = client.get("/artifacts")?;
            print(out, &v, &artifacts_table)?;
        }
        Cmd::Artifact(ArtifactCmd::Rm { sha256 }) => {
            let v = client.delete(&format!("/artifacts/{sha256}"))?;
            print(out, &v, &|_| "deleted".into())?;
        }
        Cmd::Services => {
            let v = client.get("/services")?;
            print(out, &v, &services_table)?;
        }
        Cmd::Service(ServiceCmd::Create { file }) => {
            let mut text = String::new();
            if file.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                File::open(&file)?.read_to_string(&mut text)?;
            }
            let spec: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: not JSON: {e}", file.display())))?;
            let v = client.send("POST", "/services", &spec)?;
            print(out, &v, &|v| {
                format!(
                    "{} v{}",
                    s(v, "name"),
                    v.get("version").map_or("?".into(), Value::to_string)
                )
            })?;
        }
        Cmd::Service(ServiceCmd::Show { name }) => {
            let v = client.get(&format!("/services/{name}"))?;
            print(out, &v, &service_detail)?;
        }
        Cmd::Deploy {
            name,
            workers,
            labels,
            version,
            stopped,
        } => {
            let mut body = json!({"workers": workers, "labels": parse_pairs(&labels)?});
            if let Some(n) = version {
                body["version"] = json!(n);
            }
            if stopped {
                body["desired_state"] = json!("stopped");
            }
            let v = client.send("PUT", &format!("/services/{name}/deployment"), &body)?;
            print(out, &v, &|v| {
                let targets: Vec<&str> = v
                    .get("targets")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                format!(
                    "deployed to {} worker(s): {}",
                    targets.len(),
                    targets.join(" ")
                )
            })?;
        }
        Cmd::Rollout {
            name,
            version,
            canary,
            canary_percent,
            settle,
        } => {
            let mut body = json!({"version": version});
            if let Some(c) = canary {
                body["canary"] = json!(c);
            }
            if let Some(p) = canary_percent {
                body["canary_percent"] = json!(p);
            }
            if let Some(t) = settle {
                body["settle_s"] = json!(t);
            }
            let v = client.send("POST", &format!("/services/{name}/rollout"), &body)?;
            print(out, &v, &|v| {
                service_rollouts_table(&json!({ "rollouts": [v] }))
            })?;
        }
        Cmd::Rollouts { name } => {
            let v = client.get(&format!("/services/{name}/rollouts"))?;
            print(out, &v, &service_rollouts_table)?;
        }
        Cmd::Undeploy { name } => {
            let v = client.delete(&format!("/services/{name}/deployment"))?;
            print(out, &v, &|_| format!("{name} undeployed"))?;
        }
        Cmd::Start { worker, name } => op(&client, out, &print, &worker, &name, "start")?,
        Cmd::Stop { worker, name } => op(&client, out, &print, &worker, &name, "stop")?,
        Cmd::Restart { worker, name } => op(&client, out, &print, &worker, &name, "restart")?,
        Cmd::Logs {
            worker,
            name,
            tail,
            follow,
        } => client.logs(&worker, &name, tail, follow, out)?,
        Cmd::Alert(cmd) => alerts::run(&client, cmd, out, &print)?,
        Cmd::Token(cmd) => tokens::run(&client, cmd, out, &print)?,
        Cmd::ReleaseKey(_) | Cmd::Completions { .. } => unreachable!("handled above"),
        Cmd::Agent(cmd) => agent::run(&client, cmd, out, &print)?,
        Cmd::Exec {
            worker,
            labels,
            timeout,
            max_output,
            argv,
        } => {
            let code = exec::run(&client, out, worker, &labels, &argv, timeout, max_output)?;
            if code != 0 {
                return Err(CliError::Exited(code));
            }
        }
        Cmd::Shell {
            worker,
            idle_timeout,
            argv,
        } => {
            let code = shell::run(&client, out, &worker, &argv, idle_timeout)?;
            if code != 0 {
                return Err(CliError::Exited(code));
            }
        }
        Cmd::ExecLog { limit } => {
            let v = client.get(&format!("/exec-sessions?limit={limit}"))?;
            print(out, &v, &exec::audit_table)?;
        }
    }
    Ok(())
}

type Printer<'a> =
    dyn Fn(&mut dyn Write, &Value, &dyn Fn(&Value) -> String) -> std::io::Result<()> + 'a;

fn op(
    client: &Client,
    out: &mut dyn Write,
    print: &Printer<'_>,
    worker: &str,
    name: &str,
    what: &str,
) -> Result<(), CliError> {
    let v = client.send(
        "POST",
        &format!("/workers/{worker}/services/{name}/{what}"),
        &json!({}),
    )?;
    print(out, &v, &|v| {
        format!("{what}: {} {}", s(v, "status"), s(v, "detail"))
    })?;
    Ok(())
}

fn rows(v: &Value, key: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        _ => v
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

fn workers_table(v: &Value) -> String {
    let mut t = String::from("ID                 NAME               STATUS   ARCH      MODEL\n");
    for w in rows(v, "workers") {
        let arch = w
            .pointer("/inventory/arch")
            .and_then(Value::as_str)
            .unwrap_or_else(|| s(&w, "arch"));
        let model = w
            .pointer("/inventory/device_model")
            .and_then(Value::as_str)
            .unwrap_or_else(|| s(&w, "device_model"));
        // `GET /workers` names a worker `hostname`.
        let name = w
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or_else(|| s(&w, "name"));
        t.push_str(&format!(
            "{:<18} {:<18} {:<8} {:<9} {}\n",
            s(&w, "id"),
            name,
            s(&w, "status"),
            arch,
            model
        ));
    }
    t
}

fn artifacts_table(v: &Value) -> String {
    let mut t = String::from("SHA256                                                            ARCH      SIZE       NAME\n");
    for a in rows(v, "artifacts") {
        t.push_str(&format!(
            "{:<65} {:<9} {:<10} {}\n",
            s(&a, "sha256"),
            s(&a, "arch"),
            a.get("size").map_or("-".into(), Value::to_string),
            s(&a, "name")
        ));
    }
    t
}

fn services_table(v: &Value) -> String {
    let mut t = String::from("NAME                             VERSION  KIND       DEPLOYED\n");
    for sv in rows(v, "services") {
        let version = sv
            .get("latest_version")
            .or_else(|| sv.get("version"))
            .map_or("-".into(), Value::to_string);
        let deployed = sv
            .pointer("/deployment/version")
            .map_or("no".into(), |v| format!("v{v}"));
        let kind = sv
            .pointer("/spec/kind")
            .and_then(Value::as_str)
            .unwrap_or("process");
        t.push_str(&format!(
            "{:<32} {:<8} {:<10} {}\n",
            s(&sv, "name"),
            version,
            kind,
            deployed
        ));
    }
    t
}

/// The value at `pointer` for people: a string unquoted, `-` when absent or null.
fn field(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

/// `used / total MiB` from two byte counts (`-` when either is missing).
fn mib_of(v: &Value, used: &str, total: &str) -> String {
    match (
        v.pointer(used).and_then(Value::as_u64),
        v.pointer(total).and_then(Value::as_u64),
    ) {
        (Some(u), Some(t)) => format!("{} / {} MiB", u >> 20, t >> 20),
        _ => "-".into(),
    }
}

/// `GET /workers/{id}` for people: one `KEY value` line per fact.
fn worker_detail(v: &Value) -> String {
    let labels = v
        .get("labels")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .map_or("-".into(), |m| {
            m.iter()
                .map(|(k, l)| format!("{k}={}", l.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        });
    let unit = |p: &str, u: &str| match field(v, p) {
        d if d == "-" => d,
        d => format!("{d} {u}"),
    };
    let lines = [
        ("ID", field(v, "/id")),
        ("HOSTNAME", field(v, "/hostname")),
        ("STATUS", field(v, "/status")),
        ("REVOKED", field(v, "/revoked")),
        ("ARCH", field(v, "/inventory/arch")),
        ("MODEL", field(v, "/inventory/device_model")),
        ("OS", field(v, "/inventory/os")),
        ("KERNEL", field(v, "/inventory/kernel")),
        ("AGENT", field(v, "/agent_version")),
        ("LABELS", labels),
        ("ENROLLED_MS", field(v, "/enrolled_at_ms")),
        ("LAST_SEEN_MS", field(v, "/last_seen_ms")),
        ("LAST_IP", field(v, "/last_ip")),
        ("CPU", unit("/summary/cpu_percent", "%")),
        (
            "MEMORY",
            mib_of(v, "/summary/memory_used", "/summary/memory_total"),
        ),
        (
            "DISK",
            mib_of(v, "/summary/disk_used", "/summary/disk_total"),
        ),
        ("TEMP", unit("/summary/temp_max_celsius", "°C")),
        ("LOAD1", field(v, "/summary/load1")),
        ("UPTIME", unit("/summary/uptime_s", "s")),
        (
            "EVENTS",
            v.get("events")
                .and_then(Value::as_array)
                .map_or("-".into(), |e| e.len().to_string()),
        ),
    ];
    let mut t = String::new();
    for (k, val) in lines {
        t.push_str(&format!("{k:<13} {val}\n"));
    }
    t
}

/// `GET /services/{name}/rollouts` (or one rollout) for people.
fn service_rollouts_table(v: &Value) -> String {
    let mut t = String::from(
        "ID     STATE        FROM  TO    WAVE  STARTED_MS     FINISHED_MS    REASON\n",
    );
    for r in rows(v, "rollouts") {
        let waves = r.get("waves").and_then(Value::as_array).map_or(0, Vec::len);
        let wave = match r.get("wave").and_then(Value::as_u64) {
            Some(w) if waves > 0 => format!("{}/{waves}", w.saturating_add(1)),
            _ => "-".into(),
        };
        t.push_str(&format!(
            "{:<6} {:<12} {:<5} {:<5} {:<5} {:<14} {:<14} {}\n",
            field(&r, "/id"),
            field(&r, "/state"),
            field(&r, "/from_version"),
            field(&r, "/to_version"),
            wave,
            field(&r, "/started_ms"),
            field(&r, "/finished_ms"),
            field(&r, "/reason"),
        ));
    }
    t
}

/// The newest version of a service as `GET /services/{name}` returns it:
/// the highest `versions[].version` (that answer has no `latest_version`,
/// which only the list `GET /services` carries).
fn latest_version(v: &Value) -> Option<u64> {
    v.get("latest_version").and_then(Value::as_u64).or_else(|| {
        v.get("versions")?
            .as_array()?
            .iter()
            .filter_map(|e| e.get("version").and_then(Value::as_u64))
            .max()
    })
}

fn service_detail(v: &Value) -> String {
    let mut t = format!(
        "{} (latest {})\n",
        s(v, "name"),
        latest_version(v).map_or("version unknown".into(), |n| format!("v{n}"))
    );
    t.push_str("WORKER             DESIRED     ACTUAL      VERSION  PID      RESTARTS DETAIL\n");
    for w in rows(v, "workers") {
        let actual = w.get("actual").cloned().unwrap_or(Value::Null);
        t.push_str(&format!(
            "{:<18} {:<11} {:<11} {:<8} {:<8} {:<8} {}\n",
            s(&w, "worker_id"),
            s(&w, "desired_state"),
            s(&actual, "state"),
            actual.get("version").map_or("-".into(), Value::to_string),
            actual.get("pid").map_or("-".into(), Value::to_string),
            actual.get("restarts").map_or("-".into(), Value::to_string),
            s(&actual, "detail"),
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_show_prints_the_latest_version_from_the_versions_list() {
        // As `GET /api/v1/services/{name}` answers (conductor/src/http/services.rs `get`).
        let v = serde_json::json!({
            "name": "probe",
            "versions": [
                {"version": 1, "created_ms": 1, "spec": {}},
                {"version": 3, "created_ms": 3, "spec": {}},
                {"version": 2, "created_ms": 2, "spec": {}},
            ],
            "deployment": null,
            "rollout": null,
            "workers": [{"worker_id": "w-1", "desired_state": "running",
                         "actual": {"state": "running", "version": 3, "pid": 42,
                                    "restarts": 0, "detail": "running"}}],
            "untargeted": [],
            "events": [],
        });
        let text = service_detail(&v);
        assert!(text.starts_with("probe (latest v3)\n"), "{text}");
        assert!(!text.contains('?'), "{text}");
        assert!(text.contains("w-1"), "{text}");
        let none = service_detail(&serde_json::json!({"name": "x", "versions": []}));
        assert!(none.starts_with("x (latest version unknown)"), "{none}");
    }

    /// `GET /api/v1/workers` as the conductor answers it (conductor/src/http/api.rs
    /// `list_workers`), trimmed to what the table reads plus a nested object.
    fn workers_fixture() -> Value {
        json!({
            "workers": [
                {"id": "w-1", "hostname": "pi-kitchen", "labels": {"site": "shop"},
                 "status": "online", "revoked": false, "arch": "aarch64",
                 "device_model": "Raspberry Pi 4 Model B", "agent_version": "0.1.0",
                 "summary": {"cpu_percent": 12.5, "load1": 0.5}},
                {"id": "w-2", "hostname": "pi-zero", "labels": {}, "status": "offline",
                 "revoked": false, "arch": null, "device_model": null, "summary": null},
            ],
            "now_ms": 1_765_000_000_000u64,
        })
    }

    #[test]
    fn json_output_is_the_api_answer_pretty_stable_and_round_trips() {
        let v = workers_fixture();
        let text = render(Output::Json, &v, &|_| panic!("the human form is not used"));
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        assert_eq!(
            text,
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap())
        );
        assert!(text.starts_with("{\n  \""), "pretty, not one line: {text}");
        // Stable: the same answer prints the same bytes, also after a round trip.
        let again: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(render(Output::Json, &again, &|_| String::new()), text);
        // A non-JSON body (kept as a string by `Client::finish`) is still JSON.
        let plain = render(Output::Json, &Value::String("ok".into()), &|_| {
            String::new()
        });
        assert_eq!(plain, "\"ok\"\n");
    }

    #[test]
    fn table_output_is_the_human_form() {
        let v = workers_fixture();
        let text = render(Output::Table, &v, &workers_table);
        assert_eq!(text, workers_table(&v));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["ID", "NAME", "STATUS", "ARCH", "MODEL"]
        );
        // Columns line up under their headers; the NAME is the hostname.
        assert_eq!(
            lines[1],
            format!(
                "{:<18} {:<18} {:<8} {:<9} {}",
                "w-1", "pi-kitchen", "online", "aarch64", "Raspberry Pi 4 Model B"
            )
        );
        assert_eq!(lines[1].find("pi-kitchen"), lines[0].find("NAME"));
        assert_eq!(lines[1].find("online"), lines[0].find("STATUS"));
        assert_eq!(lines[1].find("aarch64"), lines[0].find("ARCH"));
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["w-2", "pi-zero", "offline", "-", "-"]
        );
        assert_eq!(lines.len(), 3);
        // One line for an action, trimmed to one trailing newline.
        assert_eq!(
            render(Output::Table, &json!({}), &|_| "labels set\n\n".into()),
            "labels set\n"
        );
    }

    #[test]
    fn other_tables_have_their_columns() {
        let arts = artifacts_table(&json!({"artifacts": [
            {"sha256": "ab".repeat(32), "arch": "x86_64", "size": 1234, "name": "probe"},
        ]}));
        let lines: Vec<&str> = arts.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["SHA256", "ARCH", "SIZE", "NAME"]
        );
        assert_eq!(lines[1].find("x86_64"), lines[0].find("ARCH"));
        assert_eq!(lines[1].find("1234"), lines[0].find("SIZE"));
        assert!(lines[1].ends_with(" probe"), "{arts}");

        let svcs = services_table(&json!({"services": [
            {"name": "web", "latest_version": 3, "spec": {"kind": "container"},
             "deployment": {"version": 2}},
            {"name": "idle", "latest_version": 1, "deployment": null},
        ]}));
        let lines: Vec<Vec<&str>> = svcs
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0], ["NAME", "VERSION", "KIND", "DEPLOYED"]);
        assert_eq!(lines[1], ["web", "3", "container", "v2"]);
        assert_eq!(lines[2], ["idle", "1", "process", "no"]);
    }

    #[test]
    fn worker_show_prints_key_value_lines() {
        // As `GET /api/v1/workers/{id}` answers (conductor/src/http/api.rs `get_worker`).
        let v = json!({
            "id": "w-1", "hostname": "pi-kitchen", "status": "online", "revoked": false,
            "labels": {"model": "pi5", "site": "shop"},
            "enrolled_at_ms": 1000, "last_seen_ms": 2000, "last_ip": "10.0.0.5",
            "inventory": {"hostname": "pi-kitchen", "os": "Debian 12", "kernel": "6.6.51",
                          "arch": "aarch64", "device_model": "Raspberry Pi 5"},
            "agent_version": "0.1.0",
            "summary": {"cpu_percent": 12.5, "memory_used": 512u64 << 20,
                        "memory_total": 4096u64 << 20, "disk_used": 3u64 << 30,
                        "disk_total": 32u64 << 30, "temp_max_celsius": 48.2,
                        "load1": 0.52, "uptime_s": 3600},
            "events": [{"kind": "Boot"}, {"kind": "ServiceStarted"}],
        });
        let text = worker_detail(&v);
        let kv: BTreeMap<&str, String> = text
            .lines()
            .map(|l| {
                let (k, rest) = l.split_once(' ').unwrap();
                (k, rest.trim_start().to_string())
            })
            .collect();
        let get = |k: &str| kv.get(k).map(String::as_str).unwrap_or("(missing)");
        assert_eq!(get("ID"), "w-1");
        assert_eq!(get("HOSTNAME"), "pi-kitchen");
        assert_eq!(get("STATUS"), "online");
        assert_eq!(get("ARCH"), "aarch64");
        assert_eq!(get("MODEL"), "Raspberry Pi 5");
        assert_eq!(get("LABELS"), "model=pi5,site=shop");
        assert_eq!(get("CPU"), "12.5 %");
        assert_eq!(get("MEMORY"), "512 / 4096 MiB");
        assert_eq!(get("DISK"), "3072 / 32768 MiB");
        assert_eq!(get("TEMP"), "48.2 °C");
        assert_eq!(get("UPTIME"), "3600 s");
        assert_eq!(get("EVENTS"), "2");
        // Every value starts in the same column.
        let col = |l: &str| l.len() - l[l.find(' ').unwrap()..].trim_start().len();
        assert!(text.lines().all(|l| col(l) == 14), "{text}");
        // A worker that never reported: dashes, no panic.
        let bare = worker_detail(&json!({"id": "w-2", "inventory": null, "summary": null}));
        assert!(bare.contains("MEMORY        -\n"), "{bare}");
        assert!(bare.contains("CPU           -\n"), "{bare}");
        assert!(bare.contains("LABELS        -\n"), "{bare}");
    }

    #[test]
    fn service_rollouts_table_lists_waves_and_states() {
        // As `GET /api/v1/services/{name}/rollouts` answers (conductor/src/rollout.rs `to_json`).
        let v = json!({"name": "web", "rollouts": [
            {"id": 7, "from_version": 1, "to_version": 2, "state": "in_progress",
             "wave": 0, "waves": [{"workers": ["w-1"]}, {"workers": ["w-2", "w-3"]}],
             "reason": null, "started_ms": 1000, "finished_ms": null},
            {"id": 6, "from_version": 2, "to_version": 1, "state": "reverted",
             "wave": 1, "waves": [{"workers": ["w-1"]}, {"workers": ["w-2"]}],
             "reason": "w-2 failed", "started_ms": 500, "finished_ms": 900},
        ]});
        let text = service_rollouts_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "ID",
                "STATE",
                "FROM",
                "TO",
                "WAVE",
                "STARTED_MS",
                "FINISHED_MS",
                "REASON"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["7", "in_progress", "1", "2", "1/2", "1000", "-", "-"]
        );
        assert_eq!(lines[2].find("reverted"), lines[0].find("STATE"));
        assert_eq!(lines[2].find("2/2"), lines[0].find("WAVE"));
        assert!(lines[2].ends_with(" w-2 failed"), "{text}");
        // `aerekos rollout` prints the one rollout the API answers the same way.
        let one = v["rollouts"][0].clone();
        let single = service_rollouts_table(&json!({ "rollouts": [one] }));
        assert_eq!(single.lines().nth(1), Some(lines[1]));
    }

    #[test]
    fn output_flag_env_and_json_alias() {
        let format = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.format()).ok();
        // The process environment may carry AEREKOS_OUTPUT; the default only without it
        // (tests/output.rs sets it for a child process instead).
        if std::env::var_os("AEREKOS_OUTPUT").is_none() {
            assert_eq!(format(&["aerekos", "workers"]), Some(Output::Table));
        }
        assert_eq!(
            format(&["aerekos", "--output", "json", "workers"]),
            Some(Output::Json)
        );
        assert_eq!(
            format(&["aerekos", "workers", "--output", "json"]),
            Some(Output::Json)
        );
        assert_eq!(
            format(&["aerekos", "--output=table", "alert", "rules"]),
            Some(Output::Table)
        );
        assert_eq!(
            format(&["aerekos", "--json", "workers"]),
            Some(Output::Json)
        );
        assert_eq!(
            format(&["aerekos", "token", "list", "--json"]),
            Some(Output::Json)
        );
        assert_eq!(
            format(&["aerekos", "--json", "--output", "table", "workers"]),
            Some(Output::Json)
        );
        assert_eq!(format(&["aerekos", "--output", "yaml", "workers"]), None);
        assert_eq!(
            format(&["aerekos", "completions", "fish", "--output", "json"]),
            Some(Output::Json)
        );
        assert!(Cli::try_parse_from(["aerekos", "completions", "tcsh"]).is_err());
        assert!(Cli::try_parse_from(["aerekos", "completions"]).is_err());
    }

    #[test]
    fn completion_scripts_name_the_subcommands_and_bash_accepts_its_own() {
        use clap_complete::Shell;
        let bash = String::from_utf8(completion_script(Shell::Bash)).unwrap();
        for name in [
            "workers",
            "worker",
            "services",
            "rollouts",
            "exec-log",
            "rotate-secret",
            "completions",
            "add-rule",
            "release-key",
        ] {
            assert!(bash.contains(name), "bash script lacks {name}");
        }
        assert!(bash.contains("--output"), "global flag");
        assert!(bash.contains("complete -F _aerekos"), "registers itself");
        for shell in [Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            assert!(
                script.contains("aerekos") && script.contains("exec-log"),
                "{shell}: {script}"
            );
        }
        // Syntax: `bash -n` reads the script without running it.
        match std::process::Command::new("bash")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(mut child) => {
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(bash.as_bytes())
                    .unwrap();
                let done = child.wait_with_output().unwrap();
                assert!(
                    done.status.success(),
                    "bash -n: {}",
                    String::from_utf8_lossy(&done.stderr)
                );
            }
            Err(e) => eprintln!("bash not found ({e}); syntax check skipped"),
        }
    }

    #[test]
    fn pairs_and_escaping() {
        let p = parse_pairs(&["a=b".into(), "c=".into()]).unwrap_or_default();
        assert_eq!(p.get("a").map(String::as_str), Some("b"));
        assert_eq!(p.get("c").map(String::as_str), Some(""));
        assert!(parse_pairs(&["novalue".into()]).is_err());
        assert!(parse_pairs(&["=x".into()]).is_err());
        assert_eq!(query_escape("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn cli_parses_every_command_shape() {
        for args in [
            vec!["aerekos", "workers"],
            vec!["aerekos", "--json", "services"],
            vec![
                "aerekos",
                "deploy",
                "web",
                "--workers",
                "w-1,w-2",
                "--label",
                "site=shop",
            ],
            vec![
                "aerekos",
                "rollout",
                "web",
                "--version",
                "2",
                "--canary",
                "1",
                "--settle",
                "5",
            ],
            vec!["aerekos", "logs", "w-1", "web", "--tail", "100", "-f", "10"],
            vec![
                "aerekos",
                "artifact",
                "upload",
                "/bin/true",
                "--arch",
                "x86_64",
            ],
            vec!["aerekos", "service", "create", "-"],
            vec!["aerekos", "exec", "w-1", "--", "uname", "-a"],
            vec![
                "aerekos",
                "exec",
                "--label",
                "site=shop",
                "--timeout",
                "5",
                "--",
                "ls",
                "-l",
            ],
            vec!["aerekos", "exec-log", "--limit", "5"],
            vec!["aerekos", "release-key", "generate", "--out", "k.pem"],
            vec!["aerekos", "release-key", "public", "k.pem"],
            vec![
                "aerekos",
                "agent",
                "release",
                "--key",
                "k.pem",
                "--version",
                "0.2.0",
                "--arch",
                "aarch64",
                "target/edge-worker",
            ],
            vec!["aerekos", "agent", "releases"],
            vec![
                "aerekos",
                "agent",
                "rollout",
                "--version",
                "0.2.0",
                "--canary",
                "1",
                "--settle",
                "60",
                "--trial",
                "30",
                "--timeout",
                "300",
                "--label",
                "site=shop",
                "--label",
                "model=pi5",
                "--allow-downgrade",
                "--wait",
            ],
            vec![
                "aerekos",
                "agent",
                "rollout",
                "--version",
                "0.2.0",
                "--canary-percent",
                "10",
            ],
            vec!["aerekos", "agent", "rollouts"],
            vec!["aerekos", "--json", "agent", "rollouts", "3"],
            vec!["aerekos", "agent", "abort", "3"],
            vec!["aerekos", "token", "create", "ci"],
            vec![
                "aerekos", "--json", "token", "create", "ci", "--role", "viewer",
            ],
            vec!["aerekos", "token", "list"],
            vec!["aerekos", "token", "delete", "t-0123456789ab"],
        ] {
            assert!(Cli::try_parse_from(&args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["aerekos", "rollout", "web"]).is_err());
        for bad in [
            vec!["aerekos", "release-key", "generate"],
            vec![
                "aerekos",
                "agent",
                "release",
                "--version",
                "0.2.0",
                "--arch",
                "x86_64",
                "b",
            ],
            vec!["aerekos", "agent", "rollout"],
            vec!["aerekos", "token", "create", "ci", "--role", "root"],
            vec!["aerekos", "token", "create"],
            vec!["aerekos", "token", "delete"],
            vec![
                "aerekos",
                "agent",
                "rollout",
                "--version",
                "0.2.0",
                "--canary",
                "1",
                "--canary-percent",
                "5",
            ],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
        match Cli::try_parse_from([
            "aerekos",
            "agent",
            "rollout",
            "--version",
            "0.2.0",
            "--label",
            "a=b",
            "--wait",
        ])
        .map(|c| c.command)
        {
            Ok(Cmd::Agent(agent::AgentCmd::Rollout {
                version,
                labels,
                wait,
                allow_downgrade,
                ..
            })) => {
                assert_eq!(version, "0.2.0");
                assert_eq!(labels, ["a=b"]);
                assert!(wait && !allow_downgrade);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["aerekos", "exec", "w-1"]).is_err(),
            "no command"
        );
        match Cli::try_parse_from(["aerekos", "exec", "w-1", "--", "ls", "--all"])
            .map(|c| c.command)
        {
            Ok(Cmd::Exec { worker, argv, .. }) => {
                assert_eq!(worker.as_deref(), Some("w-1"));
                assert_eq!(argv, ["ls", "--all"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
