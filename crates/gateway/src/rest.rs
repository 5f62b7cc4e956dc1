//! REST endpoints: broadcast (Supabase's), tables (enable/disable), health, metrics.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use phoenix_channel::PayloadEncoding;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Claims;
use crate::channel::broadcast::{publish_json, publish_user, UserMessage};
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

#[derive(Deserialize)]
struct Batch {
    messages: Vec<BatchMessage>,
}

#[derive(Deserialize)]
struct BatchMessage {
    topic: String,
    event: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    id: Option<Value>,
}

/// `POST /api/broadcast`: `{"messages": [{topic, event, payload, private?, id?}]}` → 202.
pub async fn broadcast_batch(shared: &Shared, req: Request<Incoming>) -> Resp {
    let claims = match bearer_claims(shared, &req).await {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let body = match read_body(shared, req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"errors": {"messages": [e.to_string()]}}),
            )
        }
    };
    // Private messages: per topic, dropped unless the INSERT policies allow
    // writing (the service role writes anywhere), as upstream.
    let mut allowed: HashMap<String, bool> = HashMap::new();
    for m in batch.messages {
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
        publish_json(shared, m.private, &name, local.as_deref(), &payload, None);
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
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let encoding = if content_type.starts_with("application/json") {
        PayloadEncoding::Json
    } else if content_type.starts_with("application/octet-stream") {
        PayloadEncoding::Binary
    } else {
        return json_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}),
        );
    };
    let body = match read_body(shared, req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    if encoding == PayloadEncoding::Json
        && serde_json::from_slice::<&serde_json::value::RawValue>(&body).is_err()
    {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": {"payload": ["is not valid JSON"]}}),
        );
    }
    if subtopic.len() + "realtime:".len() > 255 || event.len() > 255 {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": {"topic": ["topic and event must be at most 255 bytes"]}}),
        );
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
    publish_user(shared, private, &name, local.as_deref(), msg, None);
    empty(StatusCode::ACCEPTED)
}

/// Routes `/api/...` requests (the `/realtime/v1` prefix already stripped).
pub async fn route_api(shared: &Shared, req: Request<Incoming>, path: &str) -> Resp {
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
