//! The bounds the module docs promise: the largest expressible frame fits in
//! MAX_FRAME_LEN, and decoding arbitrary bytes never panics.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use proptest::prelude::*;
use protocol::examples;
use protocol::*;

fn largest_bodies() -> Vec<Body> {
    vec![
        Body::Birth(examples::largest_birth()),
        Body::Metrics(examples::largest_metrics()),
        Body::Event(Event {
            kind: EventKind::CommandRejected,
            detail: frame::bounded(&"é".repeat(200)),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::SetInterval(u32::MAX),
        }),
        Body::Reply(Reply {
            cmd_id: u32::MAX,
            status: ReplyStatus::Unsupported,
            detail: frame::bounded(&"x".repeat(200)),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::Deploy(examples::largest_service_spec()),
        }),
        Body::ServiceStatus(ServiceStatus {
            name: frame::bounded(&"x".repeat(32)),
            version: u32::MAX,
            state: ServiceState::Removed,
            pid: u32::MAX,
            restarts: u32::MAX,
            exit_code: Some(i32::MIN),
            detail: frame::bounded(&"x".repeat(200)),
        }),
    ]
}

#[test]
fn largest_frame_of_every_kind_fits_max_frame_len() {
    for body in largest_bodies() {
        let kind = body.kind();
        let sealed = seal(&examples::secret(), &examples::largest_envelope(body))
            .unwrap_or_else(|e| panic!("{kind:?} does not fit: {e}"));
        assert!(sealed.len() <= MAX_FRAME_LEN, "{kind:?}: {}", sealed.len());
        println!("largest {kind:?}: {} bytes", sealed.len());
    }
}

#[test]
fn oversized_input_is_rejected_before_decoding() {
    let big = vec![FORMAT_VERSION; MAX_FRAME_LEN + 1];
    assert_eq!(
        open(&big).map(|_| ()),
        Err(DecodeError::Oversized(MAX_FRAME_LEN + 1))
    );
}

#[test]
fn truncated_unknown_version_trailing_and_tampered_are_refused() {
    let secret = examples::secret();
    let sealed = seal(
        &secret,
        &examples::envelope(7, Body::Metrics(examples::metrics())),
    )
    .unwrap();

    assert_eq!(
        open(&sealed[..10]).map(|_| ()),
        Err(DecodeError::Truncated(10))
    );
    let mut v2 = sealed.clone();
    v2[0] = 2;
    assert_eq!(open(&v2).map(|_| ()), Err(DecodeError::UnknownVersion(2)));

    // Every strict prefix is refused (never accepted, never a panic).
    for len in 0..sealed.len() {
        let verdict = open(&sealed[..len]).and_then(|o| o.verify(&secret));
        assert!(verdict.is_err(), "prefix of {len} bytes accepted");
    }

    // Flipping any single bit anywhere is refused.
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut t = sealed.clone();
            t[i] ^= 1 << bit;
            let verdict = open(&t).and_then(|o| o.verify(&secret));
            assert!(
                verdict.is_err(),
                "bit {bit} of byte {i} flipped was accepted"
            );
        }
    }

    // A byte inserted before the tag is trailing garbage, not silently ignored.
    let mut extra = sealed.clone();
    extra.insert(sealed.len() - TAG_LEN, 0);
    assert!(matches!(
        open(&extra).map(|_| ()),
        Err(DecodeError::TrailingBytes(1)) | Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn wrong_secret_is_bad_tag() {
    let sealed = seal(
        &examples::secret(),
        &examples::envelope(1, Body::Birth(examples::birth())),
    )
    .unwrap();
    let other = Secret::from_bytes([7; 32]);
    assert_eq!(
        open(&sealed).unwrap().verify(&other).map(|_| ()),
        Err(DecodeError::BadTag)
    );
}

#[test]
fn secret_hex_round_trips_and_rejects_bad_input() {
    let s = examples::secret();
    assert_eq!(Secret::from_hex(&s.to_hex()).unwrap(), s);
    assert_eq!(Secret::from_hex("zz"), Err(DecodeError::BadSecret));
    assert_eq!(
        Secret::from_hex(&"g".repeat(64)),
        Err(DecodeError::BadSecret)
    );
    assert!(!format!("{s:?}").contains(&s.to_hex()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let secret = examples::secret();
        if let Ok(opened) = open(&bytes) {
            // Random bytes essentially never carry a valid tag.
            prop_assert!(opened.verify(&secret).is_err());
        }
    }

    #[test]
    fn valid_version_prefix_with_random_body_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..600)
    ) {
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend_from_slice(&body);
        let _ = open(&bytes);
    }

    #[test]
    fn sealed_metrics_round_trip(seq in 1u64.., cpu in any::<u16>(), up in any::<u64>()) {
        let mut m = examples::metrics();
        m.cpu_total = cpu;
        m.uptime_s = up;
        let env = examples::envelope(seq, Body::Metrics(m));
        let sealed = seal(&examples::secret(), &env).unwrap();
        let back = open(&sealed).unwrap().verify(&examples::secret()).unwrap();
        prop_assert_eq!(back, env);
    }
}
