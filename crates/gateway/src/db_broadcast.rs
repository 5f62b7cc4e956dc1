//! Broadcast from the database: rows `realtime.send()` inserted into
//! `realtime.messages`, captured by change-ingest and read back in commit
//! order, delivered to this replica's **local** subscribers (every replica
//! reads the shared log itself, so this is never republished on a cluster bus).
//! Like Postgres Changes they come from a durable log, so they are delivered
//! losslessly through the paced queues and the read-ahead budget
//! ([`crate::flow`]): a subscriber that keeps reading gets every message of
//! a 10,000-row `realtime.send`, one that stalls past the grace is cut.
//!
//! Live messages are user broadcasts with `meta: {id}` (kind 4 for V2
//! clients, as Supabase sends them); replayed ones (`config.broadcast.replay`)
//! are `broadcast` pushes with `meta: {id, replayed: true}`; a channel never
//! gets a replayed message again live (it may be committed before the join
//! and still on its way through the feed). Private topics
//! reach only channels whose policies allow reading broadcasts.

use change_ingest::realtime::{DbMessage, DbPayload};
use phoenix_channel::{encode_text, encode_user_broadcast, PayloadEncoding, Vsn};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::channel::broadcast::{user_encoder, UserMessage};
use crate::registry::{Outbound, READ_BROADCAST};
use crate::state::Shared;

/// Delivers captured messages, in order, waiting for room in the read-ahead
/// budget before each (no lock held). Returns deliveries.
pub async fn deliver(shared: &Shared, messages: &[DbMessage]) -> usize {
    let mut n = 0;
    for m in messages {
        let name = format!("realtime:{}", m.topic);
        let Some(topic) = shared.registry.get(m.private, &name) else {
            continue;
        };
        let meta = serde_json::json!({ "id": m.id }).to_string();
        let (encoding, body) = match &m.payload {
            DbPayload::Json(b) => (PayloadEncoding::Json, b),
            DbPayload::Binary(b) => (PayloadEncoding::Binary, b),
        };
        // Local subscribers only: every replica reads the log itself (contract 4).
        let msg = UserMessage {
            event: &m.event,
            metadata: Some(meta.as_bytes()),
            encoding,
            payload: body,
        };
        shared.fanout.flow.room().await;
        n += shared.fanout.publish_from_log(
            &topic,
            READ_BROADCAST,
            Some(&m.id),
            user_encoder(&topic, msg),
        );
        metrics::counter!(crate::metrics::DB_BROADCASTS).increment(1);
    }
    n
}

#[derive(Serialize)]
struct Replayed<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    event: &'a str,
    payload: &'a RawValue,
    meta: ReplayMeta<'a>,
}

#[derive(Serialize)]
struct ReplayMeta<'a> {
    replayed: bool,
    id: &'a str,
}

/// The frame a replayed message is pushed as (`None`: binary payloads cannot
/// be expressed in V1, as upstream skips them).
pub fn replay_frame(vsn: Vsn, topic: &str, m: &DbMessage) -> Option<Outbound> {
    match &m.payload {
        DbPayload::Json(raw) => {
            let payload: &RawValue = serde_json::from_slice(raw).ok()?;
            let body = Replayed {
                kind: "broadcast",
                event: &m.event,
                payload,
                meta: ReplayMeta {
                    replayed: true,
                    id: &m.id,
                },
            };
            encode_text(vsn, None, None, topic, "broadcast", &body)
                .ok()
                .map(Outbound::Text)
        }
        DbPayload::Binary(bytes) => {
            if vsn == Vsn::V1 {
                return None;
            }
            let meta = serde_json::json!({"replayed": true, "id": m.id}).to_string();
            encode_user_broadcast(
                topic,
                &m.event,
                Some(meta.as_bytes()),
                PayloadEncoding::Binary,
                bytes,
            )
            .ok()
            .map(Outbound::Binary)
        }
    }
}
