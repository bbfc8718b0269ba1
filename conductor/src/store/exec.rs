//! The remote exec audit: one row per `POST /api/v1/workers/{id}/exec` (and
//! per remote shell, `kind` = `shell`), written when the command is sent and
//! completed when it ends. A row with
//! no `ended_ms` belongs to a session still running, or to one a conductor
//! stop cut off (the API shows it as `unfinished`).

use super::sql::params;

use super::{i, int, u, Store, StoreError};

/// One audited exec session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSessionRow {
    /// The session id (32 hex digits), as sent to the worker.
    pub id: String,
    /// Id of the API token (or session) that asked.
    pub token_id: String,
    /// That token's name.
    pub token_name: String,
    /// The worker it ran on.
    pub worker_id: String,
    /// `"exec"` (one command) or `"shell"` (a remote shell session); rows
    /// from before schema v8 are `"exec"`.
    pub kind: String,
    /// The argv, a JSON array of strings.
    pub argv_json: String,
    /// When the command was sent, ms.
    pub started_ms: u64,
    /// When it ended (`None`: running, or cut off by a conductor stop).
    pub ended_ms: Option<u64>,
    /// Its exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// Output bytes relayed (stdout and stderr).
    pub bytes_out: u64,
    /// How it ended (`exited`, `timeout`, `output_cap`, `refused: …`, …);
    /// empty while unfinished.
    pub outcome: String,
}

impl Store {
    /// Records a session at its start.
    pub fn insert_exec_session(&self, r: &ExecSessionRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO exec_sessions (id, token_id, token_name, worker_id, argv, started_ms,
                ended_ms, exit_code, bytes_out, outcome, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.id,
                r.token_id,
                r.token_name,
                r.worker_id,
                r.argv_json,
                i(r.started_ms),
                r.ended_ms.map(i),
                r.exit_code,
                i(r.bytes_out),
                r.outcome,
                r.kind
            ],
        )?;
        Ok(())
    }

    /// Records a session's end (once: a finished row is left alone).
    pub fn finish_exec_session(
        &self,
        id: &str,
        ended_ms: u64,
        exit_code: Option<i32>,
        bytes_out: u64,
        outcome: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE exec_sessions SET ended_ms = ?2, exit_code = ?3, bytes_out = ?4, outcome = ?5
             WHERE id = ?1 AND ended_ms IS NULL",
            params![id, i(ended_ms), exit_code, i(bytes_out), outcome],
        )?;
        Ok(())
    }

    /// The newest `limit` sessions, newest first.
    pub fn exec_sessions(&self, limit: usize) -> Result<Vec<ExecSessionRow>, StoreError> {
        self.conn.query_map(
            "SELECT id, token_id, token_name, worker_id, argv, started_ms, ended_ms, exit_code,
                    bytes_out, outcome, kind
             FROM exec_sessions ORDER BY started_ms DESC, id DESC LIMIT ?1",
            params![int(limit)],
            |r| {
                Ok(ExecSessionRow {
                    id: r.get(0)?,
                    token_id: r.get(1)?,
                    token_name: r.get(2)?,
                    worker_id: r.get(3)?,
                    argv_json: r.get(4)?,
                    started_ms: u(r.get(5)?),
                    ended_ms: r.get::<Option<i64>>(6)?.map(u),
                    exit_code: r.get(7)?,
                    bytes_out: u(r.get(8)?),
                    outcome: r.get(9)?,
                    kind: r.get(10)?,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn sessions_are_recorded_finished_once_and_listed_newest_first() {
        crate::store::each_engine(|s| {
            let row = |id: &str, started_ms| ExecSessionRow {
                id: id.into(),
                token_id: "t1".into(),
                token_name: "ci".into(),
                worker_id: "w-1".into(),
                kind: "exec".into(),
                argv_json: r#"["uname","-a"]"#.into(),
                started_ms,
                ended_ms: None,
                exit_code: None,
                bytes_out: 0,
                outcome: String::new(),
            };
            s.insert_exec_session(&row("a", 1)).unwrap();
            s.insert_exec_session(&row("b", 2)).unwrap();
            s.finish_exec_session("a", 5, Some(0), 12, "exited")
                .unwrap();
            s.finish_exec_session("a", 9, Some(1), 99, "again").unwrap();
            let got = s.exec_sessions(10).unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got[0], row("b", 2), "unfinished, newest first");
            let a = &got[1];
            assert_eq!(
                (a.ended_ms, a.exit_code, a.bytes_out, a.outcome.as_str()),
                (Some(5), Some(0), 12, "exited")
            );
            assert_eq!(s.exec_sessions(1).unwrap().len(), 1);
            let shell = ExecSessionRow {
                kind: "shell".into(),
                ..row("c", 3)
            };
            s.insert_exec_session(&shell).unwrap();
            assert_eq!(s.exec_sessions(1).unwrap(), [shell], "the kind is kept");
        });
    }
}
