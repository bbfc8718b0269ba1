//! The exec stream: what a worker uploads while it runs an
//! [`crate::Action::Exec`], as the (chunked) body of
//! `POST /api/v1/agent/exec/{session hex}` ([`exec_path`]) with its usual
//! `Authorization: Aerekos-Worker` header ([`crate::manifest::http_auth`],
//! method `POST`). Output travels over HTTP(S), never as MQTT frames: the
//! broker carries telemetry.
//!
//! The body is a sequence of frames, each
//!
//! ```text
//! +-----------+----------------+-------------------+
//! | kind (u8) | len (u32 LE)   | data (len bytes)  |
//! +-----------+----------------+-------------------+
//! ```
//!
//! kind `0` keep-alive (len 0, sent while the command is silent so no read
//! timeout ends the upload), `1` stdout bytes, `2` stderr bytes, `3` exit:
//! the last frame, data = outcome (u8) ‖ value (i32 LE) ‖ detail (UTF-8, the
//! rest, at most [`EXIT_DETAIL_MAX`] bytes). Outcomes ([`ExecOutcome`]):
//! `0` exited (value = exit code), `1` killed by a signal (value = signal
//! number), `2` killed at its timeout, `3` killed at the output cap (output
//! truncated), `4` not started (value = OS error number or -1; detail says
//! why).
//!
//! Limits: a frame carries at most [`EXEC_CHUNK_MAX`] bytes of data; the
//! decoder refuses a longer one, an unknown kind, a malformed exit frame, or
//! a stream cut inside a frame, without allocating more than that bound.

use std::io::{self, Read};

/// Path prefix of exec uploads.
pub const EXEC_PATH: &str = "/api/v1/agent/exec";
/// Most data bytes in one stream frame.
pub const EXEC_CHUNK_MAX: u32 = 64 * 1024;
/// Most bytes of an exit frame's detail.
pub const EXIT_DETAIL_MAX: usize = 200;

/// `/api/v1/agent/exec/<32 hex digits>` for `session`.
pub fn exec_path(session: &[u8; 16]) -> String {
    format!("{EXEC_PATH}/{}", crate::hex_string(session))
}

/// The session id of a path segment of 32 lower-case hex digits.
pub fn parse_session(hex: &str) -> Option<[u8; 16]> {
    let b = hex.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// How a remote command ended. **Append only** (its byte is on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    /// It exited by itself; the value is its exit code.
    Exited,
    /// A signal ended it; the value is the signal number.
    Signalled,
    /// The worker killed its process group at the request's timeout.
    TimedOut,
    /// The worker killed its process group when the output reached the
    /// request's cap; what was sent is cut there.
    OutputCap,
    /// It could not be started; the detail says why.
    NotStarted,
    /// Remote shell: the conductor ended the session after its idle
    /// timeout (no keystroke and no output for that long); value = the
    /// timeout in seconds. Never sent by a worker.
    Idle,
    /// The conductor lost the worker's stream (it broke, or no exit status
    /// came in time); the detail says how. Never sent by a worker.
    Lost,
}

impl ExecOutcome {
    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            ExecOutcome::Exited => 0,
            ExecOutcome::Signalled => 1,
            ExecOutcome::TimedOut => 2,
            ExecOutcome::OutputCap => 3,
            ExecOutcome::NotStarted => 4,
            ExecOutcome::Idle => 5,
            ExecOutcome::Lost => 6,
        }
    }

    /// The outcome of a byte.
    pub fn from_byte(b: u8) -> Option<ExecOutcome> {
        Some(match b {
            0 => ExecOutcome::Exited,
            1 => ExecOutcome::Signalled,
            2 => ExecOutcome::TimedOut,
            3 => ExecOutcome::OutputCap,
            4 => ExecOutcome::NotStarted,
            5 => ExecOutcome::Idle,
            6 => ExecOutcome::Lost,
            _ => return None,
        })
    }

    /// Lower-case name, as the API and the audit log show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecOutcome::Exited => "exited",
            ExecOutcome::Signalled => "signal",
            ExecOutcome::TimedOut => "timeout",
            ExecOutcome::OutputCap => "output_cap",
            ExecOutcome::NotStarted => "not_started",
            ExecOutcome::Idle => "idle",
            ExecOutcome::Lost => "lost",
        }
    }
}

/// The exit frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecExit {
    /// How it ended.
    pub outcome: ExecOutcome,
    /// Exit code, signal number or OS error, per [`ExecExit::outcome`].
    pub value: i32,
    /// For people (at most [`EXIT_DETAIL_MAX`] bytes; cut at a char
    /// boundary when encoded).
    pub detail: String,
}

/// One frame of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecFrame {
    /// Nothing; keeps the upload alive while the command is silent.
    KeepAlive,
    /// Standard output bytes (at most [`EXEC_CHUNK_MAX`]).
    Stdout(Vec<u8>),
    /// Standard error bytes (at most [`EXEC_CHUNK_MAX`]).
    Stderr(Vec<u8>),
    /// The end.
    Exit(ExecExit),
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExecStreamError {
    /// Reading failed (the connection broke, a read timeout).
    #[error("read: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("stream cut inside a frame")]
    Truncated,
    /// A kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than [`EXEC_CHUNK_MAX`].
    #[error("frame of {0} bytes, the limit is {EXEC_CHUNK_MAX}")]
    TooLong(u32),
    /// An exit frame too short, with an unknown outcome or a detail that
    /// is not UTF-8.
    #[error("malformed exit frame")]
    BadExit,
}

/// A detail cut to [`EXIT_DETAIL_MAX`] bytes at a char boundary.
fn cut_detail(s: &str) -> &str {
    let mut end = s.len().min(EXIT_DETAIL_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ExecFrame {
    /// Appends the frame's bytes to `out`. Data longer than
    /// [`EXEC_CHUNK_MAX`] must be split by the caller (it is cut here, never
    /// sent as a frame the decoder refuses).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, data): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            ExecFrame::KeepAlive => (0, (&[][..]).into()),
            ExecFrame::Stdout(d) => (1, d.as_slice().into()),
            ExecFrame::Stderr(d) => (2, d.as_slice().into()),
            ExecFrame::Exit(e) => {
                let mut d = vec![e.outcome.byte()];
                d.extend_from_slice(&e.value.to_le_bytes());
                d.extend_from_slice(cut_detail(&e.detail).as_bytes());
                (3, d.into())
            }
        };
        let max = EXEC_CHUNK_MAX as usize;
        let data = &data[..data.len().min(max)];
        // fits: at most EXEC_CHUNK_MAX (64 KiB), checked just above.
        #[allow(clippy::cast_possible_truncation)]
        let len = data.len() as u32;
        out.push(kind);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(data);
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Reads one frame; `Ok(None)` at a clean end of the stream (between
    /// frames).
    pub fn read_from(r: &mut impl Read) -> Result<Option<ExecFrame>, ExecStreamError> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ExecStreamError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if kind > 3 {
            return Err(ExecStreamError::UnknownKind(kind));
        }
        if len > EXEC_CHUNK_MAX {
            return Err(ExecStreamError::TooLong(len));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ExecStreamError::Truncated,
            _ => ExecStreamError::Io(e),
        })?;
        Ok(Some(match kind {
            0 if data.is_empty() => ExecFrame::KeepAlive,
            0 => return Err(ExecStreamError::TooLong(len)),
            1 => ExecFrame::Stdout(data),
            2 => ExecFrame::Stderr(data),
            _ => {
                if data.len() < 5 || data.len() > 5 + EXIT_DETAIL_MAX {
                    return Err(ExecStreamError::BadExit);
                }
                let outcome = ExecOutcome::from_byte(data[0]).ok_or(ExecStreamError::BadExit)?;
                let value = i32::from_le_bytes([data[1], data[2], data[3], data[4]]);
                let detail = std::str::from_utf8(&data[5..])
                    .map_err(|_| ExecStreamError::BadExit)?
                    .to_string();
                ExecFrame::Exit(ExecExit {
                    outcome,
                    value,
                    detail,
                })
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn read_all(mut bytes: &[u8]) -> Result<Vec<ExecFrame>, ExecStreamError> {
        let mut out = Vec::new();
        while let Some(f) = ExecFrame::read_from(&mut bytes)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn frames_are_pinned_and_round_trip() {
        let exit = ExecExit {
            outcome: ExecOutcome::Exited,
            value: -2,
            detail: "ok".into(),
        };
        let frames = [
            ExecFrame::KeepAlive,
            ExecFrame::Stdout(b"hi\n".to_vec()),
            ExecFrame::Stderr(b"e".to_vec()),
            ExecFrame::Exit(exit),
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode_into(&mut bytes);
        }
        assert_eq!(
            crate::hex_string(&bytes),
            concat!(
                "0000000000",
                "0103000000",
                "68690a",
                "020100000065",
                "030700000000feffffff6f6b"
            )
        );
        assert_eq!(read_all(&bytes).unwrap(), frames);
    }

    #[test]
    fn bad_streams_are_refused() {
        let cut = ExecFrame::Stdout(b"abc".to_vec()).encode();
        for n in 1..cut.len() {
            assert!(matches!(
                read_all(&cut[..n]),
                Err(ExecStreamError::Truncated)
            ));
        }
        assert!(matches!(
            read_all(&[9, 0, 0, 0, 0]),
            Err(ExecStreamError::UnknownKind(9))
        ));
        assert!(matches!(
            read_all(&[1, 1, 0, 1, 0]),
            Err(ExecStreamError::TooLong(65537))
        ));
        assert!(matches!(
            read_all(&[3, 1, 0, 0, 0, 0]),
            Err(ExecStreamError::BadExit)
        ));
        assert!(matches!(
            read_all(&[3, 5, 0, 0, 0, 9, 0, 0, 0, 0]),
            Err(ExecStreamError::BadExit)
        ));
    }

    #[test]
    fn long_data_and_details_are_cut_not_refused() {
        let big = ExecFrame::Stdout(vec![7; EXEC_CHUNK_MAX as usize + 10]).encode();
        let back = read_all(&big).unwrap();
        assert!(matches!(&back[..], [ExecFrame::Stdout(d)] if d.len() == EXEC_CHUNK_MAX as usize));
        let exit = ExecFrame::Exit(ExecExit {
            outcome: ExecOutcome::NotStarted,
            value: 2,
            detail: "é".repeat(150),
        });
        match &read_all(&exit.encode()).unwrap()[..] {
            [ExecFrame::Exit(e)] => assert_eq!(e.detail, "é".repeat(100)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn session_paths() {
        let s: [u8; 16] = core::array::from_fn(|i| u8::try_from(i * 17).unwrap());
        let p = exec_path(&s);
        assert_eq!(p, "/api/v1/agent/exec/00112233445566778899aabbccddeeff");
        assert_eq!(parse_session(p.rsplit('/').next().unwrap()), Some(s));
        assert_eq!(parse_session("00112233"), None);
        assert_eq!(parse_session(&"G".repeat(32)), None);
        assert_eq!(parse_session(&"AA".repeat(16)), None);
    }
}
