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

/// The bytes of an even-length hex string (either case); `None` otherwise.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex("00ffA1"), Some(vec![0, 255, 0xa1]));
        assert_eq!(from_hex(""), Some(vec![]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("+1"), None);
        assert_eq!(
            protocol::hex_string(&from_hex("0a1b").unwrap_or_default()),
            "0a1b"
        );
    }
}
