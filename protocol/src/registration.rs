//! The registration token a worker enrols with, and the fleet CA fingerprint
//! it carries (pinned enrolment, like `kubeadm join
//! --discovery-token-ca-cert-hash`).
//!
//! ```text
//! aer_<64 hex: the secret>                      older tokens: no fingerprint
//! aer_<64 hex: the secret>.<64 hex: SHA-256>    the CA certificate's fingerprint
//! ```
//!
//! The fingerprint is the SHA-256 of the DER bytes of the CA certificate the
//! conductor's TLS chain ends in (`openssl x509 -in ca.pem -noout
//! -fingerprint -sha256` prints the same bytes with colons). A worker given
//! such a token trusts, on first contact, only a conductor whose chain holds
//! that certificate, and from then on that CA alone. Only the secret part
//! authenticates the worker to the conductor (the conductor stores its
//! SHA-256); the fingerprint part is public.
//!
//! Limits: the secret part is 1..=[`MAX_SECRET_LEN`] bytes of printable
//! ASCII without spaces or `.`; anything else is refused before a byte goes
//! on the network.

/// Separates the secret from the fingerprint.
pub const SEPARATOR: char = '.';
/// Longest accepted secret part.
pub const MAX_SECRET_LEN: usize = 128;

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::fmt::Display for Fingerprint {
    /// 64 lowercase hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex_string(&self.0))
    }
}

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        use sha2::{Digest, Sha256};
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parses 64 hex digits, optionally prefixed `sha256:` and with `:`
    /// between bytes (the form `openssl x509 -fingerprint -sha256` prints).
    pub fn parse(text: &str) -> Result<Fingerprint, TokenError> {
        let t = text.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        crate::Secret::from_hex(&hex)
            .map(|s| Fingerprint(*s.as_bytes()))
            .map_err(|_| TokenError::BadFingerprint)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing given.
    #[error("the registration token is empty")]
    Empty,
    /// The secret part is too long or has characters no token has.
    #[error("the registration token is malformed (spaces, control characters, or over {MAX_SECRET_LEN} bytes before the '.')")]
    BadSecret,
    /// Text after the `.` that is not a SHA-256 fingerprint.
    #[error("the registration token's CA fingerprint (after the '.') is not 64 hex digits: was the token cut short?")]
    BadFingerprint,
}

/// A parsed registration token.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrationToken {
    /// What authenticates the enrolment (its SHA-256 is what the conductor
    /// stores); the whole token for older tokens.
    pub secret: String,
    /// The fleet CA's fingerprint, if the token carries one.
    pub ca_fingerprint: Option<Fingerprint>,
}

impl std::fmt::Debug for RegistrationToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationToken")
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

impl RegistrationToken {
    /// Parses `secret` or `secret.fingerprint`.
    pub fn parse(token: &str) -> Result<RegistrationToken, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        let (secret, fp) = match token.split_once(SEPARATOR) {
            Some((s, f)) => (s, Some(Fingerprint::parse(f)?)),
            None => (token, None),
        };
        if secret.is_empty()
            || secret.len() > MAX_SECRET_LEN
            || !secret.bytes().all(|b| b.is_ascii_graphic() && b != b'.')
        {
            return Err(TokenError::BadSecret);
        }
        Ok(RegistrationToken {
            secret: secret.to_string(),
            ca_fingerprint: fp,
        })
    }

    /// The token text: `secret` or `secret.fingerprint`.
    pub fn to_text(&self) -> String {
        match &self.ca_fingerprint {
            Some(fp) => format!("{}{SEPARATOR}{fp}", self.secret),
            None => self.secret.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_old_and_pinned_tokens() {
        let secret = format!("aer_{}", "ab".repeat(32));
        let old = RegistrationToken::parse(&secret).unwrap();
        assert_eq!(old.secret, secret);
        assert_eq!(old.ca_fingerprint, None);
        assert_eq!(old.to_text(), secret);

        let fp = Fingerprint::of_der(b"a certificate");
        let text = format!("{secret}.{fp}");
        let pinned = RegistrationToken::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(pinned.secret, secret);
        assert_eq!(pinned.ca_fingerprint, Some(fp));
        assert_eq!(pinned.to_text(), text);
        assert!(!format!("{pinned:?}").contains("abab"), "secret redacted");
    }

    #[test]
    fn fingerprints_in_openssl_form_parse() {
        let fp = Fingerprint::of_der(b"x");
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        let openssl = format!("sha256 Fingerprint={}", colons.join(":"));
        assert_eq!(Fingerprint::parse(&openssl), Ok(fp));
        assert_eq!(Fingerprint::parse(&format!("sha256:{fp}")), Ok(fp));
        assert_eq!(Fingerprint::parse(&fp.to_string().to_uppercase()), Ok(fp));
    }

    #[test]
    fn refuses_malformed_tokens() {
        let secret = format!("aer_{}", "ab".repeat(32));
        assert_eq!(RegistrationToken::parse(""), Err(TokenError::Empty));
        assert_eq!(RegistrationToken::parse("  "), Err(TokenError::Empty));
        let fp = "cd".repeat(32);
        assert_eq!(
            RegistrationToken::parse(&format!("{secret}.{}", &fp[..63])),
            Err(TokenError::BadFingerprint)
        );
        assert_eq!(
            RegistrationToken::parse(&format!("{secret}.")),
            Err(TokenError::BadFingerprint)
        );
        assert_eq!(
            RegistrationToken::parse(&format!("{secret}.{fp}.{fp}")),
            Err(TokenError::BadFingerprint)
        );
        assert_eq!(
            RegistrationToken::parse(&format!(".{fp}")),
            Err(TokenError::BadSecret)
        );
        assert_eq!(RegistrationToken::parse("a b"), Err(TokenError::BadSecret));
        assert_eq!(
            RegistrationToken::parse(&"x".repeat(MAX_SECRET_LEN + 1)),
            Err(TokenError::BadSecret)
        );
        assert_eq!(
            RegistrationToken::parse("tok\u{e9}n"),
            Err(TokenError::BadSecret)
        );
    }
}
