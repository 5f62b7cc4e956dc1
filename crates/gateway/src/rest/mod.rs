//! REST endpoints: broadcast (Supabase's), tables (enable/disable), health, metrics.
//!
//! `batch`: the broadcast bodies' parsing and validation (no I/O; fuzzed).

pub mod batch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use phoenix_channel::PayloadEncoding;
use serde_json::{json, Value};

use crate::auth::Claims;
use crate::channel::broadcast::{publish_json, publish_user, Pace, UserMessage};
use crate::error::Fault;
use crate::limits::MAX_FIELD_BYTES;
use crate::state::Shared;

/// The response type of every handler.
pub type Resp = Response<Full<Bytes>>;

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An empty response.
pub fn empty(status: StatusCode) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

fn message(status: StatusCode, msg: &str) -> Resp {
    json_response(status, &json!({ "message": msg }))
}

/// Query parameters as a map (later keys win).
pub fn query_params(query: Option<&str>) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.insert(decode(k), decode(&v.replace('+', " ")));
    }
    map
}

/// Percent-decodes a URL component.
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// REST auth: the claims of `Authorization: Bearer` first, then of the
/// `apikey` header (verified when auth is configured; dev mode decodes).
pub(crate) async fn bearer_claims<B>(
    shared: &Shared,
    req: &Request<B>,
) -> Result<Arc<Claims>, Box<Resp>> {
    let headers = req.headers();
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("apikey").and_then(|v| v.to_str().ok()));
    shared.auth.claims(token).await.map_err(|e| {
        crate::error::report(e.code(), crate::error::Fault::Client, &e.to_string());
        Box::new(message(StatusCode::UNAUTHORIZED, "Unauthorized"))
    })
}

/// Admin surfaces (tables, status) need the `service_role` whenever auth is configured.
pub async fn authorize_admin<B>(shared: &Shared, req: &Request<B>) -> Result<(), Box<Resp>> {
    let claims = bearer_claims(shared, req).await?;
    if !shared.auth.enabled() || claims.is_service_role() {
        return Ok(());
    }
    Err(Box::new(message(
        StatusCode::FORBIDDEN,
        "Forbidden: this endpoint needs the service_role key",
    )))
}

async fn read_body(shared: &Shared, body: Incoming) -> Result<Bytes, Box<Resp>> {
    match Limited::new(body, shared.config.max_body_size)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload size exceeds tenant limit",
        ))),
        Err(_) => Err(Box::new(message(
            StatusCode::BAD_REQUEST,
            "Could not read body",
        ))),
    }
}

/// The request's media type (`Content-Type` without parameters), lower-cased;
/// empty when absent.
fn content_type<B>(req: &Request<B>) -> String {
    let value = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn unsupported_media_type() -> Resp {
    json_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}),
    )
}

/// Takes `n` events from `TENANT_MAX_EVENTS_PER_SECOND`, or upstream's 429.
fn take_events(shared: &Shared, n: usize) -> Result<(), Box<Resp>> {
    let limits = &shared.limits;
    let too_many = |msg: &str| {
        crate::error::report("MessagePerSecondRateLimitReached", Fault::Client, msg);
        Err(Box::new(message(StatusCode::TOO_MANY_REQUESTS, msg)))
    };
    if limits.events.exhausted() {
        return too_many("You have exceeded your rate limit");
    }
    if !limits
        .events
        .try_acquire(u32::try_from(n).unwrap_or(u32::MAX))
    {
        return too_many("Too many messages to broadcast, please reduce the batch size");
    }
    Ok(())
}

/// How REST deliveries pace this replica's subscribers.
fn pace(shared: &Shared) -> Pace {
    Pace::WhileReading(Duration::from_millis(shared.config.slow_client_grace_ms))
}

/// `POST /api/broadcast`: `{"messages": [{topic, event, payload, private?, id?}]}` → 202.
///
/// Validated whole first (422 with upstream's per-message errors), then
/// admitted whole against the event rate (429) and delivered whole: a
/// subscriber whose backlog fills is waited for while it keeps reading, so an
/// accepted batch is never dropped for a client that keeps reading.
pub async fn broadcast_batch(shared: &Shared, req: Request<Incoming>) -> Resp {
    let claims = match bearer_claims(shared, &req).await {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if !matches!(content_type(&req).as_str(), "" | "application/json") {
        return unsupported_media_type();
    }
    let body = match read_body(shared, req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let messages = match batch::parse(&body, shared.config.max_payload_bytes()) {
        Ok(messages) => messages,
        Err(errors) => {
            crate::error::report(
                "UnprocessableEntity",
                Fault::Client,
                "invalid broadcast batch",
            );
            return json_response(StatusCode::UNPROCESSABLE_ENTITY, &errors);
        }
    };
    if let Err(resp) = take_events(shared, messages.len()) {
        return *resp;
    }
    // Private messages: per topic, dropped unless the INSERT policies allow
    // writing (the service role writes anywhere), as upstream.
    let mut allowed: HashMap<String, bool> = HashMap::new();
    for m in messages {
        if m.private && !claims.is_service_role() {
            let ok = match allowed.get(&m.topic) {
                Some(ok) => *ok,
                None => {
                    let ok = crate::channel::may_write_broadcast(shared, &m.topic, &claims).await;
                    allowed.insert(m.topic.clone(), ok);
                    ok
                }
            };
            if !ok {
                continue;
            }
        }
        let name = format!("realtime:{}", m.topic);
        // Other replicas may have subscribers even when this one has none.
        let local = shared.registry.get(m.private, &name);
        let mut payload = json!({"type": "broadcast", "event": m.event, "payload": m.payload});
        if let Some(id) = m.id {
            payload["meta"] = json!({ "id": id });
        }
        let local = local.as_deref();
        publish_json(
            shared,
            m.private,
            &name,
            local,
            &payload,
            None,
            pace(shared),
        )
        .await;
    }
    empty(StatusCode::ACCEPTED)
}

/// `POST /api/broadcast/{topic}/events/{event}[?private=true]`: raw JSON or bytes → 202.
pub async fn broadcast_single(
    shared: &Shared,
    req: Request<Incoming>,
    subtopic: &str,
    event: &str,
) -> Resp {
    let claims = match bearer_claims(shared, &req).await {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let private = query_params(req.uri().query())
        .get("private")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    // No Content-Type is taken as JSON, as upstream (older callers omit it).
    let encoding = match content_type(&req).as_str() {
        "" | "application/json" => PayloadEncoding::Json,
        "application/octet-stream" => PayloadEncoding::Binary,
        _ => return unsupported_media_type(),
    };
    let body = match read_body(shared, req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if encoding == PayloadEncoding::Json && !batch::is_json(&body) {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": {"payload": ["is not valid JSON"]}}),
        );
    }
    if subtopic.len() + "realtime:".len() > MAX_FIELD_BYTES || event.len() > MAX_FIELD_BYTES {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": {"topic": ["topic and event must be at most 255 bytes"]}}),
        );
    }
    if body.len() > shared.config.max_payload_bytes() {
        crate::error::report(
            "PayloadSizeExceeded",
            Fault::Client,
            "Payload size exceeds tenant limit",
        );
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": {"payload": ["Payload size exceeds tenant limit"]}}),
        );
    }
    if let Err(resp) = take_events(shared, 1) {
        return *resp;
    }
    if private
        && !claims.is_service_role()
        && !crate::channel::may_write_broadcast(shared, subtopic, &claims).await
    {
        return message(StatusCode::FORBIDDEN, "Unauthorized");
    }
    let name = format!("realtime:{subtopic}");
    let local = shared.registry.get(private, &name);
    let msg = UserMessage {
        event,
        metadata: None,
        encoding,
        payload: &body,
    };
    publish_user(
        shared,
        private,
        &name,
        local.as_deref(),
        msg,
        None,
        pace(shared),
    )
    .await;
    empty(StatusCode::ACCEPTED)
}

/// Routes `/api/...` requests (the `/realtime/v1` prefix already stripped).
pub async fn route_api(shared: &Shared, req: Request<Incoming>, path: &str) -> Resp {
    let mut resp = route_api_inner(shared, req, path).await;
    // These are answered before (or instead of) reading the whole body: the
    // connection cannot be reused, so say so rather than let a client send its
    // next request into a socket that is closing.
    if matches!(resp.status().as_u16(), 401 | 403 | 404 | 405 | 413 | 415) {
        resp.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn route_api_inner(shared: &Shared, req: Request<Incoming>, path: &str) -> Resp {
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::POST, ["api", "broadcast"]) => broadcast_batch(shared, req).await,
        (Method::POST, ["api", "broadcast", topic, "events", event]) => {
            let (topic, event) = (topic.to_string(), event.to_string());
            broadcast_single(shared, req, &topic, &event).await
        }
        (_, ["api", "broadcast", ..]) => {
            message(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        }
        (method, ["api", "realtime", "tables", rest @ ..]) => {
            if let Err(resp) = authorize_admin(shared, &req).await {
                return *resp;
            }
            let name = rest.join("/");
            crate::changes::rest::tables(shared, method, &name).await
        }
        _ => message(StatusCode::NOT_FOUND, "Not Found"),
    }
}
