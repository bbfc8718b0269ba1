//! The conductor's HTTP address, or several: `--conductor` may be a
//! comma-separated list (`https://a:3000,https://b:3000`), an active
//! conductor and its standbys on other hosts (see the README's
//! "Active/standby conductors"). Enrolment, manifest and artifact downloads,
//! agent updates and remote exec/shell all go to the conductor that is
//! serving.
//!
//! "Serving" is "accepts a TCP connection": a standby either opens no port
//! (older conductors, or before the active one's TLS material exists) or
//! forwards each request to the active one, so any that accepts serves.
//! Before a request [`ConductorUrls::reachable`] connects to
//! the URL that answered last, then to the others in list order, each with a
//! [`PROBE_TIMEOUT`], and remembers the first that accepts. With one URL
//! nothing is probed: the request itself says whether the conductor is there.
//!
//! Limits: at most [`MAX_CONDUCTORS`] URLs; each `http://` or `https://`
//! with a host. The list is stored as given in `state.json`.
//!
//! Blocking (it connects): call from `spawn_blocking` or a thread, as every
//! HTTP call of the agent is.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most URLs in a `--conductor` list.
pub const MAX_CONDUCTORS: usize = 8;

/// How long a probe waits for one conductor to accept a connection.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The conductor URLs, and which of them answered last.
#[derive(Clone, Debug)]
pub struct ConductorUrls {
    /// Base URLs without a trailing `/`; never empty, at most
    /// [`MAX_CONDUCTORS`], each `http://` or `https://` with a host
    /// (checked by [`ConductorUrls::parse`], the only constructor).
    list: Vec<String>,
    /// Index into `list` of the one that accepted last; shared by the
    /// clones a session hands to its download and exec threads, so one
    /// failover is found once. Always `< list.len()`.
    preferred: Arc<AtomicUsize>,
}

impl ConductorUrls {
    /// Parses a URL or a comma-separated list; `None` if any part is not
    /// `http(s)://host…`, a part is empty, or there are more than
    /// [`MAX_CONDUCTORS`].
    pub fn parse(text: &str) -> Option<ConductorUrls> {
        let mut list = Vec::new();
        for part in text.split(',') {
            let url = part.trim().trim_end_matches('/');
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))?;
            if authority(rest).is_empty() {
                return None;
            }
            list.push(url.to_string());
        }
        if list.is_empty() || list.len() > MAX_CONDUCTORS {
            return None;
        }
        Some(ConductorUrls {
            list,
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// All of them, in list order.
    pub fn all(&self) -> &[String] {
        &self.list
    }

    /// The same list with `http://` made `https://` (the conductor serves
    /// both on one port: used once a CA is pinned).
    pub fn upgraded_to_https(&self) -> ConductorUrls {
        let list = self
            .list
            .iter()
            .map(|u| match u.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => u.clone(),
            })
            .collect();
        ConductorUrls {
            list,
            preferred: self.preferred.clone(),
        }
    }

    /// Whether any of them is `https://`.
    pub fn any_https(&self) -> bool {
        self.list.iter().any(|u| u.starts_with("https://"))
    }

    /// The one that answered last (the first before any probe), without
    /// probing.
    pub fn current(&self) -> &str {
        &self.list[self.preferred.load(Ordering::Relaxed) % self.list.len()]
    }

    /// The base URL to send a request to: the only one, or the first (the
    /// one that answered last, then list order) that accepts a TCP
    /// connection within [`PROBE_TIMEOUT`]. When none does, the one that
    /// answered last, so the request fails with its own error.
    pub fn reachable(&self) -> &str {
        let n = self.list.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        if n == 1 {
            return &self.list[0];
        }
        for i in (0..n).map(|k| (start + k) % n) {
            if accepts(&self.list[i]) {
                if i != start {
                    tracing::info!(conductor = %self.list[i], "the conductor at {} does not answer: using {}", self.list[start], self.list[i]);
                    self.preferred.store(i, Ordering::Relaxed);
                }
                return &self.list[i];
            }
        }
        &self.list[start]
    }
}

impl std::fmt::Display for ConductorUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.list.join(","))
    }
}

/// `host[:port]` of what follows the scheme.
fn authority(rest: &str) -> &str {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

/// Whether the URL's host accepts a TCP connection on its port.
fn accepts(url: &str) -> bool {
    let (rest, default_port) = match url.strip_prefix("https://") {
        Some(rest) => (rest, 443),
        None => (url.strip_prefix("http://").unwrap_or(url), 80),
    };
    let host = authority(rest);
    // A port is present when the text after the last `:` is digits and
    // (for an IPv6 literal) that `:` follows the closing bracket.
    let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.starts_with('[') || h.ends_with(']'))
    });
    let target = if has_port {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    };
    let Ok(addrs) = target.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_one_url_or_a_list() {
        let one = ConductorUrls::parse("https://c:3000/").unwrap();
        assert_eq!(one.all(), ["https://c:3000"]);
        let two = ConductorUrls::parse("http://a:3000, https://[::1]:3000").unwrap();
        assert_eq!(two.all(), ["http://a:3000", "https://[::1]:3000"]);
        assert_eq!(two.to_string(), "http://a:3000,https://[::1]:3000");
        assert_eq!(
            two.upgraded_to_https().all(),
            ["https://a:3000", "https://[::1]:3000"]
        );
        assert!(two.any_https());
        assert!(!ConductorUrls::parse("http://a").unwrap().any_https());
        for bad in [
            "",
            "a:3000",
            "http://",
            "http://a,",
            "http://a,,http://b",
            "ftp://a",
            "http://a,mqtt://b",
        ] {
            assert!(ConductorUrls::parse(bad).is_none(), "{bad:?} accepted");
        }
        let nine = ["http://a"; MAX_CONDUCTORS + 1].join(",");
        assert!(ConductorUrls::parse(&nine).is_none());
        let eight = ["http://a"; MAX_CONDUCTORS].join(",");
        assert!(ConductorUrls::parse(&eight).is_some());
    }

    #[test]
    fn the_first_that_accepts_is_used_and_remembered() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = up.local_addr().unwrap().port();
        // Port 1 (tcpmux) is closed on any machine that runs these tests.
        let urls =
            ConductorUrls::parse(&format!("http://127.0.0.1:1,http://127.0.0.1:{port}/")).unwrap();
        let live = format!("http://127.0.0.1:{port}");
        assert_eq!(urls.reachable(), live);
        // Remembered, and shared with clones.
        let clone = urls.clone();
        assert_eq!(clone.preferred.load(Ordering::Relaxed), 1);
        assert_eq!(clone.reachable(), live);
        // Nobody answers: the last one that did.
        drop(up);
        assert_eq!(urls.reachable(), live);
        // One URL: never probed.
        let one = ConductorUrls::parse("http://127.0.0.1:1").unwrap();
        assert_eq!(one.reachable(), "http://127.0.0.1:1");
    }

    #[test]
    fn a_url_without_a_port_is_probed_on_the_schemes_port() {
        assert_eq!(authority("h:1/x?y"), "h:1");
        assert_eq!(authority("[::1]:8/"), "[::1]:8");
        assert!(!accepts("http://127.0.0.1:1"));
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = up.local_addr().unwrap().port();
        assert!(accepts(&format!("http://127.0.0.1:{port}/api")));
    }
}
