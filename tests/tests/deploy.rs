//! The Pi install path: `deploy/install.sh` run into a staging root
//! (`--root DIR`), the files and modes it leaves, the systemd unit's
//! settings (checked with `systemd-analyze verify` where it exists), and the
//! installed agent actually enrolling with the settings file it wrote.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use e2e::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_source() -> PathBuf {
    repo().join("deploy/systemd/edge-worker.service")
}

/// `sh deploy/install.sh ARGS` (as the README runs it).
fn install(args: &[&str]) -> Output {
    Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .args(args)
        .output()
        .expect("run sh")
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "install.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails, says why (`expect` in stderr).
#[track_caller]
fn assert_refused(out: &Output, expect: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "install.sh should fail: {err}");
    assert!(err.contains(expect), "stderr should say {expect:?}: {err}");
}

/// Permission bits as octal text, e.g. `"0600"`.
fn mode(p: &Path) -> String {
    let m = fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode();
    format!("{:04o}", m & 0o7777)
}

/// `KEY='value'` lines of the settings file (every value single-quoted,
/// which systemd's EnvironmentFile= and a shell both read literally).
fn settings(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("KEY=value");
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or_else(|| panic!("unquoted value in {line:?}"));
        assert!(
            map.insert(k.to_string(), v.to_string()).is_none(),
            "{k} twice"
        );
    }
    map
}

/// `(section, key, value)` of a unit file, in order.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("Key=value");
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

/// Where `name` is on PATH (or in /usr/bin, /bin).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn systemd_unit_restarts_always_is_hardened_and_leaves_the_agent_its_reads() {
    let text = fs::read_to_string(unit_source()).unwrap();
    let entries = unit_entries(&text);
    let get = |section: &str, key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |section: &str, key: &str| -> String {
        let v = get(section, key);
        assert_eq!(v.len(), 1, "exactly one {key}= in [{section}]: {v:?}");
        v[0].to_string()
    };
    for (key, want) in [
        ("ExecStart", "/usr/local/lib/aerekos/edge-worker"),
        ("Restart", "always"),
        ("EnvironmentFile", "-/etc/aerekos/edge-worker.env"),
        ("StateDirectory", "aerekos"),
        ("Environment", "AEREKOS_STATE_DIR=/var/lib/aerekos"),
        ("Delegate", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/aerekos /usr/local/lib/aerekos"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("LockPersonality", "yes"),
    ] {
        assert_eq!(one("Service", key), want, "{key}");
    }
    let restart_sec = one("Service", "RestartSec");
    assert!(
        restart_sec
            .trim_end_matches('s')
            .parse::<u32>()
            .is_ok_and(|s| s >= 1),
        "RestartSec={restart_sec}"
    );
    let mut families: Vec<String> = one("Service", "RestrictAddressFamilies")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    families.sort();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]);
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");

    // The agent reads all of /proc (process count, /proc/device-tree) and
    // /sys/class/{thermal,net}: nothing may hide them.
    for key in [
        "ProtectProc",
        "ProcSubset",
        "PrivateNetwork",
        "ProtectControlGroups",
    ] {
        assert!(get("Service", key).is_empty(), "{key}= must not be set");
    }
    for (_, key, value) in &entries {
        if key.starts_with("Inaccessible") || key == "TemporaryFileSystem" {
            for path in value.split_whitespace() {
                let path = path.trim_start_matches(['-', '+']);
                assert!(
                    !["/proc", "/sys"].iter().any(|p| path.starts_with(p)),
                    "{key}={value} hides what the agent reads"
                );
            }
        }
    }
}

#[test]
fn install_sh_stages_binary_settings_and_unit_and_the_agent_enrols_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let c = Conductor::start(&dir.path().join("conductor"));
    let token = c.registration_token();
    let agent = bin("edge-worker");

    let out = install(&[
        "--root",
        root.to_str().unwrap(),
        "--no-start",
        "--conductor",
        &c.url(),
        "--token",
        &token,
        "--label",
        "site=shop",
        "--label=rack=2",
        agent.to_str().unwrap(),
    ]);
    assert_ok(&out);

    let bin_dst = root.join("usr/local/lib/aerekos/edge-worker");
    // On PATH through a link; the unit runs the real path, in a directory
    // of its own that the agent may write (self-update).
    assert_eq!(
        fs::read_link(root.join("usr/local/bin/edge-worker")).unwrap(),
        Path::new("/usr/local/lib/aerekos/edge-worker")
    );
    let env_dst = root.join("etc/aerekos/edge-worker.env");
    let unit_dst = root.join("etc/systemd/system/edge-worker.service");
    assert_eq!(fs::read(&bin_dst).unwrap(), fs::read(&agent).unwrap());
    assert_eq!(mode(&bin_dst), "0755");
    assert_eq!(mode(&env_dst), "0600", "the settings hold the token");
    assert_eq!(mode(&unit_dst), "0644");
    assert_eq!(
        fs::read(&unit_dst).unwrap(),
        fs::read(unit_source()).unwrap(),
        "the unit is deploy/systemd/edge-worker.service as is"
    );
    let env = settings(&fs::read_to_string(&env_dst).unwrap());
    let expected: BTreeMap<String, String> = [
        ("AEREKOS_CONDUCTOR", c.url()),
        ("AEREKOS_REGISTRATION_TOKEN", token.clone()),
        ("AEREKOS_LABELS", "site=shop,rack=2".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(env, expected);
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants")
            .exists(),
        "--no-start enables nothing"
    );
    let leftovers: Vec<_> = walk(&root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "new"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // systemd's own check of the installed unit, pointed at the staged
    // binary (verify insists ExecStart= exists). Any warning fails.
    match which("systemd-analyze") {
        Some(analyze) => {
            let text = fs::read_to_string(&unit_dst).unwrap();
            let exec = "ExecStart=/usr/local/lib/aerekos/edge-worker";
            assert!(text.contains(exec));
            let staged = dir.path().join("verify/edge-worker.service");
            fs::create_dir_all(staged.parent().unwrap()).unwrap();
            let staged_exec = format!("ExecStart={}", bin_dst.display());
            fs::write(&staged, text.replace(exec, &staged_exec)).unwrap();
            let out = Command::new(analyze)
                .arg("verify")
                .arg(&staged)
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && said.trim().is_empty(),
                "systemd-analyze verify: {}\n{said}",
                out.status
            );
        }
        None => println!("note: systemd-analyze not installed, unit not verified by systemd"),
    }

    // The installed agent, configured only by the settings file (as systemd
    // would pass it), enrols with the conductor and carries the labels.
    let state = dir.path().join("state");
    let mut cmd = Command::new(&bin_dst);
    cmd.envs(&env)
        .env("AEREKOS_STATE_DIR", &state)
        .env("AEREKOS_INTERVAL", "300ms")
        .env("AEREKOS_HOSTNAME", "pi-installed")
        .env(
            "AEREKOS_MACHINE_ID",
            format!("m-installed-{}", std::process::id()),
        );
    let w = Proc::spawn(cmd, dir.path().join("agent.log"));
    let worker = wait_for("installed agent enrolled", Duration::from_secs(20), || {
        c.workers().into_iter().find(|w| {
            w["labels"]["site"] == "shop" && w["labels"]["rack"] == "2" && w["status"] == "online"
        })
    });
    assert_eq!(
        worker["hostname"],
        "pi-installed",
        "{worker}\n{}",
        w.tail(20)
    );
    assert!(
        !w.output().contains("AEREKOS_TOKEN"),
        "no warning about the token's variable: {}",
        w.tail(20)
    );
    assert_eq!(c.workers().len(), 1);
}

#[test]
fn install_sh_refuses_bad_input_and_reruns_keep_unrelated_settings() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    // Any file will do as the "binary" in a staging root.
    let binary = dir.path().join("edge-worker");
    fs::write(&binary, b"#!/bin/sh\n").unwrap();
    let b = binary.to_str().unwrap();
    let base = ["--root", r, "--no-start"];
    let with = |extra: &[&str]| -> Output {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        install(&args)
    };

    // Refused before anything is written.
    assert_refused(&with(&["--conductor", "http://h:3000", b]), "--token");
    assert_refused(&with(&["--token", "t", b]), "--conductor");
    assert_refused(
        &with(&["--conductor", "h:3000", "--token", "t", b]),
        "http://",
    );
    assert_refused(
        &with(&[
            "--conductor",
            "http://h:3000",
            "--token",
            "t",
            "--label",
            "a=1,b=2",
            b,
        ]),
        "commas",
    );
    assert_refused(
        &with(&[
            "--conductor",
            "http://h:3000",
            "--token",
            "t",
            "--label",
            "novalue",
            b,
        ]),
        "key=value",
    );
    assert_refused(
        &with(&["--conductor", "http://h:3000", "--token", "it's", b]),
        "quote",
    );
    assert_refused(
        &with(&["--conductor", "http://h:3000", "--token", "a\nB=c", b]),
        "newline",
    );
    assert_refused(
        &with(&[
            "--conductor",
            "http://h:3000",
            "--token",
            "t",
            "--frobnicate",
            b,
        ]),
        "unknown option",
    );
    assert_refused(
        &with(&["--conductor", "http://h:3000", "--token", "t"]),
        "binary",
    );
    assert_refused(
        &with(&[
            "--conductor",
            "http://h:3000",
            "--token",
            "t",
            "/nonexistent",
        ]),
        "no such file",
    );
    assert!(walk(&root).is_empty(), "nothing written: {:?}", walk(&root));

    // First install, then a line added by hand, then a rerun that only
    // changes the token: the rest stays, still 0600.
    assert_ok(&with(&[
        "--conductor",
        "http://h:3000",
        "--token",
        "first",
        "--label",
        "site=a",
        b,
    ]));
    let env_dst = root.join("etc/aerekos/edge-worker.env");
    let mut text = fs::read_to_string(&env_dst).unwrap();
    text.push_str("AEREKOS_INTERVAL='30s'\n");
    fs::write(&env_dst, &text).unwrap();
    assert_ok(&with(&["--token", "second", b]));
    let env = settings(&fs::read_to_string(&env_dst).unwrap());
    assert_eq!(env["AEREKOS_CONDUCTOR"], "http://h:3000");
    assert_eq!(env["AEREKOS_REGISTRATION_TOKEN"], "second");
    assert_eq!(env["AEREKOS_LABELS"], "site=a");
    assert_eq!(env["AEREKOS_INTERVAL"], "30s");
    assert_eq!(mode(&env_dst), "0600");

    // An upgrade: only the binary; labels replaced when given.
    fs::write(&binary, b"#!/bin/sh\n# v2\n").unwrap();
    assert_ok(&with(&["--label", "site=b", "--label", "tier=edge", b]));
    let env = settings(&fs::read_to_string(&env_dst).unwrap());
    assert_eq!(env["AEREKOS_LABELS"], "site=b,tier=edge");
    assert_eq!(env["AEREKOS_REGISTRATION_TOKEN"], "second");
    assert_eq!(env.len(), 4, "{env:?}");

    // An older install's AEREKOS_TOKEN line (the CLI's variable) is renamed
    // by a rerun, or dropped by one that sets the token.
    let text = fs::read_to_string(&env_dst).unwrap();
    fs::write(
        &env_dst,
        text.replace("AEREKOS_REGISTRATION_TOKEN=", "AEREKOS_TOKEN="),
    )
    .unwrap();
    assert_ok(&with(&[b]));
    let env = settings(&fs::read_to_string(&env_dst).unwrap());
    assert_eq!(env["AEREKOS_REGISTRATION_TOKEN"], "second");
    assert!(!env.contains_key("AEREKOS_TOKEN"), "{env:?}");
    let mut text = fs::read_to_string(&env_dst).unwrap();
    text.push_str("AEREKOS_TOKEN='old'\n");
    fs::write(&env_dst, &text).unwrap();
    assert_ok(&with(&["--token", "third", b]));
    let env = settings(&fs::read_to_string(&env_dst).unwrap());
    assert_eq!(env["AEREKOS_REGISTRATION_TOKEN"], "third");
    assert!(!env.contains_key("AEREKOS_TOKEN"), "{env:?}");
    assert_eq!(env.len(), 4, "{env:?}");
    assert_eq!(
        fs::read(root.join("usr/local/lib/aerekos/edge-worker")).unwrap(),
        b"#!/bin/sh\n# v2\n"
    );

    // Without --no-start, a staging root gets the unit enabled offline.
    match which("systemctl") {
        Some(_) => {
            assert_ok(&install(&["--root", r, b]));
            let link = root.join("etc/systemd/system/multi-user.target.wants/edge-worker.service");
            assert_eq!(
                fs::read_link(&link).unwrap(),
                Path::new("/etc/systemd/system/edge-worker.service")
            );
        }
        None => println!("note: systemctl not installed, offline enable not checked"),
    }
}

/// Every file and symlink below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
