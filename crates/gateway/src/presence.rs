//! Presence state of one topic, and the diffs it produces.
//!
//! Every joined channel tracks at most one meta under its presence key; several
//! channels with the same key give several metas. Each meta carries a unique
//! `phx_ref`; an update carries the previous one as `phx_ref_prev`. Diffs are
//! `{"joins": {key: {"metas": [...]}}, "leaves": {...}}` as Phoenix.Presence
//! sends them.
//!
//! With several replicas, a topic's state holds the metas of local channels and
//! those other replicas reported (see `cluster`): each meta's [`Owner`] names the
//! replica (node) and the channel. Only the owning replica changes its metas; the
//! others apply its deltas and snapshots ([`Presence::put`],
//! [`Presence::replace_node`]) and drop them all when it dies ([`Presence::remove_node`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who tracks a meta: channel `chan` on replica `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The replica's node id (`cluster::Cluster::node`).
    pub node: u64,
    /// The channel id on that replica.
    pub chan: u64,
}

/// One tracked meta, as stored and as replicas exchange it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The tracking channel (on the owning replica).
    pub chan: u64,
    /// The presence key.
    pub key: String,
    /// Unique across replicas: the owner's node id is part of it.
    pub phx_ref: String,
    /// The `phx_ref` this meta replaced (an update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phx_ref_prev: Option<String>,
    /// The tracked payload.
    pub meta: Map<String, Value>,
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
    fn add(&mut self, entry: &Entry) {
        self.0
            .entry(entry.key.clone())
            .or_default()
            .metas
            .push(entry.to_value());
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn merge(&mut self, other: PresenceMap) {
        for (key, metas) in other.0 {
            self.0.entry(key).or_default().metas.extend(metas.metas);
        }
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

impl Diff {
    fn non_empty(self) -> Option<Diff> {
        (!self.joins.is_empty() || !self.leaves.is_empty()).then_some(self)
    }
}

/// Presence state of a topic.
#[derive(Debug, Default)]
pub struct Presence {
    /// Metas by owner (at most one per channel).
    entries: HashMap<(u64, u64), Entry>,
    /// Keys in order, each with its owners in arrival order (what `state` lists).
    by_key: BTreeMap<String, Vec<Owner>>,
}

static REF_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A unique, opaque `phx_ref` (16 url-safe characters, 96 bits): 48 bits of the
/// node id and a scrambled 48-bit counter. Unique within the process by the
/// counter, and across replicas by the node id.
fn new_ref(node: u64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const MASK: u64 = (1 << 48) - 1;
    let n = REF_COUNTER.fetch_add(1, Ordering::Relaxed);
    // An odd multiplier is a bijection mod 2^48: no two counters share a value.
    let scrambled = n.wrapping_mul(0x9E37_79B9_7F4B) & MASK;
    let mut v = u128::from(scrambled) | (u128::from(node & MASK) << 48);
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
        for owners in self.by_key.values() {
            for o in owners {
                if let Some(e) = self.entries.get(&(o.node, o.chan)) {
                    map.add(e);
                }
            }
        }
        map
    }

    /// The meta `owner` tracks, if any.
    pub fn entry(&self, owner: Owner) -> Option<&Entry> {
        self.entries.get(&(owner.node, owner.chan))
    }

    /// Every meta of replica `node` (what it reports to the others).
    pub fn entries_of(&self, node: u64) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|((n, _), _)| *n == node)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Whether `owner` tracks anything.
    pub fn is_tracked(&self, owner: Owner) -> bool {
        self.entries.contains_key(&(owner.node, owner.chan))
    }

    /// Tracks (or updates) a local channel's meta under `key`, with a fresh
    /// `phx_ref`. `None` when nothing changed.
    pub fn track(&mut self, owner: Owner, key: &str, meta: Map<String, Value>) -> Option<Diff> {
        let prev = match self.entry(owner) {
            Some(old) if old.key == key && old.meta == meta => return None,
            Some(old) => Some(old.phx_ref.clone()),
            None => None,
        };
        self.put(
            owner.node,
            Entry {
                chan: owner.chan,
                key: key.to_owned(),
                phx_ref: new_ref(owner.node),
                phx_ref_prev: prev,
                meta,
            },
        )
    }

    /// Stores `entry` for channel `entry.chan` of `node`, replacing that
    /// channel's previous meta (a leave of the old one, a join of the new one).
    /// `None` when that exact meta was already there.
    pub fn put(&mut self, node: u64, entry: Entry) -> Option<Diff> {
        let owner = Owner {
            node,
            chan: entry.chan,
        };
        if self
            .entry(owner)
            .is_some_and(|old| old.phx_ref == entry.phx_ref)
        {
            return None;
        }
        let mut diff = Diff::default();
        if let Some(old) = self.remove(owner) {
            diff.leaves.add(&old);
        }
        diff.joins.add(&entry);
        self.by_key
            .entry(entry.key.clone())
            .or_default()
            .push(owner);
        self.entries.insert((node, entry.chan), entry);
        Some(diff)
    }

    /// Untracks `owner`. `None` when it was not tracked.
    pub fn untrack(&mut self, owner: Owner) -> Option<Diff> {
        let old = self.remove(owner)?;
        let mut diff = Diff::default();
        diff.leaves.add(&old);
        Some(diff)
    }

    /// Replaces every meta of replica `node` with `entries` (its snapshot);
    /// metas that did not change produce no diff.
    pub fn replace_node(&mut self, node: u64, entries: Vec<Entry>) -> Option<Diff> {
        let mut diff = Diff::default();
        let keep: HashMap<u64, &str> = entries
            .iter()
            .map(|e| (e.chan, e.phx_ref.as_str()))
            .collect();
        let stale: Vec<Owner> = self
            .entries
            .iter()
            .filter(|((n, chan), e)| *n == node && keep.get(chan) != Some(&e.phx_ref.as_str()))
            .map(|((n, chan), _)| Owner {
                node: *n,
                chan: *chan,
            })
            .collect();
        for owner in stale {
            if let Some(old) = self.remove(owner) {
                diff.leaves.add(&old);
            }
        }
        for e in entries {
            if let Some(d) = self.put(node, e) {
                diff.leaves.merge(d.leaves);
                diff.joins.merge(d.joins);
            }
        }
        diff.non_empty()
    }

    /// Removes every meta of replica `node` (it died or left).
    pub fn remove_node(&mut self, node: u64) -> Option<Diff> {
        self.replace_node(node, Vec::new())
    }

    fn remove(&mut self, owner: Owner) -> Option<Entry> {
        let old = self.entries.remove(&(owner.node, owner.chan))?;
        if let Some(owners) = self.by_key.get_mut(&old.key) {
            owners.retain(|o| *o != owner);
            if owners.is_empty() {
                self.by_key.remove(&old.key);
            }
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    const LOCAL: u64 = 7;

    fn local(chan: u64) -> Owner {
        Owner { node: LOCAL, chan }
    }

    #[test]
    fn track_update_untrack() {
        let mut p = Presence::default();
        let d = p.track(local(1), "u1", meta(json!({"a": 1}))).unwrap();
        let d = serde_json::to_value(&d).unwrap();
        let r1 = d["joins"]["u1"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(d["leaves"], json!({}));
        assert!(
            p.track(local(1), "u1", meta(json!({"a": 1}))).is_none(),
            "identical re-track is a no-op"
        );
        let d =
            serde_json::to_value(p.track(local(1), "u1", meta(json!({"a": 2}))).unwrap()).unwrap();
        assert_eq!(d["joins"]["u1"]["metas"][0]["phx_ref_prev"], json!(r1));
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], json!(r1));
        assert_ne!(d["joins"]["u1"]["metas"][0]["phx_ref"], json!(r1));
        p.track(local(2), "u1", meta(json!({"b": 1})));
        let s = serde_json::to_value(p.state()).unwrap();
        assert_eq!(s["u1"]["metas"].as_array().unwrap().len(), 2);
        let d = serde_json::to_value(p.untrack(local(1)).unwrap()).unwrap();
        assert_eq!(d["leaves"]["u1"]["metas"][0]["a"], json!(2));
        assert!(p.untrack(local(1)).is_none());
    }

    #[test]
    fn refs_are_unique_within_and_across_nodes() {
        let refs: std::collections::HashSet<_> =
            (0..10_000).flat_map(|_| [new_ref(1), new_ref(2)]).collect();
        assert_eq!(refs.len(), 20_000);
    }

    #[test]
    fn remote_metas_replace_and_expire_by_node() {
        let mut p = Presence::default();
        p.track(local(1), "alice", meta(json!({"me": true})));
        let bob = Entry {
            chan: 5,
            key: "bob".into(),
            phx_ref: "r-bob".into(),
            phx_ref_prev: None,
            meta: meta(json!({"n": 1})),
        };
        let d = serde_json::to_value(p.put(9, bob.clone()).unwrap()).unwrap();
        assert_eq!(d["joins"]["bob"]["metas"][0]["n"], json!(1));
        assert!(
            p.put(9, bob.clone()).is_none(),
            "same phx_ref twice is a no-op"
        );
        // Same channel id on another node is another owner.
        assert!(p.put(10, bob.clone()).is_some());
        assert_eq!(p.entries_of(9), vec![bob.clone()]);
        assert_eq!(p.entries_of(LOCAL).len(), 1);

        // A snapshot equal to what we have changes nothing; a changed one diffs.
        assert!(p.replace_node(9, vec![bob]).is_none());
        let carol = Entry {
            chan: 6,
            key: "carol".into(),
            phx_ref: "r-carol".into(),
            phx_ref_prev: None,
            meta: Map::new(),
        };
        let d = serde_json::to_value(p.replace_node(9, vec![carol]).unwrap()).unwrap();
        assert_eq!(d["leaves"]["bob"]["metas"][0]["phx_ref"], json!("r-bob"));
        assert_eq!(d["joins"]["carol"]["metas"][0]["phx_ref"], json!("r-carol"));

        let d = serde_json::to_value(p.remove_node(9).unwrap()).unwrap();
        assert_eq!(
            d["leaves"]["carol"]["metas"][0]["phx_ref"],
            json!("r-carol")
        );
        assert!(p.remove_node(9).is_none());
        let s = serde_json::to_value(p.state()).unwrap();
        assert_eq!(
            s.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["alice", "bob"]
        );
    }
}
