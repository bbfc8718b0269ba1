//! `aerekos exec` (`POST /api/v1/workers/{id}/exec`) and `aerekos exec-log`
//! (`GET /api/v1/exec-sessions`).
//!
//! One worker: its stdout and stderr go to ours as they stream, and the
//! exit status is the remote command's: its exit code, 128 + N when a
//! signal N ended it, 124 when it was killed at its timeout, 127 when it
//! could not be started, 1 for anything else (output cap, a refusal, a
//! transport error). With `--label k=v` (repeatable, all must match) it runs
//! on every matching worker, at most [`PARALLEL`] at a time; each output line
//! is prefixed with `<worker name>: `, a summary line per worker goes to
//! stderr, and the exit status is the highest of theirs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{parse_pairs, rows, s, CliError, Client};

/// Workers run on at once with `--label`.
pub const PARALLEL: usize = 4;

/// What one exec streams back, in order.
#[derive(Debug)]
pub enum Piece {
    /// Output text of stdout (`false`) or stderr (`true`).
    Output(bool, String),
    /// The end: the exit status to report and, if not a plain exit, why.
    End(u8, Option<String>),
}

/// The exit status for the API's last line.
fn status_of(last: &Value) -> (u8, Option<String>) {
    if let Some(code) = last.get("exit_code").and_then(Value::as_i64) {
        // fits: exit codes are 0..=255 on Unix; the low byte is the status.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return ((code & 0xff) as u8, None);
    }
    let error = s(last, "error").to_string();
    let code = match s(last, "outcome") {
        "timeout" => 124,
        "not_started" => 127,
        "signal" => last
            .get("signal")
            .and_then(Value::as_u64)
            .and_then(|n| u8::try_from(n).ok())
            .map_or(1, |n| 128u8.saturating_add(n)),
        _ => 1,
    };
    (code, Some(error))
}

impl Client {
    /// Runs `argv` on `worker`, handing each piece to `each` as it arrives.
    pub fn exec(
        &self,
        worker: &str,
        argv: &[String],
        timeout_s: u32,
        max_output: u32,
        each: &mut dyn FnMut(Piece) -> std::io::Result<()>,
    ) -> Result<(), CliError> {
        let url = self.url(&format!("/workers/{worker}/exec"));
        let wait = Duration::from_secs(u64::from(timeout_s) + 60);
        let mut req = crate::agent(wait, &self.roots).post(url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let body = json!({"argv": argv, "timeout_s": timeout_s, "max_output": max_output});
        let mut resp = req
            .header("Content-Type", "application/json")
            .send(body.to_string())?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Self::finish(Ok(resp)).map(|_| ());
        }
        let mut lines = BufReader::new(resp.body_mut().as_reader());
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line)? == 0 {
                each(Piece::End(
                    1,
                    Some("the conductor ended the stream without an exit status".into()),
                ))?;
                return Ok(());
            }
            let Ok(v) = serde_json::from_str::<Value>(line.trim_end()) else {
                continue;
            };
            if let Some(data) = v.get("data").and_then(Value::as_str) {
                each(Piece::Output(s(&v, "stream") == "stderr", data.to_string()))?;
                continue;
            }
            let (code, why) = status_of(&v);
            each(Piece::End(code, why))?;
            return Ok(());
        }
    }
}

/// `aerekos exec`: the exit status to leave with.
pub fn run(
    client: &Client,
    out: &mut dyn Write,
    worker: Option<String>,
    labels: &[String],
    argv: &[String],
    timeout_s: u32,
    max_output: u32,
) -> Result<u8, CliError> {
    match (worker, labels.is_empty()) {
        (Some(w), true) => one(client, out, &w, argv, timeout_s, max_output),
        (None, false) => fan_out(client, out, labels, argv, timeout_s, max_output),
        _ => Err(CliError::Usage(
            "give either a worker id or --label k=v (not both)".into(),
        )),
    }
}

fn one(
    client: &Client,
    out: &mut dyn Write,
    worker: &str,
    argv: &[String],
    timeout_s: u32,
    max_output: u32,
) -> Result<u8, CliError> {
    let mut code = 1;
    let mut err = std::io::stderr();
    client.exec(worker, argv, timeout_s, max_output, &mut |p| match p {
        Piece::Output(false, text) => {
            out.write_all(text.as_bytes())?;
            out.flush()
        }
        Piece::Output(true, text) => {
            err.write_all(text.as_bytes())?;
            err.flush()
        }
        Piece::End(c, why) => {
            code = c;
            if let Some(why) = why {
                writeln!(err, "aerekos: {worker}: {why}")?;
            }
            Ok(())
        }
    })?;
    Ok(code)
}

/// Complete lines of a stream, each prefixed; the rest waits for more.
#[derive(Debug, Default)]
struct Lines {
    partial: String,
}

impl Lines {
    fn push(&mut self, prefix: &str, text: &str, w: &mut dyn Write) -> std::io::Result<()> {
        self.partial.push_str(text);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            write!(w, "{prefix}: {line}")?;
        }
        w.flush()
    }

    fn finish(&mut self, prefix: &str, w: &mut dyn Write) -> std::io::Result<()> {
        if !self.partial.is_empty() {
            writeln!(w, "{prefix}: {}", std::mem::take(&mut self.partial))?;
        }
        w.flush()
    }
}

/// What a fan-out thread reports: the worker's index and a piece, or its
/// failure.
type Report = (usize, Result<Piece, String>);

fn fan_out(
    client: &Client,
    out: &mut dyn Write,
    labels: &[String],
    argv: &[String],
    timeout_s: u32,
    max_output: u32,
) -> Result<u8, CliError> {
    let want = parse_pairs(labels)?;
    let all = client.get("/workers")?;
    let targets: Vec<(String, String)> = rows(&all, "workers")
        .into_iter()
        .filter(|w| {
            let have: BTreeMap<String, String> = w
                .get("labels")
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default();
            want.iter().all(|(k, v)| have.get(k) == Some(v))
        })
        .map(|w| {
            let id = s(&w, "id").to_string();
            let name = match s(&w, "hostname") {
                "-" | "" => id.clone(),
                h => h.to_string(),
            };
            (id, name)
        })
        .collect();
    if targets.is_empty() {
        return Err(CliError::Usage(format!(
            "no worker has the label(s) {}",
            labels.join(" ")
        )));
    }
    let (tx, rx) = mpsc::channel::<Report>();
    let mut codes: Vec<Option<u8>> = vec![None; targets.len()];
    let mut lines: Vec<[Lines; 2]> = targets.iter().map(|_| Default::default()).collect();
    let mut err = std::io::stderr();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<(), CliError> {
        for _ in 0..PARALLEL.min(targets.len()) {
            let (tx, next, targets) = (tx.clone(), &next, &targets);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((id, _)) = targets.get(i) else {
                    return;
                };
                let mut send = |p: Piece| {
                    tx.send((i, Ok(p)))
                        .map_err(|_| std::io::Error::other("the printer is gone"))
                };
                if let Err(e) = client.exec(id, argv, timeout_s, max_output, &mut send) {
                    let _ = tx.send((i, Err(e.to_string())));
                }
            });
        }
        drop(tx);
        for (i, report) in rx {
            let name = &targets[i].1;
            match report {
                Ok(Piece::Output(stderr, text)) => {
                    let w: &mut dyn Write = if stderr { &mut err } else { &mut *out };
                    lines[i][usize::from(stderr)].push(name, &text, w)?;
                }
                Ok(Piece::End(code, why)) => {
                    lines[i][0].finish(name, &mut *out)?;
                    lines[i][1].finish(name, &mut err)?;
                    codes[i] = Some(code);
                    match why {
                        Some(why) => writeln!(err, "{name}: exit {code}: {why}")?,
                        None => writeln!(err, "{name}: exit {code}")?,
                    }
                }
                Err(e) => {
                    codes[i] = Some(1);
                    writeln!(err, "{name}: error: {e}")?;
                }
            }
        }
        Ok(())
    })?;
    Ok(codes.into_iter().map(|c| c.unwrap_or(1)).max().unwrap_or(1))
}

/// `aerekos exec-log`: the audit as a table.
pub fn audit_table(v: &Value) -> String {
    let mut t = String::from(
        "STARTED (ms)   KIND  WORKER             WHO              EXIT  OUTCOME          BYTES     COMMAND\n",
    );
    for r in rows(v, "sessions") {
        let argv: Vec<String> = r
            .get("argv")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        t.push_str(&format!(
            "{:<14} {:<5} {:<18} {:<16} {:<5} {:<16} {:<9} {}\n",
            r.get("started_ms").map_or("-".into(), Value::to_string),
            s(&r, "kind"),
            s(&r, "worker_id"),
            s(&r, "token_name"),
            r.get("exit_code")
                .filter(|c| !c.is_null())
                .map_or("-".into(), Value::to_string),
            s(&r, "outcome"),
            r.get("bytes_out").map_or("-".into(), Value::to_string),
            argv.join(" ")
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(status_of(&json!({"exit_code": 3})).0, 3);
        assert_eq!(status_of(&json!({"exit_code": 256})).0, 0);
        assert_eq!(
            status_of(&json!({"error": "t", "outcome": "timeout"})).0,
            124
        );
        assert_eq!(
            status_of(&json!({"error": "s", "outcome": "signal", "signal": 9})).0,
            137
        );
        assert_eq!(
            status_of(&json!({"error": "x", "outcome": "output_cap"})).0,
            1
        );
    }

    #[test]
    fn lines_are_prefixed_whole() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.push("pi", "a\nb", &mut out).ok();
        l.push("pi", "c\n", &mut out).ok();
        l.push("pi", "d", &mut out).ok();
        l.finish("pi", &mut out).ok();
        assert_eq!(String::from_utf8_lossy(&out), "pi: a\npi: bc\npi: d\n");
    }
}
