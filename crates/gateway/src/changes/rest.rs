//! `GET /api/realtime/tables`, `POST`/`DELETE /api/realtime/tables/{schema.table}`.

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::rest::{json_response, Resp};
use crate::state::Shared;

/// Lists, enables or disables tables.
pub async fn tables(shared: &Shared, method: Method, name: &str) -> Resp {
    let _ = (shared, method, name);
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"message": "no database configured"}),
    )
}
