//! The HTTP API under an OpenAPI-driven fuzzer (issue 17 §4): schemathesis
//! reads the conductor's own `GET /api/v1/openapi.json` and throws generated
//! requests, valid and invalid, at every operation of a real conductor with
//! a real worker enrolled and some of everything in its lists (a service,
//! an alert rule and receiver, API tokens of each role), as an admin API
//! token. No answer may be a 5xx, break the response schema the document
//! declares for it (body, content type, headers) or carry a status code the
//! document does not list; afterwards the conductor still runs and answers
//! `/api/v1/health`. Bounded: a few examples per operation, a fixed seed
//! (`AEREKOS_SCHEMATHESIS_SEED` picks another), about half a minute here.
//!
//! schemathesis (4.x) comes from PyPI (`python3 -m pip install
//! schemathesis==4.32.5`, tests/setup.sh); without it the test prints
//! `skipped: …` and passes, unless `AEREKOS_REQUIRE_SCHEMATHESIS=1` (CI),
//! where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::services::conductor_and_worker;
use e2e::*;
use serde_json::json;

/// The checks every response must pass.
const CHECKS: &str = "not_a_server_error,status_code_conformance,\
                      response_schema_conformance,content_type_conformance,\
                      response_headers_conformance";

/// Test cases per operation and phase: enough to reach every operation's
/// validation with good and bad input, few enough for CI
/// (`AEREKOS_SCHEMATHESIS_EXAMPLES` asks for more, for a longer local run).
const MAX_EXAMPLES: u64 = 15;

/// How long schemathesis may take (with `MAX_EXAMPLES`; proportionally more
/// with more) before the test gives up on it. It takes 15–30 s here.
const DEADLINE: Duration = Duration::from_secs(240);

/// Operations (by `operationId`) the fuzzer must not call, and why.
const EXCLUDED: &[(&str, &str)] = &[
    // Ends the session or token it is called with: the fuzzer's own token.
    (
        "logout",
        "revokes the presented bearer token, the run's own",
    ),
    // Changes the admin password and ends every session; its attempts
    // also count against the login rate limit.
    ("changePassword", "rotates the admin password"),
    // The fuzzer reads token ids from `GET /tokens` (stateful phase) and
    // could revoke its own.
    ("deleteToken", "could revoke the run's own token"),
    // Remote exec and the interactive shell run commands on the enrolled
    // worker, i.e. on this machine, and hold streams open; their agent-side
    // halves (worker-authenticated uploads and the input long-poll) belong
    // to those sessions.
    ("exec", "runs generated commands on the worker host"),
    ("shell", "opens an interactive shell on the worker host"),
    ("shellInput", "types into a shell session"),
    ("agentExecUpload", "the worker's half of an exec stream"),
    ("agentShellUpload", "the worker's half of a shell stream"),
    ("agentShellInput", "the worker's long-poll for shell input"),
];

/// `schemathesis` on the PATH; `None` (after saying so) when it is missing,
/// unless `AEREKOS_REQUIRE_SCHEMATHESIS` is set.
fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("schemathesis"))
        .find(|p| p.is_file());
    if found.is_none() {
        let required =
            std::env::var("AEREKOS_REQUIRE_SCHEMATHESIS").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "schemathesis is not installed and AEREKOS_REQUIRE_SCHEMATHESIS is set \
             (python3 -m pip install schemathesis; tests/setup.sh)"
        );
        eprintln!(
            "skipped: schemathesis is not installed (python3 -m pip install schemathesis; \
             AEREKOS_REQUIRE_SCHEMATHESIS=1 makes this a failure)"
        );
    }
    found
}

#[test]
fn schemathesis_finds_no_server_error_and_no_response_off_the_schema() {
    let Some(st) = schemathesis() else { return };
    let out = Command::new(&st).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && version.contains("version 4."),
        "this test drives the schemathesis 4 CLI; {st:?} --version says: {version}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let (mut c, _w, _id) = conductor_and_worker(dir.path(), "fuzzed-w");
    // Some of everything, so list answers have items to check against the
    // schema and inferred links have ids to follow.
    let (status, v) = c.post(
        "/api/v1/services",
        &json!({"name": "sleeper", "command": "sleep", "args": ["3600"]}),
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "down", "kind": "worker_offline", "for": "1m"}),
    );
    assert_eq!(status, 201, "{v}");
    let hook = format!("http://127.0.0.1:{}/hook", free_port());
    let (status, v) = c.post(
        "/api/v1/alert-receivers",
        &json!({"name": "ops", "url": hook}),
    );
    assert_eq!(status, 201, "{v}");
    for role in ["operator", "viewer"] {
        let (status, v) = c.post("/api/v1/tokens", &json!({"name": role, "role": role}));
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = c.post(
        "/api/v1/tokens",
        &json!({"name": "schemathesis", "role": "admin"}),
    );
    assert_eq!(status, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();

    let seed = std::env::var("AEREKOS_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let examples: u64 = std::env::var("AEREKOS_SCHEMATHESIS_EXAMPLES")
        .ok()
        .map_or(MAX_EXAMPLES, |n| {
            n.parse().expect("AEREKOS_SCHEMATHESIS_EXAMPLES: a number")
        });
    let deadline = DEADLINE * u32::try_from(examples.div_ceil(MAX_EXAMPLES).max(1)).unwrap();
    let log = dir.path().join("schemathesis.log");
    let mut cmd = Command::new(&st);
    // Its working directory is the temp dir: no schemathesis.toml of the
    // caller's is read, nothing is written into the tree.
    cmd.current_dir(dir.path())
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", c.url()))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", &examples.to_string(), "--seed", &seed])
        .args(["--request-timeout", "20", "--generation-database", "none"])
        .args(["--no-color", "--output-truncate", "false"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.path().join("schemathesis.err")).unwrap());
    for (op, _why) in EXCLUDED {
        cmd.args(["--exclude-operation-id", op]);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{st:?}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let report = format!(
        "{}{}",
        fs::read_to_string(&log).unwrap_or_default(),
        fs::read_to_string(dir.path().join("schemathesis.err")).unwrap_or_default()
    );
    // Its summary (operations, phases, warnings such as operations that
    // only answered 404 for lack of ids) goes to the test's output.
    let summary = report.find("= SUMMARY =").map_or("", |i| {
        &report[report[..i].rfind('\n').map_or(0, |n| n + 1)..]
    });
    eprintln!("schemathesis (seed {seed}, {examples} examples) took {took:.1?}\n{summary}");
    let status = status
        .unwrap_or_else(|| panic!("schemathesis did not finish within {deadline:?}:\n{report}"));
    assert!(
        status.success(),
        "schemathesis failed ({status}; rerun with AEREKOS_SCHEMATHESIS_SEED={seed}):\n{report}"
    );
    assert!(
        report.contains("Tested:") && !report.contains("Tested: 0"),
        "schemathesis tested nothing:\n{report}"
    );

    // The conductor survived it, and still serves its health and the run's token.
    assert!(
        c.proc.alive(),
        "the conductor died under schemathesis:\n{}",
        c.proc.tail(40)
    );
    let (status, health) = c.get("/api/v1/health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    let (status, v) = read(
        http()
            .get(format!("{}/api/v1/session", c.url()))
            .header("Authorization", format!("Bearer {token}"))
            .call(),
    );
    assert_eq!(status, 200, "the run's token no longer works: {v}");
}
