//! The `aerekos` binary's stdout: `--output json|table` (and `--json`,
//! `AEREKOS_OUTPUT`) against a stand-in conductor that answers fixed JSON,
//! and `aerekos completions <shell>`. The real conductor is exercised by
//! the end-to-end suite (tests/tests/*.rs); this checks what the CLI
//! prints for a known answer.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

/// `GET /api/v1/workers` as the conductor answers it.
fn workers() -> Value {
    json!({
        "workers": [
            {"id": "w-1", "hostname": "pi-kitchen", "labels": {"site": "shop"},
             "status": "online", "revoked": false, "arch": "aarch64",
             "device_model": "Raspberry Pi 4 Model B", "agent_version": "0.1.0",
             "summary": {"cpu_percent": 12.5, "load1": 0.5, "uptime_s": 60}},
        ],
        "now_ms": 1_765_000_000_000u64,
    })
}

/// `GET /api/v1/alert-rules`.
fn rules() -> Value {
    json!({"rules": [
        {"id": 1, "name": "hot", "kind": "metric_above", "metric": "temperature",
         "threshold": 75.0, "for": "2m", "selector": {"site": "shop"}},
    ]})
}

/// A stand-in conductor on loopback: answers each request by its path,
/// one request per connection, until the test process ends. Returns its URL.
fn conductor() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // The rest of the head (GETs only: no body).
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or_default();
            let (status, body) = match path {
                "/api/v1/workers" => ("200 OK", workers()),
                "/api/v1/alert-rules" => ("200 OK", rules()),
                _ => ("404 Not Found", json!({"error": "worker not found"})),
            };
            let body = body.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// Runs `aerekos` with `args` and the given environment (nothing else of
/// ours leaks in: no token, CA, URL or output format from the caller's).
fn aerekos(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aerekos"));
    for var in [
        "AEREKOS_OUTPUT",
        "AEREKOS_TOKEN",
        "AEREKOS_CACERT",
        "AEREKOS_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn json_output_is_the_api_answer_and_nothing_else() {
    let url = conductor();
    let pretty = format!("{}\n", serde_json::to_string_pretty(&workers()).unwrap());
    for (args, env) in [
        (vec!["--url", &url, "--output", "json", "workers"], vec![]),
        (vec!["--url", &url, "workers", "--output=json"], vec![]),
        (vec!["--url", &url, "--json", "workers"], vec![]),
        (
            vec!["--url", &url, "workers"],
            vec![("AEREKOS_OUTPUT", "json")],
        ),
        // `--json` stays the alias it was, whatever the environment says.
        (
            vec!["--url", &url, "--json", "workers"],
            vec![("AEREKOS_OUTPUT", "table")],
        ),
    ] {
        let o = aerekos(&args, &env);
        let text = stdout(&o);
        assert_eq!(text, pretty, "{args:?} {env:?}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), workers());
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = aerekos(&["--url", &url, "--output", "json", "alert", "rules"], &[]);
    assert_eq!(serde_json::from_str::<Value>(&stdout(&o)).unwrap(), rules());
}

#[test]
fn table_output_is_for_people() {
    let url = conductor();
    for (args, env) in [
        (vec!["--url", &url, "workers"], vec![]),
        (vec!["--url", &url, "--output", "table", "workers"], vec![]),
        // The flag beats the environment.
        (
            vec!["--url", &url, "--output", "table", "workers"],
            vec![("AEREKOS_OUTPUT", "json")],
        ),
    ] {
        let text = stdout(&aerekos(&args, &env));
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            [
                vec!["ID", "NAME", "STATUS", "ARCH", "MODEL"],
                vec![
                    "w-1",
                    "pi-kitchen",
                    "online",
                    "aarch64",
                    "Raspberry",
                    "Pi",
                    "4",
                    "Model",
                    "B"
                ],
            ],
            "{args:?} {env:?}: {text}"
        );
    }
    let text = stdout(&aerekos(&["--url", &url, "alert", "rules"], &[]));
    assert_eq!(
        text,
        "ID\tNAME\tKIND\tCONDITION\tFOR\tSELECTOR\n\
         1\thot\tmetric_above\ttemperature > 75.0\t2m\t{\"site\":\"shop\"}\n"
    );
}

#[test]
fn an_api_error_prints_nothing_on_stdout_in_either_format() {
    let url = conductor();
    for format in ["json", "table"] {
        let o = aerekos(&["--url", &url, "--output", format, "worker", "w-404"], &[]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            o.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("404: worker not found"), "{err}");
    }
    let o = aerekos(&["--url", &url, "--output", "yaml", "workers"], &[]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    let o = aerekos(&["--url", &url, "workers"], &[("AEREKOS_OUTPUT", "yaml")]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a usage error from the environment"
    );
}

#[test]
fn release_key_prints_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("release.key");
    let key = key.to_str().unwrap();
    let o = aerekos(
        &["--output", "json", "release-key", "generate", "--out", key],
        &[],
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let public = v["public_key"].as_str().unwrap().to_string();
    assert_eq!(public.len(), 64, "{v}");
    assert_eq!(v["private_key_file"], key);
    let o = aerekos(
        &["release-key", "public", key],
        &[("AEREKOS_OUTPUT", "json")],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!({ "public_key": public })
    );
    assert_eq!(
        stdout(&aerekos(&["release-key", "public", key], &[])),
        format!("{public}\n")
    );
}

#[test]
fn completions_for_every_shell() {
    let bash = stdout(&aerekos(&["completions", "bash"], &[]));
    for name in [
        "workers",
        "services",
        "exec-log",
        "rollouts",
        "rotate-secret",
        "completions",
        "add-receiver",
    ] {
        assert!(bash.contains(name), "no {name} in the bash script");
    }
    // Offline: no conductor is asked (an unreachable URL and a missing CA are fine).
    let offline = stdout(&aerekos(
        &[
            "--url",
            "http://127.0.0.1:1",
            "--cacert",
            "/nonexistent/ca.pem",
            "completions",
            "bash",
        ],
        &[],
    ));
    assert_eq!(offline, bash);

    // `bash -n`: the script parses (skipped where there is no bash).
    match Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(bash.as_bytes())
                .unwrap();
            let done = child.wait_with_output().unwrap();
            assert!(
                done.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&done.stderr)
            );
            // And sourcing it registers the function for `aerekos`.
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("aerekos.bash");
            std::fs::write(&script, &bash).unwrap();
            let o = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "source '{}' && complete -p aerekos",
                    script.display()
                ))
                .output()
                .unwrap();
            let registered = String::from_utf8_lossy(&o.stdout);
            assert!(registered.contains("_aerekos"), "{registered}");
        }
        Err(e) => eprintln!("bash not found ({e}); syntax check skipped"),
    }

    let zsh = stdout(&aerekos(&["completions", "zsh"], &[]));
    assert!(zsh.starts_with("#compdef aerekos"), "{zsh}");
    let fish = stdout(&aerekos(&["completions", "fish"], &[]));
    assert!(fish.contains("complete -c aerekos"), "{fish}");
    for shell in ["elvish", "powershell"] {
        let script = stdout(&aerekos(&["completions", shell], &[]));
        assert!(script.contains("exec-log"), "{shell}: {script}");
    }
    let o = aerekos(&["completions", "tcsh"], &[]);
    assert_eq!(o.status.code(), Some(2));
}
