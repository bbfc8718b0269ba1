//! `conductor decode`: a captured postcard frame → JSON, for debugging.
//!
//! Without a secret the envelope is shown **unverified** (`"verified":
//! false`); with the worker's secret the tag is checked first.

use protocol::{DecodeError, Secret};
use serde_json::{json, Value};

/// Decodes `bytes`; verifies the tag when `secret_hex` is given. `worker`
/// is the worker id of the frame's topic (a format-2 frame needs it).
pub fn decode_frame(
    bytes: &[u8],
    secret_hex: Option<&str>,
    worker: Option<&str>,
) -> Result<Value, DecodeError> {
    let opened = protocol::open_captured(bytes, worker)?;
    let (envelope, verified) = match secret_hex {
        Some(hex) => (opened.verify(&Secret::from_hex(hex)?)?, true),
        None => (opened.into_unverified(), false),
    };
    Ok(json!({
        "verified": verified,
        "kind": format!("{:?}", envelope.body.kind()),
        "envelope": envelope,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Body, Envelope, Event, EventKind};

    #[test]
    fn decodes_and_verifies() {
        let secret = Secret::from_bytes([7; 32]);
        let env = Envelope {
            version: protocol::FORMAT_VERSION,
            worker_id: protocol::bounded("w-000000000001"),
            seq: 3,
            sent_at_ms: 0,
            body: Body::Event(Event {
                kind: EventKind::AgentStarted,
                detail: protocol::bounded("hi"),
            }),
        };
        let frame = protocol::seal(&secret, &env).unwrap();
        let v = decode_frame(&frame, None, None).unwrap();
        assert_eq!(v["verified"], false);
        assert_eq!(v["envelope"]["seq"], 3);
        let v = decode_frame(&frame, Some(&secret.to_hex()), None).unwrap();
        assert_eq!(v["verified"], true);
        let wrong = Secret::from_bytes([8; 32]).to_hex();
        assert_eq!(
            decode_frame(&frame, Some(&wrong), None),
            Err(DecodeError::BadTag)
        );
        // Format 2: the worker id comes from the topic, given with --worker.
        let compact = protocol::seal(
            &secret,
            &Envelope {
                version: protocol::FORMAT_V2,
                ..env
            },
        )
        .unwrap();
        assert_eq!(
            decode_frame(&compact, Some(&secret.to_hex()), None),
            Err(DecodeError::NeedsTopicWorker)
        );
        let v = decode_frame(&compact, Some(&secret.to_hex()), Some("w-000000000001")).unwrap();
        assert_eq!(
            (&v["verified"], &v["envelope"]["worker_id"]),
            (&json!(true), &json!("w-000000000001"))
        );
        assert_eq!(
            decode_frame(&compact, Some(&secret.to_hex()), Some("w-000000000002")),
            Err(DecodeError::BadTag)
        );
        assert!(decode_frame(b"\x01garbage", None, None).is_err());
    }
}
