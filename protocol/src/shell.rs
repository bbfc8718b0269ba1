//! The remote shell streams of an [`crate::Action::Shell`]: everything but
//! the command and its reply travels over HTTP(S), never over MQTT.
//!
//! A worker that runs the shell opens two requests to the conductor, both
//! with its `Authorization: Aerekos-Worker` header
//! ([`crate::manifest::http_auth`]):
//!
//! * `POST /api/v1/agent/shell/{session hex}` ([`shell_path`], method
//!   `POST`): the terminal's output, as the chunked body, in the
//!   [`crate::exec`] stream format: `1` output bytes (a pseudo-terminal
//!   merges stdout and stderr), `0` keep-alive, `3` exit last.
//! * `GET /api/v1/agent/shell/{session hex}/input` ([`shell_input_path`],
//!   method `GET`): the input, as the chunked response body, a sequence of
//!   [`ShellInput`] frames.
//!
//! The same input frames are what a client posts to the conductor
//! (`POST /api/v1/shell-sessions/{session hex}/input`, one or many per
//! request), and the output stream is what the conductor relays to the
//! client that opened the session (`POST /api/v1/workers/{id}/shell`, the
//! session id in [`SESSION_HEADER`]).
//!
//! Input frames, the same header as the exec stream:
//!
//! ```text
//! +-----------+----------------+-------------------+
//! | kind (u8) | len (u32 LE)   | data (len bytes)  |
//! +-----------+----------------+-------------------+
//! ```
//!
//! kind `0` keep-alive (len 0), `1` bytes for the terminal (keystrokes,
//! pastes; Ctrl-C is the byte `03`, which the terminal turns into `SIGINT`),
//! `2` resize (len 4: columns u16 LE ‖ rows u16 LE), `3` hang-up (len 0: the
//! session ends, the shell's process group gets `SIGHUP`).
//!
//! Limits: a data frame carries at most [`INPUT_CHUNK_MAX`] bytes; the
//! decoder refuses a longer frame, an unknown kind, a resize that is not 4
//! bytes, a keep-alive or hang-up with data, and a stream cut inside a
//! frame, without allocating more than that bound.

use std::io::{self, Read};

pub use crate::exec::parse_session;

/// Path prefix of the worker's shell streams.
pub const SHELL_PATH: &str = "/api/v1/agent/shell";
/// The response header that names a new session (32 hex digits).
pub const SESSION_HEADER: &str = "X-Aerekos-Shell-Session";
/// Most data bytes in one input frame.
pub const INPUT_CHUNK_MAX: u32 = 16 * 1024;

/// `/api/v1/agent/shell/<32 hex digits>`: the output upload of `session`.
pub fn shell_path(session: &[u8; 16]) -> String {
    format!("{SHELL_PATH}/{}", crate::hex_string(session))
}

/// `/api/v1/agent/shell/<32 hex digits>/input`: the input of `session`.
pub fn shell_input_path(session: &[u8; 16]) -> String {
    format!("{}/input", shell_path(session))
}

/// Path prefix of the client's side of shell sessions.
pub const CLIENT_SESSIONS_PATH: &str = "/api/v1/shell-sessions";

/// `/api/v1/shell-sessions/<hex>/input`: where a client sends input.
pub fn client_input_path(session_hex: &str) -> String {
    format!("{CLIENT_SESSIONS_PATH}/{session_hex}/input")
}

/// One input frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellInput {
    /// Nothing; keeps a silent stream alive.
    KeepAlive,
    /// Bytes for the terminal (at most [`INPUT_CHUNK_MAX`]).
    Data(Vec<u8>),
    /// The terminal's new size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// End the session.
    Hangup,
}

/// Why an input stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ShellStreamError {
    /// Reading failed (the connection broke, a read timeout).
    #[error("read: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("stream cut inside a frame")]
    Truncated,
    /// A kind byte this version does not know.
    #[error("unknown input frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than its kind allows.
    #[error("input frame of kind {kind} with {len} bytes (data at most {INPUT_CHUNK_MAX}, resize 4, others 0)")]
    BadLength {
        /// The kind.
        kind: u8,
        /// Its length.
        len: u32,
    },
}

impl ShellInput {
    /// Appends the frame's bytes to `out`; data longer than
    /// [`INPUT_CHUNK_MAX`] goes as several frames.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut put = |kind: u8, data: &[u8]| {
            // fits: at most INPUT_CHUNK_MAX (16 KiB) or 4 bytes.
            #[allow(clippy::cast_possible_truncation)]
            let len = data.len() as u32;
            out.push(kind);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(data);
        };
        match self {
            ShellInput::KeepAlive => put(0, &[]),
            ShellInput::Data(d) => {
                for chunk in d.chunks(INPUT_CHUNK_MAX as usize) {
                    put(1, chunk);
                }
            }
            ShellInput::Resize { cols, rows } => {
                let mut b = [0u8; 4];
                b[..2].copy_from_slice(&cols.to_le_bytes());
                b[2..].copy_from_slice(&rows.to_le_bytes());
                put(2, &b);
            }
            ShellInput::Hangup => put(3, &[]),
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Reads one frame; `Ok(None)` at a clean end of the stream (between
    /// frames).
    pub fn read_from(r: &mut impl Read) -> Result<Option<ShellInput>, ShellStreamError> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ShellStreamError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let allowed = match kind {
            0 | 3 => len == 0,
            1 => len <= INPUT_CHUNK_MAX,
            2 => len == 4,
            _ => return Err(ShellStreamError::UnknownKind(kind)),
        };
        if !allowed {
            return Err(ShellStreamError::BadLength { kind, len });
        }
        // fits: at most INPUT_CHUNK_MAX, checked above.
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ShellStreamError::Truncated,
            _ => ShellStreamError::Io(e),
        })?;
        Ok(Some(match kind {
            0 => ShellInput::KeepAlive,
            1 => ShellInput::Data(data),
            2 => ShellInput::Resize {
                cols: u16::from_le_bytes([data[0], data[1]]),
                rows: u16::from_le_bytes([data[2], data[3]]),
            },
            _ => ShellInput::Hangup,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn read_all(mut bytes: &[u8]) -> Result<Vec<ShellInput>, ShellStreamError> {
        let mut out = Vec::new();
        while let Some(f) = ShellInput::read_from(&mut bytes)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn input_frames_are_pinned_and_round_trip() {
        let frames = [
            ShellInput::KeepAlive,
            ShellInput::Data(b"ls\r".to_vec()),
            ShellInput::Resize {
                cols: 120,
                rows: 40,
            },
            ShellInput::Hangup,
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
                "6c730d",
                "020400000078002800",
                "0300000000"
            )
        );
        assert_eq!(read_all(&bytes).unwrap(), frames);
    }

    #[test]
    fn bad_input_is_refused() {
        let cut = ShellInput::Data(b"abc".to_vec()).encode();
        for n in 1..cut.len() {
            assert!(matches!(
                read_all(&cut[..n]),
                Err(ShellStreamError::Truncated)
            ));
        }
        assert!(matches!(
            read_all(&[9, 0, 0, 0, 0]),
            Err(ShellStreamError::UnknownKind(9))
        ));
        for bad in [
            &[1u8, 1, 0x40, 0, 0][..],
            &[2, 3, 0, 0, 0, 1, 2, 3],
            &[0, 1, 0, 0, 0, 7],
            &[3, 1, 0, 0, 0, 7],
        ] {
            assert!(
                matches!(read_all(bad), Err(ShellStreamError::BadLength { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn long_data_goes_as_several_frames() {
        let big = vec![7u8; INPUT_CHUNK_MAX as usize + 10];
        let back = read_all(&ShellInput::Data(big.clone()).encode()).unwrap();
        assert_eq!(back.len(), 2);
        let joined: Vec<u8> = back
            .into_iter()
            .flat_map(|f| match f {
                ShellInput::Data(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(joined, big);
    }

    #[test]
    fn paths() {
        let s: [u8; 16] = core::array::from_fn(|i| u8::try_from(i * 17).unwrap());
        assert_eq!(
            shell_path(&s),
            "/api/v1/agent/shell/00112233445566778899aabbccddeeff"
        );
        assert_eq!(
            shell_input_path(&s),
            "/api/v1/agent/shell/00112233445566778899aabbccddeeff/input"
        );
        assert_eq!(client_input_path("ab"), "/api/v1/shell-sessions/ab/input");
    }
}
