//! Presence: `track` / `untrack`, and the `presence_diff` every subscriber gets.
//!
//! A local change is applied, diffed to this replica's subscribers and told to
//! the other replicas (`Cluster::presence_changed`), all under the topic's
//! presence lock: every replica sees one replica's changes in order.

use phoenix_channel::{encode_text, Message, Payload};
use serde_json::{json, Value};

use super::Session;
use crate::error::ChannelError;
use crate::presence::Diff;
use crate::registry::{Outbound, Topic, READ_PRESENCE};
use crate::state::Shared;
use change_ingest::realtime::Extension;

/// Fans a diff out to every subscriber of the topic, the tracker included.
/// Called with the topic's presence lock held, so diffs go out in the order
/// they were applied.
pub(crate) fn publish_diff(shared: &Shared, topic: &Topic, diff: &Diff) {
    shared.fanout.publish_to(topic, None, READ_PRESENCE, |vsn| {
        encode_text(vsn, None, None, &topic.name, "presence_diff", diff)
            .ok()
            .map(Outbound::Text)
    });
}

/// Untracks a channel (leave, close, replaced join) and publishes the leave diff.
pub(crate) fn untrack(shared: &Shared, topic: &Topic, chan_id: u64) {
    let mut presence = topic.presence.lock();
    if let Some(diff) = presence.untrack(shared.cluster.owner(chan_id)) {
        publish_diff(shared, topic, &diff);
        shared.cluster.presence_changed(topic, &presence, chan_id);
    }
}

impl Session {
    pub(super) async fn presence(&mut self, msg: Message, size: usize) {
        let config = &self.shared.config;
        let (max_calls, window) = (
            config.client_presence_max_calls,
            std::time::Duration::from_millis(config.client_presence_window_ms),
        );
        let max_payload = config.max_payload_bytes();
        let Payload::Json(payload @ Value::Object(_)) = &msg.payload else {
            // Not a presence message at all: an unknown presence event (`{:reply, :error}`).
            self.reply(&msg, "error", &json!({})).await;
            return;
        };
        let Some(joined) = self.channels.get_mut(&msg.topic) else {
            return;
        };
        // Every presence call counts, whatever it asks (upstream's per-channel window).
        if !joined.presence_calls.allow(max_calls, window) {
            self.shutdown_limit(&msg.topic, ChannelError::PresenceRateLimit)
                .await;
            return;
        }
        // One socket keeps at most MAX_PAYLOAD_SIZE_IN_KB of metas tracked, over
        // all its channels (this one's current meta is replaced, so it does not count).
        let tracked_elsewhere = self.presence_bytes - joined.presence_bytes;
        let event = payload
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        match event.as_str() {
            "track" if size > max_payload.saturating_sub(tracked_elsewhere) => {
                self.shutdown_limit(&msg.topic, ChannelError::TrackTooLarge)
                    .await;
            }
            "track" => {
                if !self
                    .channel_may_write(&msg.topic, Extension::Presence)
                    .await
                {
                    self.reply(&msg, "error", &json!({})).await;
                    return;
                }
                let Some(joined) = self.channels.get(&msg.topic) else {
                    return;
                };
                let meta = match payload.get("payload") {
                    None | Some(Value::Null) => serde_json::Map::new(),
                    Some(Value::Object(m)) => m.clone(),
                    Some(_) => {
                        self.reply(
                            &msg,
                            "error",
                            &json!({"reason": "Presence track payload must be a map"}),
                        )
                        .await;
                        return;
                    }
                };
                {
                    let owner = self.shared.cluster.owner(joined.handle.id);
                    let mut presence = joined.topic.presence.lock();
                    if let Some(diff) = presence.track(owner, &joined.presence_key, meta) {
                        publish_diff(&self.shared, &joined.topic, &diff);
                        self.shared.cluster.presence_changed(
                            &joined.topic,
                            &presence,
                            joined.handle.id,
                        );
                    }
                }
                self.set_presence_bytes(&msg.topic, size);
                self.reply(&msg, "ok", &json!({})).await;
            }
            "untrack" => {
                let Some(joined) = self.channels.get(&msg.topic) else {
                    return;
                };
                untrack(&self.shared, &joined.topic, joined.handle.id);
                self.set_presence_bytes(&msg.topic, 0);
                self.reply(&msg, "ok", &json!({})).await;
            }
            _ => self.reply(&msg, "error", &json!({})).await,
        }
    }

    /// Records the size of the meta a channel keeps tracked.
    fn set_presence_bytes(&mut self, topic: &str, bytes: usize) {
        if let Some(joined) = self.channels.get_mut(topic) {
            self.presence_bytes = self.presence_bytes - joined.presence_bytes + bytes;
            joined.presence_bytes = bytes;
        }
    }
}
