//! `edge_worker::container` against the real local Docker engine (and, for
//! the version and failure paths, against fake engines on a unix socket).
//!
//! Nothing is pulled: each test builds its own tag of the `FROM scratch`
//! image `images/test-service/` around the static binary of
//! `edge-worker/examples/ctr_test_service.rs`, compiled once per run with
//! plain `rustc --target x86_64-unknown-linux-musl` (std only: seconds, no
//! dependency graph for the musl target). Worker ids are unique per test and
//! run, and drop guards remove every container and image tag a test made,
//! also when it fails.
//!
//! Where no engine answers (or the docker CLI / musl target is missing) the
//! engine tests print `skipped: …` and pass, unless `AEREKOS_REQUIRE_DOCKER=1`
//! (set by CI) makes that a failure.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_worker::container::{
    container_name, ContainerError, ContainerState, Engine, EnsureAction, LABEL_MANAGED,
    LABEL_SERVICE, LABEL_VERSION, LABEL_WORKER,
};
use protocol::manifest::{ContainerRuntime, Limits, Manifest, PortMap, Runtime, VolumeMount};
use protocol::RestartPolicy;
use serde_json::Value;
use test_support::free_port;

const TARGET: &str = "x86_64-unknown-linux-musl";

fn required() -> bool {
    std::env::var("AEREKOS_REQUIRE_DOCKER").is_ok_and(|v| v == "1")
}

/// Skips (prints and returns `None`) or, when Docker is required, fails.
fn skip<T>(why: String) -> Option<T> {
    assert!(!required(), "AEREKOS_REQUIRE_DOCKER=1 but {why}");
    println!("skipped: {why}");
    None
}

/// The local engine, or `None` (skipped).
fn engine() -> Option<Engine> {
    match Engine::connect(None) {
        Ok(e) => Some(e),
        Err(ContainerError::EngineUnavailable { looked, reason }) => {
            skip(format!("no Docker engine at {looked}: {reason}"))
        }
        Err(e) => skip(format!("no usable Docker engine: {e}")),
    }
}

/// Runs the docker CLI; stdout on success.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A short id unique to this test and run, usable as a worker id.
fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ct{:x}{:x}-{tag}", std::process::id(), nanos & 0xfffff)
}

/// The static test binary, built once per run (atomically replaced, so
/// concurrent runs do not see half a file).
fn test_binary() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ctr_test_service.rs");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ctr-test-service");
        let fresh = |p: &Path| -> Option<bool> {
            Some(
                std::fs::metadata(p).ok()?.modified().ok()?
                    >= std::fs::metadata(&src).ok()?.modified().ok()?,
            )
        };
        if fresh(&out) == Some(true) {
            return Ok(out);
        }
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let res = Command::new(rustc)
            .args(["--edition", "2021", "--target", TARGET])
            .args(["-C", "opt-level=1", "-C", "strip=symbols", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .map_err(|e| format!("rustc: {e}"))?;
        if !res.status.success() {
            return Err(format!(
                "cannot build the test service for {TARGET} (rustup target add {TARGET}): {}",
                String::from_utf8_lossy(&res.stderr).trim()
            ));
        }
        std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .clone()
}

/// An image tag of this test; removed on drop (after the containers using
/// it: declare it first).
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.0]);
    }
}

/// Builds `aerekos-ctr-test:<tag>` from `images/test-service/`.
fn test_image(tag: &str) -> Option<ImageGuard> {
    let bin = match test_binary() {
        Ok(b) => b,
        Err(e) => return skip(e),
    };
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(&bin, ctx.path().join("ctr-test-service")).unwrap();
    let dockerfile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/test-service/Dockerfile");
    let name = format!("aerekos-ctr-test:{tag}");
    let guard = ImageGuard(name.clone());
    let built = docker(&[
        "build",
        "-q",
        "-t",
        &name,
        "-f",
        dockerfile.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    match built {
        Ok(_) => Some(guard),
        Err(e) => skip(format!("cannot build the test image: {e}")),
    }
}

/// Force-removes containers by name on drop.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = docker(&["rm", "-f", "-v", name]);
        }
    }
}

fn manifest(name: &str, version: u32, image: &str) -> Manifest {
    Manifest {
        name: name.into(),
        version,
        runtime: Runtime::Container(ContainerRuntime {
            image: image.into(),
            command: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            volumes: Vec::new(),
        }),
        restart: RestartPolicy::Always,
        max_restarts: 5,
        restart_window_s: 60,
        backoff_ms: 500,
        health: None,
        limits: Limits::default(),
        config: BTreeMap::new(),
        secrets: BTreeMap::new(),
    }
}

fn runtime(m: &mut Manifest) -> &mut ContainerRuntime {
    match &mut m.runtime {
        Runtime::Container(c) => c,
        Runtime::Process(_) => unreachable!(),
    }
}

/// `GET path` on 127.0.0.1:`port`; the body, or why not.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(|| format!("no HTTP answer: {out:?}"))
}

/// Polls `f` until it returns `Some` or `secs` pass.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `docker inspect` of a container as JSON (independent of the client).
fn docker_inspect(name: &str) -> Option<Value> {
    let out = docker(&["inspect", name]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0).cloned()
}

fn running_by_cli(name: &str) -> bool {
    docker_inspect(name)
        .and_then(|v| v.pointer("/State/Running").and_then(Value::as_bool))
        .unwrap_or(false)
}

#[test]
fn ensure_inspect_logs_replace_stop_remove() {
    let Some(engine) = engine() else { return };
    let t0 = Instant::now();
    let wid = unique("life");
    let Some(image) = test_image(&wid) else {
        return;
    };
    let name = container_name(&wid, "web");
    let _containers = Containers(vec![name.clone()]);
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let mut m = manifest("web", 1, &image.0);
    {
        let rt = runtime(&mut m);
        rt.command = vec!["/ctr-test-service".into(), "hello".into()];
        rt.env.insert("GREETING".into(), "hi there".into());
        rt.ports.push(PortMap {
            host: port,
            container: 8080,
            udp: false,
        });
        rt.volumes.push(VolumeMount {
            source: data.path().to_str().unwrap().into(),
            target: "/data".into(),
            read_only: true,
        });
    }
    m.limits = Limits {
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(250),
        pids: Some(32),
    };

    // Create and start.
    let first = engine.ensure(&wid, &m).unwrap();
    assert_eq!(first.action, EnsureAction::Created);
    let s = &first.state;
    assert!(s.running, "{s:?}");
    assert_eq!((s.name.as_str(), s.version), (name.as_str(), Some(1)));
    assert!(
        s.pid.is_some() && s.started_at.is_some() && s.exit_code.is_none(),
        "{s:?}"
    );
    println!("engine warnings: {:?}", first.warnings);
    if first.warnings.is_empty() {
        assert_eq!(s.limits, m.limits, "the engine applied every limit");
    }

    // What the engine itself says, through the CLI.
    let raw = docker_inspect(&name).expect("docker inspect");
    let labels = &raw["Config"]["Labels"];
    assert_eq!(labels[LABEL_MANAGED], "true");
    assert_eq!(labels[LABEL_WORKER], wid.as_str());
    assert_eq!(labels[LABEL_SERVICE], "web");
    assert_eq!(labels[LABEL_VERSION], "1");
    let host = &raw["HostConfig"];
    assert_eq!(host["RestartPolicy"]["Name"], "no");
    assert_eq!(host["NanoCpus"], 250_000_000u64);
    assert_eq!(host["PidsLimit"], 32);
    assert_eq!(host["Memory"], 64u64 << 20);
    assert_eq!(
        host["Binds"],
        serde_json::json!([format!("{}:/data:ro", data.path().display())])
    );
    assert_eq!(
        host["PortBindings"]["8080/tcp"][0]["HostPort"],
        port.to_string()
    );
    assert_eq!(
        raw["Config"]["Cmd"],
        serde_json::json!(["/ctr-test-service", "hello"])
    );
    let env = raw["Config"]["Env"].as_array().unwrap();
    assert!(env.iter().any(|e| e == "GREETING=hi there"), "{env:?}");

    // The published port answers.
    let body = wait_for(15, "the published port", || http_get(port, "/").ok());
    assert_eq!(body, "ok");

    // Idempotent.
    let again = engine.ensure(&wid, &m).unwrap();
    assert_eq!(again.action, EnsureAction::AlreadyRunning);
    assert_eq!(again.state.id, s.id);
    assert_eq!(engine.inspect(&wid, "web").unwrap().unwrap().id, s.id);

    // Logs: stdout and stderr, demultiplexed, tail respected.
    let logs = wait_for(15, "two ticks in the logs", || {
        let l = engine.logs(&wid, "web", 100).unwrap().unwrap();
        let text = String::from_utf8(l).unwrap();
        text.contains("tick 2").then_some(text)
    });
    assert!(
        logs.contains("start args=hello greeting=hi there\n"),
        "{logs:?}"
    );
    assert!(logs.contains("ready\n"), "stderr is in: {logs:?}");
    assert!(
        !logs.bytes().any(|b| b == 0),
        "frame headers stripped: {logs:?}"
    );
    let last = engine.logs(&wid, "web", 1).unwrap().unwrap();
    assert_eq!(last.iter().filter(|&&b| b == b'\n').count(), 1, "{last:?}");

    // A new version replaces the container.
    m.version = 2;
    let second = engine.ensure(&wid, &m).unwrap();
    assert_eq!(
        second.action,
        EnsureAction::Replaced {
            old_version: Some(1)
        }
    );
    assert_ne!(second.state.id, s.id);
    assert_eq!(second.state.version, Some(2));
    assert!(second.state.running);
    assert!(docker_inspect(&s.id).is_none(), "the old container is gone");

    // Stop: PID 1 ignores SIGTERM, so SIGKILL after the 1 s grace.
    let stopped = engine.stop(&wid, "web", 1).unwrap().unwrap();
    assert!(!stopped.running, "{stopped:?}");
    assert_eq!(stopped.status, "exited");
    assert_eq!(stopped.exit_code, Some(137), "{stopped:?}");
    assert!(stopped.finished_at.is_some() && stopped.pid.is_none());

    // Ensure starts the stopped container again (same id).
    let restarted = engine.ensure(&wid, &m).unwrap();
    assert_eq!(restarted.action, EnsureAction::Started);
    assert_eq!(restarted.state.id, second.state.id);
    assert!(restarted.state.running);

    // An exit of its own is seen with its code.
    wait_for(15, "the service to answer again", || {
        http_get(port, "/exit/3").ok()
    });
    let exited = wait_for(15, "the exit", || {
        let s = engine.inspect(&wid, "web").unwrap().unwrap();
        (!s.running).then_some(s)
    });
    assert_eq!(exited.exit_code, Some(3), "{exited:?}");
    assert!(!exited.oom_killed);
    let started = engine.start(&wid, "web").unwrap().unwrap();
    assert!(
        started.running && started.exit_code.is_none(),
        "{started:?}"
    );

    // Remove: gone, and removing or stopping again is fine.
    engine.remove(&wid, "web").unwrap();
    assert!(engine.inspect(&wid, "web").unwrap().is_none());
    assert!(docker_inspect(&name).is_none());
    engine.remove(&wid, "web").unwrap();
    assert!(engine.stop(&wid, "web", 1).unwrap().is_none());
    assert!(engine.logs(&wid, "web", 10).unwrap().is_none());
    assert!(engine.start(&wid, "web").unwrap().is_none());
    println!("lifecycle took {:?}", t0.elapsed());
}

#[test]
fn list_ours_sees_only_this_workers_containers() {
    let Some(engine) = engine() else { return };
    let wid = unique("lst");
    let other = unique("lst2");
    let Some(image) = test_image(&wid) else {
        return;
    };
    let _containers = Containers(vec![
        container_name(&wid, "one"),
        container_name(&wid, "two"),
        container_name(&other, "one"),
    ]);
    assert!(engine.list_ours(&wid).unwrap().is_empty());
    engine.ensure(&wid, &manifest("one", 1, &image.0)).unwrap();
    engine.ensure(&wid, &manifest("two", 4, &image.0)).unwrap();
    engine
        .ensure(&other, &manifest("one", 1, &image.0))
        .unwrap();
    engine.stop(&wid, "two", 0).unwrap();

    let mine = engine.list_ours(&wid).unwrap();
    let names: Vec<(&str, Option<u32>, bool)> = mine
        .iter()
        .map(|(n, s)| (n.as_str(), s.version, s.running))
        .collect();
    assert_eq!(names, [("one", Some(1), true), ("two", Some(4), false)]);
    let theirs = engine.list_ours(&other).unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].1.name, container_name(&other, "one"));

    // Orphan cleanup as the supervisor would do it.
    for (service, _) in mine {
        engine.remove(&wid, &service).unwrap();
    }
    assert!(engine.list_ours(&wid).unwrap().is_empty());
    assert_eq!(engine.list_ours(&other).unwrap().len(), 1, "not ours: kept");
}

#[test]
fn containers_without_our_labels_are_never_touched() {
    let Some(engine) = engine() else { return };
    let wid = unique("fgn");
    let Some(image) = test_image(&wid) else {
        return;
    };
    // Our name, no labels at all; our name, another worker's labels; and
    // half our labels (no managed=true) under another name.
    let bare = container_name(&wid, "web");
    let other_worker = container_name(&wid, "api");
    let half = format!("{wid}-half");
    let renamed = format!("{wid}-renamed");
    let _containers = Containers(vec![
        bare.clone(),
        other_worker.clone(),
        half.clone(),
        renamed.clone(),
    ]);
    docker(&["run", "-d", "--name", &bare, &image.0]).unwrap();
    let other_id = unique("xx");
    docker(&[
        "run",
        "-d",
        "--name",
        &other_worker,
        "--label",
        &format!("{LABEL_MANAGED}=true"),
        "--label",
        &format!("{LABEL_WORKER}={other_id}"),
        "--label",
        &format!("{LABEL_SERVICE}=api"),
        &image.0,
    ])
    .unwrap();
    docker(&[
        "run",
        "-d",
        "--name",
        &half,
        "--label",
        &format!("{LABEL_WORKER}={wid}"),
        "--label",
        &format!("{LABEL_SERVICE}=half"),
        &image.0,
    ])
    .unwrap();

    // All our labels, but not our name for its service: nothing addresses
    // it, so list_ours does not offer it for cleanup either.
    docker(&[
        "run",
        "-d",
        "--name",
        &renamed,
        "--label",
        &format!("{LABEL_MANAGED}=true"),
        "--label",
        &format!("{LABEL_WORKER}={wid}"),
        "--label",
        &format!("{LABEL_SERVICE}=ghost"),
        &image.0,
    ])
    .unwrap();

    for (service, name) in [("web", &bare), ("api", &other_worker)] {
        let is_not_managed = |r: Result<(), ContainerError>| match r {
            Err(e @ ContainerError::NotManaged { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(name.as_str()) && msg.contains("not managed"),
                    "{msg}"
                );
            }
            other => panic!("{service}: expected NotManaged, got {other:?}"),
        };
        let m = manifest(service, 1, &image.0);
        is_not_managed(engine.ensure(&wid, &m).map(drop));
        is_not_managed(engine.inspect(&wid, service).map(drop));
        is_not_managed(engine.stop(&wid, service, 1).map(drop));
        is_not_managed(engine.start(&wid, service).map(drop));
        is_not_managed(engine.remove(&wid, service));
        is_not_managed(engine.logs(&wid, service, 10).map(drop));
    }
    assert!(engine.list_ours(&wid).unwrap().is_empty());

    // Still running, with their ids unchanged.
    std::thread::sleep(Duration::from_millis(300));
    assert!(engine.inspect(&wid, "ghost").unwrap().is_none());
    engine.remove(&wid, "ghost").unwrap();
    for name in [&bare, &other_worker, &half, &renamed] {
        assert!(running_by_cli(name), "{name} still runs");
    }
}

#[test]
fn a_missing_image_is_a_clear_http_error() {
    let Some(engine) = engine() else { return };
    let wid = unique("img");
    let _containers = Containers(vec![container_name(&wid, "web")]);
    let m = manifest("web", 1, "aerekos-ctr-test-missing:never");
    match engine.ensure(&wid, &m) {
        Err(ContainerError::Http(404, msg)) => {
            assert!(msg.to_lowercase().contains("image"), "{msg}")
        }
        other => panic!("expected Http(404, …), got {other:?}"),
    }
    assert!(engine.inspect(&wid, "web").unwrap().is_none());
}

#[test]
fn bogus_socket_is_engine_unavailable_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here.sock");
    let err = Engine::connect(Some(&path)).unwrap_err();
    assert!(
        matches!(err, ContainerError::EngineUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    let msg = err.to_string();
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    assert!(msg.contains("no such socket"), "{msg}");

    // A socket that answers something else than HTTP.
    let junk = fake_engine(dir.path(), "junk.sock", |_| b"SSH-2.0-nope\r\n".to_vec());
    let err = Engine::connect(Some(&junk)).unwrap_err();
    assert!(
        matches!(err, ContainerError::EngineUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(junk.to_str().unwrap()), "{err}");
}

/// A fake engine on a unix socket: `answer(request head)` → raw response.
fn fake_engine(
    dir: &Path,
    name: &str,
    answer: impl Fn(&str) -> Vec<u8> + Send + 'static,
) -> PathBuf {
    let path = dir.join(name);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = conn.write_all(&answer(&String::from_utf8_lossy(&head)));
        }
    });
    path
}

fn json_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The same body, chunked in pieces of 7 bytes.
fn chunked_response(status: &str, body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    for piece in body.as_bytes().chunks(7) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn ping_response() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK".to_vec()
}

#[test]
fn api_versions_are_checked_and_negotiated() {
    let dir = tempfile::tempdir().unwrap();

    let old = fake_engine(dir.path(), "old.sock", |head| {
        if head.starts_with("GET /_ping") {
            ping_response()
        } else {
            json_response(r#"{"ApiVersion":"1.39","MinAPIVersion":"1.12"}"#)
        }
    });
    match Engine::connect(Some(&old)) {
        Err(ContainerError::ApiTooOld(v)) => assert_eq!(v, "1.39"),
        other => panic!("expected ApiTooOld, got {other:?}"),
    }

    // An engine that no longer accepts 1.40 gets its own minimum; chunked
    // answers and JSON error messages come through.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let new = fake_engine(dir.path(), "new.sock", move |head| {
        let line = head.lines().next().unwrap_or_default().to_string();
        log.lock().unwrap().push(line.clone());
        if line.starts_with("GET /_ping") {
            ping_response()
        } else if line.starts_with("GET /version") {
            chunked_response(
                "200 OK",
                r#"{"ApiVersion":"1.51","MinAPIVersion":"1.44","Version":"29.0.0"}"#,
            )
        } else {
            chunked_response("404 Not Found", r#"{"message":"No such container: x"}"#)
        }
    });
    let engine = Engine::connect(Some(&new)).unwrap();
    assert_eq!(engine.api_version(), "1.51");
    assert!(engine.inspect("w1", "web").unwrap().is_none());
    let lines = seen.lock().unwrap().clone();
    assert_eq!(
        lines.last().unwrap(),
        "GET /v1.44/containers/aerekos-w1-web/json HTTP/1.1",
        "{lines:?}"
    );

    // A hung engine: connect gives up after the ping timeout.
    let hung_path = dir.path().join("hung.sock");
    let _hung = UnixListener::bind(&hung_path).unwrap(); // accepts (backlog), never answers
    let t = Instant::now();
    let err = Engine::connect(Some(&hung_path)).unwrap_err();
    assert!(
        matches!(err, ContainerError::EngineUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// `ContainerState` must stay cheap to hand to another thread.
#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Engine>();
    check::<ContainerState>();
}
