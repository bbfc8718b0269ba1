//! Hardware metrics and inventory: sysinfo for the inventory and disks;
//! `/proc` and `/sys` read directly for the rest.
//!
//! Cost per sample is what a Pi pays every interval, so a [`Collector`]
//! keeps `/proc/stat`, `/proc/meminfo` and `/proc/net/dev` open and reads
//! them again from offset 0 (procfs regenerates them; opening each file
//! per sample, as sysinfo's refresh did, cost a fifth of a sample's CPU:
//! 0.48 → 0.37 ms, 2026-12-07), and keeps one `Disks`, refreshing only the
//! storage of the disks already chosen. The mount list and thermal zones are re-read every
//! [`RELIST_EVERY`] samples. Processes are counted from `/proc` directory
//! names (sysinfo's process refresh is far more expensive) every
//! [`PROCESS_COUNT_EVERY`] samples: listing `/proc` makes the kernel build an
//! entry per process and was a quarter of a sample's CPU (`perf`, 2026-12-07).
//! Load averages and uptime come from one `sysinfo(2)` call instead of two
//! files. Temperatures come
//! straight from `/sys/class/thermal`. The thermal zones, the device model and
//! a Pi's board ([`crate::board`]) are read under the host root
//! (`--host-root`: `/`, or where a container sees the host's `/sys`).
//!
//! Limits: all text goes through [`protocol::frame::bounded`] and lists are
//! truncated at the frame capacities (`MAX_CORES`, `MAX_DISKS`, …), so a
//! sample always encodes under [`protocol::MAX_FRAME_LEN`]. Nothing read from
//! the system is unwrapped: a missing source yields zeros or empty lists.
//! Every call blocks on file I/O: run it with `spawn_blocking`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use heapless::Vec as HVec;
use protocol::frame::{bounded, Disk, Label, NetRate, Temperature, MAX_DISKS, MAX_NETS, MAX_TEMPS};
use protocol::{Birth, Board, Metrics, Name, Text};

use crate::board::BoardReader;
use sysinfo::{DiskRefreshKind, Disks, System};

/// Samples between re-reads of the mount list and thermal zones.
pub const RELIST_EVERY: u64 = 30;

/// Samples between process counts (a minute at the default 10 s interval;
/// the samples in between repeat the last count).
pub const PROCESS_COUNT_EVERY: u64 = 6;

/// Filesystem types that are not real storage.
const PSEUDO_FS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "ramfs",
    "overlay",
    "overlayfs",
    "aufs",
    "proc",
    "sysfs",
    "squashfs",
    "autofs",
    "nsfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "tracefs",
    "debugfs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "efivarfs",
    "binfmt_misc",
    "fusectl",
    "hugetlbfs",
    "rpc_pipefs",
    "nfsd",
    "rootfs",
    "iso9660",
    "zram",
    "erofs",
];

/// The static part of a [`Birth`]: read once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// Hostname (or the override).
    pub hostname: Text,
    /// OS pretty name.
    pub os: Text,
    /// Kernel release.
    pub kernel: Text,
    /// [`arch`]: `std::env::consts::ARCH`, or `armv6l`/`armv7l` on 32-bit ARM.
    pub arch: Name,
    /// CPU brand string.
    pub cpu_model: Text,
    /// Logical cores.
    pub cores: u16,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Board model, or empty.
    pub device_model: Text,
    /// Kernel boot id.
    pub boot_id: heapless::String<36>,
}

impl Inventory {
    /// A birth frame body from this inventory plus the current disks,
    /// labels and interval. Labels beyond `MAX_LABELS` are dropped.
    pub fn birth(
        &self,
        disks: &HVec<Disk, MAX_DISKS>,
        labels: &[(String, String)],
        interval_ms: u32,
    ) -> Birth {
        let mut out_labels = HVec::new();
        for (k, v) in labels {
            let label = Label {
                key: bounded(k),
                value: bounded(v),
            };
            if out_labels.push(label).is_err() {
                break;
            }
        }
        Birth {
            hostname: self.hostname.clone(),
            os: self.os.clone(),
            kernel: self.kernel.clone(),
            arch: self.arch.clone(),
            cpu_model: self.cpu_model.clone(),
            cores: self.cores,
            memory_total: self.memory_total,
            disks: disks.clone(),
            device_model: self.device_model.clone(),
            agent_version: bounded(crate::VERSION),
            boot_id: self.boot_id.clone(),
            labels: out_labels,
            interval_ms,
        }
    }
}

/// Reusable sampling state. See the module docs.
#[derive(Debug)]
pub struct Collector {
    sys: Option<System>,
    disks: Option<Disks>,
    /// Cumulative `(interface, rx bytes, tx bytes)` from the previous
    /// `/proc/net/dev` read: one file for every interface, where sysinfo
    /// opens eight sysfs files per interface and a netlink socket per sample.
    net_prev: Vec<(String, u64, u64)>,
    /// `/proc/net/dev`, `/proc/stat` and `/proc/meminfo`, kept open and
    /// read again from the start each sample (an `lseek` instead of an
    /// `openat` + `close` per file per sample).
    net_dev: ProcFile,
    stat: ProcFile,
    meminfo: ProcFile,
    /// `(busy, total)` jiffies of the `cpu` line then each `cpuN` line of
    /// the previous `/proc/stat` read: usage is the share of busy time
    /// between two reads.
    cpu_prev: Vec<(u64, u64)>,
    /// `(zone type, path of its temp file)`, in zone order.
    thermal: Vec<(Name, PathBuf)>,
    /// When the network counters were last refreshed (for rates).
    last_net: Instant,
    samples: u64,
    /// The last process count (see [`PROCESS_COUNT_EVERY`]).
    processes: u32,
    /// Where the host's `/sys` and `/proc` are (`/` but in a container).
    host_root: PathBuf,
    /// The Pi's board reader; `None` on any other machine.
    board: Option<BoardReader>,
}

impl Collector {
    /// Sets up sysinfo and takes the baseline readings that CPU usage and
    /// network rates are measured against.
    pub fn new() -> Collector {
        Collector::with_host_root(Path::new("/"))
    }

    /// [`Collector::new`] reading the board, the thermal zones and the device model under
    /// `host_root` (`--host-root`).
    pub fn with_host_root(host_root: &Path) -> Collector {
        let sys = match System::new() {
            Ok(mut s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                Some(s)
            }
            Err(e) => {
                tracing::warn!("system metrics unavailable: {e}");
                None
            }
        };
        let disks = match Disks::new() {
            Ok(mut d) => {
                d.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
                Some(d)
            }
            Err(e) => {
                tracing::warn!("disk metrics unavailable: {e}");
                None
            }
        };
        let mut net_dev = ProcFile::new("/proc/net/dev");
        let mut stat = ProcFile::new("/proc/stat");
        let cpu_prev = stat.read().map(parse_cpu_times).unwrap_or_default();
        Collector {
            sys,
            disks,
            net_prev: net_dev.read().map(parse_net_dev).unwrap_or_default(),
            net_dev,
            stat,
            meminfo: ProcFile::new("/proc/meminfo"),
            cpu_prev,
            thermal: thermal_zones(host_root),
            last_net: Instant::now(),
            samples: 0,
            processes: 0,
            host_root: host_root.to_path_buf(),
            board: BoardReader::detect(host_root),
        }
    }

    /// The static inventory. `hostname` overrides the system hostname.
    pub fn inventory(&self, hostname: Option<&str>) -> Inventory {
        let cpus = self.sys.as_ref().map(|s| s.cpus()).unwrap_or_default();
        let cores = if cpus.is_empty() {
            std::thread::available_parallelism().map_or(0, |n| n.get())
        } else {
            cpus.len()
        };
        let cpu_model = cpus
            .first()
            .map(|c| {
                if c.brand().trim().is_empty() {
                    c.vendor_id().trim().to_string()
                } else {
                    c.brand().trim().to_string()
                }
            })
            .unwrap_or_default();
        let host = match hostname {
            Some(h) => h.to_string(),
            None => System::host_name().unwrap_or_else(|_| "unknown".into()),
        };
        Inventory {
            hostname: bounded(&host),
            os: bounded(&os_name()),
            kernel: bounded(&System::kernel_version().unwrap_or_default()),
            arch: bounded(&arch()),
            cpu_model: bounded(&cpu_model),
            cores: u16::try_from(cores).unwrap_or(u16::MAX),
            memory_total: self.sys.as_ref().map_or(0, |s| s.total_memory()),
            device_model: bounded(&device_model(&self.host_root)),
            boot_id: bounded(read_trimmed("/proc/sys/kernel/random/boot_id").as_str()),
        }
    }

    /// The Pi's board frame now (throttling re-read); `None` on any other
    /// machine.
    pub fn board(&mut self) -> Option<Board> {
        self.board.as_mut().map(BoardReader::read)
    }

    /// One metrics sample (`dropped` is left 0 for the caller to fill).
    pub fn sample(&mut self) -> Metrics {
        self.samples += 1;
        let relist = self.samples % RELIST_EVERY == 0;
        if self.samples % PROCESS_COUNT_EVERY == 1 {
            self.processes = count_processes();
        }
        let (load, uptime_s) = load_and_uptime();
        let mut m = Metrics {
            cpu_total: 0,
            cpu_per_core: HVec::new(),
            load,
            memory_used: 0,
            memory_available: 0,
            memory_total: 0,
            swap_used: 0,
            swap_total: 0,
            disks: HVec::new(),
            net: HVec::new(),
            temperatures: HVec::new(),
            uptime_s,
            processes: self.processes,
            dropped: 0,
        };
        if let Some(now) = self.stat.read().map(parse_cpu_times) {
            let usage = cpu_usage(&self.cpu_prev, &now);
            if let Some((total, cores)) = usage.split_first() {
                m.cpu_total = *total;
                for c in cores {
                    if m.cpu_per_core.push(*c).is_err() {
                        break;
                    }
                }
            }
            self.cpu_prev = now;
        }
        if let Some(mem) = self.meminfo.read().map(parse_meminfo) {
            m.memory_total = mem.total;
            m.memory_available = mem.available;
            m.memory_used = mem.total.saturating_sub(mem.available);
            m.swap_total = mem.swap_total;
            m.swap_used = mem.swap_total.saturating_sub(mem.swap_free);
        }
        m.disks = self.disks();
        m.net = self.net_rates();
        if relist {
            self.thermal = thermal_zones(&self.host_root);
            if let Some(d) = self.disks.as_mut() {
                d.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
            }
        }
        m.temperatures = read_temperatures(&self.thermal);
        m
    }

    /// Current usage of the real filesystems (refreshes their storage).
    pub fn disks(&mut self) -> HVec<Disk, MAX_DISKS> {
        let Some(disks) = self.disks.as_mut() else {
            return HVec::new();
        };
        let mut mounts = Vec::new();
        for d in disks.iter_mut() {
            let fs_type = d.file_system().to_string_lossy().into_owned();
            if !is_real_fs(&fs_type) {
                continue;
            }
            d.refresh_specifics(DiskRefreshKind::nothing().with_storage());
            mounts.push(MountInfo {
                device: d.name().to_string_lossy().into_owned(),
                mount: d.mount_point().to_string_lossy().into_owned(),
                fs_type,
                total: d.total_space(),
                available: d.available_space(),
            });
        }
        select_disks(mounts)
    }

    fn net_rates(&mut self) -> HVec<NetRate, MAX_NETS> {
        let now = Instant::now();
        let current = self.net_dev.read().map(parse_net_dev).unwrap_or_default();
        // fits: the time between two samples of this process, far below
        // the 584 million years u64 milliseconds hold.
        #[allow(clippy::cast_possible_truncation)]
        let elapsed_ms = now.duration_since(self.last_net).as_millis().max(1) as u64;
        self.last_net = now;
        let list = current
            .iter()
            .map(|(name, rx, tx)| {
                let (prx, ptx) = self
                    .net_prev
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .map_or((*rx, *tx), |(_, prx, ptx)| (*prx, *ptx));
                let wraps32 = cfg!(target_pointer_width = "32");
                (
                    name.clone(),
                    counter_delta(*rx, prx, wraps32),
                    counter_delta(*tx, ptx, wraps32),
                )
            })
            .collect();
        self.net_prev = current;
        select_nets(list, elapsed_ms)
    }
}

/// Bytes counted since the previous reading `before` of a cumulative
/// interface counter. A counter that went down was reset (the interface was
/// re-created: count from 0) or, on a 32-bit kernel (`wraps32`), may have
/// wrapped: drivers that keep `unsigned long` statistics wrap at 4 GiB,
/// which a Pi's 100 Mbit/s Ethernet passes in six minutes. A fall from the
/// upper half of the 32-bit range counts as such a wrap (from lower, it would
/// take more than 2 GiB within one sample interval).
pub fn counter_delta(now: u64, before: u64, wraps32: bool) -> u64 {
    const WRAP: u64 = 1 << 32;
    match now.checked_sub(before) {
        Some(d) => d,
        None if wraps32 && (WRAP / 2..WRAP).contains(&before) => WRAP - before + now,
        None => now,
    }
}

/// A `/proc` file kept open and read again from its start: procfs
/// regenerates the text on each read from offset 0. A failed read closes
/// it; the next one opens it again.
#[derive(Debug)]
struct ProcFile {
    path: &'static str,
    file: Option<fs::File>,
    /// The last text read (reused: no allocation once it is large enough).
    text: String,
}

impl ProcFile {
    fn new(path: &'static str) -> ProcFile {
        ProcFile {
            path,
            file: None,
            text: String::new(),
        }
    }

    /// The file's current text; `None` when it cannot be read.
    fn read(&mut self) -> Option<&str> {
        use std::io::{Read, Seek, SeekFrom};
        self.text.clear();
        let file = match self.file.as_mut() {
            Some(f) => f,
            None => self.file.insert(fs::File::open(self.path).ok()?),
        };
        let ok =
            file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut self.text).is_ok();
        if !ok {
            self.file = None;
            return None;
        }
        Some(&self.text)
    }
}

/// `(busy, total)` jiffies of each `cpu…` line of `/proc/stat`, the
/// aggregate `cpu` line first: busy is user + nice + system + irq +
/// softirq + steal (guest time is inside user and nice), total adds idle
/// and iowait — sysinfo's accounting. Other lines are skipped.
pub fn parse_cpu_times(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .take_while(|l| l.starts_with("cpu"))
        .map(|l| {
            let f: Vec<u64> = l
                .split_ascii_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .chain(std::iter::repeat(0))
                .take(8)
                .collect();
            // user nice system idle iowait irq softirq steal
            let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
            (busy, busy + f[3] + f[4])
        })
        .collect()
}

/// Usage in hundredths of a percent between two [`parse_cpu_times`]
/// readings, line by line (a line without a previous reading, or without
/// time passed, is 0).
pub fn cpu_usage(before: &[(u64, u64)], now: &[(u64, u64)]) -> Vec<u16> {
    now.iter()
        .enumerate()
        .map(|(i, (busy, total))| {
            let (pb, pt) = before.get(i).copied().unwrap_or((*busy, *total));
            let (db, dt) = (busy.saturating_sub(pb), total.saturating_sub(pt));
            if dt == 0 {
                return 0;
            }
            // ≤ 10,000 by construction (db ≤ dt), so the cast is exact.
            #[allow(clippy::cast_possible_truncation)]
            let v = (db.min(dt) * 10_000 / dt) as u16;
            v
        })
        .collect()
}

/// What a sample takes from `/proc/meminfo`, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total: u64,
    /// `MemAvailable` (kernels before 3.14: `MemFree` + `Buffers` + `Cached`).
    pub available: u64,
    /// `SwapTotal`.
    pub swap_total: u64,
    /// `SwapFree`.
    pub swap_free: u64,
}

/// Parses `/proc/meminfo` (`Name:   <n> kB` lines; unknown or malformed
/// lines are skipped).
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    let (mut available, mut free, mut buffers, mut cached) = (None, 0, 0, 0);
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(kb) = rest
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = kb.saturating_mul(1024);
        match name {
            "MemTotal" => m.total = bytes,
            "MemAvailable" => available = Some(bytes),
            "MemFree" => free = bytes,
            "Buffers" => buffers = bytes,
            "Cached" => cached = bytes,
            "SwapTotal" => m.swap_total = bytes,
            "SwapFree" => m.swap_free = bytes,
            _ => {}
        }
    }
    m.available = available
        .unwrap_or_else(|| free.saturating_add(buffers).saturating_add(cached))
        .min(m.total);
    m
}

/// Parses `/proc/net/dev`: two header lines, then `name: rx_bytes rx_packets
/// … (8 rx fields) tx_bytes …`. Malformed lines are skipped.
pub fn parse_net_dev(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            Some((name.trim().to_string(), *fields.first()?, *fields.get(8)?))
        })
        .collect()
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

/// One mounted filesystem as sysinfo reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Device (`/dev/mmcblk0p2`).
    pub device: String,
    /// Mount point.
    pub mount: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Bytes total.
    pub total: u64,
    /// Bytes available.
    pub available: u64,
}

/// Whether `fs_type` is real storage (not tmpfs, overlay, proc, FUSE, …).
pub fn is_real_fs(fs_type: &str) -> bool {
    !(PSEUDO_FS.contains(&fs_type) || fs_type.starts_with("fuse") || fs_type.is_empty())
}

/// Real filesystems, one per device (its shortest mount point, so `/` wins
/// over bind mounts), the largest [`MAX_DISKS`] by size.
pub fn select_disks(mounts: Vec<MountInfo>) -> HVec<Disk, MAX_DISKS> {
    let mut by_device: Vec<MountInfo> = Vec::new();
    for m in mounts {
        if !is_real_fs(&m.fs_type) || m.total == 0 {
            continue;
        }
        match by_device.iter_mut().find(|d| d.device == m.device) {
            Some(d) => {
                if m.mount.len() < d.mount.len() {
                    *d = m;
                }
            }
            None => by_device.push(m),
        }
    }
    by_device.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.mount.cmp(&b.mount)));
    let mut out = HVec::new();
    for m in by_device {
        let disk = Disk {
            mount: bounded(&m.mount),
            used: m.total.saturating_sub(m.available),
            total: m.total,
        };
        if out.push(disk).is_err() {
            break;
        }
    }
    out
}

/// Interfaces other than `lo`, physical-looking names first, with byte
/// deltas turned into per-second rates over `elapsed_ms`.
pub fn select_nets(mut list: Vec<(String, u64, u64)>, elapsed_ms: u64) -> HVec<NetRate, MAX_NETS> {
    list.retain(|(name, _, _)| name != "lo");
    let is_virtual = |n: &str| {
        [
            "veth", "docker", "br-", "virbr", "cni", "flannel", "cali", "tun", "tap",
        ]
        .iter()
        .any(|p| n.starts_with(p))
    };
    list.sort_by(|a, b| {
        is_virtual(&a.0)
            .cmp(&is_virtual(&b.0))
            .then_with(|| a.0.cmp(&b.0))
    });
    let per_s = |bytes: u64| bytes.saturating_mul(1000) / elapsed_ms.max(1);
    let mut out = HVec::new();
    for (name, rx, tx) in list {
        let rate = NetRate {
            name: bounded(&name),
            rx_bps: per_s(rx),
            tx_bps: per_s(tx),
        };
        if out.push(rate).is_err() {
            break;
        }
    }
    out
}

/// The three load averages in hundredths, as `/proc/loadavg` prints them,
/// and the uptime in seconds: one `sysinfo(2)` call (no file to open, read
/// and close twice per sample).
fn load_and_uptime() -> ([u32; 3], u64) {
    let si = rustix::system::sysinfo();
    // `as u64`: the kernel's unsigned long, u32 on 32-bit ARM (widened) and
    // u64 elsewhere (where the cast is a no-op).
    #[allow(clippy::cast_lossless, clippy::unnecessary_cast)]
    let load = si.loads.map(|l| load_hundredths(l as u64));
    (load, u64::try_from(si.uptime).unwrap_or(0))
}

/// One `sysinfo(2)` load average (the kernel's 11-bit fixed point shifted
/// to 16 bits) in hundredths, rounded exactly as `/proc/loadavg` rounds it
/// (kernel `fs/proc/loadavg.c`: add 1/200, then the integer part and two
/// decimals). No float: it would link 13 KiB of formatting into the agent.
fn load_hundredths(si_load: u64) -> u32 {
    const FSHIFT: u32 = 11;
    let fixed = (si_load >> (16 - FSHIFT)) + (1 << FSHIFT) / 200;
    let int = fixed >> FSHIFT;
    let frac = ((fixed & ((1 << FSHIFT) - 1)) * 100) >> FSHIFT;
    u32::try_from(int.saturating_mul(100).saturating_add(frac)).unwrap_or(u32::MAX)
}

/// Number of processes: the numeric directories in `/proc`.
pub fn count_processes() -> u32 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let n = dir
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let b = name.as_encoded_bytes();
            !b.is_empty() && b.iter().all(u8::is_ascii_digit)
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The thermal zones under `root` (`sys/class/thermal/thermal_zone*`).
fn thermal_zones(root: &Path) -> Vec<(Name, PathBuf)> {
    let Ok(dir) = fs::read_dir(root.join("sys/class/thermal")) else {
        return Vec::new();
    };
    let mut zones: Vec<(u32, Name, PathBuf)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.strip_prefix("thermal_zone")?.parse().ok()?;
            let path = e.path();
            let kind = read_trimmed(path.join("type"));
            let kind = if kind.is_empty() { name } else { kind };
            Some((n, bounded(&kind), path.join("temp")))
        })
        .collect();
    zones.sort_by_key(|z| z.0);
    zones.into_iter().map(|(_, n, p)| (n, p)).collect()
}

fn read_temperatures(zones: &[(Name, PathBuf)]) -> HVec<Temperature, MAX_TEMPS> {
    let mut out = HVec::new();
    for (name, path) in zones {
        let Ok(millicelsius) = read_trimmed(path).parse::<i32>() else {
            continue;
        };
        let t = Temperature {
            name: name.clone(),
            millicelsius,
        };
        if out.push(t).is_err() {
            break;
        }
    }
    out
}

/// A sysfs, procfs or device-tree file's text without surrounding NULs or
/// whitespace; empty when it cannot be read.
pub(crate) fn read_trimmed(path: impl AsRef<std::path::Path>) -> String {
    fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        })
        .unwrap_or_default()
}

/// The architecture the worker reports in its inventory and picks artifacts
/// by: `std::env::consts::ARCH`, except on 32-bit ARM, where that is `arm`
/// for the armv6 and the armv7 build alike. Reporting `arm` there would
/// match no `armv6`/`armv7` artifact key, and a generic one would send
/// armv7 code to a Pi Zero (SIGILL). So a 32-bit agent asks the kernel what
/// the CPU runs (`uname -m`, [`arm_arch`]).
pub fn arch() -> String {
    if cfg!(target_arch = "arm") {
        // `target_feature = "v7"` is set for the armv7 targets when std is
        // built from source (deploy/build-pi.sh); a build without it
        // (prebuilt std, `cross`) counts as armv6, the safe side.
        arm_arch(&System::cpu_arch(), cfg!(target_feature = "v7")).to_string()
    } else {
        std::env::consts::ARCH.to_string()
    }
}

/// The arch a 32-bit ARM agent reports, from the kernel's machine name
/// (`uname -m`): `armv6l` on a Pi 1/Zero, `armv7l` on a Pi 2/3/4 with a
/// 32-bit kernel, `armv7l` for `armv8l` (a 64-bit CPU in 32-bit mode runs
/// armv7 code). Under a 64-bit kernel (`aarch64`: Raspberry Pi OS 32-bit on
/// a Pi 4 boots one) or anything unknown, the level this build was compiled
/// for (`v7_build`), which the CPU runs for sure. An `armv7`
/// or `armv6` artifact key matches these names by prefix.
pub fn arm_arch(machine: &str, v7_build: bool) -> &'static str {
    match machine {
        "armv6l" => "armv6l",
        "armv7l" | "armv8l" => "armv7l",
        _ if v7_build => "armv7l",
        _ => "armv6l",
    }
}

fn device_model(root: &Path) -> String {
    for p in [
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ] {
        let m = read_trimmed(root.join(p));
        if !m.is_empty() {
            return m;
        }
    }
    // A Pi kernel without the device tree in sysfs still names the board.
    let cpuinfo = fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    crate::board::cpuinfo_field(&cpuinfo, "Model")
        .unwrap_or_default()
        .to_string()
}

/// `PRETTY_NAME` from os-release, else sysinfo's long OS version.
fn os_name() -> String {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Ok(text) = fs::read_to_string(p) {
            if let Some(v) = text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")) {
                let v = v.trim().trim_matches('"').trim_matches('\'');
                if !v.is_empty() {
                    return v.to_string();
                }
            }
        }
    }
    System::long_os_version().unwrap_or_else(|_| "Linux".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn thermal_zones_come_from_the_host_root() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pi4");
        let mut c = Collector::with_host_root(&root);
        let m = c.sample();
        let t: Vec<_> = m
            .temperatures
            .iter()
            .map(|t| (t.name.as_str(), t.millicelsius))
            .collect();
        assert_eq!(t, [("cpu-thermal", 47_712)]);
        assert_eq!(c.board().and_then(|b| b.revision), Some(0xc03114));
        assert!(Collector::with_host_root(&root.join("nothing"))
            .board()
            .is_none());
    }

    #[test]
    fn the_device_model_comes_from_the_host_root() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert_eq!(
            device_model(&fixtures.join("pi4")),
            "Raspberry Pi 4 Model B Rev 1.4"
        );
        assert_eq!(
            device_model(&fixtures.join("pi-zero-w")),
            "Raspberry Pi Zero W Rev 1.1"
        );
    }

    #[test]
    fn parses_proc_net_dev_and_skips_malformed_lines() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0
  eth0: 123456 100 0 0 0 0 0 0 654321 90 0 0 0 0 0 0
 wlan0: garbage
";
        assert_eq!(
            parse_net_dev(text),
            vec![
                ("lo".to_string(), 1000, 1000),
                ("eth0".to_string(), 123_456, 654_321)
            ]
        );
        assert!(parse_net_dev("").is_empty());
    }

    #[test]
    fn counters_reset_or_wrap_at_32_bits() {
        assert_eq!(counter_delta(1500, 1000, true), 500);
        // Reset (interface re-created): count from 0.
        assert_eq!(counter_delta(700, 1000, true), 700);
        assert_eq!(counter_delta(700, 5 << 32, true), 700);
        // A 32-bit counter wrapped near 4 GiB.
        assert_eq!(counter_delta(100, (1 << 32) - 400, true), 500);
        // With 64-bit counters a fall is always a reset.
        assert_eq!(counter_delta(100, (1 << 32) - 400, false), 100);
    }

    #[test]
    fn arm_agents_report_what_the_cpu_runs() {
        assert_eq!(arm_arch("armv6l", false), "armv6l");
        assert_eq!(arm_arch("armv7l", false), "armv7l");
        assert_eq!(arm_arch("armv7l", true), "armv7l");
        assert_eq!(arm_arch("armv8l", true), "armv7l");
        // 32-bit userland on a 64-bit kernel: the build's own level.
        assert_eq!(arm_arch("aarch64", false), "armv6l");
        assert_eq!(arm_arch("aarch64", true), "armv7l");
        assert_eq!(arm_arch("", false), "armv6l");
        if !cfg!(target_arch = "arm") {
            assert_eq!(arch(), std::env::consts::ARCH);
        }
    }

    #[test]
    fn net_rates_come_from_counter_deltas() {
        let mut c = Collector::new();
        let first = c.sample();
        assert!(first.net.iter().all(|n| n.name.as_str() != "lo"));
        // Fake a previous reading 1 MB below the current one on every interface.
        c.net_prev = parse_net_dev(&fs::read_to_string("/proc/net/dev").unwrap_or_default())
            .into_iter()
            .map(|(n, rx, tx)| (n, rx.saturating_sub(1_000_000), tx))
            .collect();
        c.last_net = Instant::now() - std::time::Duration::from_secs(1);
        let m = c.sample();
        if let Some(n) = m.net.first() {
            assert!(n.rx_bps >= 500_000, "{n:?}");
        }
    }

    use super::*;
    use protocol::{Body, Envelope, Secret};

    fn mount(device: &str, mount: &str, fs: &str, total: u64) -> MountInfo {
        MountInfo {
            device: device.into(),
            mount: mount.into(),
            fs_type: fs.into(),
            total,
            available: total / 4,
        }
    }

    #[test]
    fn disks_skip_pseudo_dedupe_by_device_keep_largest() {
        let mut mounts = vec![
            mount("/dev/mmcblk0p2", "/etc/hosts", "ext4", 100),
            mount("/dev/mmcblk0p2", "/", "ext4", 100),
            mount("/dev/mmcblk0p1", "/boot/firmware", "vfat", 10),
            mount("tmpfs", "/run", "tmpfs", 1000),
            mount("overlay", "/", "overlay", 1000),
            mount("proc", "/proc", "proc", 0),
            mount("sshfs", "/mnt/x", "fuse.sshfs", 5000),
            mount("/dev/sda1", "/empty", "ext4", 0),
        ];
        for i in 0..20 {
            mounts.push(mount(
                &format!("/dev/sd{i}"),
                &format!("/mnt/{i}"),
                "xfs",
                200 + i,
            ));
        }
        let disks = select_disks(mounts);
        assert_eq!(disks.len(), MAX_DISKS);
        assert_eq!(disks[0].total, 219, "largest first");
        assert!(disks.iter().all(|d| d.total >= 200));

        let few = select_disks(vec![
            mount("/dev/mmcblk0p2", "/etc/hosts", "ext4", 100),
            mount("/dev/mmcblk0p2", "/", "ext4", 100),
            mount("/dev/mmcblk0p1", "/boot/firmware", "vfat", 10),
            mount("tmpfs", "/run", "tmpfs", 1000),
        ]);
        let mounts: Vec<&str> = few.iter().map(|d| d.mount.as_str()).collect();
        assert_eq!(mounts, vec!["/", "/boot/firmware"]);
        assert_eq!(few[0].used, 75);
    }

    #[test]
    fn nets_skip_lo_prefer_physical_and_compute_rates() {
        let mut list = vec![
            ("lo".to_string(), 1_000, 1_000),
            ("veth123".to_string(), 10, 10),
            ("wlan0".to_string(), 2_000, 0),
            ("eth0".to_string(), 10_000, 5_000),
        ];
        for i in 0..10 {
            list.push((format!("veth{i}"), 1, 1));
        }
        let nets = select_nets(list, 2_000);
        assert_eq!(nets.len(), MAX_NETS);
        assert_eq!(nets[0].name.as_str(), "eth0");
        assert_eq!(nets[0].rx_bps, 5_000);
        assert_eq!(nets[0].tx_bps, 2_500);
        assert_eq!(nets[1].name.as_str(), "wlan0");
        assert!(nets.iter().all(|n| n.name.as_str() != "lo"));
    }

    #[test]
    fn cpu_usage_comes_from_proc_stat_deltas() {
        let before = "cpu  100 0 100 700 100 0 0 0 0 0\n\
                      cpu0 50 0 50 350 50 0 0 0 0 0\n\
                      cpu1 50 0 50 350 50 0 0 0 0 0\n\
                      intr 12345 1 2 3\n";
        // cpu: 55 of 85 jiffies busy; cpu0: 45 of 50 (irq, softirq and
        // steal count as busy); cpu1: idle and iowait only.
        let now = "cpu  130 0 110 720 110 5 5 5 0 0\n\
                   cpu0 70 0 60 355 50 5 5 5 0 0\n\
                   cpu1 50 0 50 370 60 0 0 0 0 0\n\
                   ctxt 99\n";
        let (b, n) = (parse_cpu_times(before), parse_cpu_times(now));
        assert_eq!(b.len(), 3, "the cpu lines only");
        assert_eq!(n[1], (145, 550));
        assert_eq!(cpu_usage(&b, &n), vec![6_470, 9_000, 0]);
        // No previous reading, no time passed, counters gone backwards.
        assert_eq!(cpu_usage(&[], &n), vec![0, 0, 0]);
        assert_eq!(cpu_usage(&n, &n), vec![0, 0, 0]);
        assert_eq!(cpu_usage(&n, &b), vec![0, 0, 0]);
        // Short or garbled lines read as zeros, never panic.
        assert_eq!(parse_cpu_times("cpu 1 x\ncpu0\n"), vec![(1, 1), (0, 0)]);
    }

    #[test]
    fn memory_comes_from_proc_meminfo() {
        let text = "MemTotal:        3884096 kB\nMemFree:          123456 kB\n\
                    MemAvailable:    2000000 kB\nBuffers: 10 kB\nCached: 20 kB\n\
                    SwapTotal:        102396 kB\nSwapFree:          2396 kB\ngarbage\n";
        let m = parse_meminfo(text);
        assert_eq!(m.total, 3_884_096 * 1024);
        assert_eq!(m.available, 2_000_000 * 1024);
        assert_eq!((m.swap_total, m.swap_free), (102_396 * 1024, 2_396 * 1024));
        // A kernel without MemAvailable (before 3.14).
        let old = parse_meminfo("MemTotal: 100 kB\nMemFree: 10 kB\nBuffers: 1 kB\nCached: 2 kB\n");
        assert_eq!(old.available, 13 * 1024);
    }

    #[test]
    fn cpu_and_memory_match_proc_on_this_box() {
        let mut stat = ProcFile::new("/proc/stat");
        let first = parse_cpu_times(stat.read().unwrap());
        // Read again through the same open file: the text is regenerated.
        let busy_loop = std::time::Instant::now();
        while busy_loop.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(busy_loop.elapsed());
        }
        let second = parse_cpu_times(stat.read().unwrap());
        assert_eq!(first.len(), second.len());
        assert_eq!(
            first.len(),
            std::thread::available_parallelism().map_or(0, |n| n.get()) + 1,
            "the cpu line and one per core"
        );
        assert!(
            second[0].1 > first[0].1,
            "time passed: {first:?} {second:?}"
        );
        assert!(cpu_usage(&first, &second).iter().all(|u| *u <= 10_000));
        let mem = parse_meminfo(&fs::read_to_string("/proc/meminfo").unwrap());
        assert!(mem.total > 0 && mem.available > 0 && mem.available <= mem.total);
    }

    #[test]
    fn sysinfo_loads_round_like_proc_loadavg() {
        // sysinfo(2) loads are the kernel's avenrun (11-bit fixed point) << 5.
        let si = |avenrun: u64| avenrun << 5;
        assert_eq!(load_hundredths(0), 0);
        assert_eq!(load_hundredths(si(2048)), 100);
        assert_eq!(load_hundredths(si(1024)), 50);
        // 0.41 as the kernel holds it (839/2048 = 0.4097): printed 0.41.
        assert_eq!(load_hundredths(si(839)), 41);
        // 12.29 (25170/2048 = 12.2900): printed 12.29.
        assert_eq!(load_hundredths(si(25170)), 1229);
        assert_eq!(load_hundredths(u64::MAX), u32::MAX);
    }

    #[test]
    fn load_and_uptime_match_proc_on_this_box() {
        let hundredths = |field: &str| {
            let (int, frac) = field.split_once('.').unwrap();
            int.parse::<i64>().unwrap() * 100 + frac[..2].parse::<i64>().unwrap()
        };
        let text = fs::read_to_string("/proc/loadavg").unwrap();
        let proc_load: Vec<i64> = text.split_whitespace().take(3).map(hundredths).collect();
        let up_text = fs::read_to_string("/proc/uptime").unwrap();
        let proc_up = hundredths(up_text.split_whitespace().next().unwrap()) / 100;
        let (load, uptime) = load_and_uptime();
        for (ours, theirs) in load.iter().zip(&proc_load) {
            // The kernel updates the averages every 5 s, between the two reads at most once.
            assert!(
                (i64::from(*ours) - theirs).abs() <= 100,
                "{load:?} vs {text}"
            );
        }
        assert!(
            (i64::try_from(uptime).unwrap() - proc_up).abs() <= 2,
            "{uptime} vs {up_text}"
        );
    }

    #[test]
    fn collect_produces_plausible_metrics_on_this_box() {
        let mut c = Collector::new();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let m = c.sample();
        assert!(!m.cpu_per_core.is_empty(), "cores > 0");
        assert!(m.memory_total > 0);
        assert!(m.memory_available <= m.memory_total);
        assert!(m.memory_used <= m.memory_total);
        assert!(m.uptime_s > 0);
        assert!(m.processes > 0);
        assert!(m.cpu_total <= 10_000);
        assert!(m.net.iter().all(|n| n.name.as_str() != "lo"));

        // Where /proc/mounts lists a block-device filesystem, it is reported.
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let has_real = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2
                && f[0].starts_with("/dev/")
                && is_real_fs(f[2])
                && !f[1].starts_with("/proc")
        });
        if has_real {
            assert!(!c.disks().is_empty(), "disks from {mounts}");
        }

        let inv = c.inventory(Some("pi-test"));
        assert_eq!(inv.hostname.as_str(), "pi-test");
        assert!(inv.cores > 0);
        assert!(inv.memory_total > 0);
        assert_eq!(inv.arch.as_str(), arch());
        if !cfg!(target_arch = "arm") {
            assert_eq!(inv.arch.as_str(), std::env::consts::ARCH);
        }
        assert!(!inv.kernel.is_empty());
        assert_eq!(inv.boot_id.len(), 36, "boot id {:?}", inv.boot_id);
        let birth = inv.birth(&m.disks, &[("site".into(), "lab".into())], 10_000);
        assert_eq!(birth.labels.len(), 1);

        let secret = Secret::from_bytes([3; 32]);
        for body in [Body::Metrics(m), Body::Birth(birth)] {
            let env = Envelope {
                version: protocol::FORMAT_VERSION,
                worker_id: bounded("w-1"),
                seq: 1,
                sent_at_ms: 0,
                body,
            };
            let bytes = protocol::seal(&secret, &env).unwrap();
            assert!(bytes.len() <= protocol::MAX_FRAME_LEN);
        }
        // Repeated samples keep working (and cross a relist).
        for _ in 0..RELIST_EVERY {
            let m = c.sample();
            assert!(m.memory_total > 0);
        }
    }

    #[test]
    fn birth_truncates_labels_at_capacity() {
        let inv = Collector::new().inventory(None);
        let labels: Vec<(String, String)> = (0..40)
            .map(|i| (format!("k{i}"), "v".repeat(500)))
            .collect();
        let b = inv.birth(&HVec::new(), &labels, 1);
        assert_eq!(b.labels.len(), protocol::frame::MAX_LABELS);
        assert_eq!(b.labels[0].value.len(), 64);
    }
}
