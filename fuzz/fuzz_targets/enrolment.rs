//! What a worker is handed to enrol and connect: the registration token
//! with the fleet CA's fingerprint, fingerprints in every accepted spelling,
//! the conductor's `https://` URL, broker URLs (`mqtts://`), and a CA
//! certificate in PEM (an external broker's, from the enrolment answer).
//!
//! Invariants: no panic; a parsed token or fingerprint prints to text that
//! parses back to the same value (one meaning per token); a token's secret
//! part never holds the separator and stays within its bound; an accepted
//! URL has a host and a non-zero port; accepted PEM yields some DER.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::registration::{Fingerprint, RegistrationToken, MAX_SECRET_LEN, SEPARATOR};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = RegistrationToken::parse(text) {
        assert!(!t.secret.is_empty() && t.secret.len() <= MAX_SECRET_LEN);
        assert!(!t.secret.contains(SEPARATOR));
        let again = RegistrationToken::parse(&t.to_text()).expect("its own text parses");
        assert_eq!(again, t);
    }
    if let Ok(fp) = Fingerprint::parse(text) {
        assert_eq!(Fingerprint::parse(&fp.to_string()), Ok(fp));
    }
    if let Some((host, _port)) = edge_worker::tls::https_host_port(text) {
        assert!(!host.is_empty());
    }
    if let Some(u) = edge_worker::session::MqttUrl::parse(text) {
        assert!(u.port != 0 && !u.host.is_empty());
    }
    if let Ok(der) = edge_worker::tls::der_of_pem(text) {
        assert!(!der.is_empty());
    }
});
