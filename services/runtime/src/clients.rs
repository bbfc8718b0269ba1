//! Client API keys, issued through the conductor.
//!
//! An admin puts the keys in the service spec's `secrets` on
//! the conductor; the worker hands them to the service over its local API
//! (`GET /v1/secrets`), which the service reads at start and again every
//! refresh interval (30 s by default), so a new or revoked key applies
//! without a restart. Two spellings, both may be used:
//!
//! * `"clients": "app1:<token>,app2:<token>"`
//! * `"client.app1": "<token>"`
//!
//! Client names are `[a-z0-9_-]{1,32}`; tokens are 16..=256 printable ASCII
//! characters without spaces, commas or colons (e.g. `openssl rand -hex 32`).
//! Invalid entries are skipped with a warning that names the client, never
//! the token. A request carries `Authorization: Bearer <token>`; the token is
//! compared in constant time against every client's (no early exit).

use std::collections::BTreeMap;

/// Is `name` a valid client name (`[a-z0-9_-]{1,32}`)?
pub fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// Shortest accepted client token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted client token.
pub const MAX_TOKEN_LEN: usize = 256;

/// The set of client names and tokens. `Debug` shows names only.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Clients {
    by_name: BTreeMap<String, String>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_token(t: &str) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b':')
}

impl Clients {
    /// Reads the client keys out of the service's secrets; returns the set
    /// and warnings (naming clients, never tokens).
    pub fn from_secrets(secrets: &BTreeMap<String, String>) -> (Clients, Vec<String>) {
        let mut out = Clients::default();
        let mut warnings = Vec::new();
        let mut add = |name: &str, token: &str, warnings: &mut Vec<String>| {
            let (name, token) = (name.trim(), token.trim());
            if !valid_client_name(name) {
                warnings.push(format!(
                    "client {name:?} skipped: names are [a-z0-9_-]{{1,32}}"
                ));
            } else if !valid_token(token) {
                warnings.push(format!(
                    "client {name} skipped: tokens are {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} \
                     printable characters without spaces, ',' or ':'"
                ));
            } else if out.by_name.values().any(|t| t == token) {
                warnings.push(format!(
                    "client {name} skipped: its token is another client's"
                ));
            } else {
                out.by_name.insert(name.to_string(), token.to_string());
            }
        };
        if let Some(list) = secrets.get("clients") {
            for item in list.split(',').filter(|s| !s.trim().is_empty()) {
                match item.split_once(':') {
                    Some((name, token)) => add(name, token, &mut warnings),
                    None => warnings.push(
                        "an entry of the clients secret is not name:token; skipped".to_string(),
                    ),
                }
            }
        }
        for (key, token) in secrets {
            if let Some(name) = key.strip_prefix("client.") {
                add(name, token, &mut warnings);
            }
        }
        (out, warnings)
    }

    /// A set from explicit pairs (tests, the benchmark). Invalid pairs are
    /// skipped.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Clients {
        let secrets = pairs
            .into_iter()
            .map(|(n, t)| (format!("client.{n}"), t.to_string()))
            .collect();
        Clients::from_secrets(&secrets).0
    }

    /// The client owning `token`, compared in constant time with every
    /// client's token.
    pub fn authenticate(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (name, t) in &self.by_name {
            if ct_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Client names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// No clients?
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Constant-time equality (the lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn both_spellings_and_warnings() {
        let secrets: BTreeMap<String, String> = [
            (
                "clients",
                "app1:aaaaaaaaaaaaaaaa1, app2:bbbbbbbbbbbbbbbb2,bad,APP:cccccccccccccccccc",
            ),
            ("client.app3", "dddddddddddddddd3"),
            ("client.short", "tooshort-token1"),
            ("client.dup", "dddddddddddddddd3"),
            ("master_key", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (c, warnings) = Clients::from_secrets(&secrets);
        assert_eq!(c.names().collect::<Vec<_>>(), ["app1", "app2", "app3"]);
        assert_eq!(c.authenticate("bbbbbbbbbbbbbbbb2"), Some("app2"));
        assert_eq!(c.authenticate("bbbbbbbbbbbbbbbb"), None);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        for w in &warnings {
            assert!(!w.contains("tooshort") && !w.contains("cccc") && !w.contains("dddd"));
        }
        assert!(!format!("{c:?}").contains("aaaa"));
    }
}
