//! The manifest decoder a worker runs on bytes fetched over HTTP
//! (`Manifest::decode` / `decode_verified`), and the JSON form the
//! conductor's API uses.
//!
//! Invariants: no panic; input over `MAX_MANIFEST_LEN` is refused before
//! decoding; a decoded manifest is valid, re-encodes to the same bytes
//! (one encoding, so its digest is stable) and decodes back equal; it passes
//! `decode_verified` against its own digest and fails against another; the
//! JSON form round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::manifest::{digest, MAX_MANIFEST_LEN};
use protocol::{Manifest, ManifestError, ManifestRef};

fuzz_target!(|data: &[u8]| {
    let decoded = Manifest::decode(data);
    if data.len() > MAX_MANIFEST_LEN {
        assert_eq!(decoded, Err(ManifestError::Oversized(data.len())));
        return;
    }
    let Ok(m) = decoded else {
        return;
    };
    m.validate().expect("a decoded manifest is valid");
    let bytes = m.encode().expect("a decoded manifest re-encodes");
    assert_eq!(bytes, data, "a manifest has one encoding");
    assert_eq!(Manifest::decode(&bytes).as_ref(), Ok(&m));

    let mut wanted = ManifestRef {
        name: protocol::bounded(&m.name),
        version: m.version,
        digest: digest(data),
    };
    assert_eq!(Manifest::decode_verified(data, &wanted).as_ref(), Ok(&m));
    wanted.digest[0] ^= 1;
    assert_eq!(
        Manifest::decode_verified(data, &wanted),
        Err(ManifestError::DigestMismatch)
    );

    let json = serde_json::to_string(&m).expect("JSON encodes");
    let from_json: Manifest = serde_json::from_str(&json).expect("JSON decodes");
    assert_eq!(from_json, m);
});
