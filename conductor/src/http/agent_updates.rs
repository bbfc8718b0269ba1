//! Agent self-update: `/api/v1/agent-releases*` (signed releases) and
//! `/api/v1/agent-rollouts*` (rolling one out, [`crate::agent_rollout`]).
//!
//! `POST /agent-releases {"version", "arch", "sha256", "signature"}`
//! registers a release whose binary is an uploaded artifact
//! (`POST /artifacts` first; its size comes from there). The Ed25519
//! signature (128 hex digits) must verify over
//! [`protocol::release::signed_message`] under the conductor's release key
//! (`--release-key`): the conductor checks what every worker will check
//! again, so a release signed with another key is refused here already
//! (400, as are a missing key and an invalid version, arch or digest). 404
//! for an artifact never uploaded; 409 when the version and arch have a
//! release with another binary (the same one again: 200, unchanged); 201.
//! `DELETE /agent-releases/{version}/{arch}` is refused (409) while a
//! rollout in progress uses that version.
//!
//! `POST /agent-rollouts {"version", "canary" | "canary_percent",
//! "settle_s", "timeout_s", "trial_s", "allow_downgrade", "selector":
//! {"k": "v"}}` → 201 with the rollout; 404 when no release of the version
//! exists, 409 while another is in progress or when no worker to update is
//! online. `GET /agent-rollouts` (newest first, at most
//! [`crate::agent_rollout::HISTORY`]), `GET /agent-rollouts/{id}`,
//! `POST /agent-rollouts/{id}/abort`.

use std::collections::BTreeMap;

use protocol::release::{signed_message, valid_arch, Version, SIGNATURE_LEN};
use serde::Deserialize;
use serde_json::{json, Value};

use super::labels::validate_labels;
use super::message::{ApiError, Ctx, Req, Resp};
use crate::agent_rollout::{self, AgentPolicy, AgentRollout};
use crate::rollout::IN_PROGRESS;
use crate::state::now_ms;
use crate::store::AgentReleaseRow;

/// The body of `POST /agent-releases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseReq {
    version: String,
    arch: String,
    sha256: String,
    signature: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, message)
}

/// Checks a release request against the conductor's release `key`:
/// returns the SHA-256 and the signature in lower-case hex.
pub(crate) fn verify_release(
    key: Option<&[u8; 32]>,
    body: &ReleaseReq,
) -> Result<(String, String), ApiError> {
    let key =
        key.ok_or_else(|| {
            bad("no release key is configured on the conductor (--release-key, AEREKOS_RELEASE_KEY \
             or release_key in the config file; `aerekos release-key generate` makes one)")
        })?;
    Version::parse(&body.version).map_err(|e| bad(e.to_string()))?;
    if !valid_arch(&body.arch) {
        return Err(bad(format!(
            "invalid arch {:?}: expected 1 to 32 of a-z, 0-9, _ (as workers report it)",
            body.arch
        )));
    }
    let sha: [u8; 32] = crate::crypto::from_hex(&body.sha256)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("sha256 must be 64 hex digits"))?;
    let sig = crate::crypto::from_hex(&body.signature)
        .filter(|s| s.len() == SIGNATURE_LEN)
        .ok_or_else(|| bad("signature must be 128 hex digits (an Ed25519 signature)"))?;
    let message =
        signed_message(&body.version, &body.arch, &sha).map_err(|e| bad(e.to_string()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&message, &sig)
        .map_err(|_| {
            bad(format!(
                "the signature does not verify under the conductor's release key for {} {} \
                 sha256 {}: signed with another key, or over another version, arch or binary",
                body.version,
                body.arch,
                body.sha256.to_ascii_lowercase()
            ))
        })?;
    Ok((
        body.sha256.to_ascii_lowercase(),
        body.signature.to_ascii_lowercase(),
    ))
}

/// `POST /agent-releases`: 201 with the release (200 when the same one was
/// registered already).
pub(crate) fn create_release(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let body: ReleaseReq = req.json()?;
    let key = ctx.shared.config.release_key_bytes();
    let (sha256, signature) = verify_release(key.as_ref(), &body)?;
    let db = ctx.shared.db();
    let artifact = db.artifact(&sha256)?;
    let Some(size) = artifact
        .iter()
        .find(|a| a.arch == body.arch)
        .or(artifact.first())
        .map(|a| a.size)
    else {
        return Err(ApiError::new(
            404,
            format!(
                "artifact {sha256} not found: upload the binary first (POST /api/v1/artifacts)"
            ),
        ));
    };
    let row = AgentReleaseRow {
        version: body.version.clone(),
        arch: body.arch.clone(),
        sha256,
        size,
        signature,
        created_ms: now_ms(),
    };
    if db.insert_agent_release(&row)? {
        drop(db);
        tracing::info!(version = %row.version, arch = %row.arch, sha256 = %row.sha256, "agent release stored");
        return Ok(Resp::json(201, &row));
    }
    let existing = db
        .agent_releases_of(&row.version)?
        .into_iter()
        .find(|r| r.arch == row.arch)
        .ok_or_else(|| ApiError::internal("agent release vanished"))?;
    if existing.sha256 == row.sha256 {
        Ok(Resp::ok(json!(existing)))
    } else {
        Err(ApiError::new(
            409,
            format!(
                "agent release {} for {} exists with another binary (sha256 {}); \
                 releases are immutable: delete it first or use a new version",
                row.version, row.arch, existing.sha256
            ),
        ))
    }
}

/// `GET /agent-releases`: newest first.
pub(crate) fn list_releases(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().agent_releases()?;
    Ok(Resp::ok(json!({ "releases": rows })))
}

/// `DELETE /agent-releases/{version}/{arch}`: 204; 409 while a rollout in
/// progress uses the version.
pub(crate) fn delete_release(ctx: &Ctx, version: &str, arch: &str) -> Result<Resp, ApiError> {
    if let Some(r) = ctx.shared.db().active_agent_rollout()? {
        if r.version == version {
            return Err(ApiError::new(
                409,
                format!(
                    "agent rollout {} of {version} is in progress; abort it or wait for it",
                    r.id
                ),
            ));
        }
    }
    if !ctx.shared.db().delete_agent_release(version, arch)? {
        return Err(ApiError::not_found("agent release"));
    }
    tracing::info!(version, arch, "agent release deleted");
    Ok(Resp::no_content())
}

/// `POST /agent-rollouts`: 201 with the rollout.
pub(crate) fn start_rollout(ctx: &Ctx, req: &Req) -> Result<Resp, ApiError> {
    let mut body: serde_json::Map<String, Value> = req.json()?;
    let version = match body.remove("version") {
        Some(Value::String(v)) => v,
        _ => {
            return Err(bad(
                "version (an agent release version, \"0.2.0\") is required",
            ))
        }
    };
    Version::parse(&version).map_err(|e| bad(e.to_string()))?;
    let selector: BTreeMap<String, String> = match body.remove("selector") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| bad(format!("selector must be {{\"key\": \"value\"}}: {e}")))?,
    };
    validate_labels(&selector)?;
    let policy: AgentPolicy = serde_json::from_value(Value::Object(body))
        .map_err(|e| bad(format!("invalid agent rollout: {e}")))?;
    policy.validate()?;
    if ctx.shared.db().agent_releases_of(&version)?.is_empty() {
        return Err(ApiError::new(
            404,
            format!("no agent release of version {version} (POST /api/v1/agent-releases first)"),
        ));
    }
    let r = agent_rollout::start(&ctx.shared, &version, policy, selector)?;
    Ok(Resp::json(201, &r.to_json()))
}

/// `GET /agent-rollouts`: newest first.
pub(crate) fn list_rollouts(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().agent_rollouts(agent_rollout::HISTORY)?;
    let list: Vec<Value> = rows
        .into_iter()
        .map(|r| AgentRollout::from_row(r).to_json())
        .collect();
    Ok(Resp::ok(json!({ "rollouts": list })))
}

fn rollout_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("agent rollout"))
}

/// `GET /agent-rollouts/{id}`.
pub(crate) fn get_rollout(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let row = ctx
        .shared
        .db()
        .agent_rollout(rollout_id(id)?)?
        .ok_or_else(|| ApiError::not_found("agent rollout"))?;
    Ok(Resp::ok(AgentRollout::from_row(row).to_json()))
}

/// `POST /agent-rollouts/{id}/abort`: ends it as reverted; 409 when it is
/// not in progress.
pub(crate) fn abort_rollout(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    let r = agent_rollout::abort(&ctx.shared, rollout_id(id)?)?
        .ok_or_else(|| ApiError::not_found("agent rollout"))?;
    debug_assert_ne!(r.row.state, IN_PROGRESS);
    Ok(Resp::ok(r.to_json()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use ring::signature::KeyPair;

    use super::*;

    fn keypair() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn public(k: &ring::signature::Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn signed(k: &ring::signature::Ed25519KeyPair, version: &str, arch: &str) -> ReleaseReq {
        let sha = [7u8; 32];
        let sig = k.sign(&signed_message(version, arch, &sha).unwrap());
        ReleaseReq {
            version: version.into(),
            arch: arch.into(),
            sha256: protocol::hex_string(&sha).to_ascii_uppercase(),
            signature: protocol::hex_string(sig.as_ref()),
        }
    }

    #[test]
    fn a_release_verifies_only_under_the_configured_key() {
        let (k, other) = (keypair(), keypair());
        let body = signed(&k, "0.2.0", "aarch64");
        let (sha, sig) = verify_release(Some(&public(&k)), &body).unwrap();
        assert_eq!(sha, "07".repeat(32), "lower case");
        assert_eq!(sig.len(), 128);

        let e = verify_release(Some(&public(&other)), &body).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("does not verify"), "{}", e.message);
        let e = verify_release(None, &body).unwrap_err();
        assert!(
            e.status == 400 && e.message.contains("no release key"),
            "{e:?}"
        );
        // Signed for one arch, presented for another.
        let mut moved = signed(&k, "0.2.0", "aarch64");
        moved.arch = "x86_64".into();
        assert!(verify_release(Some(&public(&k)), &moved)
            .unwrap_err()
            .message
            .contains("does not verify"));
        let mut older = signed(&k, "0.2.0", "aarch64");
        older.version = "0.1.0".into();
        assert!(verify_release(Some(&public(&k)), &older).is_err());
    }

    #[test]
    fn malformed_fields_are_named() {
        let k = keypair();
        let key = public(&k);
        type Breaks = fn(&mut ReleaseReq);
        let cases: [(Breaks, &str); 5] = [
            (|b| b.version = "1.2".into(), "invalid agent version"),
            (|b| b.arch = "AArch64".into(), "invalid arch"),
            (|b| b.sha256 = "abc".into(), "sha256"),
            (|b| b.signature = "ab".repeat(63), "signature must be"),
            (|b| b.signature = "zz".repeat(64), "signature must be"),
        ];
        for (f, want) in cases {
            let mut b = signed(&k, "0.2.0", "aarch64");
            f(&mut b);
            let e = verify_release(Some(&key), &b).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
    }
}
