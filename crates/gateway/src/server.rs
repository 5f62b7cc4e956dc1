//! Accept loop, HTTP routing and WebSocket upgrades.
//!
//! Every TCP connection is served by hyper (HTTP/1.1 with upgrades). WebSocket
//! requests on `/realtime/v1/websocket` or `/socket/websocket` are upgraded
//! with fastwebsockets and handed to [`crate::socket::serve`] on the shared
//! [`TaskTracker`](tokio_util::task::TaskTracker), so shutdown can wait for them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use phoenix_channel::Vsn;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::rest::{self, json_response, Resp};
use crate::state::Shared;

/// Runs the accept loop until `shared.shutdown` fires, then waits (at most the
/// grace period) for every connection to finish.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        // Arms: shutdown, or the next connection.
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let shared2 = Arc::clone(&shared);
        shared
            .tasks
            .spawn(serve_http(tcp, peer, shared2).instrument(tracing::debug_span!("http", %peer)));
    }
    drop(listener);
    shared.tasks.close();
    if tokio::time::timeout(shared.config.shutdown_grace(), shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = shared.tasks.len(),
            "shutdown grace period over; dropping remaining connections"
        );
    }
}

async fn serve_http(tcp: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let svc_shared = Arc::clone(&shared);
    let svc = service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        async move { Ok::<_, Infallible>(route(req, shared, peer).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades();
    tokio::pin!(conn);
    // Arms: the connection finishing, or shutdown (then let in-flight requests finish).
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(cause = %e, "http connection error");
            }
        }
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_owned();
    let path = path
        .strip_prefix("/realtime/v1")
        .unwrap_or(&path)
        .to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/websocket" | "/socket/websocket" | "/socket/websocket/") => {
            upgrade(req, shared, peer).await
        }
        (&Method::GET, "/healthz" | "/api/ping") => {
            json_response(StatusCode::OK, &json!({"message": "Success"}))
        }
        (&Method::GET, "/metrics") if !metrics_authorized(&shared, &req) => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "Unauthorized"}),
        ),
        (&Method::GET, "/metrics") => match shared.prometheus.get() {
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
        },
        (_, p) if p.starts_with("/api/") => rest::route_api(&shared, req, p).await,
        _ => json_response(StatusCode::NOT_FOUND, &json!({"message": "Not Found"})),
    }
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

/// A refused upgrade, answered after `CONNECT_ERROR_BACKOFF_MS` (as Supabase
/// does) so a misconfigured client cannot spin; only this request waits.
async fn refuse(shared: &Shared, status: StatusCode, error: &str) -> Resp {
    tokio::time::sleep(std::time::Duration::from_millis(
        shared.config.connect_error_backoff_ms,
    ))
    .await;
    json_response(status, &json!({ "error": error }))
}

/// Validates the handshake (vsn, token, connection cap) and upgrades.
async fn upgrade(mut req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Resp {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "WebSocket upgrade required"}),
        );
    }
    let params = rest::query_params(req.uri().query());
    let vsn = match Vsn::from_param(params.get("vsn").map(String::as_str)) {
        Ok(v) => v,
        Err(_) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "Unsupported serializer version"}),
            )
        }
    };
    // `x-api-key` takes precedence over the `apikey` query parameter.
    let token = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| params.get("apikey").cloned());
    let claims = match shared.auth.claims(token.as_deref()).await {
        Ok(claims) => claims,
        Err(e) => {
            crate::error::report(e.code(), crate::error::Fault::Client, &e.to_string());
            return refuse(&shared, StatusCode::UNAUTHORIZED, &e.connect_message()).await;
        }
    };
    let Ok(permit) = Arc::clone(&shared.connection_permits).try_acquire_owned() else {
        return refuse(
            &shared,
            StatusCode::TOO_MANY_REQUESTS,
            "Too many connected users",
        )
        .await;
    };
    let conn_auth = crate::channel::ConnAuth {
        token: token.map(Arc::from),
        claims,
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
    };
    let shared2 = Arc::clone(&shared);
    shared.tasks.spawn(
        async move {
            match fut.await {
                Ok(ws) => {
                    let upgraded = ws.into_inner().into_inner();
                    // Boxed: the upgrade future's state is not kept for the socket's lifetime.
                    Box::pin(crate::socket::serve(
                        upgraded, shared2, vsn, conn_auth, permit,
                    ))
                    .await;
                }
                Err(e) => tracing::debug!(cause = %e, "upgrade failed"),
            }
        }
        .instrument(tracing::debug_span!("ws", %peer)),
    );
    response.map(|_| Full::new(bytes::Bytes::new()))
}
