//! Tests leave nothing running: hosted services outlive their worker by
//! design (they are adopted after a restart), so a test that starts a
//! worker must stop what the worker started, also when it fails.
//!
//! [`kill_processes_under`] kills every process whose working directory or
//! executable lies under a directory — a worker's state dir holds its
//! services' working directories and cached artifacts, and a test's temp
//! dir holds everything it started. [`Reaper`] does it on drop, so a
//! panicking test cleans up while it unwinds. Linux only (`/proc`).

use std::fs;
use std::path::{Path, PathBuf};

/// SIGKILLs every process (but this one) whose working directory or
/// executable is under `dir`; the pids killed.
pub fn kill_processes_under(dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return killed;
    };
    let me = std::process::id();
    for e in procs.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let under =
            |link: &str| fs::read_link(e.path().join(link)).is_ok_and(|p| p.starts_with(dir));
        if under("cwd") || under("exe") {
            let ok = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                killed.push(pid);
            }
        }
    }
    killed
}

/// Kills what runs under its directory when dropped ([`kill_processes_under`]).
#[derive(Debug)]
pub struct Reaper(PathBuf);

impl Reaper {
    /// A reaper for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Reaper {
        Reaper(dir.into())
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_processes_under(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_under_the_directory_is_killed_and_others_are_not() {
        let dir = std::env::temp_dir().join(format!("reap-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut inside = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let mut outside = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        drop(Reaper::new(&dir));
        let status = inside.wait().unwrap();
        assert!(!status.success(), "killed: {status:?}");
        assert!(
            outside.try_wait().unwrap().is_none(),
            "the other one runs on"
        );
        outside.kill().unwrap();
        let _ = outside.wait();
        let _ = fs::remove_dir_all(&dir);
    }
}
