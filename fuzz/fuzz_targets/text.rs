//! Small text parsers on the authentication path: worker secrets
//! (`Secret::from_hex`), SHA-256 digests in URLs (`parse_digest`), the
//! worker download `Authorization` header (`verify_http_auth`) and the
//! re-enrol proof.
//!
//! Invariants: no panic; a parsed secret or digest has exactly one spelling
//! (it is the input, lower-cased); an `Authorization` header verifies only
//! if it is exactly the one `http_auth` builds for that method, path and
//! worker (the fuzzer would have to forge an HMAC otherwise).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::manifest::{http_auth, parse_digest, verify_http_auth};
use protocol::{examples, hex_string, Secret};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = Secret::from_hex(text) {
        assert_eq!(s.to_hex(), text.trim().to_ascii_lowercase());
    }
    if let Some(d) = parse_digest(text) {
        assert_eq!(hex_string(&d), text.to_ascii_lowercase());
    }

    // Header, method and path from the input: "<header>\n<method>\n<path>".
    let mut parts = text.splitn(3, '\n');
    let header = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or("GET");
    let path = parts.next().unwrap_or("/api/v1/agent/manifests/x");
    let secret = examples::secret();
    let mut looked_up = None;
    if let Some(id) = verify_http_auth(header, method, path, |id| {
        looked_up = Some(id.to_string());
        Some(secret.clone())
    }) {
        assert_eq!(Some(id.to_string()), looked_up);
        assert_eq!(header, http_auth(&secret, id, method, path));
    }
    // The header built for this request verifies; for another path it does not.
    let id = "w-0123456789ab";
    let good = http_auth(&secret, id, method, path);
    assert_eq!(
        verify_http_auth(&good, method, path, |_| Some(secret.clone())),
        Some(id)
    );
    let other_path = format!("{path}x");
    assert_eq!(
        verify_http_auth(&good, method, &other_path, |_| Some(secret.clone())),
        None
    );
    let proof = protocol::reenroll_proof(&secret, text);
    assert_eq!(proof.len(), 64);
});
