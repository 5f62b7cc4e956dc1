//! Presence: `track` / `untrack`, and the `presence_diff` every subscriber gets.
//!
//! A local change is applied, diffed to this replica's subscribers and told to
//! the other replicas (`Cluster::presence_changed`), all under the topic's
//! presence lock: every replica sees one replica's changes in order.

use phoenix_channel::{encode_text, Message, Payload};
use serde_json::{json, Value};

use super::Session;
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
    pub(super) async fn presence(&mut self, msg: Message) {
        if !self.channels.contains_key(&msg.topic) {
            return;
        }
        let empty = json!({});
        let payload = match &msg.payload {
            Payload::Json(v) => v,
            Payload::UserBroadcast(_) => &empty,
        };
        let event = payload
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        match event.as_str() {
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
                self.reply(&msg, "ok", &json!({})).await;
            }
            "untrack" => {
                let Some(joined) = self.channels.get(&msg.topic) else {
                    return;
                };
                untrack(&self.shared, &joined.topic, joined.handle.id);
                self.reply(&msg, "ok", &json!({})).await;
            }
            _ => self.reply(&msg, "error", &json!({})).await,
        }
    }
}
