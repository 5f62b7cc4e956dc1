//! Broadcast: client-to-client messages, from a socket or from REST.
//!
//! JSON-origin messages (text frames, the REST batch endpoint) reach every
//! subscriber as `broadcast` events carrying the whole `{type, event, payload}`
//! map. Binary-origin messages (realtime-js kind-3 pushes, REST single
//! endpoint) reach V2 subscribers as kind-4 frames and V1 subscribers as JSON;
//! raw-binary payloads cannot be expressed in V1 and are dropped for them.

use phoenix_channel::{encode_text, encode_user_broadcast, Message, Payload, PayloadEncoding, Vsn};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::Session;
use crate::registry::{Outbound, Topic, READ_BROADCAST};
use crate::state::Shared;
use change_ingest::realtime::Extension;

/// Publishes a JSON-origin broadcast (`payload` is the whole map). Returns deliveries.
pub fn publish_json(shared: &Shared, topic: &Topic, payload: &Value, skip: Option<u64>) -> usize {
    let n = shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, |vsn| {
            encode_text(vsn, None, None, &topic.name, "broadcast", payload)
                .map_err(|e| tracing::error!(cause = %e, "broadcast could not be encoded"))
                .ok()
                .map(Outbound::Text)
        });
    // One event-log entry per message (the operations hook).
    shared
        .ops
        .events
        .broadcast_json(&topic.name, topic.private, payload, n);
    n
}

/// The V1 (and V2-text) form of a user broadcast.
#[derive(Serialize)]
struct UserBroadcastJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    event: &'a str,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
}

/// Publishes a binary-origin user broadcast. Returns deliveries.
pub fn publish_user(
    shared: &Shared,
    topic: &Topic,
    event: &str,
    metadata: Option<&[u8]>,
    encoding: PayloadEncoding,
    payload: &[u8],
    skip: Option<u64>,
) -> usize {
    let n = shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, |vsn| match vsn {
            Vsn::V2 => encode_user_broadcast(&topic.name, event, metadata, encoding, payload)
                .map_err(|e| tracing::debug!(cause = %e, "user broadcast not encodable as kind 4"))
                .ok()
                .map(Outbound::Binary),
            Vsn::V1 => {
                if encoding != PayloadEncoding::Json {
                    return None;
                }
                let payload: &RawValue = serde_json::from_slice(payload).ok()?;
                let meta: Option<&RawValue> = metadata.and_then(|m| serde_json::from_slice(m).ok());
                let body = UserBroadcastJson {
                    kind: "broadcast",
                    event,
                    payload,
                    meta,
                };
                encode_text(Vsn::V1, None, None, &topic.name, "broadcast", &body)
                    .ok()
                    .map(Outbound::Text)
            }
        });
    // One event-log entry per message (the operations hook).
    let json = encoding == PayloadEncoding::Json;
    shared
        .ops
        .events
        .broadcast_bytes(&topic.name, topic.private, event, json, payload, n);
    n
}

impl Session {
    pub(super) async fn broadcast(&mut self, msg: Message) {
        // Private channels: dropped unless the INSERT policies allow it (as upstream, no reply).
        if !self
            .channel_may_write(&msg.topic, Extension::Broadcast)
            .await
        {
            tracing::debug!(topic = %msg.topic, "broadcast denied by policy: dropped");
            return;
        }
        let Some(joined) = self.channels.get(&msg.topic) else {
            return;
        };
        let skip = (!joined.broadcast_self).then_some(joined.handle.id);
        let ack = joined.broadcast_ack;
        let topic = std::sync::Arc::clone(&joined.topic);
        match &msg.payload {
            Payload::Json(payload) => {
                publish_json(&self.shared, &topic, payload, skip);
            }
            Payload::UserBroadcast(ub) => {
                publish_user(
                    &self.shared,
                    &topic,
                    &ub.event,
                    ub.metadata.as_deref(),
                    ub.encoding,
                    &ub.payload,
                    skip,
                );
            }
        }
        if ack {
            self.reply(&msg, "ok", &json!({})).await;
        }
    }
}
