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
use crate::error::ChannelError;
use crate::registry::{Outbound, Topic};
use crate::state::Shared;

/// Publishes a JSON-origin broadcast (`payload` is the whole map). Returns deliveries.
pub fn publish_json(shared: &Shared, topic: &Topic, payload: &Value, skip: Option<u64>) -> usize {
    shared
        .fanout
        .publish_with(topic, skip, json_encoder(topic, payload))
}

/// The per-serializer encoder of a JSON-origin broadcast (see [`publish_json`]).
pub fn json_encoder<'a>(
    topic: &'a Topic,
    payload: &'a Value,
) -> impl FnMut(Vsn) -> Option<Outbound> + 'a {
    move |vsn| {
        encode_text(vsn, None, None, &topic.name, "broadcast", payload)
            .map_err(|e| tracing::error!(cause = %e, "broadcast could not be encoded"))
            .ok()
            .map(Outbound::Text)
    }
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
    shared.fanout.publish_with(
        topic,
        skip,
        user_encoder(topic, event, metadata, encoding, payload),
    )
}

/// The per-serializer encoder of a binary-origin user broadcast (see [`publish_user`]).
pub fn user_encoder<'a>(
    topic: &'a Topic,
    event: &'a str,
    metadata: Option<&'a [u8]>,
    encoding: PayloadEncoding,
    payload: &'a [u8],
) -> impl FnMut(Vsn) -> Option<Outbound> + 'a {
    move |vsn| match vsn {
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
    }
}

/// Whether a broadcast may be relayed: JSON payloads must be objects (a
/// realtime-js subscriber throws on anything else), and a binary push whose
/// encoding byte says JSON must carry a JSON object. Raw-binary payloads are bytes.
fn check_payload(payload: &Payload) -> Result<(), ChannelError> {
    let ok = match payload {
        Payload::Json(v) => v.is_object(),
        Payload::UserBroadcast(ub) => match ub.encoding {
            PayloadEncoding::Binary => true,
            PayloadEncoding::Json => is_json_object(&ub.payload),
        },
    };
    ok.then_some(())
        .ok_or(ChannelError::InvalidBroadcastPayload)
}

/// Whether `bytes` is one valid JSON object (validated without building it).
pub(crate) fn is_json_object(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().first() == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

impl Session {
    pub(super) async fn broadcast(&mut self, msg: Message, size: usize) {
        let Some(joined) = self.channels.get(&msg.topic) else {
            return;
        };
        let skip = (!joined.broadcast_self).then_some(joined.handle.id);
        let ack = joined.broadcast_ack;
        let topic = std::sync::Arc::clone(&joined.topic);
        let checked = if size > self.shared.config.max_payload_bytes() {
            Err(ChannelError::BroadcastTooLarge)
        } else {
            check_payload(&msg.payload)
        };
        if let Err(e) = checked {
            // Dropped, never relayed; only a client that asked for acks hears why.
            e.report();
            if ack {
                match e {
                    // Upstream's `{:reply, {:error, :payload_size_exceeded}, socket}`.
                    ChannelError::BroadcastTooLarge => {
                        self.reply(&msg, "error", "payload_size_exceeded").await
                    }
                    _ => {
                        self.reply(&msg, "error", &json!({"reason": e.to_string()}))
                            .await
                    }
                }
            }
            return;
        }
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
