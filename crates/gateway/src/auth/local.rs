//! Loopback-only mode: what keeps an unauthenticated gateway local.
//!
//! With no authentication configured (and no `--insecure`) the gateway binds
//! a loopback address, but that alone does not keep it local: any web page
//! the developer's browser opens may connect to `ws://127.0.0.1:4000`
//! (WebSockets are not bound by the same-origin policy) or POST to it, and a
//! DNS-rebinding page reaches it under its own host name. Such requests are
//! told apart by their headers: a page elsewhere sends its `Origin`, a
//! rebound name arrives as the `Host`. So in this mode a request is served
//! only when its `Host` (if any) is a loopback name and its `Origin` (if any)
//! is a loopback origin — what local tools (wscat, curl, Node clients send no
//! `Origin`) and local pages (`http://localhost:3000`) send.

use std::net::IpAddr;

use hyper::header::{HeaderMap, HOST, ORIGIN};

/// Why a request is refused in loopback-only mode, or `None` to serve it.
pub fn refusal(headers: &HeaderMap) -> Option<&'static str> {
    if let Some(host) = headers.get(HOST) {
        if !host.to_str().is_ok_and(|h| loopback_host(strip_port(h))) {
            return Some(
                "no authentication is configured, so only requests to a loopback address \
                 (localhost, 127.0.0.1, [::1]) are served: configure API_JWT_SECRET (or a JWKS) \
                 or start with --insecure",
            );
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let local = origin
            .to_str()
            .ok()
            .and_then(origin_host)
            .is_some_and(loopback_host);
        if !local {
            return Some(
                "no authentication is configured, so only pages served from a loopback \
                 origin (http://localhost:…) may use this gateway: configure API_JWT_SECRET \
                 (or a JWKS) or start with --insecure",
            );
        }
    }
    None
}

/// `host[:port]` or `[v6][:port]` → the host.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The host of an `http(s)://host[:port]` origin (`null` and other schemes: none).
fn origin_host(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(strip_port(rest.split('/').next()?))
}

/// `localhost`, `*.localhost` (browsers resolve them to loopback themselves),
/// or a loopback IP address.
fn loopback_host(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let lower = host.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn check(host: Option<&str>, origin: Option<&str>) -> bool {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        refusal(&h).is_none()
    }

    #[test]
    fn local_tools_and_pages_are_served() {
        assert!(check(None, None));
        for host in [
            "localhost",
            "localhost:4000",
            "LOCALHOST.:4000",
            "app.localhost:4000",
            "127.0.0.1:4000",
            "127.8.9.10",
            "[::1]:4000",
            "[::ffff:127.0.0.1]:4000",
        ] {
            assert!(check(Some(host), None), "{host}");
        }
        for origin in [
            "http://localhost:3000",
            "https://localhost",
            "http://127.0.0.1:5173",
            "http://[::1]:8080",
        ] {
            assert!(check(Some("127.0.0.1:4000"), Some(origin)), "{origin}");
        }
    }

    #[test]
    fn other_sites_and_rebound_names_are_refused() {
        for host in [
            "evil.example",
            "evil.example:4000",
            "localhost.evil.example",
            "127.0.0.1.nip.io:4000",
            "192.168.1.10:4000",
            "[::]:4000",
            "0.0.0.0:4000",
        ] {
            assert!(!check(Some(host), None), "{host}");
        }
        for origin in [
            "https://evil.example",
            "http://localhost.evil.example:3000",
            "null",
            "file://",
            "chrome-extension://abc",
            "http://192.168.1.10:3000",
        ] {
            assert!(!check(Some("localhost:4000"), Some(origin)), "{origin}");
        }
    }
}
