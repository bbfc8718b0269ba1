//! Worker downloads: `GET /api/v1/agent/sealed-manifests/{name}/{version}`,
//! `GET /api/v1/agent/manifests/{name}/{version}` and
//! `GET /api/v1/agent/artifacts/{sha256}`, authenticated with
//! `Authorization: Aerekos-Worker <id> <tag>`
//! ([`protocol::manifest::verify_http_auth`]) under the worker's frame
//! secret; an unknown or revoked worker or a bad tag gets 401.
//!
//! A manifest (which carries the service's secrets) is served only to a
//! worker that a deployment of that service targets, and only for a version
//! it may be told to run ([`crate::services::may_fetch`]); anything else is
//! 404, so a worker cannot read another service's secrets. Artifacts (plain
//! binaries) are served to any authenticated worker.
//!
//! The sealed route answers the same manifest bytes sealed to the requesting
//! worker ([`protocol::sealed`], context
//! [`protocol::sealed::manifest_context`], a fresh random nonce each time),
//! so the secrets are unreadable on a plain-HTTP link or in a proxy's log.
//! Agents of this release use it; the plaintext route stays for older ones.

use std::path::PathBuf;

use super::message::{ApiError, Ctx, RawResp, Req};

fn worker_of(ctx: &Ctx, req: &Req) -> Result<String, ApiError> {
    authenticated(ctx, req).map(|(id, _)| id)
}

/// The authenticated worker's id and the secret its `GET` was signed
/// with (during a rotation: the current, the next or the previous one).
fn authenticated(ctx: &Ctx, req: &Req) -> Result<(String, protocol::Secret), ApiError> {
    authenticated_for(ctx, req, "GET")
}

/// [`authenticated`] for a request with `method` (the tag covers it):
/// the remote exec upload is a `POST`.
pub(crate) fn authenticated_for(
    ctx: &Ctx,
    req: &Req,
    method: &str,
) -> Result<(String, protocol::Secret), ApiError> {
    let header = req.authorization.as_deref().unwrap_or_default();
    let workers = ctx.shared.workers();
    let now = crate::state::now_ms();
    for k in 0..3 {
        let mut secret = None;
        let id = protocol::manifest::verify_http_auth(header, method, &req.path, |id| {
            secret = workers
                .get(id)
                .filter(|w| !w.revoked)
                .and_then(|w| w.accepted_secrets(now).get(k).map(|(s, _)| (*s).clone()));
            secret.clone()
        });
        if let (Some(id), Some(secret)) = (id, secret) {
            return Ok((id.to_string(), secret));
        }
    }
    Err(ApiError::new(401, "worker authentication failed"))
}

/// The encoded manifest `name` v`version` if `worker` may fetch it, else 404.
fn manifest_bytes(ctx: &Ctx, worker: &str, name: &str, version: u32) -> Result<Vec<u8>, ApiError> {
    let not_found = || ApiError::not_found("manifest");
    if !crate::spec::valid_name(name)
        || !crate::services::may_fetch(&ctx.shared, worker, name, version)
            .map_err(ApiError::internal)?
    {
        tracing::info!(worker_id = %worker, service = name, version, "manifest refused: not targeted");
        return Err(not_found());
    }
    let built = crate::deployment::manifest(&ctx.shared, name, version)
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    Ok(built.bytes.clone())
}

/// `GET /agent/manifests/{name}/{version}`: the exact `Manifest::encode()`
/// bytes whose SHA-256 the `DeployManifest` command carried, in plaintext
/// (agents older than the sealed route).
pub(crate) fn manifest(
    ctx: &Ctx,
    req: &Req,
    name: &str,
    version: &str,
) -> Result<RawResp, ApiError> {
    let worker = worker_of(ctx, req)?;
    let version: u32 = version
        .parse()
        .map_err(|_| ApiError::not_found("manifest"))?;
    let bytes = manifest_bytes(ctx, &worker, name, version)?;
    tracing::debug!(worker_id = %worker, service = name, version, "manifest served");
    Ok(RawResp::bytes("application/octet-stream", bytes))
}

/// `GET /agent/sealed-manifests/{name}/{version}`: the same bytes as
/// [`manifest`], sealed to the requesting worker under
/// `manifest:<worker_id>:<name>:<version>` (`Cache-Control: no-store`, as
/// `respond_raw` sends with every raw answer).
pub(crate) fn sealed_manifest(
    ctx: &Ctx,
    req: &Req,
    name: &str,
    version: &str,
) -> Result<RawResp, ApiError> {
    let (worker, secret) = authenticated(ctx, req)?;
    let version: u32 = version
        .parse()
        .map_err(|_| ApiError::not_found("manifest"))?;
    let bytes = manifest_bytes(ctx, &worker, name, version)?;
    let context = protocol::sealed::manifest_context(&worker, name, version);
    let nonce = crate::crypto::random_bytes::<{ protocol::sealed::NONCE_LEN }>()?;
    let sealed = protocol::sealed::seal(&secret, context.as_bytes(), &bytes, nonce)
        .map_err(ApiError::internal)?;
    tracing::debug!(worker_id = %worker, service = name, version, "sealed manifest served");
    Ok(RawResp::bytes("application/octet-stream", sealed))
}

/// `GET /agent/artifacts/{sha256}`: the file, streamed from disk.
pub(crate) fn artifact(ctx: &Ctx, req: &Req, sha: &str) -> Result<RawResp, ApiError> {
    let worker = worker_of(ctx, req)?;
    let not_found = || ApiError::not_found("artifact");
    if !crate::artifacts::valid_sha(sha) || ctx.shared.db().artifact(sha)?.is_empty() {
        return Err(not_found());
    }
    let path = crate::artifacts::path_of(&PathBuf::from(&ctx.shared.config.data_dir), sha);
    let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => not_found(),
        _ => ApiError::internal(e),
    })?;
    let len = file.metadata().map_err(ApiError::internal)?.len();
    let len = usize::try_from(len).map_err(ApiError::internal)?;
    tracing::debug!(worker_id = %worker, sha256 = sha, len, "artifact served");
    Ok(RawResp {
        status: 200,
        content_type: "application/octet-stream",
        body: Box::new(file),
        len: Some(len),
        headers: Vec::new(),
    })
}
