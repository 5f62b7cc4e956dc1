//! Broadcast: client-to-client messages, from a socket or from REST.
//!
//! JSON-origin messages (text frames, the REST batch endpoint) reach every
//! subscriber as `broadcast` events carrying the whole `{type, event, payload}`
//! map. Binary-origin messages (realtime-js kind-3 pushes, REST single
//! endpoint) reach V2 subscribers as kind-4 frames and V1 subscribers as JSON;
//! raw-binary payloads cannot be expressed in V1 and are dropped for them.
//!
//! `publish_*` is what clients and REST do: deliver to this replica's
//! subscribers and hand the message to the cluster bus (a no-op for a single
//! replica). `deliver_*` is local only: for messages that came from the bus,
//! and for broadcasts from the database (every replica reads those from the
//! log itself; republishing them would deliver them once per replica).

use phoenix_channel::{encode_text, encode_user_broadcast, Message, Payload, PayloadEncoding, Vsn};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::Session;
use crate::registry::{Outbound, Topic, READ_BROADCAST};
use crate::state::Shared;
use change_ingest::realtime::Extension;

/// Publishes a JSON-origin broadcast (`payload` is the whole map) on topic
/// `(private, name)`: to `local` (this replica's subscribers, if it has any)
/// except channel `skip`, and to the other replicas. Returns local deliveries.
pub fn publish_json(
    shared: &Shared,
    private: bool,
    name: &str,
    local: Option<&Topic>,
    payload: &Value,
    skip: Option<u64>,
) -> usize {
    shared.cluster.publish_json(private, name, payload);
    let (n, frame) = local.map_or((0, None), |topic| deliver(shared, topic, payload, skip));
    // One event-log entry per message, on the replica it was published on (the
    // operations hook); it shares the frame already encoded, no second encoding.
    let log = &shared.ops.events;
    log.broadcast_json(name, private, payload, frame.as_ref(), n);
    n
}

/// Delivers a JSON-origin broadcast to this replica's subscribers only. Returns deliveries.
pub fn deliver_json<P: Serialize + ?Sized>(
    shared: &Shared,
    topic: &Topic,
    payload: &P,
    skip: Option<u64>,
) -> usize {
    deliver(shared, topic, payload, skip).0
}

/// [`deliver_json`], also returning the first frame encoded (a shared `Bytes`).
fn deliver<P: Serialize + ?Sized>(
    shared: &Shared,
    topic: &Topic,
    payload: &P,
    skip: Option<u64>,
) -> (usize, Option<bytes::Bytes>) {
    let mut sent: Option<bytes::Bytes> = None;
    let n = shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, |vsn| {
            let frame = encode_text(vsn, None, None, &topic.name, "broadcast", payload)
                .map_err(|e| tracing::error!(cause = %e, "broadcast could not be encoded"))
                .ok()?;
            sent.get_or_insert_with(|| frame.clone());
            Some(Outbound::Text(frame))
        });
    (n, sent)
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

/// A binary-origin user broadcast: `event`, optional metadata, payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct UserMessage<'a> {
    /// The user event.
    pub event: &'a str,
    /// Metadata bytes (JSON), if any.
    pub metadata: Option<&'a [u8]>,
    /// How the payload is encoded.
    pub encoding: PayloadEncoding,
    /// The payload.
    pub payload: &'a [u8],
}

/// Publishes a binary-origin user broadcast on topic `(private, name)`: to
/// `local` except channel `skip`, and to the other replicas. Returns local deliveries.
pub fn publish_user(
    shared: &Shared,
    private: bool,
    name: &str,
    local: Option<&Topic>,
    msg: UserMessage<'_>,
    skip: Option<u64>,
) -> usize {
    shared.cluster.publish_user(private, name, msg);
    let n = local.map_or(0, |topic| deliver_user(shared, topic, msg, skip));
    // One event-log entry per message, on the replica it was published on (the operations hook).
    let json = msg.encoding == PayloadEncoding::Json;
    shared
        .ops
        .events
        .broadcast_bytes(name, private, msg.event, json, msg.payload, n);
    n
}

/// Delivers a binary-origin user broadcast to this replica's subscribers only. Returns deliveries.
pub fn deliver_user(
    shared: &Shared,
    topic: &Topic,
    msg: UserMessage<'_>,
    skip: Option<u64>,
) -> usize {
    shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, |vsn| {
            user_frame(topic, msg, vsn)
        })
}

/// A binary-origin user broadcast's frame for serializer `vsn` (`None`: it
/// cannot be expressed there, e.g. a raw-binary payload in V1).
pub fn user_frame(topic: &Topic, msg: UserMessage<'_>, vsn: Vsn) -> Option<Outbound> {
    let UserMessage {
        event,
        metadata,
        encoding,
        payload,
    } = msg;
    match vsn {
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
        let (private, name) = (topic.private, topic.name.as_str());
        match &msg.payload {
            Payload::Json(payload) => {
                publish_json(&self.shared, private, name, Some(&topic), payload, skip);
            }
            Payload::UserBroadcast(ub) => {
                let user = UserMessage {
                    event: &ub.event,
                    metadata: ub.metadata.as_deref(),
                    encoding: ub.encoding,
                    payload: &ub.payload,
                };
                publish_user(&self.shared, private, name, Some(&topic), user, skip);
            }
        }
        if ack {
            self.reply(&msg, "ok", &json!({})).await;
        }
    }
}
