//! S3 errors, in one place: the S3 code and HTTP status of every failure
//! (the store's, the signature check's, a request's own), and the
//! `<Error>` XML they are answered with.

use s3::xml;

use super::Reply;
use crate::chunked::ChecksumMismatch;
use crate::sigv4::SigError;
use crate::store::StoreError;

/// An S3 error answer.
#[derive(Debug)]
pub(super) struct S3Err {
    pub(super) status: u16,
    pub(super) code: &'static str,
    pub(super) message: String,
}

pub(super) fn s3err(status: u16, code: &'static str, message: impl Into<String>) -> S3Err {
    S3Err {
        status,
        code,
        message: message.into(),
    }
}

impl From<SigError> for S3Err {
    fn from(e: SigError) -> Self {
        let (code, status) = e.s3_code();
        s3err(status, code, e.to_string())
    }
}

impl From<StoreError> for S3Err {
    fn from(e: StoreError) -> Self {
        if let StoreError::Body(io) = &e {
            if let Some(sig) = io.get_ref().and_then(|i| i.downcast_ref::<SigError>()) {
                return sig.clone().into();
            }
            if let Some(m) = io
                .get_ref()
                .and_then(|i| i.downcast_ref::<ChecksumMismatch>())
            {
                return s3err(400, "BadDigest", m.to_string());
            }
        }
        let (code, status) = e.s3_code();
        if status >= 500 && status != 503 {
            eprintln!("storage-manager: internal error: {e}");
            return s3err(status, code, "internal error; see the storage-manager log");
        }
        s3err(status, code, e.to_string())
    }
}

impl StoreError {
    /// S3 error code and HTTP status.
    pub fn s3_code(&self) -> (&'static str, u16) {
        match self {
            StoreError::NoSuchBucket(_) => ("NoSuchBucket", 404),
            StoreError::NoSuchKey(_) => ("NoSuchKey", 404),
            StoreError::BucketExists(_) => ("BucketAlreadyOwnedByYou", 409),
            StoreError::BucketNotEmpty(_) => ("BucketNotEmpty", 409),
            StoreError::InvalidBucketName(_) => ("InvalidBucketName", 400),
            StoreError::KeyTooLong => ("KeyTooLongError", 400),
            StoreError::EntityTooLarge(_) => ("EntityTooLarge", 400),
            StoreError::EntityTooSmall(..) => ("EntityTooSmall", 400),
            StoreError::IncompleteBody { .. } => ("IncompleteBody", 400),
            StoreError::Body(_) => ("IncompleteBody", 400),
            StoreError::MetadataTooLarge => ("MetadataTooLarge", 400),
            StoreError::NoSuchUpload(_) => ("NoSuchUpload", 404),
            StoreError::InvalidPart(_) => ("InvalidPart", 400),
            StoreError::InvalidPartOrder => ("InvalidPartOrder", 400),
            StoreError::PreconditionFailed(_) => ("PreconditionFailed", 412),
            StoreError::InvalidPartNumber => ("InvalidArgument", 400),
            StoreError::Kms(_) => ("ServiceUnavailable", 503),
            StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Random(_) => {
                ("InternalError", 500)
            }
        }
    }
}

impl SigError {
    /// The S3 error code and HTTP status.
    pub fn s3_code(&self) -> (&'static str, u16) {
        match self {
            SigError::Missing => ("AccessDenied", 403),
            SigError::Malformed(_) => ("AuthorizationHeaderMalformed", 400),
            SigError::UnknownKey(_) => ("InvalidAccessKeyId", 403),
            SigError::Mismatch => ("SignatureDoesNotMatch", 403),
            SigError::Skewed => ("RequestTimeTooSkewed", 403),
            SigError::Expired => ("AccessDenied", 403),
            SigError::PayloadMismatch => ("XAmzContentSHA256Mismatch", 400),
            SigError::V2 => ("InvalidRequest", 400),
        }
    }
}

impl S3Err {
    /// The answer: S3's `<Error>` document about `resource`, with this
    /// error's status.
    pub(super) fn reply(&self, resource: &str, request_id: &str) -> Reply {
        let body = format!(
            "<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>{request_id}</RequestId></Error>",
            self.code,
            xml::escape(&self.message),
            xml::escape(resource)
        );
        let mut r = Reply::xml(body);
        r.status = self.status;
        r
    }

    /// This error as one `<Error>` entry of a DeleteObjects result.
    pub(super) fn delete_entry(&self, key: &str) -> String {
        format!(
            "<Error><Key>{}</Key><Code>{}</Code><Message>{}</Message></Error>",
            xml::escape(key),
            self.code,
            xml::escape(&self.message)
        )
    }
}
