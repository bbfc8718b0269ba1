//! Raspberry Pi board health: the board's identity (revision code, serial
//! number, SD card) and the firmware's throttling bits, sent as a
//! [`protocol::Board`] frame.
//!
//! Everything is read under a host root (`/`, or `--host-root DIR` where a
//! container sees the host's `/sys` and `/proc` mounted): a worker in a
//! container still reports the Pi it runs on, and the tests point it at a
//! fixture tree.
//!
//! | what | where (under the root) |
//! |---|---|
//! | is it a Pi | `sys/firmware/devicetree/base/model` (= `/proc/device-tree/model`) or `proc/cpuinfo` `Model` starts with `Raspberry Pi` |
//! | revision | `sys/firmware/devicetree/base/system/linux,revision` (4 bytes, big-endian), else `proc/cpuinfo` `Revision` |
//! | serial | `sys/firmware/devicetree/base/serial-number`, else `proc/cpuinfo` `Serial` |
//! | throttled | `sys/devices/platform/soc*/soc*:firmware/get_throttled` (hex, Raspberry Pi kernels) |
//! | SD card | `sys/block/mmcblk0/device/{name,serial,date,manfid}` |
//!
//! `get_throttled` is the Raspberry Pi kernel's `%x\n` attribute (mode
//! 0444). Newer Raspberry Pi kernels call it deprecated and log one
//! warning per boot on its first read ("use hwmon sysfs instead"); the
//! hwmon `rpi_volt` device they point to has the under-voltage bit alone,
//! so the agent reads `get_throttled` while it exists. The sticky "since
//! boot" bits are latched by the agent ([`BoardReader`]'s `sticky`).
//!
//! Limits: the identity is read once ([`BoardReader::detect`]); only the
//! throttling bits are re-read with each sample (one small sysfs read). A
//! machine that is not a Pi gets no reader and sends no frame. Nothing read
//! is unwrapped: a missing or malformed file leaves its field empty. Kernels
//! with `rpi_volt` but no `get_throttled` (mainline) report no bits.

use std::fs;
use std::path::{Path, PathBuf};

use protocol::board::{parse_hex, SINCE_BOOT};
use protocol::frame::bounded;
use protocol::{Board, SdCard};

use crate::collect::read_trimmed;

/// Where the device tree's properties are, under the root.
const DEVICE_TREE: &str = "sys/firmware/devicetree/base";

/// Reads a Pi's [`Board`] frame. See the module docs.
#[derive(Debug, Clone)]
pub struct BoardReader {
    /// The identity read at start; `throttled` is filled by each [`read`](Self::read).
    identity: Board,
    /// The firmware's `get_throttled` file, when the kernel has one.
    throttled: Option<PathBuf>,
    /// The sticky ("since boot") bits seen so far, reported with every
    /// reading. Why the agent latches them: the kernel's `rpi_volt` hwmon
    /// driver asks the firmware to clear them on every 2 s poll, and newer
    /// Raspberry Pi kernels show the value that poll got, so without the
    /// latch "since boot" would mean "in the last 2 s". Since the agent
    /// started, then: a reboot restarts it.
    sticky: u32,
}

impl BoardReader {
    /// The reader for the Pi under `root`, or `None` when the machine is not a
    /// Raspberry Pi.
    pub fn detect(root: &Path) -> Option<BoardReader> {
        let dt = root.join(DEVICE_TREE);
        let cpuinfo = fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        let field = |name: &str| cpuinfo_field(&cpuinfo, name).unwrap_or_default();
        let mut model = read_trimmed(dt.join("model"));
        if model.is_empty() {
            model = field("Model").to_string();
        }
        if !model.starts_with("Raspberry Pi") {
            return None;
        }
        let revision = match fs::read(dt.join("system/linux,revision")) {
            Ok(b) if b.len() == 4 => Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            _ => parse_hex(field("Revision")),
        };
        let mut serial = read_trimmed(dt.join("serial-number"));
        if serial.is_empty() {
            serial = field("Serial").to_string();
        }
        let card = root.join("sys/block/mmcblk0/device");
        let sd = fs::metadata(&card).is_ok().then(|| SdCard {
            name: bounded(&read_trimmed(card.join("name"))),
            serial: bounded(&read_trimmed(card.join("serial"))),
            date: bounded(&read_trimmed(card.join("date"))),
            manfid: parse_hex(&read_trimmed(card.join("manfid")))
                .and_then(|m| u16::try_from(m).ok())
                .unwrap_or(0),
        });
        Some(BoardReader {
            identity: Board {
                throttled: None,
                revision,
                serial: bounded(&serial),
                sd,
            },
            throttled: find_get_throttled(root),
            sticky: 0,
        })
    }

    /// The frame now: the identity and freshly read throttling bits, with
    /// the sticky bits seen before still set.
    pub fn read(&mut self) -> Board {
        let mut b = self.identity.clone();
        let now = self
            .throttled
            .as_ref()
            .and_then(|p| parse_hex(&read_trimmed(p)));
        b.throttled = now.map(|bits| {
            self.sticky |= bits & SINCE_BOOT;
            bits | self.sticky
        });
        b
    }
}

/// `sys/devices/platform/<soc>/<soc>:firmware/get_throttled`: the soc node
/// is `soc` on a Pi 1–4 and carries its address on a Pi 5
/// (`soc@107c000000`), so the directory is looked up, not spelled.
fn find_get_throttled(root: &Path) -> Option<PathBuf> {
    let platform = root.join("sys/devices/platform");
    let socs = fs::read_dir(&platform).ok()?;
    socs.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("soc"))
        .find_map(|soc| {
            let name = soc.file_name().to_string_lossy().into_owned();
            let p = soc.path().join(format!("{name}:firmware/get_throttled"));
            p.is_file().then_some(p)
        })
}

/// The value of a `Name\t: value` line of `/proc/cpuinfo`.
pub(crate) fn cpuinfo_field<'a>(cpuinfo: &'a str, name: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn a_pi_4_reads_from_the_device_tree() {
        let mut r = BoardReader::detect(&fixture("pi4")).expect("a Pi");
        let b = r.read();
        assert_eq!(b.revision, Some(0xc03114));
        assert_eq!(b.serial.as_str(), "10000000a1b2c3d4");
        assert_eq!(b.throttled, Some(0));
        let sd = b.sd.expect("an SD card");
        assert_eq!(sd.name.as_str(), "SN32G");
        assert_eq!(sd.serial.as_str(), "0x9f8e7d6c");
        assert_eq!(sd.date.as_str(), "03/2021");
        assert_eq!(sd.manfid, 0x03);
    }

    #[test]
    fn a_pi_zero_w_falls_back_to_cpuinfo_and_reports_under_voltage() {
        let mut r = BoardReader::detect(&fixture("pi-zero-w")).expect("a Pi");
        let b = r.read();
        assert_eq!(b.revision, Some(0x9000c1));
        assert_eq!(b.serial.as_str(), "00000000deadbeef");
        assert_eq!(b.throttled, Some(0x50005));
        assert_eq!(b.sd, None);
    }

    #[test]
    fn throttling_is_read_again_on_every_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::create_dir_all(root.join("proc")).expect("mkdir");
        fs::write(
            root.join("proc/cpuinfo"),
            "Hardware\t: BCM2835\nRevision\t: a02082\nSerial\t\t: 0000000012345678\nModel\t\t: Raspberry Pi 3 Model B Rev 1.2\n",
        )
        .expect("write");
        let fw = root.join("sys/devices/platform/soc@107c000000/soc@107c000000:firmware");
        fs::create_dir_all(&fw).expect("mkdir");
        fs::write(fw.join("get_throttled"), "0\n").expect("write");
        let mut r = BoardReader::detect(root).expect("a Pi");
        assert_eq!(r.read().throttled, Some(0));
        assert_eq!(r.read().revision, Some(0xa02082));
        fs::write(fw.join("get_throttled"), "50005\n").expect("write");
        assert_eq!(r.read().throttled, Some(0x50005));
        // The supply recovers and hwmon's poll cleared the sticky bits: the
        // "now" bits follow the firmware, the sticky ones stay latched.
        fs::write(fw.join("get_throttled"), "0\n").expect("write");
        assert_eq!(r.read().throttled, Some(0x50000));
        fs::write(fw.join("get_throttled"), "80008\n").expect("write");
        assert_eq!(r.read().throttled, Some(0xd0008));
        // Garbage from the file is no reading, not a crash.
        fs::write(fw.join("get_throttled"), "not hex\n").expect("write");
        assert_eq!(r.read().throttled, None);
    }

    #[test]
    fn other_machines_have_no_board() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(BoardReader::detect(dir.path()).is_none());
        fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        fs::write(
            dir.path().join("proc/cpuinfo"),
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n",
        )
        .expect("write");
        assert!(BoardReader::detect(dir.path()).is_none());
    }
}
