//! Service helpers shared by the end-to-end tests: the `aerekos` CLI, a
//! service's per-worker actual state, creating and deploying specs, and
//! building the fleet services' binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

use crate::{bin, bin_dir, Conductor, Worker, WorkerOpts};

/// A conductor in `dir/conductor` and one worker named `hostname` in
/// `dir/w`, enrolled with a registration token; returns them and the
/// worker's id.
pub fn conductor_and_worker(dir: &Path, hostname: &str) -> (Conductor, Worker, String) {
    let c = Conductor::start(&dir.join("conductor"));
    let mut w = Worker::start(
        &dir.join("w"),
        &c.url(),
        Some(&c.registration_token()),
        WorkerOpts::named(hostname),
    );
    let id = w.wait_id();
    (c, w, id)
}

/// Runs the CLI against `c`; returns (success, stdout, stderr).
pub fn cli(c: &Conductor, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("aerekos"))
        .args(args)
        .env("AEREKOS_URL", c.url())
        .env("AEREKOS_TOKEN", &c.admin)
        .output()
        .expect("run aerekos");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI with `--json` and parses the output; panics on failure.
#[track_caller]
pub fn cli_json(c: &Conductor, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli(c, &all);
    assert!(ok, "aerekos {args:?} failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("aerekos {args:?}: {e}: {out}"))
}

/// The actual state of `service` on `worker` per the conductor's API.
pub fn actual(c: &Conductor, service: &str, worker: &str) -> Option<Value> {
    let (status, body) = c.get(&format!("/api/v1/services/{service}"));
    assert_eq!(status, 200, "{body}");
    body["workers"]
        .as_array()?
        .iter()
        .find(|w| w["worker_id"] == worker)
        .map(|w| w["actual"].clone())
        .filter(|a| !a.is_null())
}

/// The state name of `service` on `worker` ("" when not reported).
pub fn state_of(c: &Conductor, service: &str, worker: &str) -> String {
    actual(c, service, worker)
        .and_then(|a| a["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The pid of `service` on `worker` (0 when not running).
pub fn pid_of(c: &Conductor, service: &str, worker: &str) -> u32 {
    actual(c, service, worker)
        .and_then(|a| a["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0)
}

/// Stores `spec` through the API (201 expected).
#[track_caller]
pub fn create_service(c: &Conductor, spec: &Value) {
    let (status, body) = c.post("/api/v1/services", spec);
    assert_eq!(status, 201, "create {}: {body}", spec["name"]);
}

/// Sets the deployment of `name` (`{"workers": [...]}` or `{"labels": ...}`).
#[track_caller]
pub fn deploy(c: &Conductor, name: &str, deployment: &Value) {
    let (status, body) = c.put(&format!("/api/v1/services/{name}/deployment"), deployment);
    assert_eq!(status, 200, "deploy {name}: {body}");
}

/// Uploads `file` as an artifact for this machine's arch through the CLI;
/// returns its sha256.
pub fn upload_artifact(c: &Conductor, file: &Path) -> String {
    upload_artifact_for(c, file, std::env::consts::ARCH)
}

/// Like [`upload_artifact`], the artifact of `arch` (an emulated Pi's).
pub fn upload_artifact_for(c: &Conductor, file: &Path, arch: &str) -> String {
    let v = cli_json(
        c,
        &[
            "artifact",
            "upload",
            file.to_str().expect("utf-8 path"),
            "--arch",
            arch,
        ],
    );
    v["sha256"]
        .as_str()
        .expect("sha256 in upload reply")
        .to_string()
}

/// Path of a fleet service binary (`key-manager`, `storage-manager`,
/// `db-manager`) from `package`, built on first use when this crate runs
/// alone (`cargo test --workspace` has built it already).
pub fn fleet_service_bin(package: &str, name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let path = bin_dir().join(name);
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", package, "--bin", name]);
    if bin_dir().ends_with("release") {
        cmd.arg("--release");
    }
    // Always ask cargo: it is a no-op when the binary is fresh.
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building {name} failed");
    assert!(path.is_file(), "{} missing after the build", path.display());
    path
}
