//! # aerekos storage-manager
//!
//! An S3-compatible object store hosted on an aerekos worker. See
//! `README.md` beside this crate for the supported API, on-disk formats
//! and limits.
//!
//! Modules usable by other crates: [`sigv4`] (AWS Signature V4 signing and
//! verification) and [`client`] (a small blocking S3 client).

pub mod client;
pub mod sigv4;
pub mod timefmt;
pub mod xml;

pub use client::{ClientError, S3Client};
pub use sigv4::Credentials;
