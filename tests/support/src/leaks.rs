//! Looking for a secret in bytes that may hold it encoded: raw, hex, or
//! base64 at any alignment (an API answer, a log, a packet capture).

/// Base64 of `bytes` (`+/` or, `url_safe`, `-_`), no padding.
pub fn base64(bytes: &[u8], url_safe: bool) -> String {
    let abc: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(abc[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Every form of `value` to look for: raw, lower and upper hex, standard
/// and URL-safe base64 at each of the three alignments it can have inside
/// a longer encoded text (only the characters that depend on it alone).
pub fn leak_forms(value: &str) -> Vec<(String, Vec<u8>)> {
    let v = value.as_bytes();
    let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        ("raw".to_string(), v.to_vec()),
        ("hex".to_string(), hex.clone().into_bytes()),
        ("HEX".to_string(), hex.to_uppercase().into_bytes()),
    ];
    for url_safe in [false, true] {
        for pad in 0..3usize {
            let mut shifted = vec![0u8; pad];
            shifted.extend_from_slice(v);
            let full = base64(&shifted, url_safe);
            let (start, end) = (if pad == 0 { 0 } else { 4 }, shifted.len() / 3 * 4);
            if start >= end {
                // Too short to have characters of its own at this alignment.
                continue;
            }
            forms.push((
                format!("base64 (url-safe {url_safe}, offset {pad})"),
                full.as_bytes()[start..end].to_vec(),
            ));
        }
    }
    forms
}

/// Whether `hay` holds `needle`.
pub fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leak_forms_find_an_encoded_secret_at_any_offset() {
        assert_eq!(base64(b"foobar", false), "Zm9vYmFy");
        assert_eq!(base64(b"\xfb\xff\xfe", true), "-__-");
        assert_eq!(base64(b"\xfb\xff\xfe", false), "+//+");
        let value = "find-me-0123456789abcdef";
        for pre in ["", "x", "xy", "xyz"] {
            let text = format!("{pre}{value}tail");
            for url_safe in [false, true] {
                let encoded = base64(text.as_bytes(), url_safe);
                assert!(
                    leak_forms(value)
                        .iter()
                        .any(|(_, f)| holds(encoded.as_bytes(), f)),
                    "{pre:?} {url_safe}"
                );
            }
        }
        assert!(holds(b"0123abcd", b"3ab") && !holds(b"0123", b"34"));
        assert!(leak_forms("k")
            .iter()
            .any(|(n, f)| n == "hex" && f == b"6b"));
    }
}
