//! `seed-corpus <dir>`: writes `<dir>/<target>/<name>` seed files for every
//! fuzz target in `fuzz/fuzz_targets`, built from the same examples the
//! golden tests pin, so the fuzzers start from frames that authenticate.

use std::fs;
use std::path::Path;

use protocol::frame::{Action, Command, Event, EventKind, Reply, ReplyStatus};
use protocol::manifest::{http_auth, Runtime};
use protocol::topic::{topic, TopicKind};
use protocol::{bounded, examples, hex_string, seal, Body};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    fs::create_dir_all(&d)?;
    fs::write(d.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: seed-corpus <dir>")?;
    let dir = Path::new(&dir);
    let secret = examples::secret();

    let bodies = [
        ("birth", Body::Birth(examples::birth())),
        ("metrics", Body::Metrics(examples::metrics())),
        (
            "event",
            Body::Event(Event {
                kind: EventKind::ServiceEvent,
                detail: bounded("svc: hello"),
            }),
        ),
        (
            "reply",
            Body::Reply(Reply {
                cmd_id: 7,
                status: ReplyStatus::Ok,
                detail: bounded("pong"),
            }),
        ),
        (
            "command-deploy",
            Body::Command(Command {
                id: 9,
                action: Action::Deploy(examples::service_spec()),
            }),
        ),
        (
            "command-manifest",
            Body::Command(Command {
                id: 10,
                action: Action::DeployManifest(examples::manifest_ref()),
            }),
        ),
        (
            "command-install",
            Body::Command(Command {
                id: 11,
                action: Action::InstallManifest(examples::manifest_ref()),
            }),
        ),
        (
            "command-stored",
            Body::Command(Command {
                id: 0,
                action: Action::Stored(300),
            }),
        ),
        (
            "service-status",
            Body::ServiceStatus(examples::service_status()),
        ),
        ("log-chunk", Body::LogChunk(examples::log_chunk())),
        (
            "service-metrics",
            Body::ServiceMetrics(examples::service_metrics()),
        ),
        (
            "largest-metrics",
            Body::Metrics(examples::largest_metrics()),
        ),
        ("largest-birth", Body::Birth(examples::largest_birth())),
        ("board", Body::Board(examples::board())),
        ("largest-board", Body::Board(examples::largest_board())),
    ];
    for (i, (name, body)) in bodies.into_iter().enumerate() {
        let env = if name.starts_with("largest") {
            examples::largest_envelope(body)
        } else {
            examples::envelope(6 + i as u64, body)
        };
        let frame = seal(&secret, &env)?;
        write(dir, "frame", name, &frame)?;
        if !name.starts_with("largest") {
            // The same frame in format 2 (no worker id on the wire).
            let mut compact = env.clone();
            compact.version = protocol::FORMAT_V2;
            write(dir, "frame", &format!("{name}-v2"), &seal(&secret, &compact)?)?;
        }
        // The local API parser is fed anything; frames make odd bodies.
        if name == "event" {
            write(dir, "local_api_request", "frame", &frame)?;
        }
    }

    let manifest = examples::manifest();
    write(dir, "manifest", "process-artifacts", &manifest.encode()?)?;
    let mut container = manifest.clone();
    container.runtime = Runtime::Container(protocol::manifest::ContainerRuntime {
        image: "registry.example/app:1".into(),
        command: vec!["serve".into()],
        env: [("MODE".to_string(), "prod".to_string())].into(),
        ports: Vec::new(),
        volumes: Vec::new(),
    });
    container.health = None;
    write(dir, "manifest", "container", &container.encode()?)?;

    for kind in TopicKind::ALL {
        let t = topic("w-0123456789ab", kind);
        write(dir, "topic", &kind.leaf().replace('/', "-"), t.as_bytes())?;
    }
    write(dir, "topic", "wildcard", b"aerekos/v1/+/metrics")?;

    write(dir, "text", "secret", secret.to_hex().as_bytes())?;
    write(dir, "text", "digest", hex_string(&[0xab; 32]).as_bytes())?;
    let path = "/api/v1/agent/manifests/app/3";
    let auth = http_auth(&secret, "w-0123456789ab", "GET", path);
    write(
        dir,
        "text",
        "http-auth",
        format!("{auth}\nGET\n{path}").as_bytes(),
    )?;

    let requests: [(&str, &[u8]); 6] = [
        ("get-secret", b"GET /v1/secrets/db%2Dpassword HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer 0123abcd\r\n\r\n"),
        ("post-event", b"POST /v1/events HTTP/1.1\r\nContent-Length: 16\r\nAuthorization: bearer t\r\n\r\n{\"text\": \"hi!\"}"),
        ("post-metrics", b"POST /v1/metrics HTTP/1.0\nContent-Length: 30\nExpect: 100-continue\n\n{\"samples\": {\"queue_len\": 3}}"),
        ("chunked", b"POST /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("event-body", b"{\"text\": \"disk almost full \\u00e9\"}"),
        ("metrics-body", b"{\"samples\": {\"a\": -9223372036854775808, \"b_2\": 1}}"),
    ];
    for (name, bytes) in requests {
        write(dir, "local_api_request", name, bytes)?;
    }
    write(dir, "local_api_request", "secret-key", b"a%20b%2Fc%C3%A9")?;

    let fp = protocol::Fingerprint::of_der(b"a CA certificate");
    let token = format!("aer_{}", hex_string(&[0x5a; 32]));
    let pinned = protocol::RegistrationToken {
        secret: token.clone(),
        ca_fingerprint: Some(fp),
    };
    let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
    let samples: [(&str, String); 8] = [
        ("token-old", token),
        ("token-pinned", pinned.to_text()),
        ("fingerprint-openssl", format!("sha256 Fingerprint={}", colons.join(":"))),
        ("https-url", "https://conductor.lan:3000/".into()),
        ("https-v6", "https://[fe80::1]:3000".into()),
        ("mqtts-url", "mqtts://192.168.1.10:8883".into()),
        ("pem", "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n".into()),
        ("pem-garbage", "-----BEGIN CERTIFICATE-----\n!!\n".into()),
    ];
    for (name, text) in samples {
        write(dir, "enrolment", name, text.as_bytes())?;
    }
    Ok(())
}
