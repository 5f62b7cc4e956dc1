//! HTTP routing: which handler answers which method and path.
//!
//! Every path is also served under `/realtime/v1` (supabase-js's prefix). GET
//! routes that only read also answer HEAD (hyper sends the headers without the
//! body), since probes such as Supabase's compose healthcheck use `curl --head`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use crate::health;
use crate::rest::{self, json_response, Resp};
use crate::state::Shared;

/// Routes one request.
pub(crate) async fn route(req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Resp {
    if !shared.auth.enabled() && !shared.config.insecure {
        if let Some(why) = crate::auth::local::refusal(req.headers()) {
            tracing::warn!(%peer, "refused a non-local request in loopback-only mode");
            return json_response(StatusCode::FORBIDDEN, &json!({"message": why}));
        }
    }
    let full = req.uri().path().to_owned();
    let path = full.strip_prefix("/realtime/v1").unwrap_or(&full);
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match (read, path) {
        (true, "/websocket" | "/socket/websocket" | "/socket/websocket/")
            if req.method() == Method::GET =>
        {
            crate::server::upgrade(req, shared, peer).await
        }
        (true, "/healthz" | "/healthcheck" | "/api/ping") => health::healthz(),
        (true, "/readyz") => health::readyz(&shared),
        (true, "/metrics") if !metrics_authorized(&shared, &req) => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "Unauthorized"}),
        ),
        (true, "/metrics") => metrics(&shared),
        (true, p) if p.starts_with("/inspector") => {
            crate::inspector::asset(p).unwrap_or_else(|| {
                json_response(StatusCode::NOT_FOUND, &json!({"message": "Not Found"}))
            })
        }
        (true, p) if tenant_health_path(p).is_some() => {
            let tenant = tenant_health_path(p).unwrap_or_default();
            health::tenant_health(&shared, &req, &rest::decode(tenant)).await
        }
        (_, p) if crate::ops::api::handles(p) => {
            let p = p.to_owned();
            crate::ops::api::route(&shared, req, &p).await
        }
        (_, p) if p.starts_with("/api/") => {
            let p = p.to_owned();
            rest::route_api(&shared, req, &p).await
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"message": "Not Found"})),
    }
}

/// `/api/tenants/<tenant>/health` → `Some(tenant)`.
fn tenant_health_path(path: &str) -> Option<&str> {
    let tenant = path
        .strip_prefix("/api/tenants/")?
        .strip_suffix("/health")?;
    (!tenant.is_empty() && !tenant.contains('/')).then_some(tenant)
}

/// `GET /metrics` with `METRICS_JWT_SECRET` set needs `Authorization: Bearer
/// <JWT signed with it>` (HS256/384/512; `exp` checked when present), like Supabase's.
fn metrics_authorized<B>(shared: &Shared, req: &Request<B>) -> bool {
    let Some(secret) = shared
        .config
        .metrics_jwt_secret
        .as_deref()
        .filter(|s| !s.is_empty())
    else {
        return true;
    };
    let Some(token) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    else {
        return false;
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.algorithms = vec![
        jsonwebtoken::Algorithm::HS256,
        jsonwebtoken::Algorithm::HS384,
        jsonwebtoken::Algorithm::HS512,
    ];
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    validation.leeway = 0;
    jsonwebtoken::decode::<serde::de::IgnoredAny>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .is_ok()
}

/// `GET /metrics`: Prometheus text.
fn metrics(shared: &Shared) -> Resp {
    match shared.prometheus.get() {
        Some(handle) => {
            let mut resp = hyper::Response::new(Full::new(handle.render().into()));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"message": "metrics recorder not installed"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_health_paths() {
        assert_eq!(
            tenant_health_path("/api/tenants/realtime-dev/health"),
            Some("realtime-dev")
        );
        assert_eq!(tenant_health_path("/api/tenants//health"), None);
        assert_eq!(tenant_health_path("/api/tenants/a/b/health"), None);
        assert_eq!(tenant_health_path("/api/tenants/a"), None);
    }
}
