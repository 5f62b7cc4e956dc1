//! `GET /api/realtime/tables`, `POST`/`DELETE /api/realtime/tables/{schema.table}`.
//!
//! The same state the SQL functions and the CLI change: enabling here is
//! `select realtime_gateway.enable('schema.table')`.

use change_ingest::IngestError;
use hyper::{Method, StatusCode};
use serde_json::json;

use crate::rest::{json_response, Resp};
use crate::state::Shared;

fn error(e: &IngestError) -> Resp {
    let status = match e {
        IngestError::UnknownTable(_) => StatusCode::NOT_FOUND,
        IngestError::InvalidTableName { .. } | IngestError::NotEligible { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_response(status, &json!({ "message": e.to_string() }))
}

/// Lists, enables or disables tables.
pub async fn tables(shared: &Shared, method: Method, name: &str) -> Resp {
    let db = match shared.changes.db().await {
        None => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"message": "no database configured"}),
            )
        }
        Some(Err(e)) => return error(&e),
        Some(Ok(db)) => db,
    };
    let db = &*db;
    match (method, name.is_empty()) {
        (Method::GET, true) => match change_ingest::list_tables(db).await {
            Ok(list) => json_response(StatusCode::OK, &json!({ "tables": list })),
            Err(e) => error(&e),
        },
        (Method::POST, false) => match change_ingest::enable_table(db, name).await {
            Ok(info) => json_response(
                StatusCode::OK,
                &json!({"schema": info.schema, "table": info.table, "enabled": true}),
            ),
            Err(e) => error(&e),
        },
        (Method::DELETE, false) => match change_ingest::disable_table(db, name).await {
            Ok(was_enabled) => json_response(
                StatusCode::OK,
                &json!({"table": name, "enabled": false, "was_enabled": was_enabled}),
            ),
            Err(e) => error(&e),
        },
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"message": "use GET /api/realtime/tables, POST or DELETE /api/realtime/tables/{schema.table}"}),
        ),
    }
}
