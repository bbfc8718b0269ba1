//! End-to-end: the conductor's web dashboard in a real headless Chromium,
//! driven over the W3C WebDriver protocol (chromedriver) with a small client
//! below: log in through the form, watch two live workers, a worker page's
//! charts update, rotate the registration token in Settings and enrol with
//! it, create and delete an API token, change the password, log out; then
//! create a process service in the Services form, deploy it to a live
//! worker, stop and start it there, see it on the worker page and undeploy
//! it; follow its log in the log panel (service and worker pages); upload
//! and delete an artifact. A second test drives the Alerts page: add a
//! webhook receiver (its secret shown once), a rule (an invalid one first:
//! the API's refusal is shown), see a worker's offline alert fire and
//! resolve, its notifications, delete the rule. A third drives the Agents
//! page: a release signed with the CLI listed, a bad trial time refused in
//! the page, a real agent rolled out from the form to `updated`, the release
//! deleted. A fourth opens a worker's Shell panel: the terminal emulator on
//! escape sequences, then a real shell typed into (output, colour, resize,
//! Ctrl-C, exit code, Close). Browser console errors fail
//! the tests (except the failed requests they provoke on purpose).
//! Screenshots land in `target/screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them the test fails with the install hint.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::{json, Value};

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// W3C WebDriver's element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

// ---------------------------------------------------------------- WebDriver

/// First existing path among `candidates`, else the first hit on `$PATH`.
fn find_exe(candidates: &[&str], names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = candidates.iter().map(Path::new).find(|p| p.is_file()) {
        return Some(p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

/// A chromedriver process with one headless Chromium session; both end on drop.
struct Browser {
    base: String,
    session: String,
    /// Browser console entries fetched so far.
    console: Vec<Value>,
    _profile: tempfile::TempDir,
    driver: Proc,
}

/// An element reference.
#[derive(Clone)]
struct El(String);

impl Browser {
    /// `trust_spki`: base64 SHA-256 of a certificate's SubjectPublicKeyInfo
    /// (the conductor's fleet CA) whose chains Chromium accepts.
    fn start(width: u32, height: u32, trust_spki: &str) -> Browser {
        let hint = "the dashboard test needs Chromium and its WebDriver: \
                    apt-get install -y chromium chromium-driver (.ci/run installs them)";
        let chrome = find_exe(
            &["/usr/bin/chromium", "/usr/lib/chromium/chromium"],
            &["chromium", "chromium-browser", "google-chrome"],
        )
        .unwrap_or_else(|| panic!("chromium not found; {hint}"));
        let chromedriver = find_exe(&["/usr/bin/chromedriver"], &["chromedriver"])
            .unwrap_or_else(|| panic!("chromedriver not found; {hint}"));

        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn(cmd, profile.path().join("chromedriver.log"));
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to listen", SECS(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            let (_, v) = wd(&base, "GET", "/status", None);
            (v["value"]["ready"] == true).then_some(())
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chrome.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking", "--disable-component-update",
                    format!("--window-size={width},{height}"),
                    format!("--ignore-certificate-errors-spki-list={trust_spki}"),
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let (status, v) = wd(&base, "POST", "/session", Some(caps));
        assert_eq!(
            status,
            200,
            "new WebDriver session: {v}\n{}",
            driver.tail(20)
        );
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            base,
            session,
            console: Vec::new(),
            _profile: profile,
            driver,
        }
    }

    /// A session command; panics on a WebDriver error.
    #[track_caller]
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.session);
        let (status, v) = wd(&self.base, method, &full, body);
        if status != 200 {
            panic!(
                "WebDriver {method} {path}: {status} {v}\n{}",
                self.driver.tail(10)
            );
        }
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    #[track_caller]
    fn find(&self, css: &str) -> El {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        El(v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: {v}"))
            .to_string())
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{}/click", el.0), Some(json!({})));
    }

    /// Empties an input or textarea.
    fn clear(&self, css: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{}/clear", el.0), Some(json!({})));
    }

    /// Types `text` into the element (real key events).
    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({ "text": text })),
        );
    }

    fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.cmd("GET", &format!("/element/{}/text", el.0), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` available) in the page.
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Polls the JS expression `expr` until it is truthy; its value.
    #[track_caller]
    fn wait(&mut self, what: &str, timeout: Duration, expr: &str) -> Value {
        let script = format!("return ({expr});");
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(&script);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                self.fetch_console();
                panic!(
                    "timed out after {timeout:?} waiting for {what} ({expr} = {v})\nconsole: {:#?}\npage: {}",
                    self.console,
                    self.js("return document.body.innerText")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn set_window(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Saves a PNG screenshot under `target/screenshots/`; its path.
    fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let dir = bin_dir()
            .parent()
            .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
            .join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
        path
    }

    /// Drains the browser console log into `self.console` (chromedriver's
    /// `se/log` endpoint, enabled by `goog:loggingPrefs`).
    fn fetch_console(&mut self) {
        let full = format!("/session/{}/se/log", self.session);
        let (status, v) = wd(&self.base, "POST", &full, Some(json!({"type": "browser"})));
        assert_eq!(status, 200, "chromedriver browser log: {v}");
        if let Some(entries) = v["value"].as_array() {
            self.console.extend(entries.iter().cloned());
        }
    }

    /// Drops the console errors Chromium logs for an HTTP error response
    /// (`Failed to load resource: … status of 400`) from a request whose URL
    /// contains `url_part`: the test provoked them on purpose. How many.
    fn forgive_failed_load(&mut self, url_part: &str, status: u16) -> usize {
        self.fetch_console();
        let before = self.console.len();
        let expected = |e: &Value| {
            let msg = e["message"].as_str().unwrap_or_default();
            e["level"] == "SEVERE"
                && msg.contains(url_part)
                && msg.contains(&format!("status of {status}"))
        };
        self.console.retain(|e| !expected(e));
        before - self.console.len()
    }

    /// Console entries at level SEVERE (errors, CSP violations, failed loads).
    fn console_errors(&mut self) -> Vec<Value> {
        self.fetch_console();
        self.console
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .cloned()
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = wd(
            &self.base,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        self.driver.kill9();
    }
}

/// One WebDriver HTTP call: (status, JSON body).
fn wd(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{base}{path}");
    let agent = http();
    let resp = match (method, body) {
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        (_, b) => agent.post(&url).send_json(b.unwrap_or_else(|| json!({}))),
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// Standard base64 (screenshots), padding optional.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            // Truncation intended: the low 8 bits are the decoded byte
            // (older bits stay above them in acc).
            #[allow(clippy::cast_possible_truncation)]
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// -------------------------------------------------------------------- test

/// The harness rebuilds the binaries when Rust sources change; the dashboard
/// files are embedded too, so rebuild the conductor when they are newer.
fn conductor_with_current_assets() {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conductor/assets");
    let newest = std::fs::read_dir(&assets)
        .unwrap()
        .flatten()
        .filter_map(|e| modified(&e.path()))
        .max();
    if newest > modified(&bin("conductor")) {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "conductor", "--bins"]);
        if bin_dir().ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "cargo build -p conductor");
    }
}

/// Kills, on drop, every process whose working directory is under the
/// path: the service a worker started outlives the worker (by design), so a
/// failed run would otherwise leave the `sh` loop behind.
struct KillStrays(PathBuf);

impl Drop for KillStrays {
    fn drop(&mut self) {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in procs.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let under =
                std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&self.0));
            if under && pid != std::process::id() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// What `--ignore-certificate-errors-spki-list` takes: base64 of the
/// SHA-256 of the certificate's SubjectPublicKeyInfo.
fn spki_sha256_base64(cert_pem: &str) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let digest = ring_digest(cert.tbs_certificate.subject_pki.raw);
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in digest.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(B64[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    out
}

fn ring_digest(bytes: &[u8]) -> [u8; 32] {
    protocol::Fingerprint::of_der(bytes).0
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// One browser test at a time: two Chromiums on a small machine would
/// slow each other past the tests' timeouts.
fn one_browser() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn dashboard_in_a_real_browser() {
    let _one = one_browser();
    let started = Instant::now();
    conductor_with_current_assets();
    let dir = tempfile::tempdir().unwrap();
    // Dropped after the workers and before the directory.
    let _strays = KillStrays(dir.path().to_path_buf());
    let mut c = Conductor::start(&dir.path().join("conductor"));
    let old_token = c.registration_token();
    let mut workers: Vec<Worker> = ["pi-alpha", "pi-beta"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut opts = WorkerOpts::named(name);
            opts.interval_ms = 500;
            opts.extra = vec!["--label".into(), format!("rack=r{i}")];
            Worker::start(&dir.path().join(name), &c.url(), Some(&old_token), opts)
        })
        .collect();
    let ids: Vec<String> = workers.iter_mut().map(|w| w.wait_id()).collect();
    for id in &ids {
        wait_for("worker online", SECS(20), || {
            (c.status_of(id) == "online").then_some(())
        });
    }

    // Over HTTPS: the browser trusts the conductor's fleet CA (by its key).
    let base = c.https_url();
    let agent = https(&c.ca_pem());
    // The page and its files: types, caching, a strict CSP, HSTS.
    let page = agent.get(&base).call().unwrap();
    assert!(header(&page, "strict-transport-security").contains("max-age"));
    assert_eq!(page.status(), 200);
    assert!(header(&page, "content-type").starts_with("text/html"));
    assert_eq!(header(&page, "cache-control"), "no-cache");
    let csp = header(&page, "content-security-policy");
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let etag = header(&page, "etag");
    let again = agent
        .get(&base)
        .header("If-None-Match", &etag)
        .call()
        .unwrap();
    assert_eq!(again.status(), 304);
    let js = agent.get(format!("{base}/assets/app.js")).call().unwrap();
    assert!(header(&js, "content-type").starts_with("text/javascript"));

    let mut b = Browser::start(1280, 900, &spki_sha256_base64(&c.ca_pem()));
    b.goto(&base);

    // Login form.
    b.wait(
        "the login form",
        SECS(10),
        "!document.querySelector('#login-view').hidden",
    );
    b.screenshot("login");
    b.type_into("#login-pass", ADMIN_PASSWORD);
    b.click("#login-form button[type=submit]");

    // Fleet: both workers online, with sparklines filling up.
    b.wait(
        "two online workers",
        SECS(15),
        "document.querySelectorAll('.card[data-status=online]').length === 2",
    );
    assert_eq!(b.text("#count-online"), "2");
    assert_eq!(b.text("#count-offline"), "0");
    b.wait(
        "sparklines with history",
        SECS(10),
        "[...document.querySelectorAll('.card [data-spark=cpu]')].every(s => +s.dataset.points >= 3)",
    );
    let names =
        b.js("return [...document.querySelectorAll('.card .name')].map(a => a.textContent)");
    assert_eq!(names, json!(["pi-alpha", "pi-beta"]));
    let card = b.text(".card[data-id] .meta");
    assert!(card.contains("seen"), "{card}");
    b.screenshot("fleet");

    // Search and label filter.
    b.type_into("#f-q", "beta");
    b.wait(
        "search narrows to one card",
        SECS(5),
        "[...document.querySelectorAll('.card')].filter(c => !c.hidden).map(c => c.querySelector('.name').textContent).join() === 'pi-beta'",
    );
    b.type_into("#f-q", "\u{E003}\u{E003}\u{E003}\u{E003}");
    b.wait(
        "search cleared",
        SECS(5),
        "[...document.querySelectorAll('.card')].filter(c => !c.hidden).length === 2",
    );
    b.js("const s = document.querySelector('#f-label'); s.value = 'rack=r0'; s.dispatchEvent(new Event('change')); return true");
    b.wait(
        "label filter narrows to one card",
        SECS(5),
        "[...document.querySelectorAll('.card')].filter(c => !c.hidden).map(c => c.querySelector('.name').textContent).join() === 'pi-alpha'",
    );
    b.js("const s = document.querySelector('#f-label'); s.value = ''; s.dispatchEvent(new Event('change')); return true");

    // Worker page, opened with the keyboard (Enter on the link).
    b.type_into(&format!(".card[data-id='{}'] a.name", ids[0]), "\u{E007}");
    b.wait(
        "the worker page",
        SECS(10),
        "document.querySelector('#w-name') && document.querySelector('#w-name').textContent === 'pi-alpha'",
    );
    assert!(b
        .js("return location.hash")
        .as_str()
        .unwrap()
        .ends_with(&ids[0]));
    let first = b.wait(
        "the CPU chart drawn",
        SECS(10),
        "+document.querySelector('[data-chart=cpu]').dataset.points >= 3 && document.querySelector('[data-chart=cpu]').dataset.last",
    );
    let t0 = Instant::now();
    b.wait(
        "the CPU chart to update",
        SECS(8),
        &format!("document.querySelector('[data-chart=cpu]').dataset.last !== {first}"),
    );
    println!("chart updated {:?} after first draw", t0.elapsed());
    for chart in ["cores", "mem", "disk", "net"] {
        let n = b.js(&format!(
            "return document.querySelectorAll('[data-chart={chart}] path').length"
        ));
        assert!(n.as_u64().unwrap() >= 1, "{chart} chart has no line");
    }
    let inv = b.text("#w-inv");
    assert!(
        inv.contains("Architecture") && inv.contains(&ids[0]),
        "{inv}"
    );
    assert!(b.text("#w-labels").contains("rack=r0"));
    b.screenshot("worker");

    // History ranges from the stored series.
    b.click("[data-range=h1]");
    b.wait(
        "1 h range (raw)",
        SECS(8),
        "document.querySelector('[data-range=h1]').getAttribute('aria-pressed') === 'true' && +document.querySelector('[data-chart=cpu]').dataset.points >= 3",
    );
    b.click("[data-range=h24]");
    b.wait(
        "24 h range (minute aggregates)",
        SECS(8),
        "document.querySelector('#w-res').textContent.includes('minute') && +document.querySelector('[data-chart=cpu]').dataset.points >= 1",
    );
    b.click("[data-range=live]");

    // Settings: rotate the registration token, see it once, enrol with it.
    b.click("[data-nav=settings]");
    b.wait(
        "settings",
        SECS(10),
        "document.querySelector('#rotate-reg') && document.querySelector('#reg-created').textContent !== '…'",
    );
    b.click("#rotate-reg");
    b.click("#rotate-confirm");
    let token = b.wait(
        "the new registration token",
        SECS(10),
        "document.querySelector('#reg-token') && document.querySelector('#reg-token').value",
    );
    let token = token.as_str().unwrap().to_string();
    assert_ne!(token, old_token);
    let cmd = b.text("#enrol-cmd");
    assert_eq!(
        cmd,
        format!("edge-worker --conductor {base} --token {token}")
    );
    let (status, body) = c.post(
        "/api/v1/enroll",
        &json!({"token": token, "hostname": "pi-from-ui", "machine_id": "ui-1"}),
    );
    assert_eq!(status, 200, "enrol with the token the UI showed: {body}");
    let (status, _) = c.post(
        "/api/v1/enroll",
        &json!({"token": old_token, "hostname": "pi-old", "machine_id": "ui-2"}),
    );
    assert_eq!(status, 401, "the rotated-out token no longer enrols");

    // API tokens: create (shown once, works), delete (stops working).
    b.type_into("#token-name", "ci-script");
    b.click("#token-form button[type=submit]");
    let api_token = b.wait(
        "the new API token",
        SECS(10),
        "document.querySelector('#new-token') && document.querySelector('#new-token').value",
    );
    let api_token = api_token.as_str().unwrap().to_string();
    let bearer = |t: &str| {
        http()
            .get(format!("{}/api/v1/workers", c.url()))
            .header("Authorization", format!("Bearer {t}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(bearer(&api_token), 200);
    b.wait(
        "the token listed",
        SECS(5),
        "document.querySelector('#tokens-body').textContent.includes('ci-script')",
    );
    b.js("window.scrollTo(0, 0); return true");
    b.screenshot("settings");
    b.click("#tokens-body button.danger");
    b.wait(
        "the token gone",
        SECS(5),
        "!document.querySelector('#tokens-body').textContent.includes('ci-script')",
    );
    assert_eq!(bearer(&api_token), 401);

    // Phone width: no horizontal scrolling, cards in one column.
    b.goto(&format!("{base}/#/"));
    b.set_window(390, 844);
    b.wait(
        "the fleet at phone width",
        SECS(10),
        "window.innerWidth <= 420 && document.querySelectorAll('.card').length === 3",
    );
    std::thread::sleep(Duration::from_millis(300));
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "horizontal overflow at phone width: {overflow}px"
    );
    b.screenshot("fleet-phone");
    b.click(&format!(".card[data-id='{}'] a.name", ids[1]));
    b.wait(
        "the worker page at phone width",
        SECS(10),
        "+(document.querySelector('[data-chart=cpu]') || {dataset: {}}).dataset.points >= 3",
    );
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "horizontal overflow of the worker page at phone width: {overflow}px"
    );
    b.screenshot("worker-phone");
    b.set_window(1280, 900);

    // Change the password in Settings, log out, log in with the new one.
    let new_password = "a-new-password-42";
    b.click("[data-nav=settings]");
    b.wait(
        "settings",
        SECS(10),
        "!!document.querySelector('#password-form')",
    );
    b.type_into("#pw-current", ADMIN_PASSWORD);
    b.type_into("#pw-new", new_password);
    b.type_into("#pw-again", new_password);
    b.click("#password-form button[type=submit]");
    b.wait(
        "password changed",
        SECS(10),
        "document.querySelector('#pw-msg').textContent.includes('Password changed')",
    );
    b.click("#logout");
    b.wait(
        "the login form after logout",
        SECS(10),
        "!document.querySelector('#login-view').hidden && document.querySelector('#top').hidden",
    );
    b.type_into("#login-pass", new_password);
    b.click("#login-form button[type=submit]");
    b.wait(
        "back on the settings page after logging in with the new password",
        SECS(10),
        "!document.querySelector('#view').hidden && !!document.querySelector('#password-form')",
    );

    // Log out: the cookie is gone, a reload shows the login form.
    b.click("#logout");
    b.wait(
        "the login form after logout",
        SECS(10),
        "!document.querySelector('#login-view').hidden",
    );
    b.goto(&base);
    b.wait(
        "the login form after a reload",
        SECS(10),
        "!document.querySelector('#login-view').hidden && document.querySelector('#view').hidden",
    );

    // Services: sign in again, create a process service through the form.
    b.type_into("#login-pass", new_password);
    b.click("#login-form button[type=submit]");
    b.wait(
        "signed in again",
        SECS(10),
        "!document.querySelector('#view').hidden",
    );
    // The password change ended the harness's API session too.
    let (status, body) = c.post(
        "/api/v1/login",
        &json!({"username": "admin", "password": new_password}),
    );
    assert_eq!(status, 200, "{body}");
    c.admin = body["token"].as_str().unwrap().to_string();
    b.click("[data-nav=services]");
    b.wait(
        "the services page",
        SECS(10),
        "(document.querySelector('#services-list') || {dataset: {}}).dataset.loaded === '1'",
    );
    assert!(b.text("#svc-empty").contains("No services"));

    // Artifacts: upload a file with the form (WebDriver types its path into
    // the file input); listed with the sha256 the API computed; offered in
    // the new-service form; deleted.
    let file = dir.path().join("hello-artifact.bin");
    std::fs::write(&file, b"#!/bin/sh\necho hello from an artifact\n").unwrap();
    b.type_into("#art-file", &file.display().to_string());
    b.type_into("#art-arch", "aarch64");
    b.type_into("#art-name", "hello");
    b.click("#art-upload");
    let sha = wait_for("the artifact stored", SECS(10), || {
        let (_, body) = c.get("/api/v1/artifacts");
        body["artifacts"][0]["sha256"].as_str().map(str::to_string)
    });
    b.wait(
        "the artifact listed with its sha256",
        SECS(10),
        &format!("(document.querySelector(\"tr[data-sha='{sha}'] td.sha\") || {{}}).textContent === '{sha}'"),
    );
    let listed = b.text(&format!("tr[data-sha='{sha}']"));
    assert!(
        listed.contains("hello") && listed.contains("aarch64"),
        "{listed}"
    );
    assert_eq!(
        b.js(&format!(
            "return !!document.querySelector(\"#sf-art-aarch64 option[value='{sha}']\")"
        )),
        json!(true),
        "the artifact is offered in the new-service form"
    );
    b.js("document.querySelector('#art-h').scrollIntoView(); return true");
    b.screenshot("artifacts");
    b.click(&format!("tr[data-sha='{sha}'] button.danger"));
    b.wait(
        "the artifact deleted",
        SECS(10),
        "!document.querySelector('tr[data-sha]') && document.querySelector('#art-empty').textContent !== ''",
    );
    let (_, body) = c.get("/api/v1/artifacts");
    assert_eq!(body["artifacts"], json!([]), "{body}");
    b.js("window.scrollTo(0, 0); return true");

    // A process service whose command prints a line every 0.3 s.
    b.click("#new-service");
    assert_eq!(b.js("return document.activeElement.id"), json!("sf-name"));
    b.type_into("#sf-name", "ui-tick");
    b.type_into("#sf-command", "sh");
    b.type_into(
        "#sf-args",
        "-c\nwhile true; do echo tick-$(date +%s); sleep 0.3; done",
    );
    // A health check path without the leading /: the API's refusal is shown in the page.
    let health = |kind: &str| {
        format!("const s = document.querySelector('#sf-hc'); s.value = '{kind}'; s.dispatchEvent(new Event('change', {{bubbles: true}})); return true")
    };
    b.js(&health("http"));
    b.type_into("#sf-hport", "8080");
    b.clear("#sf-hpath");
    b.type_into("#sf-hpath", "healthz");
    b.click("#svc-form button[type=submit]");
    b.wait(
        "the API error shown in the form",
        SECS(10),
        "document.querySelector('#sf-error').textContent.includes('health path must start with /')",
    );
    b.screenshot("service-form");
    std::thread::sleep(Duration::from_millis(300)); // let the failed load reach the log
    assert_eq!(b.forgive_failed_load("/api/v1/services ", 400), 1);
    b.js(&health(""));
    assert_eq!(
        b.js("return document.querySelector('#sf-hport').closest('.field').hidden"),
        json!(true)
    );
    b.type_into("#sf-env", "GREETING=hello\nMODE=ui");
    b.type_into("#sf-config", "threshold=5");
    b.type_into("#sf-secrets", "API_KEY=hunter2-secret");
    b.click("#svc-form button[type=submit]");
    b.wait(
        "the new service's page with the fleet to choose from",
        SECS(10),
        "location.hash === '#/services/ui-tick' && document.querySelectorAll('input[name=deploy-worker]').length === 3",
    );
    let (status, body) = c.get("/api/v1/services/ui-tick");
    assert_eq!(status, 200, "{body}");
    let spec = &body["versions"][0]["spec"];
    assert_eq!(spec["command"], "sh");
    assert_eq!(
        spec["args"],
        json!([
            "-c",
            "while true; do echo tick-$(date +%s); sleep 0.3; done"
        ])
    );
    assert_eq!(spec["env"], json!({"GREETING": "hello", "MODE": "ui"}));
    assert_eq!(spec["config"], json!({"threshold": "5"}));
    assert_eq!(spec["secrets"], json!(["API_KEY"]));
    assert!(spec["limits"].is_null(), "no limits: {spec}");
    assert!(b.text("#s-rows-empty").contains("Not deployed"));
    b.wait(
        "the spec shown",
        SECS(5),
        "document.querySelector('#s-spec').textContent.includes('API_KEY')",
    );
    let shown = b.text("#s-spec");
    for want in ["process", "threshold", "Health check\nnone", "Limits\nnone"] {
        assert!(shown.contains(want), "{want:?} not in the spec: {shown}");
    }
    assert!(
        !b.text("body").contains("hunter2"),
        "a secret value is shown"
    );
    assert!(b.text("#s-ro").contains("no rollout yet"));

    // Deploy it to pi-alpha with the form; the page shows it running there.
    let row = format!("tr[data-worker='{}']", ids[0]);
    let state_is = |state: &str| {
        format!(
            "((document.querySelector(\"{row} [data-col=state]\") || {{}}).textContent || '') === '{state}'"
        )
    };
    b.click(&format!("input[name=deploy-worker][value='{}']", ids[0]));
    b.click("#deploy");
    let t0 = Instant::now();
    b.wait(
        "ui-tick running on pi-alpha",
        SECS(20),
        &state_is("running"),
    );
    println!("deployed and running after {:?}", t0.elapsed());
    b.wait(
        "in sync, 1/1 running",
        SECS(5),
        "document.querySelector('#s-badge').textContent === 'in sync' && document.querySelector('#s-count').textContent === '1/1 running'",
    );
    let pid = b.text(&format!("{row} [data-col=pid]"));
    assert!(pid.parse::<u32>().is_ok(), "pid shown: {pid:?}");
    assert!(b
        .text(&format!("{row} [data-col=worker]"))
        .contains("pi-alpha"));

    // Stop it there, then start it again from the keyboard (Enter on the button).
    b.click(&format!("{row} button[data-op=stop]"));
    b.wait("ui-tick stopped", SECS(10), &state_is("stopped"));
    assert!(b.text("#s-op").contains("Stop ui-tick on pi-alpha: ok"));
    b.wait(
        "in sync: a stop by request is kept for that worker",
        SECS(5),
        &format!("document.querySelector('#s-badge').textContent === 'in sync' && document.querySelector('#s-count').textContent === '0/1 running, 1 stopped by request' && document.querySelector(\"{row} [data-col=desired]\").textContent === 'stopped v1'"),
    );
    b.type_into(&format!("{row} button[data-op=start]"), "\u{E007}");
    b.wait("ui-tick running again", SECS(10), &state_is("running"));
    b.wait(
        "in sync again",
        SECS(5),
        "document.querySelector('#s-badge').textContent === 'in sync' && document.querySelector('#s-count').textContent === '1/1 running'",
    );
    assert_eq!(
        b.js("return document.activeElement.dataset.op || ''"),
        json!("start"),
        "focus stays on the button across refreshes"
    );
    b.js("window.scrollTo(0, 0); return true");
    b.screenshot("service");

    // Its log: the panel shows the output and keeps following it.
    b.click(&format!("{row} button[data-log]"));
    let t0 = Instant::now();
    b.wait(
        "log lines in the panel",
        SECS(15),
        "!document.querySelector('#log-panel').hidden && document.querySelector('#log-text').textContent.includes('tick-')",
    );
    println!("first log lines after {:?}", t0.elapsed());
    let ticks = "document.querySelector('#log-text').textContent.split('\\n').filter(l => l.startsWith('tick-')).length";
    let n0 = b.js(&format!("return {ticks}")).as_u64().unwrap();
    std::thread::sleep(SECS(2));
    b.wait(
        "new log lines (follow)",
        SECS(5),
        &format!("{ticks} >= {n0} + 3"),
    );
    assert_eq!(b.text("#log-state"), "following");
    assert_eq!(b.text("#log-error"), "");
    b.screenshot("service-logs");
    b.set_window(390, 844);
    std::thread::sleep(Duration::from_millis(500));
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "horizontal overflow of the log panel at phone width: {overflow}px"
    );
    b.js("document.querySelector('#log-panel').scrollIntoView(); return true");
    b.screenshot("service-logs-phone");
    b.set_window(1280, 900);
    b.type_into("#log-close", "\u{E007}"); // Enter
    assert_eq!(
        b.js("return document.querySelector('#log-panel').hidden && document.activeElement.dataset.log"),
        json!(ids[0]),
        "closed, focus back on the Logs button"
    );

    // The list: placement and desired vs actual.
    b.click("[data-nav=services]");
    b.wait(
        "the service card",
        SECS(10),
        "(document.querySelector('[data-service=ui-tick] [data-f=sync]') || {}).textContent === 'in sync'",
    );
    let card = b.text("[data-service=ui-tick]");
    for want in ["v1", "process", "sh -c", "workers pi-alpha", "1/1 running"] {
        assert!(card.contains(want), "{want:?} not in the card: {card}");
    }
    b.screenshot("services");

    // The worker page lists it.
    b.goto(&format!("{base}/#/workers/{}", ids[0]));
    b.wait(
        "the worker's services",
        SECS(10),
        "!!document.querySelector('#w-svc-rows [data-service=ui-tick] .badge.running')",
    );
    b.click("#w-svc-rows [data-service=ui-tick] button[data-log]");
    b.wait(
        "the log tail on the worker page",
        SECS(15),
        "document.querySelector('#log-text').textContent.includes('tick-')",
    );
    b.js("document.querySelector('#w-services').scrollIntoView(); return true");
    b.screenshot("worker-services");
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "horizontal overflow of the worker page with its log: {overflow}px"
    );
    b.click("#log-close");

    // Rotate the worker's secret from its page: the worker confirms, keeps
    // reporting under the new secret, and its service keeps running.
    let secret_before = workers[0].secret();
    b.click("#rotate-secret");
    b.wait(
        "the rotation confirmed",
        SECS(15),
        "document.querySelector('#rotate-result').textContent === 'secret rotated'",
    );
    assert_ne!(
        workers[0].secret(),
        secret_before,
        "the worker stored a new secret"
    );
    let seq = |c: &Conductor| c.worker(&ids[0])["metrics"]["seq"].as_u64().unwrap_or(0);
    let before = seq(&c);
    wait_for("frames under the new secret", SECS(15), || {
        (seq(&c) > before + 2).then_some(())
    });
    assert_eq!(
        c.rejected("bad_tag"),
        0.0,
        "nothing refused across the rotation"
    );

    // Phone width: the list and the service page without horizontal scrolling.
    b.set_window(390, 844);
    for (hash, ready, shot) in [
        (
            "#/services",
            "(document.querySelector('[data-service=ui-tick] [data-f=sync]') || {}).textContent === 'in sync'",
            "services-phone",
        ),
        ("#/services/ui-tick", &*state_is("running"), "service-phone"),
    ] {
        b.goto(&format!("{base}/{hash}"));
        b.wait(
            &format!("{hash} at phone width"),
            SECS(10),
            &format!("window.innerWidth <= 420 && {ready}"),
        );
        std::thread::sleep(Duration::from_millis(300));
        let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
        assert!(
            overflow.as_i64().unwrap() <= 0,
            "horizontal overflow of {hash} at phone width: {overflow}px"
        );
        b.screenshot(shot);
    }
    b.set_window(1280, 900);

    // Roll out version 2 (stored through the API) from the page: one canary,
    // 1 s settle; the rollout and its history are shown.
    let (status, body) = c.post(
        "/api/v1/services",
        &json!({"name": "ui-tick", "command": "sh",
                "args": ["-c", "while true; do echo tick-$(date +%s); sleep 0.3; done"],
                "env": {"GREETING": "hello", "MODE": "v2"}, "secrets": {"API_KEY": "hunter2-secret"}}),
    );
    assert_eq!(status, 201, "{body}");
    b.wait(
        "v2 offered for a rollout",
        SECS(10),
        "document.querySelector('#ro-version').value === '2'",
    );
    b.clear("#ro-settle");
    b.type_into("#ro-settle", "1");
    b.click("#ro-start");
    let t0 = Instant::now();
    b.wait(
        "the rollout succeeded",
        SECS(40),
        "document.querySelector('#s-ro').textContent.includes('succeeded') && document.querySelectorAll('#ro-rows tr').length === 1",
    );
    println!("rollout v1 → v2 succeeded after {:?}", t0.elapsed());
    assert!(b.text("#s-ro").contains("v1 → v2"), "{}", b.text("#s-ro"));
    b.wait(
        "v2 running on pi-alpha",
        SECS(10),
        &format!(
            "{} && document.querySelector(\"{row} [data-col=version]\").textContent === 'v2'",
            state_is("running")
        ),
    );
    b.js("document.querySelector('#ro-h').scrollIntoView(); return true");
    b.screenshot("service-rollout");

    // Undeploy through the UI: gone from the worker per the JSON API.
    b.click("#undeploy");
    b.click("#undeploy-confirm");
    b.wait(
        "the page shows it undeployed",
        SECS(20),
        &format!(
            "!document.querySelector(\"{row}\") && document.querySelector('#s-rows-empty').textContent.includes('Not deployed')"
        ),
    );
    wait_for("ui-tick gone from pi-alpha", SECS(20), || {
        let (status, body) = c.get(&format!("/api/v1/workers/{}/services", ids[0]));
        assert_eq!(status, 200, "{body}");
        let names: Vec<&str> = body["services"]
            .as_array()?
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        (!names.contains(&"ui-tick")).then_some(())
    });
    let (_, body) = c.get("/api/v1/services/ui-tick");
    assert!(body["deployment"].is_null(), "{body}");

    // "New version…" opens the form filled in with the current spec.
    b.click("#new-version");
    b.wait(
        "the form prefilled for a new version",
        SECS(10),
        "!document.querySelector('#svc-form').hidden && document.querySelector('#sf-name').value === 'ui-tick'",
    );
    assert_eq!(
        b.js("return ['sf-command', 'sf-args', 'sf-env', 'sf-config', 'sf-secrets'].map(id => document.getElementById(id).value)"),
        json!([
            "sh",
            "-c\nwhile true; do echo tick-$(date +%s); sleep 0.3; done",
            "GREETING=hello\nMODE=v2",
            "",
            ""
        ])
    );
    assert!(b.text("#sf-secrets-hint").contains("API_KEY"));

    let errors = b.console_errors();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    println!(
        "dashboard test: {} console entries, 0 errors, {:?}",
        b.console.len(),
        started.elapsed()
    );
}

/// A browser signed in as admin through the login form shown at `route`
/// (`#/`, `#/alerts`), once the page's `ready` expression holds.
fn signed_in_at(c: &Conductor, route: &str, ready: &str) -> Browser {
    let mut b = Browser::start(1280, 900, &spki_sha256_base64(&c.ca_pem()));
    b.goto(&format!("{}/{route}", c.https_url()));
    b.wait(
        "the login form",
        SECS(10),
        "!document.querySelector('#login-view').hidden",
    );
    b.type_into("#login-pass", ADMIN_PASSWORD);
    b.click("#login-form button[type=submit]");
    b.wait(&format!("the page at {route}"), SECS(10), ready);
    b
}

/// A browser signed in as admin through the login form shown on
/// `#/<page>`, once that page (its root `#<page>`) has loaded and its nav
/// link is the current one.
fn signed_in_on(c: &Conductor, page: &str) -> Browser {
    let loaded =
        format!("(document.querySelector('#{page}') || {{dataset: {{}}}}).dataset.loaded === '1'");
    let b = signed_in_at(c, &format!("#/{page}"), &loaded);
    assert_eq!(
        b.js(&format!(
            "return document.querySelector('[data-nav={page}]').getAttribute('aria-current')"
        )),
        json!("page")
    );
    b
}

#[test]
fn alerts_page_in_a_real_browser() {
    let _one = one_browser();
    let started = Instant::now();
    conductor_with_current_assets();
    let dir = tempfile::tempdir().unwrap();
    let _strays = KillStrays(dir.path().to_path_buf());
    let c = Conductor::start_with_env(
        &dir.path().join("conductor"),
        &["--default-interval-ms", "300"],
        &[("AEREKOS_ALERT_INTERVAL", "200ms")],
    );
    let mut w = Worker::start(
        &dir.path().join("pi-alert"),
        &c.url(),
        Some(&c.registration_token()),
        WorkerOpts::named("pi-alert"),
    );
    let id = w.wait_id();
    wait_for("worker online", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });

    // Sign in on #/alerts: the page opens after the login.
    let mut b = signed_in_on(&c, "alerts");
    let loaded = "(document.querySelector('#alerts') || {dataset: {}}).dataset.loaded === '1'";
    assert_eq!(b.text("#al-count"), "0 firing");
    assert!(b.text("#al-fire-empty").contains("Nothing is firing"));
    assert!(b.text("#ar-empty").contains("No rules"));

    // A receiver nobody listens on (its notifications show the failed
    // attempts). The secret is shown once, never in the list.
    let hook = format!("http://127.0.0.1:{}/hook", free_port());
    b.type_into("#rc-name", "ops");
    b.type_into("#rc-url", &hook);
    b.click("#rc-add");
    let secret = b.wait(
        "the receiver's secret",
        SECS(10),
        "document.querySelector('#rc-secret') && document.querySelector('#rc-secret').value",
    );
    let secret = secret.as_str().unwrap().to_string();
    assert!(secret.len() >= 32, "a generated secret: {secret:?}");
    assert!(
        b.text("#rc-secret-note")
            .contains("will not be shown again"),
        "{}",
        b.text("#rc-secret-note")
    );
    b.wait(
        "the receiver listed",
        SECS(10),
        &format!("document.querySelector('#rc-rows').textContent.includes('{hook}')"),
    );
    let in_list = format!("document.querySelector('#rc').textContent.includes('{secret}')");
    assert_eq!(b.js(&format!("return {in_list}")), json!(false));
    let (_, listed) = c.get("/api/v1/alert-receivers");
    assert!(!listed.to_string().contains(&secret), "{listed}");
    b.screenshot("alerts-receiver");

    // The rule form shows the fields of the chosen kind.
    let kind = |k: &str| {
        format!("const s = document.querySelector('#ar-kind'); s.value = '{k}'; s.dispatchEvent(new Event('change', {{bubbles: true}})); return true")
    };
    let hidden = |id: &str| {
        b.js(&format!(
            "return document.querySelector('#{id}').closest('.field').hidden"
        ))
    };
    b.js(&kind("metric_above"));
    assert_eq!(
        (hidden("ar-threshold"), hidden("ar-service")),
        (json!(false), json!(true))
    );
    b.js(&kind("service_failed"));
    assert_eq!(
        (hidden("ar-threshold"), hidden("ar-service")),
        (json!(true), json!(false))
    );
    b.js(&kind("worker_offline"));

    // An invalid rule: the API's 400 message is shown in the form.
    b.type_into("#ar-name", "down");
    b.type_into("#ar-for", "soon");
    b.click("#ar-add");
    b.wait(
        "the API's refusal shown",
        SECS(10),
        "document.querySelector('#ar-error').textContent.includes('not a duration')",
    );
    let refusal = b.text("#ar-error");
    assert!(
        refusal.starts_with("Rule not added: ") && refusal.contains("soon"),
        "{refusal}"
    );
    b.screenshot("alerts-rule-error");
    std::thread::sleep(Duration::from_millis(300)); // let the failed load reach the log
    assert_eq!(b.forgive_failed_load("/api/v1/alert-rules ", 400), 1);
    let (_, rules) = c.get("/api/v1/alert-rules");
    assert_eq!(rules["rules"], json!([]), "nothing stored: {rules}");

    // Fixed: stored and listed, the form emptied.
    b.clear("#ar-for");
    b.type_into("#ar-for", "1s");
    b.click("#ar-add");
    b.wait(
        "the rule listed",
        SECS(10),
        "(document.querySelector('#ar-rows tr[data-rule] [data-col=name]') || {}).textContent === 'down'",
    );
    assert_eq!(b.text("#ar-error"), "");
    assert_eq!(
        b.js("return document.querySelector('#ar-name').value"),
        json!("")
    );
    let row = b.text("#ar-rows tr[data-rule]");
    assert!(
        row.contains("worker offline") && row.contains("1s"),
        "{row}"
    );
    let (_, rules) = c.get("/api/v1/alert-rules");
    assert_eq!(rules["rules"][0]["for"], json!("1s"), "{rules}");

    // The worker dies: the alert fires and is shown.
    w.proc.kill9();
    let t0 = Instant::now();
    b.wait(
        "the alert firing",
        SECS(20),
        "[...document.querySelectorAll('#al-fire-rows tr[data-state=firing]')].some(r => r.querySelector('[data-col=summary]').textContent.includes('pi-alert'))",
    );
    println!("alert shown firing {:?} after the kill", t0.elapsed());
    assert_eq!(b.text("#al-count"), "1 firing");
    let fired = b.text("#al-fire-rows tr[data-alert]");
    assert!(
        fired.contains("down") && fired.contains("pi-alert") && fired.contains("ago"),
        "{fired}"
    );
    let alert_id = b
        .js("return document.querySelector('#al-fire-rows tr[data-alert]').dataset.alert")
        .as_str()
        .unwrap()
        .to_string();

    // Its notifications: the receiver, the attempts, the last error.
    b.js("window.scrollTo(0, 0); return true"); // not under the sticky header
    b.click("#al-fire-rows tr[data-alert] button[data-alert]");
    b.wait(
        "the notification with its failed attempts",
        SECS(15),
        "!document.querySelector('#al-detail').hidden && [...document.querySelectorAll('#al-notes-rows tr')].some(r => r.textContent.includes('ops') && r.querySelector('[data-col=delivery]').textContent.startsWith('not delivered: '))",
    );
    assert_eq!(
        b.js("return document.activeElement.id"),
        json!("al-detail-h")
    );
    assert!(b.text("#al-detail-kv").contains("firing"));
    b.screenshot("alerts-firing");

    // The worker comes back: the alert moves to the history, resolved.
    w.restart();
    let t0 = Instant::now();
    b.wait(
        "the alert resolved in the history",
        SECS(20),
        &format!("!document.querySelector('#al-fire-rows tr') && (document.querySelector(\"#al-hist-rows tr[data-alert='{alert_id}'][data-state=resolved] [data-col=resolved]\") || {{}}).textContent.includes('condition cleared')"),
    );
    println!("alert shown resolved {:?} after the restart", t0.elapsed());
    assert_eq!(b.text("#al-count"), "0 firing");
    b.wait(
        "the open alert's two notifications",
        SECS(10),
        "document.querySelector('#al-detail-kv').textContent.includes('resolved') && document.querySelectorAll('#al-notes-rows tr').length === 2",
    );
    assert_eq!(
        b.js(&format!(
            "return document.querySelector(\"#al-hist-rows tr[data-alert='{alert_id}']\").classList.contains('sel')"
        )),
        json!(true)
    );
    b.screenshot("alerts-resolved");

    // Delete the rule.
    b.click("#ar-rows tr[data-rule] button.danger");
    b.wait(
        "the rule gone",
        SECS(10),
        "!document.querySelector('#ar-rows tr') && document.querySelector('#ar-empty').textContent.includes('No rules')",
    );
    let (_, rules) = c.get("/api/v1/alert-rules");
    assert_eq!(rules["rules"], json!([]), "{rules}");

    // Back on the page later: the receiver is listed, its secret nowhere.
    b.click("[data-nav=fleet]");
    b.wait(
        "the fleet page",
        SECS(10),
        "!!document.querySelector('.card')",
    );
    b.click("[data-nav=alerts]");
    b.wait(
        "the alerts page again",
        SECS(10),
        &format!("{loaded} && document.querySelector('#rc-rows').textContent.includes('ops')"),
    );
    assert_eq!(
        b.js(&format!(
            "return document.documentElement.outerHTML.includes('{secret}')"
        )),
        json!(false),
        "the secret is shown once"
    );
    assert!(b.text("#al-hist-rows").contains("pi-alert"));

    // Phone width: no horizontal scrolling.
    b.set_window(390, 844);
    std::thread::sleep(Duration::from_millis(300));
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "horizontal overflow of the alerts page at phone width: {overflow}px"
    );
    b.screenshot("alerts-phone");
    b.set_window(1280, 900);

    // Delete the receiver.
    b.click("#rc-rows tr[data-receiver] button.danger");
    b.wait(
        "the receiver gone",
        SECS(10),
        "!document.querySelector('#rc-rows tr') && document.querySelector('#rc-empty').textContent.includes('No receivers')",
    );

    let errors = b.console_errors();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    println!("alerts page test: {:?}", started.elapsed());
}

#[test]
fn agents_page_in_a_real_browser() {
    use e2e::agent_release::{release_for, release_key, worker_from};
    let _one = one_browser();
    let started = Instant::now();
    conductor_with_current_assets();
    let next = agent_with_version("0.99.0");
    let dir = tempfile::tempdir().unwrap();
    let _strays = KillStrays(dir.path().to_path_buf());
    let (key, public) = release_key(dir.path(), "release.key");
    let c = Conductor::start_with(&dir.path().join("conductor"), &["--release-key", &public]);
    let token = c.registration_token();
    let mut w = worker_from(dir.path(), "pi-agent", &c, &token, &bin("edge-worker"), &[]);
    let id = w.wait_id();
    wait_for("worker online", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });
    let running = c.worker(&id)["agent_version"].as_str().unwrap().to_string();

    let mut b = signed_in_on(&c, "agents");
    assert_eq!(b.text("#ag-count"), "1 worker, 1 version");
    assert_eq!(
        b.text(&format!(
            "#ag-ver-rows tr[data-version='{running}'] [data-col=count]"
        )),
        "1"
    );
    assert!(b.text("#ag-rel-empty").contains("No agent releases"));
    assert_eq!(
        b.js("return document.querySelector('#ag-start').disabled"),
        json!(true)
    );

    // A release signed offline (the CLI) shows up, and is offered.
    release_for(&c, &key, "0.99.0", std::env::consts::ARCH, &next);
    b.wait(
        "the release listed",
        SECS(10),
        "!!document.querySelector('#ag-rel-rows tr[data-release]') && document.querySelector('#ag-version').value === '0.99.0'",
    );
    // Out-of-range input is refused in the page, nothing sent.
    b.clear("#ag-trial");
    b.type_into("#ag-trial", "2");
    b.click("#ag-start");
    b.wait(
        "the trial refused",
        SECS(5),
        "document.querySelector('#ag-error').textContent.includes('Trial')",
    );
    let (_, none) = c.get("/api/v1/agent-rollouts");
    assert_eq!(none["rollouts"], json!([]), "{none}");

    // Roll it out from the page: the worker's row goes to `updated`.
    b.clear("#ag-trial");
    b.type_into("#ag-trial", "30");
    b.clear("#ag-settle");
    b.type_into("#ag-settle", "1");
    b.click("#ag-start");
    b.wait(
        "the member updated",
        SECS(90),
        &format!("(document.querySelector(\"#ag-mem-rows tr[data-worker='{id}']\") || {{dataset: {{}}}}).dataset.state === 'updated'"),
    );
    b.wait(
        "the rollout succeeded",
        SECS(20),
        "(document.querySelector('#ag-hist-rows tr[data-rollout]') || {dataset: {}}).dataset.state === 'succeeded'",
    );
    assert!(
        b.text("#ag-ro").contains("succeeded"),
        "{}",
        b.text("#ag-ro")
    );
    b.wait(
        "the new version counted",
        SECS(10),
        "!!document.querySelector(\"#ag-ver-rows tr[data-version='0.99.0']\")",
    );
    assert_eq!(c.worker(&id)["agent_version"], "0.99.0");
    assert!(w.proc.alive(), "{}", w.proc.tail(30));
    b.screenshot("agents-rolled-out");

    // A release in no rollout in progress can be deleted.
    b.click("#ag-rel-rows tr[data-release] button.danger");
    b.wait(
        "the release gone",
        SECS(10),
        "!document.querySelector('#ag-rel-rows tr') && document.querySelector('#ag-rel-empty').textContent.includes('No agent releases')",
    );

    let errors = b.console_errors();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    println!("agents page test: {:?}", started.elapsed());
}

/// The Shell panel of a worker page (`terminal.js`): first the API's
/// refusal shown (no `remote-exec=allow` label), then a real shell on the
/// worker's pseudo-terminal typed into with WebDriver key events: output,
/// an ANSI colour rendered as its class, the terminal size following the
/// panel (resize frames), the exit code; Close hangs up a live one. Before
/// that, the emulator alone on escape sequences (cursor moves, erase,
/// scroll region, alternate screen).
#[test]
fn shell_panel_in_a_real_browser() {
    let _one = one_browser();
    let started = Instant::now();
    conductor_with_current_assets();
    let dir = tempfile::tempdir().unwrap();
    let _strays = KillStrays(dir.path().to_path_buf());
    let c = Conductor::start(&dir.path().join("conductor"));
    // A plain /bin/sh with a known prompt, started in the temp dir.
    let native = bin("edge-worker").to_string_lossy().into_owned();
    let home = format!("HOME={}", dir.path().display());
    let mut opts = WorkerOpts::named("pi-shell");
    opts.extra.push("--allow-remote-exec".into());
    let mut w = Worker::start_with_program(
        &[
            "env",
            "SHELL=/bin/sh",
            "PS1=sh-test$ ",
            "ENV=",
            &home,
            &native,
        ],
        &dir.path().join("pi-shell"),
        &c.url(),
        Some(&c.registration_token()),
        opts,
    );
    let id = w.wait_id();
    wait_for("worker online", SECS(20), || {
        (c.status_of(&id) == "online").then_some(())
    });

    let mut b = signed_in_on(&c, "alerts");

    // The emulator alone: 10×4, fed escape sequences, its screen text.
    let v = b.cmd(
        "POST",
        "/execute/async",
        Some(json!({"args": [], "script": r#"
            const done = arguments[arguments.length - 1];
            import('/assets/terminal.js').then(({ Term }) => {
              const el = document.createElement('div');
              document.body.append(el);
              const t = new Term(el, { size: [10, 4] }), out = [];
              const step = (s) => { t.write(s); out.push(t.text()); };
              step('abcdefghijKL\r\nline2');                        // wrap at the margin
              step('\x1b[2J\x1b[3;4HX\x1b[1;1HA\x1b[3B\x1b[2CB\x1b[A\x1b[GC'); // CUP CUD CUF CUU CHA
              step('\x1b[1;1H12345\x1b[1;3H\x1b[K\x1b[3;2H\x1b[1J');    // EL 0, ED 1
              step('\x1b[2J\x1b[H1\r\n2\r\n3\r\n4\x1b[2;3r\x1b[3;1H\n\x1b[r'); // scroll region
              step('\x1b[?1049h\x1b[Halt\x1b]0;title\x07\x1b[?1049l');  // alternate screen, OSC
              step('\x1b[H\x1b[2Pz\x1b[1;1H\x1b[2@\x1b[31mr\x1b[0m');  // DCH ICH SGR
              t.render();
              out.push(el.querySelector('span.f1').textContent);
              el.remove();
              done(out);
            }, (e) => done('import failed: ' + e));
        "#})),
    );
    assert_eq!(
        v,
        json!([
            "abcdefghij\nKL\nline2\n",
            "A\n\nC  X\n   B",
            "\n\n   X\n   B",
            "1\n3\n\n4",
            "1\n3\n\n4",
            "r z\n3\n\n4",
            "r"
        ]),
        "{v:#}"
    );

    // Without the label the conductor refuses; the page says how to allow it.
    b.goto(&format!("{}/#/workers/{id}", c.https_url()));
    b.wait(
        "the worker page",
        SECS(10),
        "document.querySelector('#w-name') && document.querySelector('#w-name').textContent === 'pi-shell'",
    );
    b.click("#shell-open");
    b.wait(
        "the refusal",
        SECS(15),
        "document.querySelector('#shell-error').textContent.includes('remote-exec=allow')",
    );
    assert_eq!(
        b.js("return document.querySelector('#shell-term').hidden"),
        json!(true)
    );
    std::thread::sleep(Duration::from_millis(300)); // let the failed load reach the log
    assert_eq!(b.forgive_failed_load("/shell", 403), 1);
    let (st, v) = c.put(
        &format!("/api/v1/workers/{id}/labels"),
        &json!({"remote-exec": "allow"}),
    );
    assert_eq!(st, 200, "{v}");

    // The rows on screen, as text (scrollback and screen).
    let rows = "[...document.querySelectorAll('#shell-term > div > div')].map(d => d.textContent.trimEnd())";
    let prompts = format!("{rows}.filter(r => r === 'sh-test$').length");
    // The shell waits for a command: the last row written is a bare prompt.
    let idle = format!("{rows}.filter(r => r).pop() === 'sh-test$'");
    b.click("#shell-open");
    b.wait(
        "the prompt",
        SECS(15),
        &format!(
            "document.querySelector('#shell-state').textContent === 'connected' && {prompts} === 1"
        ),
    );
    assert_eq!(b.text("#shell-error"), "");
    assert_eq!(
        b.js("return document.activeElement.id"),
        json!("shell-term")
    );
    // WebDriver key events (Enter is U+E007).
    b.type_into("#shell-term", "echo $((6*7))\u{E007}");
    b.wait("42", SECS(10), &format!("{rows}.includes('42') && {idle}"));
    assert!(
        b.js(&format!("return {rows}"))
            .to_string()
            .contains("sh-test$ echo $((6*7))"),
        "the typed line echoed"
    );
    // Ctrl-C (byte 03) interrupts a command.
    b.type_into("#shell-term", "sleep 60\u{E007}");
    b.wait(
        "sleep running",
        SECS(10),
        &format!("{rows}.filter(r => r).pop() === 'sh-test$ sleep 60'"),
    );
    b.type_into("#shell-term", "\u{E009}c");
    b.wait("the prompt after Ctrl-C", SECS(10), &idle);
    b.type_into("#shell-term", "printf '\\033[31mred\\033[0m\\n'\u{E007}");
    let red = b.wait(
        "red text in red",
        SECS(10),
        "[...document.querySelectorAll('#shell-term span.f1')].filter(s => s.textContent === 'red').map(s => getComputedStyle(s).color)[0]",
    );
    assert_eq!(red, json!("rgb(208, 64, 64)"));

    // The terminal's size is the panel's: as the shell sees it, before and
    // after the window shrinks (a resize frame).
    let size = "(() => { const r = document.querySelectorAll('#shell-term > div:nth-child(2) > div'); return r.length + ' ' + r[0].textContent.length; })()";
    let mut last = String::new();
    for width in [0, 800] {
        if width > 0 {
            b.set_window(width, 900);
        }
        let want = b.wait(
            "the terminal's size",
            SECS(5),
            &format!("{size} !== '{last}' && {size}"),
        );
        let want = want.as_str().unwrap().to_string();
        last.clone_from(&want);
        let shown = format!("{rows}.filter(r => r === '{want}').length");
        let before = b.js(&format!("return {shown}"));
        b.type_into("#shell-term", "stty size\u{E007}");
        b.wait(
            &format!("stty size {want}"),
            SECS(10),
            &format!("{shown} > {before}"),
        );
    }
    b.set_window(1280, 900);
    b.screenshot("shell");

    b.type_into("#shell-term", "exit 3\u{E007}");
    b.wait(
        "the outcome",
        SECS(10),
        "document.querySelector('#shell-state').textContent === '[exited 3]'",
    );
    assert!(
        b.js(&format!("return {rows}"))
            .to_string()
            .contains("[exited 3]"),
        "the outcome line in the terminal"
    );

    // A new session, closed while running: hung up, the panel hidden.
    b.click("#shell-open");
    b.wait(
        "a new prompt",
        SECS(15),
        &format!(
            "document.querySelector('#shell-state').textContent === 'connected' && {prompts} === 1"
        ),
    );
    b.click("#shell-close");
    b.wait(
        "the panel closed",
        SECS(5),
        "document.querySelector('#shell-panel').hidden && document.activeElement.id === 'shell-open'",
    );

    // Both sessions are in the audit on the settings page, the newest first.
    b.goto(&format!("{}/#/settings", c.url()));
    b.wait(
        "the audit on the settings page",
        SECS(15),
        "(() => { const r = [...document.querySelectorAll('#exec-audit-body tr')].map((tr) => tr.textContent); \
         return r.length >= 2 && r[0].includes('shell') && r[0].includes('(login shell)') \
         && r.some((t) => t.includes('exited') && t.includes('admin')); })()",
    );

    let errors = b.console_errors();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    drop(w);
    println!("shell panel test: {:?}", started.elapsed());
}

#[test]
fn pi_power_warnings_in_a_real_browser() {
    let _one = one_browser();
    let started = Instant::now();
    conductor_with_current_assets();
    let dir = tempfile::tempdir().unwrap();
    let _strays = KillStrays(dir.path().to_path_buf());
    let c = Conductor::start_with(
        &dir.path().join("conductor"),
        &["--default-interval-ms", "300"],
    );
    // A Pi Zero W on a weak supply (its /sys and /proc from the fixture).
    let root = pi_host_root("pi-zero-w", &dir.path().join("host"));
    let mut opts = WorkerOpts::named("pi-sag");
    opts.extra = vec!["--host-root".into(), root.display().to_string()];
    let mut w = Worker::start(
        &dir.path().join("pi-sag"),
        &c.url(),
        Some(&c.registration_token()),
        opts,
    );
    let id = w.wait_id();
    wait_for("the board", SECS(20), || {
        (!c.worker(&id)["board"].is_null()).then_some(())
    });

    let mut b = signed_in_at(&c, "#/", "!!document.querySelector('.card')");
    let power = format!("document.querySelector('[data-id=\"{id}\"] .power')");
    b.wait(
        "the under-voltage badge",
        SECS(10),
        &format!("{power} && !{power}.hidden && {power}.textContent === 'under-voltage'"),
    );
    assert!(
        b.js(&format!("return {power}.title"))
            .as_str()
            .unwrap()
            .contains("under_voltage_now"),
        "the badge's title names the bits"
    );
    b.screenshot("fleet-under-voltage");

    // The worker page shows the board.
    b.goto(&format!("{}/#/workers/{id}", c.https_url()));
    b.wait(
        "the board on the worker page",
        SECS(10),
        "document.querySelector('#w-inv') && document.querySelector('#w-inv').textContent.includes('Pi power')",
    );
    let inv = b.text("#w-inv");
    for want in [
        "Raspberry Pi Zero W",
        "rev 9000c1",
        "00000000deadbeef",
        "under voltage now",
    ] {
        assert!(inv.contains(want), "{want:?} not in: {inv}");
    }

    // The supply recovers: the card says it happened since boot.
    std::fs::write(pi_throttled_file(&root), "50000\n").unwrap();
    b.goto(&format!("{}/#/", c.https_url()));
    b.wait(
        "the since-boot badge",
        SECS(15),
        &format!("{power} && {power}.textContent === 'under-voltage since boot'"),
    );
    // And clears after a reboot (the agent starts again; the firmware
    // reports nothing).
    std::fs::write(pi_throttled_file(&root), "0\n").unwrap();
    w.restart();
    b.wait("no badge", SECS(15), &format!("{power} && {power}.hidden"));
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    eprintln!("pi power warnings checked in {:?}", started.elapsed());
}
