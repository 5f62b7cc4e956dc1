//! Presence state of one topic, and the diffs it produces.
//!
//! Every joined channel tracks at most one meta under its presence key; several
//! channels with the same key give several metas. Each meta carries a unique
//! `phx_ref`; an update carries the previous one as `phx_ref_prev`. Diffs are
//! `{"joins": {key: {"metas": [...]}}, "leaves": {...}}` as Phoenix.Presence
//! sends them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{Map, Value};

/// One tracked meta.
#[derive(Clone, Debug)]
struct Entry {
    chan_id: u64,
    phx_ref: String,
    phx_ref_prev: Option<String>,
    meta: Map<String, Value>,
}

impl Entry {
    fn to_value(&self) -> Value {
        let mut m = self.meta.clone();
        m.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(prev) = &self.phx_ref_prev {
            m.insert("phx_ref_prev".into(), Value::String(prev.clone()));
        }
        Value::Object(m)
    }
}

/// `{key: {"metas": [...]}}`.
#[derive(Debug, Default, Serialize)]
pub struct PresenceMap(BTreeMap<String, Metas>);

/// The metas of one key.
#[derive(Debug, Default, Serialize)]
pub struct Metas {
    metas: Vec<Value>,
}

impl PresenceMap {
    fn add(&mut self, key: &str, entry: &Entry) {
        self.0
            .entry(key.to_owned())
            .or_default()
            .metas
            .push(entry.to_value());
    }
}

/// A presence diff.
#[derive(Debug, Default, Serialize)]
pub struct Diff {
    /// Metas that appeared.
    pub joins: PresenceMap,
    /// Metas that went away.
    pub leaves: PresenceMap,
}

/// Presence state of a topic.
#[derive(Debug, Default)]
pub struct Presence {
    by_key: BTreeMap<String, Vec<Entry>>,
    /// Which key each channel tracks under.
    keys: std::collections::HashMap<u64, String>,
}

static REF_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, opaque `phx_ref` (16 url-safe characters).
fn new_ref() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // A random per-process salt mixed with a counter: unique within the process,
    // and unlikely to collide with another replica's.
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let salt = *SALT.get_or_init(rand::random);
    let n = REF_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut v = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt) as u128 | ((n as u128) << 64);
    let mut out = String::with_capacity(16);
    for _ in 0..16 {
        out.push(ALPHABET[(v & 63) as usize] as char);
        v >>= 6;
    }
    out
}

impl Presence {
    /// The full state, as sent in `presence_state`.
    pub fn state(&self) -> PresenceMap {
        let mut map = PresenceMap::default();
        for (key, entries) in &self.by_key {
            for e in entries {
                map.add(key, e);
            }
        }
        map
    }

    /// Tracks (or updates) `chan_id`'s meta under `key`. `None` when nothing changed.
    pub fn track(&mut self, chan_id: u64, key: &str, meta: Map<String, Value>) -> Option<Diff> {
        let mut diff = Diff::default();
        let mut prev_ref = None;
        if let Some(old_key) = self.keys.get(&chan_id).cloned() {
            let entries = self.by_key.get_mut(&old_key)?;
            let pos = entries.iter().position(|e| e.chan_id == chan_id)?;
            if old_key == key && entries[pos].meta == meta {
                return None;
            }
            let old = entries.remove(pos);
            if entries.is_empty() {
                self.by_key.remove(&old_key);
            }
            diff.leaves.add(&old_key, &old);
            prev_ref = Some(old.phx_ref);
        }
        let entry = Entry {
            chan_id,
            phx_ref: new_ref(),
            phx_ref_prev: prev_ref,
            meta,
        };
        diff.joins.add(key, &entry);
        self.by_key.entry(key.to_owned()).or_default().push(entry);
        self.keys.insert(chan_id, key.to_owned());
        Some(diff)
    }

    /// Untracks `chan_id`. `None` when it was not tracked.
    pub fn untrack(&mut self, chan_id: u64) -> Option<Diff> {
        let key = self.keys.remove(&chan_id)?;
        let entries = self.by_key.get_mut(&key)?;
        let pos = entries.iter().position(|e| e.chan_id == chan_id)?;
        let old = entries.remove(pos);
        if entries.is_empty() {
            self.by_key.remove(&key);
        }
        let mut diff = Diff::default();
        diff.leaves.add(&key, &old);
        Some(diff)
    }

    /// Whether `chan_id` tracks anything.
    pub fn is_tracked(&self, chan_id: u64) -> bool {
        self.keys.contains_key(&chan_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn track_update_untrack() {
        let mut p = Presence::default();
        let d = p.track(1, "u1", meta(json!({"a": 1}))).unwrap();
        let d = serde_json::to_value(&d).unwrap();
        let r1 = d["joins"]["u1"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(d["leaves"], json!({}));
        assert!(
            p.track(1, "u1", meta(json!({"a": 1}))).is_none(),
            "identical re-track is a no-op"
        );
        let d = serde_json::to_value(p.track(1, "u1", meta(json!({"a": 2}))).unwrap()).unwrap();
        assert_eq!(d["joins"]["u1"]["metas"][0]["phx_ref_prev"], json!(r1));
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], json!(r1));
        assert_ne!(d["joins"]["u1"]["metas"][0]["phx_ref"], json!(r1));
        p.track(2, "u1", meta(json!({"b": 1})));
        let s = serde_json::to_value(p.state()).unwrap();
        assert_eq!(s["u1"]["metas"].as_array().unwrap().len(), 2);
        let d = serde_json::to_value(p.untrack(1).unwrap()).unwrap();
        assert_eq!(d["leaves"]["u1"]["metas"][0]["a"], json!(2));
        assert!(p.untrack(1).is_none());
    }

    #[test]
    fn refs_are_unique() {
        let refs: std::collections::HashSet<_> = (0..10_000).map(|_| new_ref()).collect();
        assert_eq!(refs.len(), 10_000);
    }
}
