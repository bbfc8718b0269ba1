//! Hosted services: specs, placement, reconciliation, per-worker commands and
//! persistence, against a real in-process conductor with fake MQTT workers.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use protocol::manifest::{Program, Runtime};
use protocol::{Action, ServiceState};
use serde_json::{json, Value};

#[test]
fn specs_are_versioned_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let spec = json!({"name": "web", "command": "/usr/bin/python3",
        "args": ["-m", "http.server", "8080"], "env": {"PORT": "8080"},
        "restart": "always", "max_restarts": 3, "restart_window_s": 30, "backoff_ms": 500});
    let (code, v) = call(&c, "POST", "/api/v1/services", Some(spec.clone()));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v, json!({"name": "web", "version": 1}));
    let (code, v) = call(&c, "POST", "/api/v1/services", Some(spec));
    assert_eq!((code, &v["version"]), (201, &json!(2)), "{v}");
    assert_eq!(c.call("GET", "/api/v1/services", None, None).0, 401);

    let bad = [
        (json!({"name": "Web", "command": "x"}), "name"),
        (json!({"name": "", "command": "x"}), "name"),
        (json!({"name": "a".repeat(33), "command": "x"}), "name"),
        (json!({"name": "ok", "command": ""}), "command"),
        (
            json!({"name": "ok", "command": "x".repeat(1025)}),
            "command",
        ),
        (
            json!({"name": "ok", "command": "x", "args": vec!["a"; 65]}),
            "args",
        ),
        (
            json!({"name": "ok", "command": "x", "args": ["a".repeat(1025)]}),
            "args",
        ),
        (
            json!({"name": "ok", "command": "x", "env": {"K": "v".repeat(1025)}}),
            "env",
        ),
        (
            json!({"name": "ok", "command": "x", "env": {"K=1": "v"}}),
            "env",
        ),
        (
            json!({"name": "ok", "command": "x", "working_dir": "/".repeat(1025)}),
            "working_dir",
        ),
        (
            json!({"name": "ok", "command": "x", "restart": "sometimes"}),
            "restart",
        ),
        (
            json!({"name": "ok", "command": "x", "surprise": 1}),
            "surprise",
        ),
    ];
    for (body, word) in bad {
        let (code, v) = call(&c, "POST", "/api/v1/services", Some(body.clone()));
        assert_eq!(code, 400, "{body}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(word), "{body}: {msg}");
    }
    // The old frame limits (16 args of 64 bytes…) no longer apply.
    let (code, v) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(json!({"name": "ok", "command": "x".repeat(200), "args": vec!["a".repeat(100); 20]})),
    );
    assert_eq!(code, 201, "{v}");
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("K{i}"), json!("v"))).collect();
    let (code, _) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(json!({"name": "ok", "command": "x", "env": many})),
    );
    assert_eq!(code, 400);

    let list = c.get("/api/v1/services");
    assert_eq!(list["services"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list["services"][1]["name"], "web");
    assert_eq!(list["services"][1]["latest_version"], 2);
    assert_eq!(list["services"][1]["deployment"], Value::Null);
    let one = c.get("/api/v1/services/web");
    assert_eq!(one["versions"].as_array().unwrap().len(), 2);
    assert_eq!(one["versions"][0]["spec"]["args"][1], "http.server");
    assert_eq!(call(&c, "GET", "/api/v1/services/nope", None).0, 404);
    // Deployment errors.
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"version": 9, "labels": {"a": "b"}})),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"workers": ["w-000000000000"]})),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        call(
            &c,
            "PUT",
            "/api/v1/services/nope/deployment",
            Some(json!({}))
        )
        .0,
        404
    );
    assert_eq!(
        call(&c, "DELETE", "/api/v1/services/web/deployment", None).0,
        404
    );
}

#[test]
fn placement_reconciliation_commands_and_undeploy() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let ea = enroll_labels(&c, "pi-a", json!({"role": "web", "site": "lab"}));
    let eb = enroll_labels(&c, "pi-b", json!({"role": "web"}));
    let ec = enroll_labels(&c, "pi-c", json!({"role": "db", "site": "lab"}));
    let a = SvcWorker::connect(&c, &ea, "pi-a");
    let b = SvcWorker::connect(&c, &eb, "pi-b");
    let w3 = SvcWorker::connect(&c, &ec, "pi-c");
    for id in [&ea.id, &eb.id, &ec.id] {
        wait_status(&c, id, "online", T);
    }

    let (code, _) = call(
        &c,
        "POST",
        "/api/v1/services",
        Some(json!({"name": "web", "command": "/bin/sleep", "args": ["1000"]})),
    );
    assert_eq!(code, 201);
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/web/deployment",
        Some(json!({"labels": {"role": "web"}})),
    );
    assert_eq!(code, 200, "{v}");
    let mut expect = vec![ea.id.clone(), eb.id.clone()];
    expect.sort();
    assert_eq!(v["targets"], json!(expect));

    // Exactly the two targets get a sealed DeployManifest (verified with
    // their secret) whose manifest they can fetch and check.
    for w in [&a, &b] {
        let act = w.wait_action("deploy", |x| is_deploy(x, "web", 1));
        let m = fetch_manifest(&c, w, &act);
        match m.runtime {
            Runtime::Process(p) => {
                assert_eq!(p.program, Program::Command("/bin/sleep".into()));
                assert_eq!(p.args, vec!["1000".to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }

    // Actual state: a runs it.
    a.report("web", 1, ServiceState::Running);
    let svc = wait_for("a in sync", T, || {
        let v = c.get("/api/v1/services/web");
        (target(&v, &ea.id)["in_sync"] == true).then_some(v)
    });
    let ta = target(&svc, &ea.id);
    assert_eq!(ta["actual"]["state"], "running");
    assert_eq!(ta["actual"]["pid"], 4242);
    assert_eq!(ta["desired_version"], 1);
    assert_eq!(ta["hostname"], "pi-a");
    assert_eq!(target(&svc, &eb.id)["actual"], Value::Null);
    assert_eq!(target(&svc, &eb.id)["in_sync"], false);
    let ws = c.get(&format!("/api/v1/workers/{}/services", ea.id));
    assert_eq!(ws["services"][0]["name"], "web");
    assert_eq!(ws["services"][0]["desired"]["version"], 1);
    assert_eq!(ws["services"][0]["actual"]["state"], "running");
    assert!(c.prometheus().contains(&format!(
        "aerekos_service_running{{worker_id=\"{}\",service=\"web\"}} 1",
        ea.id
    )));

    // A service nobody deployed gets removed.
    w3.report("ghost", 4, ServiceState::Running);
    w3.wait_action("remove ghost", |x| is_remove(x, "ghost"));

    // A new worker whose labels match gets the Deploy.
    let ed = enroll_labels(&c, "pi-d", json!({"role": "web"}));
    let d = SvcWorker::connect(&c, &ed, "pi-d");
    d.wait_action("deploy", |x| is_deploy(x, "web", 1));

    // Per-worker commands: the right action, the worker's reply returned.
    for (op, detail) in [
        ("stop", "stopped"),
        ("start", "started"),
        ("restart", "restarted"),
    ] {
        let (code, v) = call(
            &c,
            "POST",
            &format!("/api/v1/workers/{}/services/web/{op}", ea.id),
            None,
        );
        assert_eq!(code, 200, "{op}: {v}");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["detail"], detail);
    }
    let acts = a.actions();
    assert!(acts
        .iter()
        .any(|x| matches!(x, Action::Stop(n) if n.as_str() == "web")));
    assert!(acts
        .iter()
        .any(|x| matches!(x, Action::Start(n) if n.as_str() == "web")));
    assert!(acts
        .iter()
        .any(|x| matches!(x, Action::Restart(n) if n.as_str() == "web")));
    assert_eq!(
        call(
            &c,
            "POST",
            &format!("/api/v1/workers/{}/services/web/explode", ea.id),
            None
        )
        .0,
        404
    );

    // The untargeted worker never received anything about "web".
    assert!(
        !w3.actions()
            .iter()
            .any(|x| matches!(x, Action::DeployManifest(_))),
        "{:?}",
        w3.actions()
    );
    // Only the ghost removal reached it (at most resent once per 5 s).
    assert!(w3.publishes.load(Ordering::SeqCst) <= 2);

    // Undeploy: every worker that reports it gets Remove.
    b.report("web", 1, ServiceState::Running);
    wait_for("b reported", T, || {
        let v = c.get("/api/v1/services/web");
        (target(&v, &eb.id)["in_sync"] == true).then_some(())
    });
    let (code, v) = call(&c, "DELETE", "/api/v1/services/web/deployment", None);
    assert_eq!(code, 200, "{v}");
    a.wait_action("remove web", |x| is_remove(x, "web"));
    b.wait_action("remove web", |x| is_remove(x, "web"));
    a.report("web", 1, ServiceState::Removed);
    wait_for("a row gone", T, || {
        let v = c.get(&format!("/api/v1/workers/{}/services", ea.id));
        (v["services"] == json!([])).then_some(())
    });
    let v = c.get("/api/v1/services/web");
    assert_eq!(v["deployment"], Value::Null);
}

/// A worker whose desired state is `stopped` (the deployment's, or a
/// per-worker stop set before the deployment) and that lacks the desired
/// version gets `InstallManifest`, never `DeployManifest` (which would start
/// it); a new version rolled out while stopped passes on `stopped`; with
/// the desired state `running`, the next version is deployed.
#[test]
fn a_stopped_deployment_installs_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let ea = enroll_labels(&c, "pi-a", json!({}));
    let eb = enroll_labels(&c, "pi-b", json!({}));
    let a = SvcWorker::connect(&c, &ea, "pi-a");
    let b = SvcWorker::connect(&c, &eb, "pi-b");
    for id in [&ea.id, &eb.id] {
        wait_status(&c, id, "online", T);
    }
    let spec = json!({"name": "idle", "command": "/bin/sleep", "args": ["1000"]});
    for _ in 0..3 {
        assert_eq!(
            call(&c, "POST", "/api/v1/services", Some(spec.clone())).0,
            201
        );
    }
    let started = |w: &SvcWorker| {
        w.actions()
            .into_iter()
            .filter(|x| matches!(x, Action::DeployManifest(_) | Action::Start(_)))
            .collect::<Vec<_>>()
    };

    // Deployment desired stopped: installed stopped, with a manifest the
    // worker can fetch and verify.
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/idle/deployment",
        Some(json!({"version": 1, "workers": [ea.id], "desired_state": "stopped"})),
    );
    assert_eq!(code, 200, "{v}");
    let act = a.wait_action("install", |x| is_install(x, "idle", 1));
    let m = fetch_manifest(&c, &a, &act);
    assert_eq!((m.name.as_str(), m.version), ("idle", 1));
    a.report("idle", 1, ServiceState::Stopped);
    wait_for("a in sync", T, || {
        let v = c.get("/api/v1/services/idle");
        (target(&v, &ea.id)["in_sync"] == true).then_some(())
    });

    // A new version while stopped: rolled out as an install, and the wave
    // passes on `stopped` (nothing more can be checked).
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/idle/deployment",
        Some(
            json!({"version": 2, "workers": [ea.id], "desired_state": "stopped",
                    "rollout": {"settle_s": 1}}),
        ),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["rollout"].is_object(), "{v}");
    a.wait_action("install v2", |x| is_install(x, "idle", 2));
    a.report("idle", 2, ServiceState::Stopped);
    wait_for("the rollout succeeded", T, || {
        let v = c.get("/api/v1/services/idle");
        (v["deployment"]["version"] == 2).then_some(())
    });
    assert!(started(&a).is_empty(), "{:?}", a.actions());

    // A per-worker stop set before b is targeted: b installs stopped too.
    let (code, v) = call(
        &c,
        "POST",
        &format!("/api/v1/workers/{}/services/idle/stop", eb.id),
        None,
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/idle/deployment",
        Some(json!({"version": 2, "workers": [ea.id, eb.id]})),
    );
    assert_eq!(code, 200, "{v}");
    b.wait_action("install on b", |x| is_install(x, "idle", 2));
    assert!(started(&b).is_empty(), "{:?}", b.actions());

    // Desired running: a gets the next version deployed (and started).
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/idle/deployment",
        Some(json!({"version": 3, "workers": [ea.id, eb.id],
                    "rollout": {"canary": 2, "settle_s": 1}})),
    );
    assert_eq!(code, 200, "{v}");
    a.wait_action("deploy v3", |x| is_deploy(x, "idle", 3));
    b.wait_action("install v3 on b", |x| is_install(x, "idle", 3));
    assert!(started(&b).is_empty(), "{:?}", b.actions());
}

#[test]
fn conductor_restart_keeps_services() {
    let dir = tempfile::tempdir().unwrap();
    let c = Conductor::start(dir.path());
    let ea = enroll_labels(&c, "pi-a", json!({}));
    let a = SvcWorker::connect(&c, &ea, "pi-a");
    wait_status(&c, &ea.id, "online", T);
    for _ in 0..2 {
        let (code, _) = call(
            &c,
            "POST",
            "/api/v1/services",
            Some(json!({"name": "job", "command": "true", "restart": "never"})),
        );
        assert_eq!(code, 201);
    }
    let (code, v) = call(
        &c,
        "PUT",
        "/api/v1/services/job/deployment",
        Some(json!({"version": 1, "workers": [ea.id]})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["targets"], json!([ea.id]));
    a.wait_action("deploy", |x| is_deploy(x, "job", 1));
    a.report("job", 1, ServiceState::Running);
    wait_for("in sync", T, || {
        let v = c.get("/api/v1/services/job");
        (target(&v, &ea.id)["in_sync"] == true).then_some(())
    });
    let before = c.get("/api/v1/services/job");
    drop(a);
    c.stop();

    let c = Conductor::start(dir.path());
    let after = c.get("/api/v1/services/job");
    assert_eq!(after["versions"], before["versions"]);
    assert_eq!(after["deployment"], before["deployment"]);
    let t = target(&after, &ea.id);
    assert_eq!(t["actual"], target(&before, &ea.id)["actual"]);
    assert_eq!(t["in_sync"], true);
    assert_eq!(
        c.get("/api/v1/services")["services"][0]["latest_version"],
        2
    );
}
