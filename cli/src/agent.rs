//! Signed agent self-update from the shell: the release signing key
//! (`aerekos release-key …`, offline: it never reaches the conductor),
//! signing and registering a release (`aerekos agent release`), and
//! rolling it out (`aerekos agent rollout`, `/api/v1/agent-rollouts`).
//!
//! The key file is the Ed25519 private key as PKCS#8 in PEM
//! (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm ed25519`
//! writes it too), mode 0600. A release signature covers
//! [`protocol::release::signed_message`] (version, arch, SHA-256 of the
//! binary); the conductor checks it under its `--release-key` and every
//! worker again under the key it pinned at enrolment.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

use crate::{parse_pairs, rows, s, CliError, Client, Output, Printer};

/// The PEM label of the key file.
pub const PEM_TAG: &str = "PRIVATE KEY";
/// How often `agent rollout --wait` polls.
const POLL: Duration = Duration::from_secs(2);

/// `aerekos release-key …`
#[derive(Debug, Subcommand)]
pub enum ReleaseKeyCmd {
    /// Make a new release signing key (Ed25519) in FILE (mode 0600, never
    /// overwritten); prints its public key for the conductor's
    /// `--release-key`. Keep the file offline.
    Generate {
        /// Where to write the private key (PKCS#8 PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (64 hex digits) of a key file.
    Public {
        /// The private key file.
        file: PathBuf,
    },
}

/// `aerekos agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Sign an edge-worker binary, upload it as an artifact and register it
    /// as the agent release VERSION for ARCH.
    Release {
        /// The release signing key (`aerekos release-key generate`).
        #[arg(long)]
        key: PathBuf,
        /// Agent version, `major.minor.patch[-pre]`.
        #[arg(long)]
        version: String,
        /// Architecture as workers report it (`aarch64`, `x86_64`, `armv7l`).
        #[arg(long)]
        arch: String,
        /// The edge-worker binary.
        binary: PathBuf,
    },
    /// List agent releases.
    Releases,
    /// Roll an agent release out to the fleet in waves (canary first).
    Rollout {
        /// The release version.
        #[arg(long)]
        version: String,
        /// Workers in the first (canary) wave (default 1).
        #[arg(long, conflicts_with = "canary_percent")]
        canary: Option<u32>,
        /// Canary wave as a percentage of the workers to update.
        #[arg(long)]
        canary_percent: Option<u8>,
        /// Seconds each worker must report the new version.
        #[arg(long)]
        settle: Option<u32>,
        /// Seconds a wave may take (default trial + settle + 60).
        #[arg(long)]
        timeout: Option<u32>,
        /// Seconds the new agent has on the device to come back before the
        /// old one takes over again (5..=600, default 60).
        #[arg(long)]
        trial: Option<u16>,
        /// Only workers with this label `key=value` (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Install even where the running agent is newer.
        #[arg(long)]
        allow_downgrade: bool,
        /// Wait until it ends, print each worker's outcome, and exit 1 when
        /// it was reverted.
        #[arg(long)]
        wait: bool,
    },
    /// Agent rollouts, newest first, or one with its workers' outcomes.
    Rollouts {
        /// A rollout id.
        id: Option<i64>,
    },
    /// Stop the agent rollout in progress (workers already updated stay).
    Abort {
        /// The rollout id.
        id: i64,
    },
}

fn key_err(path: &Path, why: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{}: {why}", path.display()))
}

/// A new key pair: the PKCS#8 document and the public key.
pub fn generate_key() -> Result<(Vec<u8>, [u8; 32]), CliError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| CliError::Usage("cannot generate a key (no randomness)".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| CliError::Usage("the generated key does not parse".into()))?;
    Ok((pkcs8.as_ref().to_vec(), public_of(&pair)))
}

fn public_of(pair: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(pair.public_key().as_ref());
    out
}

/// Writes `pkcs8` as PEM to `path`: a new file (refused when it exists),
/// mode 0600.
pub fn write_key(path: &Path, pkcs8: &[u8]) -> Result<(), CliError> {
    let text = pem::encode(&pem::Pem::new(PEM_TAG, pkcs8.to_vec()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => key_err(path, "exists already; not overwritten"),
        _ => key_err(path, e),
    })?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Reads a key file (PKCS#8 PEM, v1 or v2).
pub fn read_key(path: &Path) -> Result<Ed25519KeyPair, CliError> {
    let text = std::fs::read(path).map_err(|e| key_err(path, e))?;
    let p = pem::parse(&text).map_err(|e| key_err(path, format!("not PEM: {e}")))?;
    if p.tag() != PEM_TAG {
        return Err(key_err(
            path,
            format!("expected a {PEM_TAG} PEM block, found {}", p.tag()),
        ));
    }
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(p.contents())
        .map_err(|e| key_err(path, format!("not an Ed25519 PKCS#8 key: {e}")))
}

/// The public key of a key pair as the conductor takes it (64 hex digits).
pub fn public_hex(pair: &Ed25519KeyPair) -> String {
    protocol::hex_string(&public_of(pair))
}

/// SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], CliError> {
    let mut f = File::open(path).map_err(|e| key_err(path, e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// The signature (hex) of release `version` for `arch` whose binary has
/// SHA-256 `sha`.
pub fn sign_release(
    pair: &Ed25519KeyPair,
    version: &str,
    arch: &str,
    sha: &[u8; 32],
) -> Result<String, CliError> {
    let message = protocol::release::signed_message(version, arch, sha)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(protocol::hex_string(pair.sign(&message).as_ref()))
}

/// `aerekos release-key …` (no conductor involved).
pub fn run_key(cmd: ReleaseKeyCmd, out: &mut dyn Write, format: Output) -> Result<(), CliError> {
    match cmd {
        ReleaseKeyCmd::Generate { out: path } => {
            let (pkcs8, public) = generate_key()?;
            write_key(&path, &pkcs8)?;
            let hex = protocol::hex_string(&public);
            let v = json!({"private_key_file": path.display().to_string(), "public_key": hex});
            out.write_all(
                crate::render(format, &v, &|_| {
                    format!(
                        "private key written to {} (mode 0600; keep it offline)\n\
                         public key: {hex}\n\
                         on the conductor: --release-key {hex}\n  \
                         (or AEREKOS_RELEASE_KEY={hex}, or release_key = \"{hex}\" in its config file)",
                        path.display()
                    )
                })
                .as_bytes(),
            )?;
        }
        ReleaseKeyCmd::Public { file } => {
            let v = json!({"public_key": public_hex(&read_key(&file)?)});
            out.write_all(
                crate::render(format, &v, &|v| s(v, "public_key").to_string()).as_bytes(),
            )?;
        }
    }
    Ok(())
}

fn opt(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

fn releases_table(v: &Value) -> String {
    let mut t = String::from("VERSION          ARCH      SIZE       SHA256\n");
    for r in rows(v, "releases") {
        t.push_str(&format!(
            "{:<16} {:<9} {:<10} {}\n",
            s(&r, "version"),
            s(&r, "arch"),
            opt(&r, "size"),
            s(&r, "sha256")
        ));
    }
    t
}

fn rollouts_table(v: &Value) -> String {
    let mut t =
        String::from("ID     VERSION          STATE        WAVE  UPDATED FAILED SKIPPED REASON\n");
    for r in rows(v, "rollouts") {
        t.push_str(&format!(
            "{:<6} {:<16} {:<12} {:<5} {:<7} {:<6} {:<7} {}\n",
            opt(&r, "id"),
            s(&r, "version"),
            s(&r, "state"),
            opt(&r, "wave"),
            r.pointer("/counts/updated")
                .map_or("-".into(), Value::to_string),
            r.pointer("/counts/failed")
                .map_or("-".into(), Value::to_string),
            r.pointer("/counts/skipped")
                .map_or("-".into(), Value::to_string),
            s(&r, "reason"),
        ));
    }
    t
}

/// One rollout with its members' outcomes.
pub fn rollout_detail(r: &Value) -> String {
    let mut t = format!(
        "agent rollout {} to {}: {}{}\n",
        opt(r, "id"),
        s(r, "version"),
        s(r, "state"),
        match r.get("reason").and_then(Value::as_str) {
            Some(x) if !x.is_empty() => format!(" ({x})"),
            _ => String::new(),
        }
    );
    t.push_str("WORKER             STATE    FROM             ARCH      DETAIL\n");
    for m in rows(r, "members") {
        t.push_str(&format!(
            "{:<18} {:<8} {:<16} {:<9} {}\n",
            s(&m, "worker_id"),
            s(&m, "state"),
            s(&m, "from_version"),
            s(&m, "arch"),
            s(&m, "detail"),
        ));
    }
    t
}

/// The body of `POST /agent-rollouts` from the flags.
#[allow(clippy::too_many_arguments)]
pub fn rollout_body(
    version: &str,
    canary: Option<u32>,
    canary_percent: Option<u8>,
    settle: Option<u32>,
    timeout: Option<u32>,
    trial: Option<u16>,
    labels: &[String],
    allow_downgrade: bool,
) -> Result<Value, CliError> {
    let mut body = json!({"version": version});
    if let Some(c) = canary {
        body["canary"] = json!(c);
    }
    if let Some(p) = canary_percent {
        body["canary_percent"] = json!(p);
    }
    if let Some(x) = settle {
        body["settle_s"] = json!(x);
    }
    if let Some(x) = timeout {
        body["timeout_s"] = json!(x);
    }
    if let Some(x) = trial {
        body["trial_s"] = json!(x);
    }
    if !labels.is_empty() {
        body["selector"] = json!(parse_pairs(labels)?);
    }
    if allow_downgrade {
        body["allow_downgrade"] = json!(true);
    }
    Ok(body)
}

/// `aerekos agent …`
pub fn run(
    client: &Client,
    cmd: AgentCmd,
    out: &mut dyn Write,
    print: &Printer<'_>,
) -> Result<(), CliError> {
    match cmd {
        AgentCmd::Release {
            key,
            version,
            arch,
            binary,
        } => {
            let pair = read_key(&key)?;
            let mut head = Vec::with_capacity(20);
            File::open(&binary)?.take(20).read_to_end(&mut head)?;
            if let Some(why) = protocol::release::elf_mismatch(&head, &arch) {
                return Err(CliError::Usage(format!(
                    "refusing to sign {}: {why} (built for the wrong --target?)",
                    binary.display()
                )));
            }
            let sha = sha256_file(&binary)?;
            let signature = sign_release(&pair, &version, &arch, &sha)?;
            let sha_hex = protocol::hex_string(&sha);
            let label = format!("edge-worker {version} {arch}");
            let uploaded = client.upload(File::open(&binary)?, &arch, &label)?;
            if uploaded.get("sha256").and_then(Value::as_str) != Some(sha_hex.as_str()) {
                return Err(CliError::Usage(format!(
                    "the conductor stored sha256 {} for {}, expected {sha_hex} (changed while uploading?)",
                    s(&uploaded, "sha256"),
                    binary.display()
                )));
            }
            let v = client.send(
                "POST",
                "/agent-releases",
                &json!({"version": version, "arch": arch, "sha256": sha_hex, "signature": signature}),
            )?;
            print(out, &v, &|v| {
                format!(
                    "signed {} ({} bytes, sha256 {}) with key {}\nagent release {} for {} registered",
                    binary.display(),
                    opt(v, "size"),
                    sha_hex,
                    public_hex(&pair),
                    s(v, "version"),
                    s(v, "arch"),
                )
            })?;
        }
        AgentCmd::Releases => {
            let v = client.get("/agent-releases")?;
            print(out, &v, &releases_table)?;
        }
        AgentCmd::Rollout {
            version,
            canary,
            canary_percent,
            settle,
            timeout,
            trial,
            labels,
            allow_downgrade,
            wait,
        } => {
            let body = rollout_body(
                &version,
                canary,
                canary_percent,
                settle,
                timeout,
                trial,
                &labels,
                allow_downgrade,
            )?;
            let mut v = client.send("POST", "/agent-rollouts", &body)?;
            if wait {
                let id = v.get("id").and_then(Value::as_i64).unwrap_or_default();
                while v.get("state").and_then(Value::as_str) == Some("in_progress") {
                    std::thread::sleep(POLL);
                    v = client.get(&format!("/agent-rollouts/{id}"))?;
                }
            }
            print(out, &v, &rollout_detail)?;
            if wait && v.get("state").and_then(Value::as_str) != Some("succeeded") {
                return Err(CliError::Failed(format!(
                    "agent rollout {} {}: {}",
                    opt(&v, "id"),
                    s(&v, "state"),
                    s(&v, "reason")
                )));
            }
        }
        AgentCmd::Rollouts { id: None } => {
            let v = client.get("/agent-rollouts")?;
            print(out, &v, &rollouts_table)?;
        }
        AgentCmd::Rollouts { id: Some(id) } => {
            let v = client.get(&format!("/agent-rollouts/{id}"))?;
            print(out, &v, &rollout_detail)?;
        }
        AgentCmd::Abort { id } => {
            let v = client.send("POST", &format!("/agent-rollouts/{id}/abort"), &json!({}))?;
            print(out, &v, &rollout_detail)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn a_generated_key_round_trips_and_its_signature_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.key");
        let mut out = Vec::new();
        run_key(
            ReleaseKeyCmd::Generate { out: path.clone() },
            &mut out,
            Output::Table,
        )
        .unwrap();
        let printed = String::from_utf8(out).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        // Never overwritten.
        let e = run_key(
            ReleaseKeyCmd::Generate { out: path.clone() },
            &mut Vec::new(),
            Output::Table,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        let mut out = Vec::new();
        run_key(
            ReleaseKeyCmd::Public { file: path.clone() },
            &mut out,
            Output::Table,
        )
        .unwrap();
        let public = String::from_utf8(out).unwrap().trim().to_string();
        assert_eq!(public.len(), 64);
        assert!(
            printed.contains(&format!("--release-key {public}")),
            "{printed}"
        );
        // `--output json`: the same key as JSON, nothing else.
        let mut out = Vec::new();
        run_key(
            ReleaseKeyCmd::Public { file: path.clone() },
            &mut out,
            Output::Json,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"public_key": public}));
        let key = protocol::release::parse_public_key(&public).unwrap();

        // Sign a "binary" the way `agent release` does; ring verifies it
        // under the public key, as the conductor and the agent do.
        let bin = dir.path().join("edge-worker");
        std::fs::write(&bin, b"\x7fELF not really").unwrap();
        let sha = sha256_file(&bin).unwrap();
        let pair = read_key(&path).unwrap();
        let sig = sign_release(&pair, "0.2.0", "aarch64", &sha).unwrap();
        let sig = (0..sig.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&sig[i..i + 2], 16).unwrap())
            .collect::<Vec<_>>();
        let verify = |version: &str, arch: &str| {
            let m = protocol::release::signed_message(version, arch, &sha).unwrap();
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
                .verify(&m, &sig)
                .is_ok()
        };
        assert!(verify("0.2.0", "aarch64"));
        assert!(!verify("0.2.1", "aarch64"));
        assert!(!verify("0.2.0", "x86_64"));
        assert!(sign_release(&pair, "0.2", "aarch64", &sha).is_err());
    }

    #[test]
    fn a_key_file_that_is_not_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "hello").unwrap();
        assert!(read_key(&p).unwrap_err().to_string().contains("not PEM"));
        std::fs::write(&p, pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2]))).unwrap();
        assert!(read_key(&p)
            .unwrap_err()
            .to_string()
            .contains("PRIVATE KEY"));
        std::fs::write(&p, pem::encode(&pem::Pem::new(PEM_TAG, vec![1, 2]))).unwrap();
        assert!(read_key(&p).unwrap_err().to_string().contains("Ed25519"));
        assert!(read_key(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn rollout_flags_make_the_api_body() {
        let b = rollout_body(
            "0.2.0",
            Some(2),
            None,
            Some(30),
            None,
            Some(90),
            &["site=shop".into()],
            true,
        )
        .unwrap();
        assert_eq!(
            b,
            json!({"version": "0.2.0", "canary": 2, "settle_s": 30, "trial_s": 90,
                   "selector": {"site": "shop"}, "allow_downgrade": true})
        );
        let b = rollout_body("0.2.0", None, None, None, None, None, &[], false).unwrap();
        assert_eq!(b, json!({"version": "0.2.0"}));
        assert!(rollout_body("0.2.0", None, None, None, None, None, &["x".into()], false).is_err());
    }

    #[test]
    fn a_rollout_shows_its_members() {
        let r = json!({"id": 3, "version": "0.2.0", "state": "reverted",
            "reason": "wave 0 failed: w-1: 0.2.0: rolled back",
            "members": [{"worker_id": "w-1", "state": "failed", "from_version": "0.1.0",
                         "arch": "aarch64", "detail": "0.2.0: rolled back"}]});
        let t = rollout_detail(&r);
        assert!(
            t.contains("agent rollout 3 to 0.2.0: reverted (wave 0 failed"),
            "{t}"
        );
        assert!(
            t.contains("w-1") && t.contains("failed") && t.contains("0.1.0"),
            "{t}"
        );
        let t = rollouts_table(&json!({"rollouts": [r]}));
        assert!(t.contains("reverted"), "{t}");
    }
}
