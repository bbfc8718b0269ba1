//! Process probes (`/proc`), percentiles and the open-file limit.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ, 100 on every
/// Linux ABI we target).
pub const TICKS_PER_S: f64 = 100.0;

/// `(comm, utime + stime)` from a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let stat = fs::read_to_string(path).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // Fields after the parenthesised name; utime and stime are fields 14 and 15.
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((comm, ticks))
}

/// CPU ticks (user + system) consumed so far by `pid` (all threads).
pub fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat")).map_or(0, |(_, t)| t)
}

/// CPU ticks of this process.
pub fn self_ticks() -> u64 {
    stat_ticks("/proc/self/stat").map_or(0, |(_, t)| t)
}

/// Per-thread `tid → (name, ticks)` of `pid`.
pub fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(tid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(v) = stat_ticks(&format!("/proc/{pid}/task/{tid}/stat")) {
            out.insert(tid, v);
        }
    }
    out
}

/// CPU % (of one core) per thread name between two snapshots taken
/// `secs` apart, threads of the same name summed (`name×count`), busiest first.
pub fn thread_profile(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
    secs: f64,
) -> Vec<(String, f64)> {
    let mut by_name: HashMap<String, (u64, usize)> = HashMap::new();
    for (tid, (name, t1)) in after {
        let t0 = before.get(tid).map_or(0, |(_, t)| *t);
        let e = by_name.entry(name.clone()).or_default();
        e.0 += t1.saturating_sub(t0);
        e.1 += 1;
    }
    let mut v: Vec<(String, f64)> = by_name
        .into_iter()
        .map(|(name, (ticks, n))| {
            let label = if n > 1 { format!("{name}×{n}") } else { name };
            (label, ticks as f64 / TICKS_PER_S / secs.max(1e-9) * 100.0)
        })
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// `(VmRSS, VmHWM)` of `pid` in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The `p`-quantile (0..=1) of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // fits: p is 0..=1, so the rank is 0..=len (and clamped below).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Sorts and returns `(p50, p99, n)`.
pub fn p50_p99(mut v: Vec<f64>) -> (Option<f64>, Option<f64>, usize) {
    v.sort_by(f64::total_cmp);
    (quantile(&v, 0.50), quantile(&v, 0.99), v.len())
}

/// Raises the open-file soft limit to the hard limit; returns `(soft, hard)`.
pub fn raise_nofile() -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    let lim = getrlimit(Resource::Nofile);
    (lim.current, lim.maximum)
}
