//! `/inspector`: a built-in page to watch and poke a running gateway.
//!
//! Plain HTML, CSS and JavaScript compiled into the binary (`include_str!`):
//! no CDN, no build step. The page reads the admin APIs (status, events,
//! connections, tables) like any client, with the token the user pastes when
//! auth is configured, and sends broadcasts over its own WebSocket. It shows
//! live change events and broadcasts (pause, filter), connected clients and
//! their channels, enabled tables with enable/disable buttons, the feed's
//! state and lag, and a chart of deliveries per second.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::rest::Resp;

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Everything the page loads comes from this origin; the WebSocket too.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The asset at `path` (`/inspector`, `/inspector/`, `/inspector/app.js`, `/inspector/app.css`).
pub fn asset(path: &str) -> Option<Resp> {
    let (body, kind) = match path {
        "/inspector" | "/inspector/" | "/inspector/index.html" => {
            (INDEX, "text/html; charset=utf-8")
        }
        "/inspector/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/inspector/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_assets_and_nothing_from_elsewhere() {
        for p in [
            "/inspector",
            "/inspector/",
            "/inspector/app.js",
            "/inspector/app.css",
        ] {
            assert!(asset(p).is_some(), "{p}");
        }
        assert!(asset("/inspector/../Cargo.toml").is_none());
        // No CDN: every script and stylesheet is local.
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(INDEX.contains(r#"src="/inspector/app.js""#));
    }
}
