//! Resource limits of process services through cgroups v2.
//!
//! The worker's own cgroup is the `0::<path>` line of `/proc/self/cgroup`
//! under the cgroup2 mount (`/sys/fs/cgroup`). A service with limits runs in
//! `<own>/aerekos-<name>` with `memory.max`, `cpu.max`
//! (`<millicores × 100> 100000`) and `pids.max`; its pid is written to
//! `cgroup.procs` right after the spawn, so whatever it forks afterwards is
//! limited too (a child forked within that instant stays outside).
//!
//! cgroups v2 allows controllers for child cgroups only in a cgroup without
//! processes of its own ("no internal processes"; the root is exempt). So
//! before enabling `memory`/`cpu`/`pids` in its own `subtree_control`, the
//! worker moves every process of its cgroup (itself included) to the leaf
//! `<own>/agent`, and later treats `…/agent` as its own cgroup's leaf.
//! Under systemd this needs `Delegate=yes` on the unit (the shipped unit
//! has it).
//!
//! Where any of this is impossible (cgroup v1 or hybrid hierarchy, read-only
//! mount, missing controller, no delegation) nothing is changed: the
//! service runs without limits and the caller reports
//! `limits not applied: <reason>`.
//!
//! Limits: `cpu.max` is at least 1 ms per 100 ms period (10 millicores);
//! only the three limits above are managed; a service's cgroup is removed
//! (`rmdir`) when the service is removed or deployed without limits.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use protocol::manifest::Limits;

/// Where cgroup2 is mounted on a systemd host.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";
/// The leaf the worker moves its own processes to.
pub const AGENT_LEAF: &str = "agent";
/// Prefix of service cgroup names.
pub const SERVICE_PREFIX: &str = "aerekos-";
/// The `cpu.max` period, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Creates, fills and removes service cgroups under the worker's own.
#[derive(Debug, Clone)]
pub struct Cgroups {
    fs_root: PathBuf,
    /// Contents of `/proc/self/cgroup` to use instead of the real one (tests).
    self_cgroup: Option<String>,
}

impl Default for Cgroups {
    fn default() -> Self {
        Cgroups::new(CGROUP_FS)
    }
}

impl Cgroups {
    /// cgroup2 mounted at `fs_root`; the own cgroup from `/proc/self/cgroup`.
    pub fn new(fs_root: impl Into<PathBuf>) -> Cgroups {
        Cgroups {
            fs_root: fs_root.into(),
            self_cgroup: None,
        }
    }

    /// Like [`Cgroups::new`] with a given `/proc/self/cgroup` text.
    pub fn with_self_cgroup(fs_root: impl Into<PathBuf>, text: &str) -> Cgroups {
        Cgroups {
            fs_root: fs_root.into(),
            self_cgroup: Some(text.to_string()),
        }
    }

    /// The worker's own cgroup dir (the parent of its `agent` leaf once it
    /// moved there).
    pub fn own(&self) -> Result<PathBuf, String> {
        let text = match &self.self_cgroup {
            Some(t) => t.clone(),
            None => fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?,
        };
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("the worker is not in a cgroup v2 hierarchy")?
            .trim();
        if rel.split('/').any(|c| c == "..") {
            return Err(format!("unusable cgroup path {rel:?}"));
        }
        let mut own = self.fs_root.join(rel.trim_start_matches('/'));
        if own.file_name().is_some_and(|n| n == AGENT_LEAF) {
            if let Some(parent) = own.parent() {
                own = parent.to_path_buf();
            }
        }
        if !own.join("cgroup.controllers").is_file() {
            return Err(format!(
                "cgroup v2 is not mounted at {}",
                self.fs_root.display()
            ));
        }
        Ok(own)
    }

    /// The cgroup dir of service `name` (whether or not it exists).
    pub fn service_dir(&self, name: &str) -> Result<PathBuf, String> {
        Ok(self.own()?.join(format!("{SERVICE_PREFIX}{name}")))
    }

    /// Makes sure the controllers `needed` are enabled for the children of
    /// the worker's cgroup, moving its processes to the `agent` leaf first
    /// when the cgroup is not the root.
    fn prepare(&self, own: &Path, needed: &[&str]) -> Result<(), String> {
        let available = fs::read_to_string(own.join("cgroup.controllers"))
            .map_err(|e| format!("cannot read {}: {e}", own.display()))?;
        let enabled = fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
        let mut missing = Vec::new();
        for c in needed {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(format!(
                    "the {c} controller is not available in {}",
                    own.display()
                ));
            }
            if !enabled.split_whitespace().any(|a| a == *c) {
                missing.push(format!("+{c}"));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if own != self.fs_root {
            self.move_to_leaf(own)?;
        }
        fs::write(own.join("cgroup.subtree_control"), missing.join(" ")).map_err(|e| {
            format!(
                "cannot enable {} in {}: {}",
                missing.join(" "),
                own.display(),
                describe(&e)
            )
        })
    }

    /// Moves every process of `own` to `own/agent`. Refuses when the
    /// cgroup holds processes that are neither the worker nor its
    /// descendants (a worker started from a login shell shares the shell's
    /// cgroup: it must not reorganise other people's processes).
    fn move_to_leaf(&self, own: &Path) -> Result<(), String> {
        let procs = fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            return Ok(());
        }
        let me = std::process::id();
        if let Some(foreign) = procs
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|&pid| !descends_from(pid, me))
        {
            return Err(format!(
                "the worker's cgroup {} also holds process {foreign}, which is not the worker's \
                 (run the worker as a systemd service with Delegate=yes)",
                own.display()
            ));
        }
        let leaf = own.join(AGENT_LEAF);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create {}: {}",
                    leaf.display(),
                    describe(&e)
                ))
            }
        }
        let mut last_err = None;
        for pid in procs.split_whitespace() {
            if let Err(e) = fs::write(leaf.join("cgroup.procs"), pid) {
                last_err = Some(format!("pid {pid}: {}", describe(&e)));
            }
        }
        match last_err {
            Some(e) => Err(format!(
                "cannot move the worker's processes to {}: {e}",
                leaf.display()
            )),
            None => {
                tracing::info!(leaf = %leaf.display(), "moved the worker to a leaf cgroup");
                Ok(())
            }
        }
    }

    /// Creates (or updates) the cgroup of service `name` with `limits`.
    /// `Ok(None)` when there are no limits (the service needs no cgroup).
    pub fn apply(&self, name: &str, limits: &Limits) -> Result<Option<PathBuf>, String> {
        let mut needed = Vec::new();
        if limits.memory_bytes.is_some() {
            needed.push("memory");
        }
        if limits.cpu_millicores.is_some() {
            needed.push("cpu");
        }
        if limits.pids.is_some() {
            needed.push("pids");
        }
        if needed.is_empty() {
            return Ok(None);
        }
        let own = self.own()?;
        self.prepare(&own, &needed)?;
        let dir = own.join(format!("{SERVICE_PREFIX}{name}"));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {}", dir.display(), describe(&e))),
        }
        let write = |file: &str, value: String| {
            fs::write(dir.join(file), &value)
                .map_err(|e| format!("cannot set {file} to {value}: {}", describe(&e)))
        };
        // Unset limits are written as "max" so a previous version's limit
        // does not linger (only where the controller is enabled).
        let max = |v: Option<String>| v.unwrap_or_else(|| "max".to_string());
        if limits.memory_bytes.is_some() || dir.join("memory.max").exists() {
            write(
                "memory.max",
                max(limits.memory_bytes.map(|b| b.to_string())),
            )?;
        }
        if limits.cpu_millicores.is_some() || dir.join("cpu.max").exists() {
            let quota = limits
                .cpu_millicores
                .map(|m| (u64::from(m) * 100).max(1000).to_string());
            write("cpu.max", format!("{} {CPU_PERIOD_US}", max(quota)))?;
        }
        if limits.pids.is_some() || dir.join("pids.max").exists() {
            write("pids.max", max(limits.pids.map(|p| p.to_string())))?;
        }
        Ok(Some(dir))
    }

    /// Puts process `pid` into the cgroup `dir` from [`Cgroups::apply`].
    pub fn attach(&self, dir: &Path, pid: u32) -> Result<(), String> {
        fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(|e| {
            format!(
                "cannot move pid {pid} to {}: {}",
                dir.display(),
                describe(&e)
            )
        })
    }

    /// Removes the cgroup of service `name` if there is one (it must have
    /// no processes left). Failures are logged.
    pub fn remove(&self, name: &str) {
        let Ok(dir) = self.service_dir(name) else {
            return;
        };
        match fs::remove_dir(&dir) {
            Ok(()) => tracing::info!(service = name, "cgroup removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(service = name, "cannot remove {}: {e}", dir.display()),
        }
    }
}

/// True when `pid` is `ancestor` or one of its descendants (parent chain
/// from `/proc/<pid>/stat`, at most 64 steps). A process that vanished
/// counts as ours: it can no longer be moved anyway.
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        // The fields after the parenthesised command name: state, ppid, …
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        match ppid {
            Some(p) if p > 0 => pid = p,
            _ => return false,
        }
    }
    false
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => format!("{e} (no delegation: Delegate=yes?)"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_the_worker_and_its_descendants_count_as_ours() {
        let me = std::process::id();
        assert!(descends_from(me, me));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sleep: {e}"));
        assert!(descends_from(child.id(), me));
        let _ = child.kill();
        let _ = child.wait();
        // pid 1 is nobody's descendant but its own.
        assert!(!descends_from(1, me));
    }

    #[test]
    fn not_v2_is_a_reason_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits {
            memory_bytes: Some(1 << 20),
            ..Limits::default()
        };
        let v1 = Cgroups::with_self_cgroup(tmp.path(), "4:memory:/x\n1:cpu:/\n");
        let e = v1.apply("web", &limits).unwrap_err();
        assert!(e.contains("not in a cgroup v2"), "{e}");
        let unmounted = Cgroups::with_self_cgroup(tmp.path(), "0::/\n");
        let e = unmounted.apply("web", &limits).unwrap_err();
        assert!(e.contains("not mounted"), "{e}");
        assert_eq!(unmounted.apply("web", &Limits::default()), Ok(None));
        let evil = Cgroups::with_self_cgroup(tmp.path(), "0::/../../etc\n");
        assert!(evil.own().is_err());
    }

    /// The files written, on a directory laid out like a cgroup2 root
    /// (a layout check; the kernel side is tested in tests/services.rs
    /// where /sys/fs/cgroup is writable).
    #[test]
    fn writes_limits_in_the_cgroup_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroups::with_self_cgroup(root, "0::/\n");
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(250),
            pids: Some(32),
        };
        let dir = cg.apply("web", &limits).unwrap().unwrap();
        assert_eq!(dir, root.join("aerekos-web"));
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "25000 100000");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        cg.attach(&dir, 4242).unwrap();
        assert_eq!(read("cgroup.procs"), "4242");
        // A later version without a memory limit resets it.
        let fewer = Limits {
            pids: Some(8),
            ..Limits::default()
        };
        cg.apply("web", &fewer).unwrap();
        assert_eq!(read("memory.max"), "max");
        assert_eq!(read("cpu.max"), "max 100000");
        assert_eq!(read("pids.max"), "8");
        // A controller the hierarchy lacks: a reason.
        fs::write(root.join("cgroup.controllers"), "cpu pids\n").unwrap();
        let e = cg.apply("web", &limits).unwrap_err();
        assert!(e.contains("memory controller is not available"), "{e}");
    }
}
