//! Postgres Changes: bindings, filters and routing of captured changes to channels.
//!
//! # Layout
//! - [`BindingRequest`]: one `postgres_changes` entry of a join, with its id.
//! - `rest`: `GET/POST/DELETE /api/realtime/tables`.

pub mod rest;

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::registry::{ChannelHandle, Outbound};

/// Ids are non-negative integers below 2^27, like Realtime's `:erlang.phash2/1`.
const ID_RANGE: u64 = 1 << 27;

/// Stable id of a binding: identical filter maps get identical ids.
fn binding_id(raw: &Map<String, Value>) -> u32 {
    // serde_json's Map is ordered by key, so this text is canonical.
    let text = serde_json::to_string(raw).unwrap_or_default();
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % ID_RANGE) as u32
}

/// One `postgres_changes` entry of a join.
#[derive(Debug, Clone)]
pub struct BindingRequest {
    /// The entry exactly as the client sent it (echoed back with `id`).
    pub raw: Map<String, Value>,
    /// Its id.
    pub id: u32,
}

impl BindingRequest {
    /// Wraps a raw entry.
    pub fn from_raw(raw: &Map<String, Value>) -> Self {
        BindingRequest {
            id: binding_id(raw),
            raw: raw.clone(),
        }
    }

    /// The reply entry: the raw map plus `id`.
    pub fn echo(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("id".into(), json!(self.id));
        Value::Object(m)
    }
}

/// A join without `config` on `realtime:<schema>[:<table>[:<filter>]]` or `realtime:*`.
pub fn parse_legacy_topic(topic: &str) -> Option<BindingRequest> {
    let sub = topic.strip_prefix("realtime:")?;
    if sub.is_empty() {
        return None;
    }
    let mut parts = sub.splitn(3, ':');
    let schema = parts.next().unwrap_or("*");
    let mut raw = Map::new();
    raw.insert("event".into(), json!("*"));
    raw.insert("schema".into(), json!(schema));
    if let Some(table) = parts.next() {
        raw.insert("table".into(), json!(table));
    }
    if let Some(filter) = parts.next() {
        raw.insert("filter".into(), json!(filter));
    }
    Some(BindingRequest::from_raw(&raw))
}

/// A channel's registered bindings (returned by [`Changes::subscribe`]).
#[derive(Debug)]
pub struct ChannelBindings {
    chan_id: u64,
}

/// The Postgres Changes router.
#[derive(Debug, Default)]
pub struct Changes {}

impl Changes {
    /// Registers a channel's bindings and tells it whether they are live.
    pub fn subscribe(
        &self,
        chan: &Arc<ChannelHandle>,
        requests: Vec<BindingRequest>,
        _legacy: bool,
    ) -> ChannelBindings {
        let _ = requests;
        let msg = json!({
            "extension": "postgres_changes",
            "status": "error",
            "message": "Postgres Changes are unavailable: the gateway has no database configured",
            "channel": chan.subtopic(),
        });
        if let Ok(frame) =
            phoenix_channel::encode_text(chan.vsn, chan.join_ref.as_ref(), None, &chan.topic, "system", &msg)
        {
            let _ = chan.conn.tx.try_send(Outbound::Text(frame));
        }
        ChannelBindings { chan_id: chan.id }
    }

    /// Removes a channel's bindings.
    pub fn unsubscribe(&self, bindings: ChannelBindings) {
        let _ = bindings.chan_id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_bounded() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"event":"*","schema":"public","table":"t"}"#).unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"table":"t","schema":"public","event":"*"}"#).unwrap();
        assert_eq!(binding_id(&a), binding_id(&b));
        assert!(u64::from(binding_id(&a)) < ID_RANGE);
        let c: Map<String, Value> =
            serde_json::from_str(r#"{"event":"INSERT","schema":"public","table":"t"}"#).unwrap();
        assert_ne!(binding_id(&a), binding_id(&c));
    }

    #[test]
    fn legacy_topics() {
        let b = parse_legacy_topic("realtime:public:orders:id=eq.1").unwrap();
        assert_eq!(b.raw["schema"], "public");
        assert_eq!(b.raw["table"], "orders");
        assert_eq!(b.raw["filter"], "id=eq.1");
        let b = parse_legacy_topic("realtime:*").unwrap();
        assert_eq!(b.raw["schema"], "*");
        assert!(b.raw.get("table").is_none());
        assert!(parse_legacy_topic("realtime:").is_none());
    }
}
