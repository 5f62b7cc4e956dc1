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
//!
//! Nothing is relayed that a realtime-js subscriber would choke on: a
//! socket's broadcast payload must be a JSON object, and a binary push whose
//! encoding byte says JSON must carry one ([`check_payload`]).

use std::time::Duration;

use bytes::Bytes;
use phoenix_channel::{encode_text, encode_user_broadcast, Message, Payload, PayloadEncoding, Vsn};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::Session;
use crate::error::ChannelError;
use crate::registry::{Outbound, Topic, READ_BROADCAST};
use crate::state::Shared;
use change_ingest::realtime::Extension;

/// How a publisher treats this replica's subscribers whose backlog is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Never wait (a socket's reader, the bus): the lag policy applies at once.
    Never,
    /// Wait while the subscriber keeps reading, giving up on a write blocked
    /// this long (REST: an accepted batch is delivered whole, see
    /// [`Fanout::publish_paced`](crate::registry::Fanout::publish_paced)).
    WhileReading(Duration),
}

/// Publishes a JSON-origin broadcast (`payload` is the whole map) on topic
/// `(private, name)`: to `local` (this replica's subscribers, if it has any)
/// except channel `skip`, and to the other replicas. Returns local deliveries.
pub async fn publish_json(
    shared: &Shared,
    private: bool,
    name: &str,
    local: Option<&Topic>,
    payload: &Value,
    skip: Option<u64>,
    pace: Pace,
) -> usize {
    shared.cluster.publish_json(private, name, payload);
    let mut frame = None;
    let n = match local {
        Some(topic) => {
            let encode = json_encoder(topic, payload, &mut frame);
            deliver(shared, topic, skip, encode, pace).await
        }
        None => 0,
    };
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
    let mut frame = None;
    let encode = json_encoder(topic, payload, &mut frame);
    shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, encode)
}

/// Local delivery to the subscribers that may read broadcasts (private
/// channels' read policy), waiting or not as `pace` says.
async fn deliver(
    shared: &Shared,
    topic: &Topic,
    skip: Option<u64>,
    encode: impl FnMut(Vsn) -> Option<Outbound>,
    pace: Pace,
) -> usize {
    match pace {
        Pace::Never => shared
            .fanout
            .publish_to(topic, skip, READ_BROADCAST, encode),
        Pace::WhileReading(grace) => {
            let fanout = &shared.fanout;
            fanout
                .publish_paced(topic, skip, READ_BROADCAST, encode, grace)
                .await
        }
    }
}

/// The per-serializer encoder of a JSON-origin broadcast; the first frame it
/// encodes is kept in `first` (a shared `Bytes`, for the event log).
fn json_encoder<'a, P: Serialize + ?Sized>(
    topic: &'a Topic,
    payload: &'a P,
    first: &'a mut Option<Bytes>,
) -> impl FnMut(Vsn) -> Option<Outbound> + 'a {
    move |vsn| {
        let frame = encode_text(vsn, None, None, &topic.name, "broadcast", payload)
            .map_err(|e| tracing::error!(cause = %e, "broadcast could not be encoded"))
            .ok()?;
        first.get_or_insert_with(|| frame.clone());
        Some(Outbound::Text(frame))
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
pub async fn publish_user(
    shared: &Shared,
    private: bool,
    name: &str,
    local: Option<&Topic>,
    msg: UserMessage<'_>,
    skip: Option<u64>,
    pace: Pace,
) -> usize {
    shared.cluster.publish_user(private, name, msg);
    let n = match local {
        Some(topic) => deliver(shared, topic, skip, user_encoder(topic, msg), pace).await,
        None => 0,
    };
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
    let encode = user_encoder(topic, msg);
    shared
        .fanout
        .publish_to(topic, skip, READ_BROADCAST, encode)
}

/// The per-serializer encoder of a binary-origin user broadcast.
pub(crate) fn user_encoder<'a>(
    topic: &'a Topic,
    msg: UserMessage<'a>,
) -> impl FnMut(Vsn) -> Option<Outbound> + 'a {
    let UserMessage {
        event,
        metadata,
        encoding,
        payload,
    } = msg;
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

/// Whether a socket's broadcast may be relayed: JSON payloads must be objects
/// (a realtime-js subscriber throws on anything else), and a binary push whose
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
        let (private, name) = (topic.private, topic.name.as_str());
        match &msg.payload {
            Payload::Json(payload) => {
                let local = Some(&*topic);
                publish_json(
                    &self.shared,
                    private,
                    name,
                    local,
                    payload,
                    skip,
                    Pace::Never,
                )
                .await;
            }
            Payload::UserBroadcast(ub) => {
                let user = UserMessage {
                    event: &ub.event,
                    metadata: ub.metadata.as_deref(),
                    encoding: ub.encoding,
                    payload: &ub.payload,
                };
                let local = Some(&*topic);
                publish_user(&self.shared, private, name, local, user, skip, Pace::Never).await;
            }
        }
        if ack {
            self.reply(&msg, "ok", &json!({})).await;
        }
    }
}
