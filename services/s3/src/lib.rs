//! # aerekos S3, the client side
//!
//! What a program needs to talk to an S3-compatible store such as
//! storage-manager, in one place: storage-manager's server verifies with
//! the same canonical requests and signatures, db-manager stores its
//! backups with the client. No server code and no other service in here.
//!
//! * [`sigv4`]: AWS Signature V4 signing — canonical requests, signing
//!   keys, the `Authorization` header and presigned URLs; the server's
//!   verification (storage-manager's `sigv4`) builds on it.
//! * [`client`]: a small blocking S3 client (ureq, path-style, plain HTTP).
//! * [`timefmt`]: the UTC time formats S3 uses, without a date library.
//! * [`xml`]: escaping, and a reader for S3's flat XML documents.

pub mod client;
pub mod sigv4;
pub mod timefmt;
pub mod xml;

pub use client::{ClientError, ListPage, ObjectInfo, ObjectSummary, S3Client};
pub use sigv4::Credentials;
