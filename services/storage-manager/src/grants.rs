//! Per-bucket permissions of access keys (issue 18).
//!
//! An access key either has full access (every key of the plain
//! `AKID:secret,...` form, as before grants existed) or only the buckets its
//! grants list: `{"backups": "read-write", "public-*": "read"}`, bucket
//! names or name prefixes ending in `*` (`*` alone: every bucket), each
//! with `read` or `read-write`. When several patterns match a bucket the
//! strongest permission applies; a bucket no pattern matches cannot be
//! touched at all (an empty list `{}` gives no bucket).
//!
//! `read` allows GET/HEAD of objects, listing objects, HeadBucket and
//! GetBucketLocation, and reading a copy source; `read-write` allows
//! everything on the bucket (PUT, DELETE, copies into it, multipart
//! uploads and their listings, CreateBucket and DeleteBucket). ListBuckets
//! shows only the buckets the key may read. What each request needs is
//! decided in [`crate::http`]; malformed grants are refused with an error
//! naming the key (never its secret), so a key is never given more than
//! its grants because of a typo.

use serde_json::Value;

/// A permission on a bucket; `ReadWrite` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Perm {
    /// Read objects and list the bucket.
    Read,
    /// Everything on the bucket.
    ReadWrite,
}

impl Perm {
    /// `read` or `read-write`, as written in the grants.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::ReadWrite => "read-write",
        }
    }

    /// Parses `read` or `read-write`.
    pub fn parse(s: &str) -> Option<Perm> {
        match s {
            "read" => Some(Perm::Read),
            "read-write" => Some(Perm::ReadWrite),
            _ => None,
        }
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One grant: a bucket name, or a name prefix (the pattern ended in `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    /// The name, or the prefix without its `*`.
    name: String,
    prefix: bool,
    perm: Perm,
}

impl Grant {
    fn matches(&self, bucket: &str) -> bool {
        if self.prefix {
            bucket.starts_with(&self.name)
        } else {
            bucket == self.name
        }
    }
}

/// The buckets a restricted key may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(Vec<Grant>);

/// Whether `p` is a bucket name or a prefix of one: lowercase letters,
/// digits, `.` and `-`, at most 63 characters, optionally followed by one
/// trailing `*`.
fn parse_pattern(p: &str) -> Option<(String, bool)> {
    let (name, prefix) = match p.strip_suffix('*') {
        Some(n) => (n, true),
        None => (p, false),
    };
    let ok = name.len() <= 63
        && (prefix || !name.is_empty())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    ok.then(|| (name.to_string(), prefix))
}

impl Grants {
    /// From a JSON object `{"<bucket or prefix*>": "read" | "read-write", ...}`;
    /// an error saying what is wrong otherwise (`who` names the key).
    pub fn from_json(who: &str, v: &Value) -> Result<Grants, String> {
        let Value::Object(map) = v else {
            return Err(format!(
                "{who}: \"buckets\" must be an object like {{\"backups\": \"read-write\", \"public-*\": \"read\"}}"
            ));
        };
        let mut grants = Vec::with_capacity(map.len());
        for (pattern, perm) in map {
            let (name, prefix) = parse_pattern(pattern).ok_or_else(|| {
                format!(
                    "{who}: bucket pattern {pattern:?} is neither a bucket name nor a name prefix \
                     ending in * (lowercase letters, digits, '.', '-'; '*' only at the end)"
                )
            })?;
            let perm = perm.as_str().and_then(Perm::parse).ok_or_else(|| {
                format!(
                    "{who}: the permission on {pattern:?} must be \"read\" or \"read-write\", not {perm}"
                )
            })?;
            grants.push(Grant { name, prefix, perm });
        }
        Ok(Grants(grants))
    }

    /// The strongest permission a grant gives on `bucket`, if any.
    pub fn perm(&self, bucket: &str) -> Option<Perm> {
        self.0
            .iter()
            .filter(|g| g.matches(bucket))
            .map(|g| g.perm)
            .max()
    }
}

impl std::fmt::Display for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no bucket");
        }
        for (i, g) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let star = if g.prefix { "*" } else { "" };
            write!(f, "{sep}{}{star}: {}", g.name, g.perm)?;
        }
        Ok(())
    }
}

/// What an access key may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every bucket, read and write (a key without grants).
    Full,
    /// Only what the grants give.
    Buckets(Grants),
}

impl Access {
    /// No bucket at all (what a request has before its key is known).
    pub fn nothing() -> Access {
        Access::Buckets(Grants::default())
    }

    /// Whether `need` is allowed on `bucket`.
    pub fn allows(&self, bucket: &str, need: Perm) -> bool {
        match self {
            Access::Full => true,
            Access::Buckets(g) => g.perm(bucket).is_some_and(|p| p >= need),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    fn grants(json: &str) -> Result<Grants, String> {
        Grants::from_json("access key AKIDX", &serde_json::from_str(json).unwrap())
    }

    #[test]
    fn matching_names_prefixes_and_the_strongest_grant() {
        let g =
            grants(r#"{"backups": "read-write", "public-*": "read", "public-rw": "read-write"}"#)
                .unwrap();
        let a = Access::Buckets(g.clone());
        assert!(a.allows("backups", Perm::Read));
        assert!(a.allows("backups", Perm::ReadWrite));
        assert!(!a.allows("backups2", Perm::Read), "a name is not a prefix");
        assert!(!a.allows("backup", Perm::Read));
        assert!(a.allows("public-photos", Perm::Read));
        assert!(!a.allows("public-photos", Perm::ReadWrite));
        assert!(a.allows("public-", Perm::Read));
        assert_eq!(g.perm("public-rw"), Some(Perm::ReadWrite), "strongest wins");
        assert!(!a.allows("db-backups", Perm::Read));
        assert_eq!(
            g.to_string(),
            "backups: read-write, public-*: read, public-rw: read-write"
        );

        let all = grants(r#"{"*": "read"}"#).unwrap();
        assert_eq!(all.perm("anything"), Some(Perm::Read));
        let none = Access::Buckets(grants("{}").unwrap());
        assert!(!none.allows("backups", Perm::Read));
        assert!(!Access::nothing().allows("backups", Perm::Read));
        assert!(Access::Full.allows("backups", Perm::ReadWrite));
    }

    #[test]
    fn bad_shapes_are_refused_with_a_clear_error() {
        for (json, says) in [
            (r#"["backups"]"#, "must be an object"),
            (r#""backups""#, "must be an object"),
            (
                r#"{"backups": "write"}"#,
                "must be \"read\" or \"read-write\", not \"write\"",
            ),
            (r#"{"backups": "READ"}"#, "not \"READ\""),
            (r#"{"backups": true}"#, "not true"),
            (r#"{"Backups": "read"}"#, "\"Backups\" is neither"),
            (r#"{"*-backups": "read"}"#, "'*' only at the end"),
            (r#"{"a*b": "read"}"#, "is neither"),
            (r#"{"": "read"}"#, "is neither"),
            (r#"{"b/k": "read"}"#, "is neither"),
        ] {
            let e = grants(json).unwrap_err();
            assert!(e.starts_with("access key AKIDX: "), "{json}: {e}");
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
