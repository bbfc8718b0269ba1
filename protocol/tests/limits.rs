//! The bounds the module docs promise: the largest expressible frame fits in
//! MAX_FRAME_LEN, and decoding arbitrary bytes never panics.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use proptest::prelude::*;
use protocol::examples;
use protocol::*;

fn largest_bodies() -> Vec<Body> {
    vec![
        Body::Birth(examples::largest_birth()),
        Body::Board(examples::largest_board()),
        Body::Metrics(examples::largest_metrics()),
        Body::MetricsBatch(examples::largest_metrics_batch()),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::Live(LiveRequest {
                interval_ms: u32::MAX,
                for_s: u32::MAX,
            }),
        }),
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
        Body::Command(Command {
            id: u32::MAX,
            action: Action::DeployManifest(ManifestRef {
                name: frame::bounded(&"é".repeat(32)),
                version: u32::MAX,
                digest: [0xff; 32],
            }),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::InstallManifest(ManifestRef {
                name: frame::bounded(&"é".repeat(32)),
                version: u32::MAX,
                digest: [0xff; 32],
            }),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::Stored(u64::MAX),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::Logs(LogRequest {
                name: frame::bounded(&"é".repeat(32)),
                tail_bytes: u32::MAX,
                follow_s: u16::MAX,
            }),
        }),
        Body::Command(Command {
            id: u32::MAX,
            action: Action::Exec(ExecRequest {
                session: [0xff; 16],
                argv: std::iter::repeat_n(frame::bounded(&"é".repeat(EXEC_ARG_LEN)), MAX_EXEC_ARGS)
                    .collect(),
                timeout_s: u32::MAX,
                max_output: u32::MAX,
            }),
        }),
        Body::LogChunk(LogChunk {
            cmd_id: u32::MAX,
            name: frame::bounded(&"é".repeat(32)),
            index: u32::MAX,
            data: std::iter::repeat_n(0xffu8, LOG_CHUNK_LEN).collect(),
            last: true,
        }),
        Body::ServiceMetrics(ServiceMetrics {
            name: frame::bounded(&"é".repeat(32)),
            samples: std::iter::repeat_n(
                Sample {
                    key: frame::bounded(&"é".repeat(32)),
                    value: i64::MIN,
                },
                MAX_SERVICE_SAMPLES,
            )
            .collect(),
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
        open(&big, examples::WORKER_ID).map(|_| ()),
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
        open(&sealed[..10], examples::WORKER_ID).map(|_| ()),
        Err(DecodeError::Truncated(10))
    );
    let mut v3 = sealed.clone();
    v3[0] = 3;
    assert_eq!(
        open(&v3, examples::WORKER_ID).map(|_| ()),
        Err(DecodeError::UnknownVersion(3))
    );
    // A format-1 frame relabelled as format 2 does not decode as one that
    // verifies (its bytes still hold the id).
    let mut relabelled = sealed.clone();
    relabelled[0] = FORMAT_V2;
    assert!(open(&relabelled, examples::WORKER_ID)
        .and_then(|o| o.verify(&secret))
        .is_err());

    // Every strict prefix is refused (never accepted, never a panic).
    for len in 0..sealed.len() {
        let verdict = open(&sealed[..len], examples::WORKER_ID).and_then(|o| o.verify(&secret));
        assert!(verdict.is_err(), "prefix of {len} bytes accepted");
    }

    // Flipping any single bit anywhere is refused.
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut t = sealed.clone();
            t[i] ^= 1 << bit;
            let verdict = open(&t, examples::WORKER_ID).and_then(|o| o.verify(&secret));
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
        open(&extra, examples::WORKER_ID).map(|_| ()),
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
        open(&sealed, examples::WORKER_ID)
            .unwrap()
            .verify(&other)
            .map(|_| ()),
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
        if let Ok(opened) = open(&bytes, examples::WORKER_ID) {
            // Random bytes essentially never carry a valid tag.
            prop_assert!(opened.verify(&secret).is_err());
        }
    }

    #[test]
    fn valid_version_prefix_with_random_body_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        v2 in any::<bool>(),
    ) {
        let mut bytes = vec![if v2 { FORMAT_V2 } else { FORMAT_VERSION }];
        bytes.extend_from_slice(&body);
        let _ = open(&bytes, examples::WORKER_ID);
    }

    #[test]
    fn sealed_format_2_round_trips_on_its_own_topic_only(seq in 1u64.., cpu in any::<u16>()) {
        let mut m = examples::metrics();
        m.cpu_total = cpu;
        let mut env = examples::envelope(seq, Body::Metrics(m));
        env.version = FORMAT_V2;
        let sealed = seal(&examples::secret(), &env).unwrap();
        let back = open(&sealed, examples::WORKER_ID).unwrap().verify(&examples::secret()).unwrap();
        prop_assert_eq!(back, env);
        // The same bytes on another worker's topic: the tag covers the id.
        prop_assert_eq!(
            open(&sealed, "w-ffffffffffff").unwrap().verify(&examples::secret()).map(|_| ()),
            Err(DecodeError::BadTag)
        );
    }

    #[test]
    fn sealed_metrics_round_trip(seq in 1u64.., cpu in any::<u16>(), up in any::<u64>()) {
        let mut m = examples::metrics();
        m.cpu_total = cpu;
        m.uptime_s = up;
        let env = examples::envelope(seq, Body::Metrics(m));
        let sealed = seal(&examples::secret(), &env).unwrap();
        let back = open(&sealed, examples::WORKER_ID).unwrap().verify(&examples::secret()).unwrap();
        prop_assert_eq!(back, env);
    }
}

#[test]
fn manifest_refuses_bad_bytes_and_bad_content() {
    let m = examples::manifest();
    let bytes = m.encode().unwrap();
    assert!(matches!(
        Manifest::decode(&vec![1u8; manifest::MAX_MANIFEST_LEN + 1]),
        Err(ManifestError::Oversized(_))
    ));
    assert_eq!(
        Manifest::decode(&[]),
        Err(ManifestError::UnknownFormat(None))
    );
    let mut wrong_format = bytes.clone();
    wrong_format[0] = 9;
    assert_eq!(
        Manifest::decode(&wrong_format),
        Err(ManifestError::UnknownFormat(Some(9)))
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        Manifest::decode(&trailing),
        Err(ManifestError::TrailingBytes(1))
    );
    assert!(matches!(
        Manifest::decode(&bytes[..bytes.len() - 3]),
        Err(ManifestError::Malformed(_))
    ));
    let mut bad = m.clone();
    bad.name = "Not/A/Name".into();
    assert!(matches!(bad.encode(), Err(ManifestError::Invalid(_))));
    let mut bad = m.clone();
    bad.config.insert("bad key".into(), "v".into());
    assert!(matches!(bad.encode(), Err(ManifestError::Invalid(_))));
    // Digest, name and version must all match the command.
    let good_ref = ManifestRef {
        name: frame::bounded("sensor-relay"),
        version: 4,
        digest: manifest::digest(&bytes),
    };
    assert_eq!(Manifest::decode_verified(&bytes, &good_ref).unwrap(), m);
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        Manifest::decode_verified(&tampered, &good_ref),
        Err(ManifestError::DigestMismatch)
    );
    let other_version = ManifestRef {
        version: 5,
        ..good_ref
    };
    assert!(matches!(
        Manifest::decode_verified(&bytes, &other_version),
        Err(ManifestError::Invalid(_))
    ));
}

#[test]
fn artifact_is_picked_by_arch() {
    let m = examples::manifest();
    assert!(m.artifact_for("aarch64").is_some());
    assert!(m.artifact_for("x86_64").is_none());
}

#[test]
fn arm_artifacts_are_picked_by_what_the_cpu_runs() {
    use protocol::manifest::{ArtifactRef, ProcessRuntime, Program, Runtime};
    let with = |archs: &[&str]| {
        let mut m = examples::manifest();
        let list = archs
            .iter()
            .zip(1u8..)
            .map(|(arch, n)| ArtifactRef {
                arch: (*arch).into(),
                sha256: [n; 32],
                size: 4096,
            })
            .collect();
        if let Runtime::Process(ProcessRuntime { program, .. }) = &mut m.runtime {
            *program = Program::Artifacts(list);
        }
        m
    };
    let picked = |m: &protocol::Manifest, arch: &str| m.artifact_for(arch).map(|a| a.arch.clone());
    let both = with(&["armv6", "armv7"]);
    assert_eq!(picked(&both, "armv6l").as_deref(), Some("armv6"));
    assert_eq!(picked(&both, "armv7l").as_deref(), Some("armv7"));
    // A Pi 2/3/4 runs the Pi Zero's build; a Pi Zero never gets armv7 code.
    let v6 = with(&["armv6", "aarch64"]);
    assert_eq!(picked(&v6, "armv7l").as_deref(), Some("armv6"));
    let v7 = with(&["armv7", "aarch64"]);
    assert_eq!(picked(&v7, "armv6l"), None);
    assert_eq!(picked(&v7, "aarch64").as_deref(), Some("aarch64"));
}

#[test]
fn http_auth_verifies_only_the_same_worker_method_and_path() {
    let s = examples::secret();
    let h = manifest::http_auth(&s, "w-1", "GET", "/a");
    let lookup = |id: &str| (id == "w-1").then(examples::secret);
    assert_eq!(
        manifest::verify_http_auth(&h, "GET", "/a", lookup),
        Some("w-1")
    );
    assert_eq!(manifest::verify_http_auth(&h, "GET", "/b", lookup), None);
    assert_eq!(manifest::verify_http_auth(&h, "PUT", "/a", lookup), None);
    let other = manifest::http_auth(&s, "w-2", "GET", "/a");
    assert_eq!(
        manifest::verify_http_auth(&other, "GET", "/a", lookup),
        None
    );
    assert_eq!(
        manifest::verify_http_auth("Bearer x", "GET", "/a", lookup),
        None
    );
    assert_eq!(
        manifest::verify_http_auth(&format!("{h} extra"), "GET", "/a", lookup),
        None
    );
    assert_eq!(
        manifest::parse_digest(&hex_string(&[0xab; 32])),
        Some([0xab; 32])
    );
    assert_eq!(manifest::parse_digest("zz"), None);
}

proptest! {
    #[test]
    fn arbitrary_manifest_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let mut with_format = vec![manifest::MANIFEST_FORMAT];
        with_format.extend_from_slice(&bytes);
        let _ = Manifest::decode(&bytes);
        let _ = Manifest::decode(&with_format);
    }
}

#[test]
fn format_2_needs_a_valid_topic_worker_id_and_captured_frames_say_so() {
    let mut env = examples::envelope(1, Body::Metrics(examples::metrics()));
    env.version = FORMAT_V2;
    let sealed = seal(&examples::secret(), &env).unwrap();
    let long = "w".repeat(33);
    assert_eq!(
        open(&sealed, &long).map(|_| ()),
        Err(DecodeError::BadTopicWorker(long.clone()))
    );
    assert_eq!(
        open_captured(&sealed, None).map(|_| ()),
        Err(DecodeError::NeedsTopicWorker)
    );
    let back = open_captured(&sealed, Some(examples::WORKER_ID))
        .unwrap()
        .verify(&examples::secret())
        .unwrap();
    assert_eq!(back, env);
    // A format-1 frame opens without the topic (its id is in the frame).
    let v1 = seal(
        &examples::secret(),
        &examples::envelope(1, Body::Birth(examples::birth())),
    )
    .unwrap();
    assert_eq!(
        open_captured(&v1, None).unwrap().worker_id(),
        examples::WORKER_ID
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Arbitrary bytes (most with the right format byte) never panic and
    /// never open; what does open is exactly what was sealed.
    #[test]
    fn arbitrary_sealed_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        context in proptest::collection::vec(any::<u8>(), 0..64),
        plaintext in proptest::collection::vec(any::<u8>(), 0..200),
        nonce in any::<[u8; 12]>(),
    ) {
        let secret = examples::secret();
        let mut formatted = vec![sealed::SEALED_FORMAT];
        formatted.extend_from_slice(&bytes);
        for input in [&bytes, &formatted] {
            match sealed::open(&secret, &context, input) {
                Err(sealed::SealError::TooShort(n)) => {
                    prop_assert_eq!(n, input.len());
                    prop_assert!(n < sealed::OVERHEAD);
                }
                Err(sealed::SealError::UnknownFormat(b)) => prop_assert_ne!(b, sealed::SEALED_FORMAT),
                Err(e) => prop_assert_eq!(e, sealed::SealError::BadTag),
                Ok(_) => prop_assert!(false, "random bytes opened"),
            }
        }
        let sealed_bytes = sealed::seal(&secret, &context, &plaintext, nonce).unwrap();
        prop_assert_eq!(sealed_bytes.len(), plaintext.len() + sealed::OVERHEAD);
        prop_assert_eq!(sealed::open(&secret, &context, &sealed_bytes).unwrap(), plaintext);
    }
}

#[test]
fn verify_any_names_the_secret_a_frame_was_sealed_with() {
    let (old, new) = (Secret::from_bytes([1; 32]), Secret::from_bytes([2; 32]));
    let env = protocol::examples::envelope(7, Body::Metrics(protocol::examples::metrics()));
    let bytes = protocol::seal(&new, &env).unwrap();
    let opened = || protocol::open(&bytes, protocol::examples::WORKER_ID).unwrap();
    let (back, which) = opened().verify_any(&[&old, &new]).unwrap();
    assert_eq!((back, which), (env, 1));
    assert_eq!(
        opened().verify_any(&[&old]).unwrap_err(),
        protocol::DecodeError::BadTag
    );
    assert_eq!(
        opened().verify_any(&[]).unwrap_err(),
        protocol::DecodeError::BadTag
    );
}
