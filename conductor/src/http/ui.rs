//! The web dashboard: `conductor/assets/` embedded in the binary at build
//! time and served at `/` (no CDN, nothing fetched at build or run time).
//!
//! Every file is answered with `Cache-Control: no-cache` and a strong `ETag`
//! (sha256 of the content), so a browser revalidates cheaply (304) and an
//! upgraded conductor is picked up at once. The page gets a strict
//! Content-Security-Policy: only same-origin scripts, styles, images and
//! `fetch`, no inline script or style attribute, no framing.
//!
//! The script is a set of ES modules (`<script type="module">`, one per
//! view plus `core.js`), loaded as they are: no bundler, no build step.
//! `index.html` preloads every module (`modulepreload`) so the browser
//! fetches them in one round instead of following the imports.

use std::sync::OnceLock;

use super::message::Resp;
use crate::crypto::sha256_hex;

/// The policy sent with every dashboard file.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
}

/// A script module, `conductor/assets/<name>` served at `/assets/<name>`.
macro_rules! module {
    ($name:literal) => {
        Asset {
            path: concat!("/assets/", $name),
            body: include_str!(concat!("../../assets/", $name)),
            content_type: "text/javascript; charset=utf-8",
        }
    };
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        body: include_str!("../../assets/index.html"),
        content_type: "text/html; charset=utf-8",
    },
    module!("app.js"),
    module!("core.js"),
    module!("login.js"),
    module!("logs.js"),
    module!("fleet.js"),
    module!("worker.js"),
    module!("services.js"),
    module!("artifacts.js"),
    module!("service.js"),
    module!("rollouts.js"),
    module!("settings.js"),
    module!("alerts.js"),
    module!("agents.js"),
    module!("terminal.js"),
    Asset {
        path: "/assets/app.css",
        body: include_str!("../../assets/app.css"),
        content_type: "text/css; charset=utf-8",
    },
    Asset {
        path: "/assets/favicon.svg",
        body: include_str!("../../assets/favicon.svg"),
        content_type: "image/svg+xml",
    },
];

fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", &sha256_hex(a.body)[..20]))
            .collect()
    })
}

/// The dashboard file at `path` (`/index.html` and `/favicon.ico` are
/// aliases), or `None`.
pub(crate) fn asset(path: &str, if_none_match: Option<&str>) -> Option<Resp> {
    let path = match path {
        "" | "/index.html" => "/",
        "/favicon.ico" => "/assets/favicon.svg",
        p => p,
    };
    let i = ASSETS.iter().position(|a| a.path == path)?;
    let (a, etag) = (&ASSETS[i], etags().get(i)?);
    let fresh = if_none_match.is_some_and(|h| h.split(',').any(|t| t.trim() == etag.as_str()));
    let resp = Resp {
        status: if fresh { 304 } else { 200 },
        body: if fresh { String::new() } else { a.body.into() },
        content_type: a.content_type,
        headers: Vec::new(),
    };
    Some(
        resp.with("Cache-Control", "no-cache")
            .with("ETag", etag.clone())
            .with("Content-Security-Policy", CSP)
            .with("Referrer-Policy", "no-referrer")
            .with("X-Frame-Options", "DENY"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_size() -> usize {
        ASSETS.iter().map(|a| a.body.len()).sum()
    }

    #[test]
    fn serves_files_with_types_and_revalidates() {
        let r = asset("/", None).expect("index");
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("text/html"));
        assert!(r.body.contains("/assets/app.js"));
        let etag = r
            .headers
            .iter()
            .find(|(k, _)| *k == "ETag")
            .map(|(_, v)| v.clone())
            .expect("etag");
        let again = asset("/index.html", Some(&etag)).expect("index again");
        assert_eq!(again.status, 304);
        assert!(again.body.is_empty());
        assert!(asset("/assets/app.js", None)
            .expect("js")
            .content_type
            .starts_with("text/javascript"));
        assert!(asset("/assets/core.js", None)
            .expect("module")
            .content_type
            .starts_with("text/javascript"));
        assert!(asset("/assets/nope.js", None).is_none());
        assert!(asset("/../Cargo.toml", None).is_none());
    }

    /// Every module another one imports is served, and the page preloads
    /// every module: a missing table entry would only show as a blank
    /// dashboard.
    #[test]
    fn every_module_is_served_and_preloaded() {
        let index = asset("/", None).expect("index").body;
        assert!(index.contains(r#"<script src="/assets/app.js" type="module">"#));
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            if a.path != "/assets/app.js" {
                let preload = format!(r#"<link rel="modulepreload" href="{}">"#, a.path);
                assert!(index.contains(&preload), "{} is not preloaded", a.path);
            }
            for import in a.body.split(" from './").skip(1) {
                let name = import.split('\'').next().unwrap_or_default();
                let path = format!("/assets/{name}");
                assert!(
                    ASSETS.iter().any(|b| b.path == path),
                    "{} imports {path}, which is not served",
                    a.path
                );
            }
        }
    }

    #[test]
    fn no_inline_script_and_small() {
        let index = asset("/", None).expect("index").body;
        // Every <script> has a src: the CSP forbids inline script.
        for tag in index.split("<script").skip(1) {
            assert!(tag.trim_start().starts_with("src="), "inline script: {tag}");
        }
        assert!(!index.contains("style="), "inline style attribute");
        assert!(!index.contains("http://") && !index.contains("https://"));
        // Uncompressed and unminified (no build step): ~48 KB gzipped (162 KiB
        // plain with the shell terminal, terminal.js 23 KiB). A budget, so a
        // Pi-hosted conductor serves the whole UI in one quick round.
        assert!(
            total_size() < 172 * 1024,
            "assets are {} bytes",
            total_size()
        );
    }
}
