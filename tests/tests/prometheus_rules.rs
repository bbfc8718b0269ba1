//! The Prometheus and Grafana files under `deploy/` against the code:
//! `promtool check rules` / `check config` pass on `deploy/prometheus/`,
//! the rule unit tests (`promtool test rules aerekos.rules.test.yml`) pass,
//! every `aerekos_*` metric, label name and fixed label value the rules, their
//! tests and the Grafana dashboard use is one a real conductor exports, and a
//! real Prometheus scrapes a conductor with the example configuration (HTTPS
//! with the fleet CA, the `--metrics-token` bearer), evaluates every rule
//! without an error and answers every dashboard query. The conductor's
//! `/metrics` itself passes `promtool check metrics` (the naming
//! conventions: units in names, `_total` counters, HELP and TYPE on every
//! family), with a worker, a hosted service and an alert rule in it.
//!
//! promtool and prometheus come from Debian's `prometheus` package; without
//! them those tests print `skipped: …` and pass, unless
//! `AEREKOS_REQUIRE_PROMTOOL=1` (CI), where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Where the files under test are.
fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    fs::read_to_string(deploy(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

/// `promtool` or `prometheus` on the PATH; `None` (after saying so) when it
/// is missing, unless `AEREKOS_REQUIRE_PROMTOOL` is set.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let required =
            std::env::var("AEREKOS_REQUIRE_PROMTOOL").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "{name} is not installed and AEREKOS_REQUIRE_PROMTOOL is set (apt-get install prometheus)"
        );
        eprintln!(
            "skipped: {name} is not installed (apt-get install prometheus; \
             AEREKOS_REQUIRE_PROMTOOL=1 makes this a failure)"
        );
    }
    found
}

/// Runs `cmd`; its output, or a panic with it when it fails.
#[track_caller]
fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Replaces `from` (which must be there) in `text`.
#[track_caller]
fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy/prometheus/prometheus.yml no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// The example `prometheus.yml` made runnable in `dir`: the scrape target
/// `target`, the CA and the bearer token (its commented block switched on)
/// in files there, the rule file next to it, `interval` for scrapes and
/// rule evaluation. Returns the config's path.
fn example_config(dir: &Path, target: &str, ca_pem: &str, token: &str, interval: &str) -> PathBuf {
    fs::copy(
        deploy("prometheus/aerekos.rules.yml"),
        dir.join("aerekos.rules.yml"),
    )
    .unwrap();
    let ca = dir.join("aerekos-ca.pem");
    fs::write(&ca, ca_pem).unwrap();
    let token_file = dir.join("aerekos-metrics-token");
    fs::write(&token_file, token).unwrap();
    let mut text = read("prometheus/prometheus.yml");
    text = replace(
        &text,
        "/etc/prometheus/aerekos-ca.pem",
        ca.to_str().unwrap(),
    );
    text = replace(&text, "    # authorization:\n", "    authorization:\n");
    text = replace(&text, "    #   type: Bearer\n", "      type: Bearer\n");
    text = replace(
        &text,
        "    #   credentials_file: /etc/prometheus/aerekos-metrics-token\n",
        &format!("      credentials_file: {}\n", token_file.display()),
    );
    text = replace(&text, "\"conductor.local:3000\"", &format!("\"{target}\""));
    text = replace(
        &text,
        "scrape_interval: 30s",
        &format!("scrape_interval: {interval}"),
    );
    text = replace(
        &text,
        "evaluation_interval: 30s",
        &format!("evaluation_interval: {interval}"),
    );
    let path = dir.join("prometheus.yml");
    fs::write(&path, text).unwrap();
    path
}

/// A CA certificate (PEM) to stand in for the fleet CA.
fn self_signed_ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn promtool_checks_the_rules_and_the_example_config() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "rules"])
        .arg(deploy("prometheus/aerekos.rules.yml"));
    let out = run_ok(cmd);
    assert!(out.contains("SUCCESS"), "{out}");
    // The example as shipped (its CA file and target are the user's)…
    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "config", "--syntax-only"])
        .arg(deploy("prometheus/prometheus.yml"));
    run_ok(cmd);
    // …and with the files it names present and the token block switched on:
    // then promtool also loads the rule file it lists.
    let dir = tempfile::tempdir().unwrap();
    let config = example_config(
        dir.path(),
        "127.0.0.1:3000",
        &self_signed_ca_pem(),
        "a-metrics-token-of-32-characters",
        "30s",
    );
    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "config"]).arg(&config);
    let out = run_ok(cmd);
    assert!(out.contains("1 rule files found"), "{out}");
}

#[test]
fn every_rule_has_a_unit_test_and_a_readme_row_and_the_unit_tests_pass() {
    // Every alert in the rules file has a unit test and a row in the
    // README's table (this test keeps them in step).
    let rules = read("prometheus/aerekos.rules.yml");
    let tests = read("prometheus/aerekos.rules.test.yml");
    let readme = read("prometheus/README.md");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 13, "{alerts:?}");
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "no unit test for {alert}"
        );
        assert!(
            readme.contains(&format!("| `{alert}` |")),
            "no row for {alert} in deploy/prometheus/README.md"
        );
    }
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut cmd = Command::new(&promtool);
    cmd.args(["test", "rules", "aerekos.rules.test.yml"])
        .current_dir(deploy("prometheus"));
    let out = run_ok(cmd);
    assert!(out.contains("SUCCESS"), "{out}");
}

// ---- What the files reference, and what the conductor exports ----

/// A `metric{label op "value", …}` selector (or a sample's label set).
#[derive(Debug, Default)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// What a PromQL expression uses: its selectors and the label names of its
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` clauses.
#[derive(Debug, Default)]
struct Uses {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A quoted string starting at `s[*i]` (the quote); `*i` ends past it.
fn quoted(s: &[char], i: &mut usize) -> String {
    let q = s[*i];
    let mut out = String::new();
    *i += 1;
    while *i < s.len() && s[*i] != q {
        if s[*i] == '\\' && *i + 1 < s.len() {
            *i += 1;
            out.push(match s[*i] {
                'n' => '\n',
                c => c,
            });
        } else {
            out.push(s[*i]);
        }
        *i += 1;
    }
    *i += 1;
    out
}

fn skip_space(s: &[char], i: &mut usize) {
    while *i < s.len() && s[*i].is_whitespace() {
        *i += 1;
    }
}

fn ident(s: &[char], i: &mut usize) -> String {
    let start = *i;
    while *i < s.len() && is_ident(s[*i]) {
        *i += 1;
    }
    s[start..*i].iter().collect()
}

/// The matchers from `{` (at `s[*i]`) to the closing `}`.
fn matchers(s: &[char], i: &mut usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    *i += 1;
    loop {
        skip_space(s, i);
        match s.get(*i) {
            None => panic!("unclosed selector in {:?}", s.iter().collect::<String>()),
            Some('}') => {
                *i += 1;
                return out;
            }
            Some(',') => *i += 1,
            Some(_) => {
                let name = ident(s, i);
                skip_space(s, i);
                let op_start = *i;
                while *i < s.len() && matches!(s[*i], '=' | '!' | '~') {
                    *i += 1;
                }
                let op: String = s[op_start..*i].iter().collect();
                skip_space(s, i);
                assert!(
                    !name.is_empty() && !op.is_empty() && matches!(s.get(*i), Some('"' | '\'')),
                    "cannot read the selector in {:?}",
                    s.iter().collect::<String>()
                );
                out.push((name, op, quoted(s, i)));
            }
        }
    }
}

/// Reads the selectors and grouping labels of a PromQL expression (enough
/// of PromQL for these files: no nested braces, no comments).
fn promql(expr: &str) -> Uses {
    let s: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut last = String::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if is_ident(c) {
            last = ident(&s, &mut i);
            if matches!(
                last.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                skip_space(&s, &mut i);
                if s.get(i) == Some(&'(') {
                    i += 1;
                    while i < s.len() && s[i] != ')' {
                        let l = ident(&s, &mut i);
                        if l.is_empty() {
                            i += 1;
                        } else {
                            uses.grouping.insert(l);
                        }
                    }
                }
                last.clear();
            }
            continue;
        }
        match c {
            '{' => {
                let metric = std::mem::take(&mut last);
                let matchers = matchers(&s, &mut i);
                uses.selectors.push(Selector { metric, matchers });
                continue;
            }
            '"' | '\'' => {
                quoted(&s, &mut i);
                last.clear();
                continue;
            }
            // `metric {…}` is a selector too.
            c if c.is_whitespace() => {}
            _ => last.clear(),
        }
        i += 1;
    }
    uses
}

/// Every `aerekos_<something>` name in `text` (not inside a longer word).
fn aerekos_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("aerekos_") {
        let inside_word = rest[..at].chars().last().is_some_and(is_ident);
        let tail = &rest[at..];
        let len = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !inside_word && len > "aerekos_".len() {
            out.insert(tail[..len].to_string());
        }
        // The next character, if any, ends an identifier: a match right
        // after it starts a word.
        rest = &tail[len..];
    }
    out
}

/// The `expr:` of every rule in a rule file (a plain scalar on the line, or
/// a `|`/`>` block below it).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else {
            assert!(
                !value.starts_with(['"', '\'']),
                "quoted expr (write it plain or as a block): {line}"
            );
            out.push(value.to_string());
        }
    }
    out
}

/// The exposition: the declared metrics (name → type) and every sample's
/// name and labels.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Selector>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let s: Vec<char> = line.chars().collect();
                let mut i = 0;
                let metric = ident(&s, &mut i);
                let matchers = if s.get(i) == Some(&'{') {
                    matchers(&s, &mut i)
                } else {
                    Vec::new()
                };
                samples.push(Selector { metric, matchers });
            }
        }
        Exposition { types, samples }
    }

    /// A declared metric, or a histogram's/summary's `_bucket`/`_sum`/`_count`.
    fn declares(&self, name: &str) -> bool {
        self.types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    matches!(
                        self.types.get(base).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                })
            })
    }

    fn label_names(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .flat_map(|s| s.matchers.iter().map(|m| m.0.clone()))
            .collect()
    }

    fn has_samples(&self, metric: &str) -> bool {
        self.samples.iter().any(|s| s.metric == metric)
    }

    fn has_value(&self, metric: &str, label: &str, value: &str) -> bool {
        self.samples.iter().any(|s| {
            s.metric == metric && s.matchers.iter().any(|(l, _, v)| l == label && v == value)
        })
    }
}

/// The targets of a Grafana dashboard's panels: (panel title, expr, legend).
fn dashboard_targets(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for t in panel["targets"].as_array().expect("targets") {
            out.push((
                title.clone(),
                t["expr"].as_str().expect("expr").to_string(),
                t["legendFormat"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// `{{name}}` placeholders (legend formats) and `$labels.name` (rule templates).
fn template_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (open, close) in [("{{", "}}"), ("$labels.", " ")] {
        let mut rest = text;
        while let Some(at) = rest.find(open) {
            rest = &rest[at + open.len()..];
            let inner = rest.split(close).next().unwrap_or_default().trim();
            let name: String = inner.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() && !inner.starts_with('$') {
                out.insert(name);
            }
        }
    }
    out
}

/// A conductor, one worker reporting to it and running a hosted service,
/// an alert rule, and the conductor's `/metrics` once all of them show
/// there (so every label is in the text). `args` are extra conductor flags;
/// `token` the `--metrics-token`, if any.
fn fleet(dir: &Path, args: &[&str], token: Option<&str>) -> (Conductor, Worker, String) {
    let c = Conductor::start_with(&dir.join("conductor"), args);
    // A Pi 4 (the fixture's /sys and /proc), so the board series are there.
    let root = pi_host_root("pi4", &dir.join("host"));
    let mut opts = WorkerOpts::named("prom-pi");
    opts.extra = vec!["--host-root".into(), root.display().to_string()];
    let mut w = Worker::start(
        &dir.join("worker"),
        &c.url(),
        Some(&c.registration_token()),
        opts,
    );
    let id = w.wait_id();
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "sleeper", "command": "sleep",
                "args": [format!("3600.{}", std::process::id())]}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = c.put(
        "/api/v1/services/sleeper/deployment",
        &json!({"workers": [id]}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = c.post(
        "/api/v1/alert-rules",
        &json!({"name": "prom-down", "kind": "worker_offline", "for": "1m"}),
    );
    assert_eq!(status, 201, "{body}");
    let text = wait_for(
        "the worker, its service and the rule in /metrics",
        SECS(60),
        || {
            let mut req = http().get(format!("{}/metrics", c.url()));
            if let Some(t) = token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let mut resp = req.call().ok()?;
            let text = resp.body_mut().read_to_string().ok()?;
            (resp.status() == 200
                && text.contains("aerekos_worker_cpu_percent{")
                && text.contains("aerekos_worker_up{")
                && text.contains("aerekos_worker_pi_throttled{")
                && text.contains("aerekos_service_running{")
                && text.contains(&format!(
                    "aerekos_service_running{{worker_id=\"{id}\",service=\"sleeper\"}} 1"
                ))
                && text.contains("aerekos_alerts_firing{"))
            .then_some(text)
        },
    );
    (c, w, text)
}

#[test]
fn the_conductors_metrics_pass_promtool_check_metrics() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_c, _w, text) = fleet(dir.path(), &[], None);
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics on the conductor's /metrics:\n{report}\n--- exposition ---\n{text}"
    );
    // The check is not vacuous: the families a fleet exports are there.
    for family in [
        "aerekos_worker_cpu_percent",
        "aerekos_worker_pi_throttled",
        "aerekos_service_running",
        "aerekos_alerts_firing",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} in:\n{text}"
        );
    }
}

#[test]
fn every_metric_and_label_the_rules_and_the_dashboard_use_is_exported() {
    let rules = read("prometheus/aerekos.rules.yml");
    let rule_tests = read("prometheus/aerekos.rules.test.yml");
    let dash: Value = serde_json::from_str(&read("grafana/aerekos-dashboard.json"))
        .expect("deploy/grafana/aerekos-dashboard.json is JSON");

    // What the files use: (where, names), (where, PromQL), (where, label names).
    let mut names: Vec<(String, BTreeSet<String>)> = vec![
        ("aerekos.rules.yml".into(), aerekos_names(&rules)),
        ("aerekos.rules.test.yml".into(), aerekos_names(&rule_tests)),
    ];
    let mut exprs: Vec<(String, String)> = Vec::new();
    let mut labels: Vec<(String, BTreeSet<String>)> = vec![(
        "aerekos.rules.yml annotations".into(),
        template_labels(&rules),
    )];
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(
        rule_exprs.len(),
        rules.matches("- alert: ").count(),
        "one expr per alert: {rule_exprs:#?}"
    );
    for e in rule_exprs {
        exprs.push(("aerekos.rules.yml".into(), e));
    }
    // Unit-test input series: their label names must be real too.
    for line in rule_tests.lines() {
        if let Some(series) = line.trim().strip_prefix("- series: ") {
            exprs.push((
                "aerekos.rules.test.yml".into(),
                series.trim_matches('\'').to_string(),
            ));
        }
    }
    for (title, expr, legend) in dashboard_targets(&dash) {
        names.push((format!("dashboard panel {title:?}"), aerekos_names(&expr)));
        labels.push((
            format!("dashboard panel {title:?} legend"),
            template_labels(&legend),
        ));
        exprs.push((format!("dashboard panel {title:?}"), expr));
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(def) = var["definition"].as_str() {
            // label_values(metric, label)
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {def}"));
            let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
            names.push((
                format!("dashboard variable {}", var["name"]),
                aerekos_names(metric),
            ));
            labels.push((
                format!("dashboard variable {}", var["name"]),
                BTreeSet::from([label.trim().to_string()]),
            ));
        }
    }
    for (at, expr) in &exprs {
        let uses = promql(expr);
        let mut l: BTreeSet<String> = uses.grouping;
        for s in &uses.selectors {
            l.extend(s.matchers.iter().map(|m| m.0.clone()));
        }
        labels.push((at.clone(), l));
    }
    let all_names: BTreeSet<&String> = names.iter().flat_map(|(_, n)| n).collect();
    for must in [
        "aerekos_worker_up",
        "aerekos_worker_temperature_max_celsius",
        "aerekos_service_running",
        "aerekos_frames_rejected_total",
        "aerekos_tls_certificate_expiry_seconds",
        "aerekos_alerts_firing",
        "aerekos_worker_pi_throttled",
    ] {
        assert!(
            all_names.contains(&must.to_string()),
            "{must} is used nowhere"
        );
    }

    // What a real conductor with a worker exports.
    let dir = tempfile::tempdir().unwrap();
    let (_c, _w, text) = fleet(dir.path(), &[], None);
    let expo = Exposition::parse(&text);
    let exported_labels = expo.label_names();

    let mut missing = Vec::new();
    for (at, set) in &names {
        for n in set {
            if !expo.declares(n) {
                missing.push(format!("{at}: metric {n}"));
            }
        }
    }
    // `job` and `instance` are the labels Prometheus adds to every series.
    for (at, set) in &labels {
        for l in set {
            if !exported_labels.contains(l) && l != "job" && l != "instance" {
                missing.push(format!("{at}: label {l}"));
            }
        }
    }
    // A fixed value (`=`, `!=`) on a metric with samples must be one it has
    // (`reason!="duplicate"`, `status="offline"`). Test inputs are made up.
    for (at, expr) in exprs.iter().filter(|(at, _)| !at.ends_with(".test.yml")) {
        for s in promql(expr).selectors {
            if !s.metric.starts_with("aerekos_") || !expo.has_samples(&s.metric) {
                continue;
            }
            for (l, op, v) in &s.matchers {
                if (op == "=" || op == "!=") && !v.contains('$') && !expo.has_value(&s.metric, l, v)
                {
                    missing.push(format!("{at}: {}{{{l}{op}\"{v}\"}}", s.metric));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the conductor's /metrics:\n  {}\n\n{text}",
        missing.join("\n  ")
    );

    // The dashboard: every panel on the datasource variable, unique ids.
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a datasource variable DS_PROMETHEUS"
    );
    assert!(vars.iter().any(|v| v["name"] == "worker"));
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
    }
}

/// GET `path` on Prometheus's API; `data` of a successful answer.
fn api(base: &str, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
    let mut req = http().get(format!("{base}{path}"));
    for (k, v) in query {
        req = req.query(*k, *v);
    }
    let (status, body) = e2e::read(req.call());
    if status == 200 && body["status"] == "success" {
        Ok(body["data"].clone())
    } else {
        Err(format!("{status} {body}"))
    }
}

#[test]
fn prometheus_scrapes_the_conductor_with_the_example_config() {
    let (Some(_), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = "prometheus-scrape-token-0123456789";
    let (c, _w, text) = fleet(dir.path(), &["--metrics-token", token], Some(token));
    let expo = Exposition::parse(&text);
    let (status, _) = c.get_text("/metrics");
    assert_eq!(status, 401, "/metrics without the token");

    let prom_dir = dir.path().join("prometheus");
    fs::create_dir_all(&prom_dir).unwrap();
    let config = example_config(
        &prom_dir,
        &format!("127.0.0.1:{}", c.http.port()),
        &c.ca_pem(),
        token,
        "1s",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"));
    let p = Proc::spawn(cmd, prom_dir.join("prometheus.log"));
    let base = format!("http://{listen}");

    // Scraped over HTTPS (the fleet CA, the bearer token) a few times.
    let deadline = Instant::now() + SECS(60);
    loop {
        let up = api(
            &base,
            "/api/v1/query",
            &[(
                "query",
                "count_over_time(up{job=\"aerekos\"}[1m]) >= 3 and up{job=\"aerekos\"} == 1",
            )],
        );
        if up
            .as_ref()
            .is_ok_and(|d| d["result"].as_array().is_some_and(|r| r.len() == 1))
        {
            break;
        }
        if Instant::now() > deadline {
            let targets = api(&base, "/api/v1/targets", &[]);
            panic!(
                "Prometheus did not scrape the conductor: {up:?}\ntargets: {targets:?}\n{}",
                p.tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every rule evaluated on real series without an error.
    let rules = wait_for("every rule evaluated", SECS(30), || {
        let data = api(&base, "/api/v1/rules", &[]).ok()?;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    });
    let expected = read("prometheus/aerekos.rules.yml")
        .matches("- alert: ")
        .count();
    assert_eq!(rules.len(), expected, "rules loaded: {rules:#?}");
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }
    // A healthy fleet: nothing fires (WorkerDown, ServiceNotRunning, …).
    let firing = api(
        &base,
        "/api/v1/query",
        &[("query", "ALERTS{alertstate=\"firing\"}")],
    )
    .unwrap();
    assert_eq!(firing["result"], Value::Array(Vec::new()), "{firing}");

    // Every dashboard query answers, with data where the conductor has
    // samples for every metric it uses (no temperature sensor in a VM, no
    // hosted service, no alert rule: those panels may be empty).
    let dash: Value = serde_json::from_str(&read("grafana/aerekos-dashboard.json")).unwrap();
    for (title, expr, _) in dashboard_targets(&dash) {
        let q = expr
            .replace("$worker", ".*")
            .replace("$__rate_interval", "1m");
        let data = api(&base, "/api/v1/query", &[("query", &q)])
            .unwrap_or_else(|e| panic!("panel {title:?}: {q}: {e}"));
        let result = data["result"].as_array().expect("a vector");
        let need_data = aerekos_names(&expr).iter().all(|n| expo.has_samples(n));
        assert!(
            !need_data || !result.is_empty(),
            "panel {title:?}: {q} returned nothing"
        );
    }
    // The worker variable lists the worker.
    let hostnames = api(
        &base,
        "/api/v1/label/hostname/values",
        &[("match[]", "aerekos_worker_up")],
    )
    .unwrap();
    assert_eq!(hostnames, json!(["prom-pi"]));
}
