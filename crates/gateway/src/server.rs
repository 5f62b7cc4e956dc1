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
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::rest::{self, json_response, Resp};
use crate::state::Shared;

/// Runs the accept loop until `shared.shutdown` fires, then waits (at most the
/// grace period) for every connection to finish.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connections that have started speaking HTTP (handshakes, REST) are capped.
    let http_permits = Arc::new(Semaphore::new(shared.config.max_http_connections));
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
        let permits = Arc::clone(&http_permits);
        shared.tasks.spawn(
            serve_http(tcp, peer, shared2, permits).instrument(tracing::debug_span!("http", %peer)),
        );
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

/// Serves one TCP connection's HTTP.
///
/// hyper's connection state costs ~14 KiB from the start (its write buffer)
/// and ~26 KiB once a request head is being read, so a connection only
/// reaches it once its first byte has arrived and it holds one of
/// `MAX_HTTP_CONNECTIONS` slots (released when it ends, which for a WebSocket
/// is right after the upgrade). A silent connection costs only this small
/// future, and both waits end at `HEADER_READ_TIMEOUT_MS`, after which hyper's
/// own header timeout applies to the request head.
async fn serve_http(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
) {
    let head_timeout = std::time::Duration::from_millis(shared.config.header_read_timeout_ms);
    let first_byte_and_slot = async {
        // `peek` waits for data (`readable` may report a fresh socket ready).
        if tcp.peek(&mut [0u8; 1]).await.ok()? == 0 {
            return None; // closed before sending anything
        }
        permits.acquire_owned().await.ok()
    };
    // Arms: shutdown, or the first byte and a free slot before the head timeout.
    let _permit = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => return,
        r = tokio::time::timeout(head_timeout, first_byte_and_slot) => match r {
            Ok(Some(permit)) => permit,
            _ => return,
        },
    };
    // Boxed: this task's future is allocated at its largest state for the
    // connection's whole life, and hyper's state (with the request handlers
    // inline) is kilobytes; a silent connection should not pay for it.
    Box::pin(serve_hyper(tcp, peer, shared, head_timeout)).await;
}

async fn serve_hyper(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    head_timeout: std::time::Duration,
) {
    let svc_shared = Arc::clone(&shared);
    let svc = service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        // Boxed: hyper keeps the in-flight request future inline in every
        // connection's state; the handlers' futures are large.
        Box::pin(async move { Ok::<_, Infallible>(route(req, shared, peer).await) })
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
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
            upgrade(req, shared, peer)
        }
        (&Method::GET, "/healthz" | "/api/ping") => {
            json_response(StatusCode::OK, &json!({"message": "Success"}))
        }
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

/// Validates the handshake (vsn, token, connection cap) and upgrades.
fn upgrade(mut req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Resp {
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
    if let Err(e) = shared.auth.authorize(token.as_deref()) {
        crate::error::report(e.code(), crate::error::Fault::Client, &e.to_string());
        return json_response(StatusCode::UNAUTHORIZED, &json!({"error": e.to_string()}));
    }
    // Upstream's connect-time tenant checks: users, then the join rate.
    let users_full = shared
        .limits
        .users
        .load(std::sync::atomic::Ordering::Relaxed)
        >= shared.config.tenant_max_concurrent_users;
    let refused = if users_full {
        Some(("ConnectionRateLimitReached", "Too many connected users"))
    } else if shared.limits.joins.exhausted() {
        Some(("JoinsRateLimitReached", "Too many joins per second"))
    } else {
        None
    };
    if let Some((code, message)) = refused {
        crate::error::report(code, crate::error::Fault::Client, message);
        return json_response(StatusCode::TOO_MANY_REQUESTS, &json!({ "error": message }));
    }
    let Ok(permit) = Arc::clone(&shared.connection_permits).try_acquire_owned() else {
        return json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "Too many connected users"}),
        );
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
                    Box::pin(crate::socket::serve(upgraded, shared2, vsn, token, permit)).await;
                }
                Err(e) => tracing::debug!(cause = %e, "upgrade failed"),
            }
        }
        .instrument(tracing::debug_span!("ws", %peer)),
    );
    response.map(|_| Full::new(bytes::Bytes::new()))
}
