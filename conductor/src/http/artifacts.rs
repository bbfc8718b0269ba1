//! `POST /api/v1/artifacts?arch=<arch>&name=<label>` (raw body, streamed to
//! disk while hashed, see [`crate::artifacts`]), `GET /api/v1/artifacts`,
//! `DELETE /api/v1/artifacts/{sha256}`.
//!
//! Limits: `Config::max_artifact_bytes` per upload (413 beyond, refused
//! before reading when `Content-Length` says so); an artifact referenced by
//! any stored spec version cannot be deleted (409; spec versions are
//! immutable and never deleted, so it stays while a spec names it), nor can
//! the binary of an agent release (409 until the release is deleted).

use std::io::Read;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::message::{ApiError, Ctx, Req, Resp};
use crate::artifacts::{self, ArtifactError, MAX_LABEL_LEN};
use crate::spec::SpecDoc;
use crate::state::now_ms;
use crate::store::ArtifactRow;

/// Decodes `%XX` escapes and `+` of a query value; `None` if malformed.
fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                // Two hex digits only: `from_str_radix` also takes a sign
                // (`%+1` was 0x01); the worker's twin of this decoder had the
                // same slip (see the `local_api_request` fuzz target).
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn data_dir(ctx: &Ctx) -> PathBuf {
    PathBuf::from(&ctx.shared.config.data_dir)
}

/// `POST /artifacts?arch=&name=`: → 201 with the stored row.
pub(crate) fn upload(
    ctx: &Ctx,
    req: &Req,
    content_length: Option<u64>,
    body: &mut dyn Read,
) -> Result<Resp, ApiError> {
    super::auth::authorize(ctx, req)?;
    let arch = req
        .query
        .get("arch")
        .and_then(|a| pct_decode(a))
        .filter(|a| artifacts::valid_arch(a))
        .ok_or_else(|| {
            ApiError::new(400, "arch is required: 1..=32 characters of [A-Za-z0-9_-]")
        })?;
    let name = match req.query.get("name") {
        None => String::new(),
        Some(n) => pct_decode(n)
            .filter(|n| n.len() <= MAX_LABEL_LEN && !n.chars().any(char::is_control))
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    format!("name must be ≤ {MAX_LABEL_LEN} bytes without control characters"),
                )
            })?,
    };
    let limit = ctx.shared.config.max_artifact_bytes;
    if content_length.is_some_and(|n| n > limit) {
        return Err(ApiError::new(
            413,
            format!("artifact larger than {limit} bytes"),
        ));
    }
    let (sha256, size) = artifacts::receive(&data_dir(ctx), body, limit).map_err(|e| match e {
        ArtifactError::TooLarge(_) => ApiError::new(413, e.to_string()),
        ArtifactError::Empty => ApiError::new(400, e.to_string()),
        ArtifactError::Io { .. } => ApiError::internal(e),
    })?;
    let row = ArtifactRow {
        sha256,
        arch,
        name,
        size,
        created_ms: now_ms(),
    };
    ctx.shared.db().put_artifact(&row)?;
    tracing::info!(sha256 = %row.sha256, arch = %row.arch, size, "artifact stored");
    Ok(Resp::json(201, &row))
}

/// `GET /artifacts`.
pub(crate) fn list(ctx: &Ctx) -> Result<Resp, ApiError> {
    let rows = ctx.shared.db().artifacts()?;
    Ok(Resp::ok(json!({ "artifacts": rows })))
}

/// `DELETE /artifacts/{sha}`: 409 while a stored spec references it or it
/// is an agent release's binary.
pub(crate) fn delete(ctx: &Ctx, sha: &str) -> Result<Resp, ApiError> {
    if !artifacts::valid_sha(sha) {
        return Err(ApiError::not_found("artifact"));
    }
    let db = ctx.shared.db();
    if db.artifact(sha)?.is_empty() {
        return Err(ApiError::not_found("artifact"));
    }
    let users: Vec<Value> = db
        .services_containing(sha)?
        .into_iter()
        .filter(|row| {
            serde_json::from_str::<SpecDoc>(&row.spec_json)
                .map_or(true, |d| d.artifact_shas().any(|s| s == sha))
        })
        .map(|row| json!({"name": row.name, "version": row.version}))
        .collect();
    if !users.is_empty() {
        return Err(ApiError::new(
            409,
            format!(
                "artifact is referenced by service specs: {}",
                Value::from(users)
            ),
        ));
    }
    let releases: Vec<String> = db
        .agent_releases_with_sha(sha)?
        .into_iter()
        .map(|r| format!("{} {}", r.version, r.arch))
        .collect();
    if !releases.is_empty() {
        return Err(ApiError::new(
            409,
            format!(
                "artifact is the binary of agent releases: {} (DELETE /api/v1/agent-releases/{{version}}/{{arch}} first)",
                releases.join(", ")
            ),
        ));
    }
    db.delete_artifact(sha)?;
    drop(db);
    match std::fs::remove_file(artifacts::path_of(&data_dir(ctx), sha)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::internal(e)),
    }
    tracing::info!(sha256 = sha, "artifact deleted");
    Ok(Resp::no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(pct_decode("relay%20v2+x").as_deref(), Some("relay v2 x"));
        assert_eq!(pct_decode("aarch64").as_deref(), Some("aarch64"));
        assert_eq!(pct_decode("%zz"), None);
        assert_eq!(pct_decode("%4"), None);
        assert_eq!(pct_decode("%ff"), None);
        assert_eq!(pct_decode("%+1"), None);
        assert_eq!(pct_decode("%-1"), None);
    }
}
