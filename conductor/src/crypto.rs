//! The conductor's small cryptographic helpers: OS randomness, SHA-256 in
//! hex, comparison without early exit. A leaf module.

use sha2::{Digest, Sha256};

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)?;
    Ok(b)
}

/// Lower-case hex of `N` random bytes.
pub fn random_hex<const N: usize>() -> Result<String, getrandom::Error> {
    Ok(protocol::hex_string(&random_bytes::<N>()?))
}

/// sha256 of `s`, lower-case hex.
pub fn sha256_hex(s: &str) -> String {
    protocol::hex_string(&Sha256::digest(s.as_bytes()))
}

/// Compares two byte strings without early exit on the first difference.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
