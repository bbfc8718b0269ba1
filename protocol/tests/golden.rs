//! Golden bytes: the wire format is a contract. If one of these fails, a
//! change broke compatibility with deployed workers — don't update the
//! bytes, add a new variant or a new FORMAT_VERSION instead.
//! The layouts are explained byte by byte in `protocol/README.md`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use protocol::examples;
use protocol::*;

fn hex(bytes: &[u8]) -> String {
    hex_string(bytes)
}

fn sealed(seq: u64, body: Body) -> Vec<u8> {
    seal(&examples::secret(), &examples::envelope(seq, body)).unwrap()
}

#[track_caller]
fn assert_golden(body: Body, expected_hex: &str) {
    let bytes = sealed(1, body.clone());
    assert_eq!(
        hex(&bytes),
        expected_hex,
        "wire bytes changed for {:?}",
        body.kind()
    );
    // And the pinned bytes still decode to the same value.
    let back = open(&bytes, examples::WORKER_ID)
        .unwrap()
        .verify(&examples::secret())
        .unwrap();
    assert_eq!(back.body, body);
}

#[test]
fn golden_metrics() {
    assert_golden(Body::Metrics(examples::metrics()), GOLDEN_METRICS);
}

#[test]
fn golden_birth() {
    assert_golden(Body::Birth(examples::birth()), GOLDEN_BIRTH);
}

#[test]
fn golden_event() {
    assert_golden(
        Body::Event(Event {
            kind: EventKind::QueueOverflow,
            detail: frame::bounded("dropped 3"),
        }),
        GOLDEN_EVENT,
    );
}

#[test]
fn golden_command_every_action() {
    for (action, expected) in [
        (Action::Ping, GOLDEN_CMD_PING),
        (Action::SetInterval(1000), GOLDEN_CMD_SET_INTERVAL),
        (Action::Rebirth, GOLDEN_CMD_REBIRTH),
    ] {
        assert_golden(Body::Command(Command { id: 5, action }), expected);
    }
}

#[test]
fn golden_reply() {
    assert_golden(
        Body::Reply(Reply {
            cmd_id: 5,
            status: ReplyStatus::Ok,
            detail: frame::bounded("pong"),
        }),
        GOLDEN_REPLY,
    );
}

#[test]
fn golden_deploy_and_service_commands() {
    for (action, expected) in [
        (Action::Deploy(examples::service_spec()), GOLDEN_CMD_DEPLOY),
        (
            Action::Start(frame::bounded("sensor-relay")),
            GOLDEN_CMD_START,
        ),
        (
            Action::Remove(frame::bounded("sensor-relay")),
            GOLDEN_CMD_REMOVE,
        ),
    ] {
        assert_golden(Body::Command(Command { id: 5, action }), expected);
    }
}

#[test]
fn golden_service_status() {
    assert_golden(
        Body::ServiceStatus(examples::service_status()),
        GOLDEN_SERVICE_STATUS,
    );
}

#[test]
fn golden_manifest_commands_logs_and_service_metrics() {
    for (body, expected) in [
        (
            Body::Command(Command {
                id: 5,
                action: Action::DeployManifest(examples::manifest_ref()),
            }),
            GOLDEN_CMD_DEPLOY_MANIFEST,
        ),
        (
            Body::Command(Command {
                id: 5,
                action: Action::Logs(LogRequest {
                    name: frame::bounded("sensor-relay"),
                    tail_bytes: 4096,
                    follow_s: 30,
                }),
            }),
            GOLDEN_CMD_LOGS,
        ),
        (Body::LogChunk(examples::log_chunk()), GOLDEN_LOG_CHUNK),
        (
            Body::ServiceMetrics(examples::service_metrics()),
            GOLDEN_SERVICE_METRICS,
        ),
    ] {
        assert_golden(body, expected);
    }
}

#[test]
fn golden_board() {
    assert_golden(Body::Board(examples::board()), GOLDEN_BOARD);
}

#[test]
fn golden_install_manifest_command() {
    // The DeployManifest layout under action index 10 (`0a`).
    assert_golden(
        Body::Command(Command {
            id: 5,
            action: Action::InstallManifest(examples::manifest_ref()),
        }),
        GOLDEN_CMD_INSTALL_MANIFEST,
    );
}

#[test]
fn golden_stored_command() {
    // The conductor's acknowledgement: id 0 (no reply), action index 11
    // (`0b`), then the acknowledged worker seq as a varint (300 = `ac 02`).
    assert_golden(
        Body::Command(Command {
            id: 0,
            action: Action::Stored(300),
        }),
        GOLDEN_CMD_STORED,
    );
}

#[test]
fn golden_stored_command_of_a_batch_reading_conductor() {
    // The same acknowledgement with `STORED_ACCEPTS_BATCH` in the id (`01`):
    // the worker may send `MetricsBatch` frames.
    assert_golden(
        Body::Command(Command {
            id: STORED_ACCEPTS_BATCH,
            action: Action::Stored(300),
        }),
        GOLDEN_CMD_STORED_BATCH,
    );
}

#[test]
fn golden_metrics_batch() {
    let batch = examples::metrics_batch();
    assert_golden(Body::MetricsBatch(batch.clone()), GOLDEN_METRICS_BATCH);
    // Three samples (one whole, two deltas of 22 and 8 bytes with their
    // tags) in 144 bytes of format 2, against 104 for a lone sample.
    let whole = sealed_v2(1, Body::Metrics(examples::metrics())).len();
    let v2 = sealed_v2(1, Body::MetricsBatch(batch)).len();
    assert_eq!((whole, v2), (104, 144));
}

#[test]
fn golden_live_command() {
    // Action index 16 (`10`): interval_ms 1000 (`e8 07`), for_s 300 (`ac 02`).
    assert_golden(
        Body::Command(Command {
            id: 6,
            action: Action::Live(LiveRequest {
                interval_ms: 1000,
                for_s: 300,
            }),
        }),
        GOLDEN_CMD_LIVE,
    );
}

#[test]
fn golden_rotate_secret_command() {
    // Action index 12 (`0c`), then the sealed secret as a byte list: its
    // length (61 = `3d`) and the `sealed` layout (`01`, nonce, ciphertext,
    // tag) of the new secret under the current one.
    let next = protocol::Secret::from_bytes([0x42; 32]);
    let sealed =
        protocol::sealed::seal_rotation(&examples::secret(), examples::WORKER_ID, &next, [7; 12])
            .unwrap();
    assert_eq!(
        protocol::sealed::open_rotation(&examples::secret(), examples::WORKER_ID, &sealed).unwrap(),
        next
    );
    assert_golden(
        Body::Command(Command {
            id: 9,
            action: Action::RotateSecret(sealed),
        }),
        GOLDEN_CMD_ROTATE_SECRET,
    );
}

/// The `Exec` command of the README's example: `uname -a`, 60 s, 1 MiB.
fn exec_request() -> ExecRequest {
    ExecRequest {
        session: [0x11; 16],
        argv: [frame::bounded("uname"), frame::bounded("-a")]
            .into_iter()
            .collect(),
        timeout_s: 60,
        max_output: 1 << 20,
    }
}

#[test]
fn golden_exec_command() {
    // Action index 13 (`0d`), then the 16 session bytes (no length prefix),
    // argv as a list of strings, timeout_s and max_output as varints.
    assert_golden(
        Body::Command(Command {
            id: 5,
            action: Action::Exec(exec_request()),
        }),
        GOLDEN_CMD_EXEC,
    );
}

/// The `Shell` command of the README's example: the default shell, 80×24.
fn shell_request() -> protocol::ShellRequest {
    protocol::ShellRequest {
        session: [0x11; 16],
        argv: heapless::Vec::new(),
        cols: 80,
        rows: 24,
    }
}

#[test]
fn golden_shell_command() {
    // Action index 15 (`0f`), the 16 session bytes, argv (empty: `00`),
    // cols and rows as varints.
    assert_golden(
        Body::Command(Command {
            id: 5,
            action: Action::Shell(shell_request()),
        }),
        GOLDEN_CMD_SHELL,
    );
}

/// The `UpdateAgent` command of the README's example: 0.2.0 for aarch64.
fn agent_update() -> protocol::release::AgentUpdate {
    protocol::release::AgentUpdate {
        version: frame::bounded("0.2.0"),
        arch: frame::bounded("aarch64"),
        sha256: [0x22; 32],
        size: 1_524_968,
        signature: [0x33; 64].into_iter().collect(),
        allow_downgrade: false,
        trial_s: 90,
    }
}

#[test]
fn golden_update_agent_command() {
    // Action index 14 (`0e`), version and arch as strings, the 32 digest
    // bytes (no length prefix), size as a varint, the signature as a byte
    // list (`40` = 64, then the bytes), allow_downgrade, trial_s.
    assert_golden(
        Body::Command(Command {
            id: 5,
            action: Action::UpdateAgent(agent_update()),
        }),
        GOLDEN_CMD_UPDATE_AGENT,
    );
}

#[test]
fn the_release_signed_message_is_pinned() {
    let m = protocol::release::signed_message("0.2.0", "aarch64", &[0x22; 32]).unwrap();
    assert_eq!(hex(&m), GOLDEN_RELEASE_MESSAGE);
}

#[test]
fn golden_manifest() {
    let m = examples::manifest();
    let bytes = m.encode().unwrap();
    assert_eq!(hex(&bytes), GOLDEN_MANIFEST, "manifest bytes changed");
    assert_eq!(Manifest::decode(&bytes).unwrap(), m);
}

#[test]
fn http_auth_is_pinned() {
    assert_eq!(
        manifest::http_auth(
            &examples::secret(),
            "w-0123456789ab",
            "GET",
            "/api/v1/agent/artifacts/ab"
        ),
        GOLDEN_HTTP_AUTH
    );
}

#[test]
fn enum_discriminants_are_append_only() {
    // postcard writes a variant's index as a varint: pin every index.
    let idx = |b: &Body| postcard::to_stdvec(b).unwrap()[0];
    assert_eq!(idx(&Body::Birth(examples::birth())), 0);
    assert_eq!(idx(&Body::Metrics(examples::metrics())), 1);
    let ev = |kind| {
        postcard::to_stdvec(&Event {
            kind,
            detail: frame::bounded(""),
        })
        .unwrap()[0]
    };
    assert_eq!(ev(EventKind::AgentStarted), 0);
    assert_eq!(ev(EventKind::AgentStopping), 1);
    assert_eq!(ev(EventKind::QueueOverflow), 2);
    assert_eq!(ev(EventKind::CommandRejected), 3);
    let st = |status| {
        postcard::to_stdvec(&Reply {
            cmd_id: 0,
            status,
            detail: frame::bounded(""),
        })
        .unwrap()[1]
    };
    assert_eq!(st(ReplyStatus::Ok), 0);
    assert_eq!(st(ReplyStatus::Error), 1);
    assert_eq!(st(ReplyStatus::Unsupported), 2);
    let act = |a: Action| postcard::to_stdvec(&a).unwrap()[0];
    let name = || frame::bounded("s");
    assert_eq!(act(Action::Ping), 0);
    assert_eq!(act(Action::SetInterval(1)), 1);
    assert_eq!(act(Action::Rebirth), 2);
    assert_eq!(act(Action::Deploy(examples::service_spec())), 3);
    assert_eq!(act(Action::Start(name())), 4);
    assert_eq!(act(Action::Stop(name())), 5);
    assert_eq!(act(Action::Restart(name())), 6);
    assert_eq!(act(Action::Remove(name())), 7);
    let body = |b: &Body| postcard::to_stdvec(b).unwrap()[0];
    assert_eq!(body(&Body::ServiceStatus(examples::service_status())), 5);
    assert_eq!(body(&Body::LogChunk(examples::log_chunk())), 6);
    assert_eq!(body(&Body::ServiceMetrics(examples::service_metrics())), 7);
    assert_eq!(body(&Body::Board(examples::board())), 8);
    assert_eq!(act(Action::DeployManifest(examples::manifest_ref())), 8);
    assert_eq!(
        act(Action::Logs(LogRequest {
            name: name(),
            tail_bytes: 0,
            follow_s: 0
        })),
        9
    );
    assert_eq!(act(Action::InstallManifest(examples::manifest_ref())), 10);
    assert_eq!(act(Action::Stored(1)), 11);
    assert_eq!(act(Action::RotateSecret(protocol::SealedSecret::new())), 12);
    assert_eq!(act(Action::Exec(exec_request())), 13);
    assert_eq!(act(Action::UpdateAgent(agent_update())), 14);
    assert_eq!(act(Action::Shell(shell_request())), 15);
    for (i, k) in [
        EventKind::ServiceChanged,
        EventKind::ArtifactRejected,
        EventKind::HealthFailed,
        EventKind::ServiceEvent,
        EventKind::AgentUpdated,
        EventKind::AgentUpdateFailed,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(ev(k) as usize, 4 + i);
    }
    let state = |st: ServiceState| postcard::to_stdvec(&st).unwrap()[0];
    let states = [
        ServiceState::Starting,
        ServiceState::Running,
        ServiceState::Backoff,
        ServiceState::Stopped,
        ServiceState::Failed,
        ServiceState::Removed,
        ServiceState::Healthy,
        ServiceState::Unhealthy,
    ];
    for (i, s) in states.into_iter().enumerate() {
        assert_eq!(state(s) as usize, i);
    }
    let policy = |p: RestartPolicy| postcard::to_stdvec(&p).unwrap()[0];
    assert_eq!(policy(RestartPolicy::Always), 0);
    assert_eq!(policy(RestartPolicy::OnFailure), 1);
    assert_eq!(policy(RestartPolicy::Never), 2);
}

#[test]
fn reenroll_proof_is_pinned() {
    assert_eq!(
        reenroll_proof(&examples::secret(), "w-0123456789ab"),
        GOLDEN_REENROLL_PROOF
    );
}

const GOLDEN_METRICS: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac3301e20904e807dc0b8407c00c2a231e80c6",
    "98830380fe98c60bc0faa4ea0e0080e0ff3101012f80b6abfd1580d4df816f010465746830f00bf0",
    "06010b6370752d746865726d616c88e20580a3058e0100ab3951e1ee6976575db9a49918375bbd"
);
const GOLDEN_BIRTH: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac33000970692d73686f702d311e4465626961",
    "6e20474e552f4c696e75782031322028626f6f6b776f726d2911362e362e33312b7270742d727069",
    "2d763807616172636836340a436f727465782d41373204c0faa4ea0e01012f80b6abfd1580d4df81",
    "6f1e5261737062657272792050692034204d6f64656c20422052657620312e3405302e312e302435",
    "663163306239652d386432612d346331652d396633622d3261376436653463386231300104736974",
    "650473686f70904efc70ba1e3690458c0c807cafa6c63348"
);
const GOLDEN_EVENT: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac3302020964726f707065642033dc741d41b0",
    "af4f5e62d46aced63a3b2d"
);
const GOLDEN_CMD_PING: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac33030500debcb655aa87c874a618ec1b6ec2",
    "f71a"
);
const GOLDEN_CMD_SET_INTERVAL: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac33030501e807f4918c59589cf718101a8983",
    "1efd6274"
);
const GOLDEN_CMD_REBIRTH: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac33030502d691c62e5ddaa421828917ec41c7",
    "571f"
);
const GOLDEN_REPLY: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac3304050004706f6e6752f14d8f0bd307695c",
    "d917d9b903dadb"
);
const GOLDEN_REENROLL_PROOF: &str =
    "cefe62b33fddc3293c6f3ebf5a709eee8c486717d56994c14974f7feb947bcf6";
const GOLDEN_CMD_DEPLOY: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac330305030c73656e736f722d72656c617903",
    "1b2f7573722f6c6f63616c2f62696e2f73656e736f722d72656c617902062d2d706f727404383038",
    "300108525553545f4c4f4704696e666f0001053ce807b7a5b09b83b3789b47a24793114930ba"
);
const GOLDEN_CMD_START: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac330305040c73656e736f722d72656c61796e",
    "060251fea4ba6d22ddd22bd5d488f7"
);
const GOLDEN_CMD_REMOVE: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac330305070c73656e736f722d72656c61791a",
    "aa08879e2f80cd7dee2eeb3f719f44"
);
const GOLDEN_SERVICE_STATUS: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac33050c73656e736f722d72656c6179030192",
    "210000005c670ab7a74363ac455174614dc1507a"
);
const GOLDEN_CMD_DEPLOY_MANIFEST: &str = "010e772d3031323334353637383961620180a8f094ac330305080c73656e736f722d72656c6179045a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5ab63443a69df16d289d6eae9c2bbc29d2";
const GOLDEN_CMD_ROTATE_SECRET: &str = "010e772d3031323334353637383961620180a8f094ac3303090c3d01070707070707070707070707754eab822ec22e19d66d1738bb6c0cb7d33f8c803e6701a1ad05f92e15a017b1051963686db3ea94961821cd0b73222247593906f0be0ffed78a1297fe4f6ab5";
const GOLDEN_CMD_STORED: &str =
    "010e772d3031323334353637383961620180a8f094ac3303000bac023b6a9c46247ea3f2efd45c525243fb73";
const GOLDEN_CMD_STORED_BATCH: &str =
    "010e772d3031323334353637383961620180a8f094ac3303010bac022c2430eb33c665e8b09f726fdcdef226";
const GOLDEN_METRICS_BATCH: &str = "010e772d3031323334353637383961620180a8f094ac3309904ee0a712fa01036e00e20904e807dc0b8407c00c2a231e80c698830380fe98c60bc0faa4ea0e0080e0ff3101012f80b6abfd1580d4df816f010465746830f00bf006010b6370752d746865726d616c88e20580a3058e0100011bd900c0029003c801d804804080c001a001ce071401210001cb03010276ec0a712dbb88845149bea84bbd9024";
const GOLDEN_CMD_LIVE: &str =
    "010e772d3031323334353637383961620180a8f094ac33030610e807ac0272de7e74630e0692795e78927cc4c8f6";
const GOLDEN_CMD_INSTALL_MANIFEST: &str = "010e772d3031323334353637383961620180a8f094ac3303050a0c73656e736f722d72656c6179045a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a0ab47cc0db84b54e5eaa1e359638e8f7";
const GOLDEN_CMD_EXEC: &str = "010e772d3031323334353637383961620180a8f094ac3303050d111111111111111111111111111111110205756e616d65022d613c808040b76f8c6e57cb48d825990896681aab23";
const GOLDEN_CMD_LOGS: &str = "010e772d3031323334353637383961620180a8f094ac330305090c73656e736f722d72656c617980201e49c4035deba47ec6bfbd339d65f260b1";
const GOLDEN_LOG_CHUNK: &str = "010e772d3031323334353637383961620180a8f094ac3306050c73656e736f722d72656c617900136c697374656e696e67206f6e203a383038300a01e7e8cf4272d1f4ad9f92da5392acb1df";
const GOLDEN_SERVICE_METRICS: &str = "010e772d3031323334353637383961620180a8f094ac33070c73656e736f722d72656c6179020872656164696e6773e0120b71756575655f646570746801894ad48e1c7d32144899246f926c9bdf";
const GOLDEN_BOARD: &str = "010e772d3031323334353637383961620180a8f094ac33080185801401c181c0041030303030303030306131623263336434010553433136470a307838613364326631310730332f32303231037dd6f2f1f6ae037d7bc1992b8637f449";
const GOLDEN_MANIFEST: &str = "010c73656e736f722d72656c6179040001010761617263683634abababababababababababababababababababababababababababababababab80804002062d2d706f727404383038300108525553545f4c4f4704696e666f0001053ce8070100903f082f6865616c74687ad00fe807038827018080802001f403000104736974650473686f7001076170695f6b657906733363723374";
const GOLDEN_HTTP_AUTH: &str = "Aerekos-Worker w-0123456789ab 9c3a2739b615db0fc5f3b89f6486c1fa";

/// Format 2: the same envelope without the worker id on the wire.
const GOLDEN_METRICS_V2: &str = "020180a8f094ac3301e20904e807dc0b8407c00c2a231e80c698830380fe98c60bc0faa4ea0e0080e0ff3101012f80b6abfd1580d4df816f010465746830f00bf006010b6370752d746865726d616c88e20580a3058e010078a4f421738461d5b5a1a0cfe6536d65";

fn sealed_v2(seq: u64, body: Body) -> Vec<u8> {
    let mut env = examples::envelope(seq, body);
    env.version = FORMAT_V2;
    seal(&examples::secret(), &env).unwrap()
}

#[test]
fn golden_format_2() {
    let v2 = sealed_v2(1, Body::Metrics(examples::metrics()));
    assert_eq!(hex(&v2), GOLDEN_METRICS_V2, "format-2 wire bytes changed");
    let v1_len = sealed(1, Body::Metrics(examples::metrics())).len();
    assert_eq!(
        (v1_len, v2.len()),
        (119, 104),
        "format 1 less the 15-byte id"
    );
    let id = examples::WORKER_ID.as_bytes();
    for body in [
        Body::Metrics(examples::metrics()),
        Body::Birth(examples::birth()),
        Body::Command(Command {
            id: 5,
            action: Action::Stored(41),
        }),
        Body::ServiceStatus(examples::service_status()),
    ] {
        let v1 = sealed(1, body.clone());
        let v2 = sealed_v2(1, body.clone());
        let (v1_signed, v2_signed) = (&v1[..v1.len() - TAG_LEN], &v2[..v2.len() - TAG_LEN]);
        // Layout: 02, then format 1's bytes after its version byte and id.
        assert_eq!(v2_signed[0], FORMAT_V2);
        assert_eq!(v1_signed[1] as usize, id.len());
        assert_eq!(&v1_signed[2..2 + id.len()], id);
        assert_eq!(&v2_signed[1..], &v1_signed[2 + id.len()..]);
        // Tag: HMAC-SHA256 over format 1's layout with version byte 02.
        let mut covered = v1_signed.to_vec();
        covered[0] = FORMAT_V2;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(
            examples::secret().as_bytes(),
        )
        .unwrap();
        hmac::Mac::update(&mut mac, &covered);
        let tag = hmac::Mac::finalize(mac).into_bytes();
        assert_eq!(&v2[v2.len() - TAG_LEN..], &tag[..TAG_LEN]);
        // It opens on its worker's topic to the same envelope, version 2.
        let back = open(&v2, examples::WORKER_ID)
            .unwrap()
            .verify(&examples::secret())
            .unwrap();
        assert_eq!((back.version, &back.body), (FORMAT_V2, &body));
        assert_eq!(back.worker_id.as_str(), examples::WORKER_ID);
    }
}

// ---- Sealed data (protocol::sealed): manifests sealed to their worker ----

/// `examples::secret()`, nonce `a0 a1 … ab`, context
/// `manifest:w-0123456789ab:sensor-relay:4`, plaintext `API_KEY=hunter2`
/// (`protocol/README.md`, Sealed manifests).
/// Also what Python's `cryptography` (OpenSSL) computes for the same inputs.
const GOLDEN_SEALED: &str =
    "01a0a1a2a3a4a5a6a7a8a9aaabd3086e46db0bbd8c60f54bea22dac110dd6df071e733e1d21ba44abd802bcf";
/// HMAC-SHA256(`examples::secret()`, "aerekos seal v1").
const GOLDEN_SEAL_KEY: &str = "e4ec88b4b36c03949719c92c917b084211ab7539b35a5c30b3f25f65ee96cd11";
const SEAL_NONCE: [u8; 12] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab,
];
const SEAL_PLAINTEXT: &[u8] = b"API_KEY=hunter2";

fn seal_context() -> String {
    sealed::manifest_context(examples::WORKER_ID, "sensor-relay", 4)
}

#[test]
fn golden_sealed() {
    let ctx = seal_context();
    assert_eq!(ctx, "manifest:w-0123456789ab:sensor-relay:4");
    let bytes = sealed::seal(
        &examples::secret(),
        ctx.as_bytes(),
        SEAL_PLAINTEXT,
        SEAL_NONCE,
    )
    .unwrap();
    assert_eq!(hex(&bytes), GOLDEN_SEALED, "sealed bytes changed");
    assert_eq!(bytes.len(), SEAL_PLAINTEXT.len() + sealed::OVERHEAD);
    assert_eq!(
        sealed::open(&examples::secret(), ctx.as_bytes(), &bytes).unwrap(),
        SEAL_PLAINTEXT
    );

    // The layout rebuilt from the primitives: key = HMAC-SHA256(secret,
    // "aerekos seal v1"), then 01 ‖ nonce ‖ ChaCha20-Poly1305(key, nonce,
    // aad = context, plaintext) with the tag at the end.
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(examples::secret().as_bytes())
            .unwrap();
    hmac::Mac::update(&mut mac, b"aerekos seal v1");
    let key: [u8; 32] = hmac::Mac::finalize(mac).into_bytes().into();
    assert_eq!(hex(&key), GOLDEN_SEAL_KEY);
    let aead = <chacha20poly1305::ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&key.into());
    let mut body = SEAL_PLAINTEXT.to_vec();
    let tag = chacha20poly1305::AeadInOut::encrypt_inout_detached(
        &aead,
        &SEAL_NONCE.into(),
        ctx.as_bytes(),
        body.as_mut_slice().into(),
    )
    .unwrap();
    let mut expected = vec![0x01];
    expected.extend_from_slice(&SEAL_NONCE);
    expected.extend_from_slice(&body);
    expected.extend_from_slice(&tag);
    assert_eq!(bytes, expected);
    assert_eq!(bytes[0], sealed::SEALED_FORMAT);
    assert_eq!(&bytes[1..13], &SEAL_NONCE);
}

/// RFC 8439 section 2.8.2, through the same AEAD and layout as `seal`.
#[test]
fn sealing_matches_rfc_8439_section_2_8_2() {
    let key: [u8; 32] = core::array::from_fn(|i| 0x80 + u8::try_from(i).unwrap());
    let nonce = [
        0x07, 0x00, 0x00, 0x00, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47,
    ];
    let aad = [
        0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
    ];
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one \
                      tip for the future, sunscreen would be it.";
    let ciphertext = "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
                      3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
                      92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
                      3ff4def08e4b7a9de576d26586cec64b6116";
    let tag = "1ae10b594f09e26a7e902ecbd0600691";
    let k = sealed::SealKey::from_bytes(key);
    let out = k.seal(&aad, plaintext, nonce).unwrap();
    assert_eq!(hex(&out), format!("01{}{ciphertext}{tag}", hex(&nonce)));
    assert_eq!(k.open(&aad, &out).unwrap(), plaintext);
}

#[test]
fn sealed_data_opens_only_unchanged_with_its_secret_and_context() {
    let secret = examples::secret();
    let ctx = seal_context();
    let bytes = sealed::seal(&secret, ctx.as_bytes(), SEAL_PLAINTEXT, SEAL_NONCE).unwrap();
    // Any bit of any byte changed: refused (the format byte as a format).
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut t = bytes.clone();
            t[i] ^= 1 << bit;
            let err = sealed::open(&secret, ctx.as_bytes(), &t).unwrap_err();
            let want = if i == 0 {
                sealed::SealError::UnknownFormat(t[0])
            } else {
                sealed::SealError::BadTag
            };
            assert_eq!(err, want, "byte {i} bit {bit}");
        }
    }
    // Another worker, service, version; another secret; cut or extended.
    for other in [
        sealed::manifest_context("w-0123456789ac", "sensor-relay", 4),
        sealed::manifest_context(examples::WORKER_ID, "sensor-relaz", 4),
        sealed::manifest_context(examples::WORKER_ID, "sensor-relay", 5),
        String::new(),
    ] {
        assert_eq!(
            sealed::open(&secret, other.as_bytes(), &bytes),
            Err(sealed::SealError::BadTag),
            "{other}"
        );
    }
    let mut wrong = *secret.as_bytes();
    wrong[31] ^= 1;
    assert_eq!(
        sealed::open(&Secret::from_bytes(wrong), ctx.as_bytes(), &bytes),
        Err(sealed::SealError::BadTag)
    );
    for n in 0..bytes.len() {
        let err = sealed::open(&secret, ctx.as_bytes(), &bytes[..n]).unwrap_err();
        if n < sealed::OVERHEAD {
            assert_eq!(err, sealed::SealError::TooShort(n), "{n} bytes");
        } else {
            assert_eq!(err, sealed::SealError::BadTag, "{n} bytes");
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(sealed::open(&secret, ctx.as_bytes(), &longer).is_err());
    // Fresh nonces: sealing the same bytes twice gives unrelated output.
    let again = sealed::seal(&secret, ctx.as_bytes(), SEAL_PLAINTEXT, [0xa1; 12]).unwrap();
    assert_ne!(again[13..], bytes[13..]);
}
const GOLDEN_CMD_SHELL: &str = "010e772d3031323334353637383961620180a8f094ac3303050f11111111111111111111111111111111005018cae852a9094b4db8fd71f3d88b4a2f2d";

const GOLDEN_CMD_UPDATE_AGENT: &str = concat!(
    "010e772d3031323334353637383961620180a8f094ac3303050e05302e322e300761617263683634",
    "2222222222222222222222222222222222222222222222222222222222222222e8895d4033333333",
    "33333333333333333333333333333333333333333333333333333333333333333333333333333333",
    "3333333333333333333333333333333333333333005a1f5dcc4a1f6f84f0ae038b9e9e6650bb",
);
const GOLDEN_RELEASE_MESSAGE: &str = concat!(
    "616572656b6f732d6167656e742d72656c656173652d76310005302e322e30076161726368363422",
    "22222222222222222222222222222222222222222222222222222222222222",
);
