//! Agent self-update in tests: release keys, signed releases through the
//! real `aerekos` CLI, and workers that may replace their own binary (used
//! by `tests/agent_update.rs` and the dashboard's agents page test).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::services::cli;
use crate::{bin, Conductor, Worker, WorkerOpts};

/// `aerekos release-key generate` into `dir`; the key file and its public
/// key (hex).
pub fn release_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(bin("aerekos"))
        .args(["release-key", "generate", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(bin("aerekos"))
        .args(["release-key", "public"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    (key, public)
}

/// A worker that may update itself: it runs from its own copy of `agent`
/// in `dir/<name>/bin/edge-worker` (the file an update replaces), with
/// `--self-update always` and `extra`. An aarch64 `agent` runs under qemu
/// through binfmt_misc and execs its successor the same way.
pub fn worker_from(
    dir: &Path,
    name: &str,
    c: &Conductor,
    token: &str,
    agent: &Path,
    extra: &[&str],
) -> Worker {
    let state = dir.join(name);
    std::fs::create_dir_all(state.join("bin")).unwrap();
    let exe = state.join("bin/edge-worker");
    // A `cp` child, not `fs::copy`: a file this process holds open for
    // writing while another test thread forks would make the later exec
    // fail with ETXTBSY ("Text file busy").
    let cp = Command::new("cp").arg(agent).arg(&exe).status().unwrap();
    assert!(cp.success(), "cp: {cp:?}");
    let mut opts = WorkerOpts::named(name);
    // This test machine may itself be a container, where `auto` refuses.
    opts.extra = ["--self-update", "always"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    Worker::start_with_program(
        &[exe.to_str().unwrap()],
        &state,
        &c.url(),
        Some(token),
        opts,
    )
}

/// `aerekos agent release` of `binary` as `version` for `arch`, signed
/// with `key`; fails the test unless it is registered.
#[track_caller]
pub fn release_for(c: &Conductor, key: &Path, version: &str, arch: &str, binary: &Path) {
    let (ok, out, err) = cli(
        c,
        &[
            "agent",
            "release",
            "--key",
            key.to_str().unwrap(),
            "--version",
            version,
            "--arch",
            arch,
            binary.to_str().unwrap(),
        ],
    );
    assert!(ok, "agent release {version}: {err}\n{out}");
    assert!(out.contains("registered"), "{out}");
}
