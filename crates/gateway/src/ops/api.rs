//! The admin APIs. With auth configured each needs a `service_role` token
//! (`Authorization: Bearer` or `apikey`): 401 without a valid token, 403 for
//! another role.
//!
//! - `GET /api/realtime/status`: version, uptime, readiness, connections,
//!   channels by kind, the change feed (state, enabled tables, lag in seconds
//!   and rows behind the log), counters.
//! - `GET /api/realtime/events?limit=&table=&topic=&after=`: the newest events
//!   (default 200, at most the log's capacity), oldest first.
//! - `POST /api/realtime/events/clear`.
//! - `GET /api/realtime/connections?limit=`: current connections (default
//!   1000) and the last disconnects with their reason.

use std::time::Duration;

use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::events::Filter;
use crate::changes::FeedState;
use crate::rest::{json_response, query_params, Resp};
use crate::state::Shared;

/// Default `limit` of the events API.
pub const DEFAULT_EVENTS: usize = 200;
/// Default `limit` of the connections API.
pub const DEFAULT_CONNECTIONS: usize = 1000;
/// Rows-behind counts stop here (the count is an index range scan bounded by it).
const ROWS_BEHIND_CAP: i64 = 100_000;

/// Whether `path` (prefix stripped) is one of these APIs.
pub fn handles(path: &str) -> bool {
    matches!(
        path,
        "/api/realtime/status"
            | "/api/realtime/events"
            | "/api/realtime/events/clear"
            | "/api/realtime/connections"
    )
}

/// Answers one admin API request.
pub async fn route<B>(shared: &Shared, req: Request<B>, path: &str) -> Resp {
    if let Err(resp) = crate::rest::authorize_admin(shared, &req).await {
        return *resp;
    }
    let params = query_params(req.uri().query());
    let limit = |default: usize, max: usize| {
        params
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(default)
            .min(max)
    };
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match (read, req.method(), path) {
        (true, _, "/api/realtime/status") => json_response(StatusCode::OK, &status(shared).await),
        (true, _, "/api/realtime/events") => {
            let filter = Filter {
                table: params.get("table").filter(|t| !t.is_empty()).cloned(),
                topic: params.get("topic").filter(|t| !t.is_empty()).cloned(),
                after: params.get("after").and_then(|a| a.parse().ok()),
            };
            let log = &shared.ops.events;
            let events = log.read(&filter, limit(DEFAULT_EVENTS, log.capacity()));
            json_response(
                StatusCode::OK,
                &json!({"events": events, "last_id": log.last_id(), "capacity": log.capacity()}),
            )
        }
        (_, &Method::POST, "/api/realtime/events/clear") => {
            let last = shared.ops.events.clear();
            json_response(StatusCode::OK, &json!({"cleared_through": last}))
        }
        (true, _, "/api/realtime/connections") => json_response(
            StatusCode::OK,
            &shared
                .ops
                .conns
                .snapshot(limit(DEFAULT_CONNECTIONS, usize::MAX)),
        ),
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"message": "Method Not Allowed"}),
        ),
    }
}

/// The status document.
pub async fn status(shared: &Shared) -> Value {
    // The database round trip first, so the rest is read at one moment after it.
    let rows_behind = match shared.changes.feed_state() {
        FeedState::NotConfigured => None,
        _ => rows_behind(shared).await,
    };
    let feed_state = shared.changes.feed_state();
    let readiness = shared.health.readiness(feed_state);
    let (channels, presence, with_changes, private) = shared.ops.conns.channel_kinds();
    let (broadcasts, changes) = shared.ops.events.totals();
    let progress = &shared.ops.feed;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": super::rfc3339(shared.health.started_at()),
        "uptime_secs": shared.health.uptime().as_secs_f64(),
        "ready": readiness.ready,
        "draining": readiness.draining,
        "cluster_bus": readiness.cluster_bus,
        "connections": shared.connection_count(),
        "channels": {
            "total": channels,
            "presence": presence,
            "postgres_changes": with_changes,
            "private": private,
            "public": channels - private,
        },
        "change_feed": {
            "state": feed_state,
            "enabled_tables": progress.tables(),
            "lag_seconds": progress.lag_seconds(),
            "rows_behind": rows_behind,
            "rows_behind_cap": ROWS_BEHIND_CAP,
            "last_batch_at": progress.last_batch_at(),
        },
        "counters": {
            "frames_sent": shared.fanout.metrics.frames_sent.get(),
            "lagged_frames": shared.fanout.metrics.lagged.get(),
            "broadcasts": broadcasts,
            "changes": changes,
            "disconnects": shared.ops.conns.totals(),
        },
    })
}

/// Rows of the log committed after the newest transaction routed here (capped),
/// or `None` when the database cannot say within a second.
async fn rows_behind(shared: &Shared) -> Option<i64> {
    let db = shared.changes.db().await?.ok()?;
    let txid = shared
        .ops
        .feed
        .max_txid
        .load(std::sync::atomic::Ordering::Relaxed);
    let count = change_ingest::status::rows_after(&db, txid, ROWS_BEHIND_CAP);
    tokio::time::timeout(Duration::from_secs(1), count)
        .await
        .ok()?
        .ok()
}
