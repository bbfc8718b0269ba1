//! Raspberry Pi board facts carried by [`crate::Board`]: what the firmware's
//! throttling bits mean and what a revision code says.
//!
//! Both sides use these: the agent parses the sysfs text with
//! [`parse_hex`], the conductor names the bits ([`THROTTLE_FLAGS`]) in its
//! API, Prometheus gauges and alert rules, and decodes the revision
//! ([`revision_memory`], [`revision_model`]).
//!
//! Sources: the Raspberry Pi documentation's `vcgencmd get_throttled` bit
//! table and its "new-style revision codes" (bit 23 set: `NOQuuuWuFMMMCCCCPPPPTTTTTTTTRRRR`).
//! Old-style codes (Pi 1 era, bit 23 clear) name no memory size here.

/// One `get_throttled` bit: its mask and its name in the API and in
/// Prometheus labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleFlag {
    /// The bit.
    pub mask: u32,
    /// snake_case name, e.g. `under_voltage_now`.
    pub name: &'static str,
}

/// The eight bits the firmware documents, "now" first, then "since boot".
pub const THROTTLE_FLAGS: [ThrottleFlag; 8] = [
    ThrottleFlag {
        mask: 1 << 0,
        name: "under_voltage_now",
    },
    ThrottleFlag {
        mask: 1 << 1,
        name: "freq_capped_now",
    },
    ThrottleFlag {
        mask: 1 << 2,
        name: "throttled_now",
    },
    ThrottleFlag {
        mask: 1 << 3,
        name: "soft_temp_limit_now",
    },
    ThrottleFlag {
        mask: 1 << 16,
        name: "under_voltage_since_boot",
    },
    ThrottleFlag {
        mask: 1 << 17,
        name: "freq_capped_since_boot",
    },
    ThrottleFlag {
        mask: 1 << 18,
        name: "throttled_since_boot",
    },
    ThrottleFlag {
        mask: 1 << 19,
        name: "soft_temp_limit_since_boot",
    },
];

/// Under-voltage now or since boot: the supply is not good enough (the
/// fleet page flags such a worker).
pub const UNDER_VOLTAGE_ANY: u32 = (1 << 0) | (1 << 16);

/// Frequency capped, throttled or soft temperature limit, now.
pub const THROTTLING_NOW: u32 = (1 << 1) | (1 << 2) | (1 << 3);

/// The four "since boot" (sticky) bits, 16–19.
pub const SINCE_BOOT: u32 = 0xf << 16;

/// A hex number as sysfs and the firmware print it (`0x50005`, `50005`,
/// `c03114`), surrounding whitespace ignored. `None` for anything else.
pub fn parse_hex(text: &str) -> Option<u32> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() || t.len() > 8 {
        return None;
    }
    u32::from_str_radix(t, 16).ok()
}

/// Memory on the board in bytes, from a new-style revision code.
pub fn revision_memory(revision: u32) -> Option<u64> {
    if revision & (1 << 23) == 0 {
        return None;
    }
    let code = (revision >> 20) & 0x7;
    // 0 = 256 MB … 5 = 8 GB, 6 = 16 GB (Pi 5); 7 is not assigned.
    (code <= 6).then(|| (256u64 << code) * 1024 * 1024)
}

/// The board type a new-style revision code names, e.g. `4B`, `Zero W`.
pub fn revision_model(revision: u32) -> Option<&'static str> {
    if revision & (1 << 23) == 0 {
        return None;
    }
    Some(match (revision >> 4) & 0xff {
        0x00 => "A",
        0x01 => "B",
        0x02 => "A+",
        0x03 => "B+",
        0x04 => "2B",
        0x06 => "CM1",
        0x08 => "3B",
        0x09 => "Zero",
        0x0a => "CM3",
        0x0c => "Zero W",
        0x0d => "3B+",
        0x0e => "3A+",
        0x10 => "CM3+",
        0x11 => "4B",
        0x12 => "Zero 2 W",
        0x13 => "400",
        0x14 => "CM4",
        0x15 => "CM4S",
        0x17 => "5",
        0x18 => "CM5",
        0x19 => "500",
        0x1a => "CM5 Lite",
        _ => return None,
    })
}

/// The names of the flags set in `bits`, in [`THROTTLE_FLAGS`] order.
pub fn throttle_names(bits: u32) -> impl Iterator<Item = &'static str> {
    THROTTLE_FLAGS
        .iter()
        .filter(move |f| bits & f.mask != 0)
        .map(|f| f.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_as_sysfs_prints_it() {
        assert_eq!(parse_hex("0x50005\n"), Some(0x50005));
        assert_eq!(parse_hex("50005"), Some(0x50005));
        assert_eq!(parse_hex(" c03114 "), Some(0xc03114));
        assert_eq!(parse_hex("0"), Some(0));
        assert_eq!(parse_hex(""), None);
        assert_eq!(parse_hex("0x"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("123456789"), None);
    }

    #[test]
    fn revision_codes_name_model_and_memory() {
        // Pi 4 Model B 1.4, 4 GB, Sony UK.
        assert_eq!(revision_model(0xc03114), Some("4B"));
        assert_eq!(revision_memory(0xc03114), Some(4 << 30));
        // Pi Zero W 1.1, 512 MB.
        assert_eq!(revision_model(0x9000c1), Some("Zero W"));
        assert_eq!(revision_memory(0x9000c1), Some(512 << 20));
        // Pi 5, 8 GB.
        assert_eq!(revision_model(0xd04170), Some("5"));
        assert_eq!(revision_memory(0xd04170), Some(8 << 30));
        // Old-style (Pi 1 B 2.0): nothing decoded.
        assert_eq!(revision_model(0x000e), None);
        assert_eq!(revision_memory(0x000e), None);
    }

    #[test]
    fn throttle_bits_are_named() {
        let names: Vec<_> = throttle_names(0x50005).collect();
        assert_eq!(
            names,
            [
                "under_voltage_now",
                "throttled_now",
                "under_voltage_since_boot",
                "throttled_since_boot"
            ]
        );
        assert_eq!(throttle_names(0).count(), 0);
        assert_ne!(0x50005 & UNDER_VOLTAGE_ANY, 0);
        assert_ne!(0x50005 & THROTTLING_NOW, 0);
        assert_eq!(0x10000 & THROTTLING_NOW, 0);
    }
}
