//! The worker's local API: the hand-written HTTP/1.1 head parser
//! (`edge-worker/src/local_api/server.rs`), the `/v1/secrets/{key}` path
//! decoder and the `POST /v1/events` and `/v1/metrics` body parsers.
//!
//! Invariants: no panic; a refusal is 400, 431 or 505; a parsed head has a
//! `tchar` method, a visible-ASCII target, at most `MAX_HEADERS` fields and
//! lies within `MAX_HEAD` bytes or the input; the path decoder accepts only
//! `%` + two hex digits and round trips through percent-encoding; a body the
//! API queues becomes a frame body that seals within `MAX_FRAME_LEN`.
#![no_main]

use edge_worker::local_api::fuzzing::{
    decode_secret_key, parse_publish_body, parse_request_head, HeadOutcome,
};
use edge_worker::local_api::{MAX_HEAD, MAX_HEADERS};
use libfuzzer_sys::fuzz_target;
use protocol::{examples, seal, Body};

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fuzz_target!(|data: &[u8]| {
    // As the server sees it: at most MAX_HEAD bytes buffered for the head.
    let raw = &data[..data.len().min(MAX_HEAD)];
    match parse_request_head(raw) {
        HeadOutcome::Incomplete => {}
        HeadOutcome::Refused(code) => assert!([400, 431, 505].contains(&code), "{code}"),
        HeadOutcome::Parsed {
            head_len,
            method,
            target,
            headers,
            length: _,
            bearer,
        } => {
            assert!(head_len <= raw.len());
            assert!(!method.is_empty() && method.bytes().all(tchar));
            assert!(!target.is_empty() && target.bytes().all(|b| b.is_ascii_graphic()));
            assert!(headers <= MAX_HEADERS);
            if let Some(token) = bearer {
                assert_eq!(token, token.trim());
            }
        }
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(key) = decode_secret_key(text) {
        let bytes = text.as_bytes();
        for (i, _) in text.match_indices('%') {
            assert!(
                bytes
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
                "accepted a bad escape at {i} in {text:?}"
            );
        }
        if !text.contains('%') {
            assert_eq!(key, text);
        }
    }
    assert_eq!(
        decode_secret_key(&percent_encode(text)).as_deref(),
        Some(text)
    );

    for metrics in [false, true] {
        if let Ok(body) = parse_publish_body("svc-a", metrics, data) {
            match &body {
                Body::Event(e) => assert!(e.detail.starts_with("svc-a: ")),
                Body::ServiceMetrics(m) => assert!(!m.samples.is_empty()),
                other => panic!("unexpected body {other:?}"),
            }
            let env = examples::envelope(u64::MAX, body);
            let frame = seal(&examples::secret(), &env).expect("a queued publish fits a frame");
            assert!(frame.len() <= protocol::MAX_FRAME_LEN);
        }
    }
});
