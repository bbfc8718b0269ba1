//! Signed agent releases: what an Ed25519 release signature covers, agent
//! versions and how they compare, and the public key's text form.
//!
//! An agent release is one artifact per architecture (the static
//! `edge-worker` binary, content-addressed by its SHA-256 like every
//! artifact) plus an Ed25519 signature over ([`signed_message`])
//! `(version, arch, sha256)`. The signing key is made offline
//! (`aerekos release-key generate`) and never reaches the conductor; its
//! public key is configured on the conductor, handed to each worker at
//! enrolment and pinned in the worker's state. A worker installs only a
//! binary that verifies under the pinned key, is for its own architecture,
//! and is newer than what it runs (unless a downgrade is asked for), so a
//! compromised conductor or broker cannot push code to the fleet.
//!
//! This crate holds no Ed25519 code (it stays free of `ring`): the CLI signs
//! and the agent and the conductor verify, all with `ring`, over the bytes
//! defined here; `tests/golden.rs` pins them.
//!
//! Limits: a version is at most [`VERSION_LEN`] bytes, `major.minor.patch`
//! with an optional `-pre` suffix of ASCII letters, digits, `.` and `-`; an
//! arch at most 32 bytes (a [`crate::Name`]).

use core::cmp::Ordering;
use core::fmt;

use heapless::String;
use serde::{Deserialize, Serialize};

/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Longest agent version string.
pub const VERSION_LEN: usize = 32;
/// Longest arch string (a [`crate::Name`]).
pub const ARCH_LEN: usize = 32;
/// The domain separator that starts every signed message, so a release
/// signature can never be taken for a signature over anything else.
pub const DOMAIN: &[u8] = b"aerekos-agent-release-v1\0";

/// Why a release field is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// Not `major.minor.patch[-pre]`, or too long.
    #[error("invalid agent version {0:?}: expected major.minor.patch[-pre], at most 32 bytes")]
    Version(std::string::String),
    /// Empty, too long, or not `[a-z0-9_]`.
    #[error("invalid arch {0:?}: expected 1 to 32 of a-z, 0-9, _")]
    Arch(std::string::String),
    /// Not 64 hex digits.
    #[error("invalid release public key: expected 64 hex digits (32 bytes), got {0:?}")]
    PublicKey(std::string::String),
}

/// An agent version, `major.minor.patch[-pre]`, ordered as semver orders
/// them (a pre-release comes before its release; pre-releases compare as
/// strings, which is enough for `-rc.1`…`-rc.9`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
    /// Pre-release suffix without the `-` (empty: a release).
    pub pre: std::string::String,
}

impl Version {
    /// Parses `major.minor.patch[-pre]` (≤ [`VERSION_LEN`] bytes).
    pub fn parse(s: &str) -> Result<Version, ReleaseError> {
        let bad = || ReleaseError::Version(s.chars().take(64).collect());
        if s.is_empty() || s.len() > VERSION_LEN {
            return Err(bad());
        }
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, p),
            None => (s, ""),
        };
        if s.contains('-')
            && (pre.is_empty()
                || !pre
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
        {
            return Err(bad());
        }
        let mut parts = core.split('.');
        let mut num = || -> Result<u32, ReleaseError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let (major, minor, patch) = (num()?, num()?, num()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Version {
            major,
            minor,
            patch,
            pre: pre.into(),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.pre.is_empty() {
            write!(f, "-{}", self.pre)?;
        }
        Ok(())
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// `true` for an arch as workers report it (`aarch64`, `armv7l`, `x86_64`).
pub fn valid_arch(arch: &str) -> bool {
    !arch.is_empty()
        && arch.len() <= ARCH_LEN
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The bytes a release signature covers:
///
/// | bytes | field |
/// |---|---|
/// | 25 | [`DOMAIN`] `aerekos-agent-release-v1\0` |
/// | 1 | version length |
/// | ≤ 32 | version, UTF-8 |
/// | 1 | arch length |
/// | ≤ 32 | arch, UTF-8 |
/// | 32 | SHA-256 of the binary |
///
/// Fails on a version or arch that is invalid (see [`Version::parse`],
/// [`valid_arch`]), so nothing ambiguous is ever signed or verified.
pub fn signed_message(
    version: &str,
    arch: &str,
    sha256: &[u8; 32],
) -> Result<Vec<u8>, ReleaseError> {
    Version::parse(version)?;
    if !valid_arch(arch) {
        return Err(ReleaseError::Arch(arch.chars().take(64).collect()));
    }
    let mut m = Vec::with_capacity(DOMAIN.len() + 2 + version.len() + arch.len() + 32);
    m.extend_from_slice(DOMAIN);
    // fits: both were checked to be at most 32 bytes.
    #[allow(clippy::cast_possible_truncation)]
    {
        m.push(version.len() as u8);
        m.extend_from_slice(version.as_bytes());
        m.push(arch.len() as u8);
    }
    m.extend_from_slice(arch.as_bytes());
    m.extend_from_slice(sha256);
    Ok(m)
}

/// Parses a release public key from its text form: 64 hex digits.
pub fn parse_public_key(s: &str) -> Result<[u8; PUBLIC_KEY_LEN], ReleaseError> {
    let s = s.trim();
    let bad = || ReleaseError::PublicKey(s.chars().take(80).collect());
    if s.len() != 2 * PUBLIC_KEY_LEN {
        return Err(bad());
    }
    let mut out = [0u8; PUBLIC_KEY_LEN];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
        // fits: two hex digits are at most 255.
        #[allow(clippy::cast_possible_truncation)]
        {
            out[i] = (hi * 16 + lo) as u8;
        }
    }
    Ok(out)
}

/// What [`crate::Action::UpdateAgent`] asks a worker to install: one signed
/// release for its arch. The worker fetches the binary like any artifact
/// (`GET /api/v1/agent/artifacts/{sha256}`, checked against `sha256` and
/// `size`), checks the signature under its pinned key, then runs it on
/// trial and keeps it only if it comes back (see the agent's `update`
/// module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdate {
    /// The release's version (`major.minor.patch[-pre]`).
    pub version: String<VERSION_LEN>,
    /// The arch the release was built for (must be the worker's).
    pub arch: String<ARCH_LEN>,
    /// SHA-256 of the binary.
    pub sha256: [u8; 32],
    /// Size of the binary, bytes.
    pub size: u64,
    /// Ed25519 signature over [`signed_message`] (64 bytes; a list on the
    /// wire because serde has no 64-byte arrays).
    pub signature: heapless::Vec<u8, SIGNATURE_LEN>,
    /// Install even if `version` is older than the running agent.
    pub allow_downgrade: bool,
    /// Seconds the new agent has to start, reach the conductor and have a
    /// frame acknowledged before the old one takes over again.
    pub trial_s: u16,
}

/// The ELF `e_machine` of the binaries that run on `arch` (as workers
/// report it: `std::env::consts::ARCH` or `uname -m`), `None` for an arch
/// this table does not know.
fn elf_machine_of(arch: &str) -> Option<u16> {
    Some(match arch {
        "x86_64" | "amd64" => 62,
        "aarch64" | "arm64" => 183,
        "x86" | "i386" | "i586" | "i686" => 3,
        "riscv64" => 243,
        a if a.starts_with("arm") => 40,
        _ => return None,
    })
}

/// Why a release binary cannot run on `arch`, judged from its first bytes
/// (at least 20): `Some` when they are an ELF header whose machine is not
/// `arch`'s. Anything that is not ELF (a script) or an arch the table does
/// not know passes: the trial run decides those. The CLI refuses to sign
/// such a binary and the agent refuses to stage it, so an x86_64 build
/// released as `aarch64` by mistake never replaces a Pi's agent.
pub fn elf_mismatch(head: &[u8], arch: &str) -> Option<std::string::String> {
    let machine = match head {
        [0x7f, b'E', b'L', b'F', _, 1, ..] if head.len() >= 20 => {
            u16::from_le_bytes([head[18], head[19]])
        }
        [0x7f, b'E', b'L', b'F', _, 2, ..] if head.len() >= 20 => {
            u16::from_be_bytes([head[18], head[19]])
        }
        _ => return None,
    };
    let want = elf_machine_of(arch)?;
    (machine != want).then(|| {
        let name = match machine {
            62 => "x86_64",
            183 => "aarch64",
            40 => "32-bit ARM",
            3 => "x86",
            243 => "riscv",
            _ => "another machine",
        };
        format!("the binary is an ELF executable for {name} (e_machine {machine}), not {arch}")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn elf_mismatch_reads_the_machine_field() {
        let elf = |machine: u16| {
            let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1];
            h.resize(18, 0);
            h.extend_from_slice(&machine.to_le_bytes());
            h
        };
        assert_eq!(super::elf_mismatch(&elf(183), "aarch64"), None);
        assert_eq!(super::elf_mismatch(&elf(62), "x86_64"), None);
        assert_eq!(super::elf_mismatch(&elf(40), "armv7l"), None);
        let wrong = super::elf_mismatch(&elf(62), "aarch64").unwrap();
        assert!(
            wrong.contains("x86_64") && wrong.contains("aarch64"),
            "{wrong}"
        );
        assert!(super::elf_mismatch(&elf(183), "armv6l").is_some());
        // Not ELF, too short, an unknown arch: nothing to say.
        assert_eq!(super::elf_mismatch(b"#!/bin/sh\nexit 0\n", "aarch64"), None);
        assert_eq!(super::elf_mismatch(&elf(62)[..10], "aarch64"), None);
        assert_eq!(super::elf_mismatch(&elf(62), "mips"), None);
    }

    use super::*;

    #[test]
    fn versions_parse_and_order_like_semver() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("0.1.0") < v("0.2.0"));
        assert!(v("0.2.0") < v("0.10.0"));
        assert!(v("1.0.0-rc.1") < v("1.0.0"));
        assert!(v("1.0.0-rc.1") < v("1.0.0-rc.2"));
        assert!(v("1.0.0") == v("1.0.0"));
        assert_eq!(v("1.2.3-beta.1").to_string(), "1.2.3-beta.1");
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.2.x",
            "1.2.3-",
            "1.2.3-a b",
            "1.2.3+x",
            "11111111111111111111.0.0",
            "1.2.3-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_signed_message_is_unambiguous_and_checked() {
        let m = signed_message("0.2.0", "aarch64", &[7; 32]).unwrap();
        assert_eq!(&m[..DOMAIN.len()], DOMAIN);
        assert_eq!(m.len(), DOMAIN.len() + 1 + 5 + 1 + 7 + 32);
        // Moving a byte from the version to the arch changes the message.
        assert_ne!(
            signed_message("0.2.0", "aarch64", &[7; 32]).unwrap(),
            signed_message("0.2.0", "aarch6", &[7; 32]).unwrap()
        );
        assert!(signed_message("0.2", "aarch64", &[0; 32]).is_err());
        assert!(signed_message("0.2.0", "AARCH64", &[0; 32]).is_err());
        assert!(signed_message("0.2.0", "", &[0; 32]).is_err());
    }

    #[test]
    fn public_keys_are_64_hex_digits() {
        let k = parse_public_key(&"ab".repeat(32)).unwrap();
        assert_eq!(k, [0xab; 32]);
        assert!(parse_public_key("ab").is_err());
        assert!(parse_public_key(&"zz".repeat(32)).is_err());
        assert!(parse_public_key(&"é".repeat(32)).is_err());
    }
}
