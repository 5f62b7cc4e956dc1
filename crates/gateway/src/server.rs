//! Accept loop and WebSocket upgrades.
//!
//! Every TCP connection is served by hyper (HTTP/1.1 with upgrades) and routed
//! by [`crate::routes`]. WebSocket requests on `/realtime/v1/websocket` or
//! `/socket/websocket` are checked (drain, vsn, token, connection caps), upgraded
//! with fastwebsockets and handed to [`crate::socket::serve`] on the shared
//! [`TaskTracker`](tokio_util::task::TaskTracker), so shutdown can wait for them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use phoenix_channel::Vsn;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::rest::{self, json_response, Resp};
use crate::state::Shared;

/// Runs the accept loop until `shared.shutdown` fires, then waits for every
/// connection to finish, until `SHUTDOWN_GRACE_MS` after the drain began.
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
    let deadline = shared
        .health
        .shutdown_deadline(shared.config.shutdown_grace());
    if tokio::time::timeout_at(deadline.into(), shared.tasks.wait())
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
/// hyper's connection state costs ~8 KiB from the start (its write buffer)
/// and ~16 KiB once a request head is being read, so a connection only
/// reaches it once its first byte has arrived and it holds one of
/// `MAX_HTTP_CONNECTIONS` slots (released when it ends, which for a WebSocket
/// is right after the upgrade). A silent connection costs ~1.4 KiB (this small
/// future and the socket), and both waits end at `HEADER_READ_TIMEOUT_MS`,
/// after which hyper's own header timeout applies to the request head.
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
        Box::pin(async move { Ok::<_, Infallible>(crate::routes::route(req, shared, peer).await) })
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

/// A refused upgrade, answered after `CONNECT_ERROR_BACKOFF_MS` (as Supabase
/// does) so a misconfigured client cannot spin; only this request waits.
async fn refuse(shared: &Shared, status: StatusCode, error: &str) -> Resp {
    tokio::time::sleep(std::time::Duration::from_millis(
        shared.config.connect_error_backoff_ms,
    ))
    .await;
    json_response(status, &json!({ "error": error }))
}

/// Validates the handshake (drain, vsn, token, connection caps) and upgrades.
pub(crate) async fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    peer: SocketAddr,
) -> Resp {
    if shared.health.draining() {
        // At once (no backoff): a load balancer retries this on another
        // replica (nginx: `proxy_next_upstream http_503`).
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "Server is shutting down"}),
        );
    }
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
        return refuse(&shared, StatusCode::TOO_MANY_REQUESTS, message).await;
    }
    // Per user (`sub`); released when the connection task ends, however it ends.
    let user_conn = match claims.sub.as_deref() {
        Some(sub) => match shared
            .limits
            .user_connections
            .acquire(sub, shared.config.max_connections_per_user)
        {
            Some(guard) => Some(guard),
            None => {
                let message = "Too many connections for this user";
                crate::error::report(
                    "UserConnectionLimitReached",
                    crate::error::Fault::Client,
                    message,
                );
                return refuse(&shared, StatusCode::TOO_MANY_REQUESTS, message).await;
            }
        },
        None => None,
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
    let conn_id = shared.next_id();
    let meta = crate::ops::conns::ConnMeta {
        id: conn_id,
        peer,
        forwarded_for: forwarded_for(&req),
        since: std::time::SystemTime::now(),
    };
    // One span per connection: every line about it carries these fields.
    let span = tracing::info_span!("conn", conn_id, %peer, sub = conn_auth.claims.sub.as_deref());
    shared.tasks.spawn(
        async move {
            let _user_conn = user_conn;
            match fut.await {
                Ok(ws) => {
                    let upgraded = ws.into_inner().into_inner();
                    // Boxed: the upgrade future's state is not kept for the socket's lifetime.
                    let socket =
                        crate::socket::serve(upgraded, shared2, meta, vsn, conn_auth, permit);
                    Box::pin(socket).await;
                }
                Err(e) => tracing::debug!(cause = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response.map(|_| Full::new(bytes::Bytes::new()))
}

/// The first address of `X-Forwarded-For` (bounded), for the connections API.
fn forwarded_for<B>(req: &Request<B>) -> Option<String> {
    let v = req.headers().get("x-forwarded-for")?.to_str().ok()?;
    let first = v.split(',').next()?.trim();
    (!first.is_empty() && first.len() <= 64).then(|| first.to_owned())
}
