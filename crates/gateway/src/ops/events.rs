//! A bounded log of the change and broadcast events this replica saw, for
//! `GET /api/realtime/events` and the inspector.
//!
//! Recording is one relaxed `fetch_add` for a sequence number plus a store
//! into that sequence's slot under the slot's own mutex: publishers take
//! different slots, so they do not contend, and nothing here is per
//! subscriber. Nothing is encoded on the hot path: a payload up to
//! [`SHARE_BYTES`] is kept by sharing the bytes already encoded (the frame a
//! broadcast was sent as, a change's row image: a reference count, no copy)
//! and its preview is extracted when someone reads the log; a larger one is
//! cut to [`PREVIEW_BYTES`]. The log's memory is bounded by its capacity
//! whatever the messages weigh.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use change_ingest::{Change, TableInfo};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// Most payload bytes shown per event.
pub const PREVIEW_BYTES: usize = 1024;
/// Payloads up to this size are kept by sharing their bytes; larger ones are cut.
pub const SHARE_BYTES: usize = 4096;

/// A payload as kept in the log.
#[derive(Debug, Clone)]
enum Kept {
    /// A whole (small) V1 or V2 text frame; the broadcast payload is taken out when read.
    Frame(Bytes),
    /// Payload text (JSON or not); `true` when it was cut.
    Text(Bytes, bool),
    /// A description (binary payloads).
    Note(String),
}

impl Kept {
    /// Shares `b` when small, else keeps its first [`PREVIEW_BYTES`].
    fn raw(b: &Bytes) -> Kept {
        if b.len() <= SHARE_BYTES {
            Kept::Text(b.clone(), false)
        } else {
            Kept::Text(Bytes::copy_from_slice(&b[..PREVIEW_BYTES]), true)
        }
    }

    /// The preview text and whether it was cut (read path only).
    fn preview(&self) -> (String, bool) {
        match self {
            Kept::Frame(frame) => match frame_payload(frame) {
                Some(v) => preview_json(&v),
                None => preview_bytes(frame),
            },
            Kept::Text(b, cut) => {
                let (text, cut2) = preview_bytes(b);
                (text, *cut || cut2)
            }
            Kept::Note(s) => (s.clone(), false),
        }
    }
}

/// The broadcast payload inside a V1 (`{..., "payload": {type, event, payload}}`)
/// or V2 (`[jr, ref, topic, event, {type, event, payload}]`) text frame.
fn frame_payload(frame: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(frame).ok()?;
    let message = match v {
        Value::Array(mut a) if a.len() == 5 => a.pop()?,
        Value::Object(mut o) => o.remove("payload")?,
        _ => return None,
    };
    match message {
        Value::Object(mut o) => o.remove("payload"),
        _ => None,
    }
}

/// What happened.
#[derive(Debug, Clone)]
enum What {
    Broadcast {
        topic: String,
        event: String,
        private: bool,
        deliveries: usize,
    },
    Change {
        table: Arc<TableInfo>,
        op: &'static str,
        commit_timestamp: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    at_ms: u64,
    what: What,
    kept: Kept,
}

/// Which events a read returns.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// `schema.table` or `table`: change events on that table only.
    pub table: Option<String>,
    /// `realtime:<name>` or `<name>`: broadcast events on that topic only.
    pub topic: Option<String>,
    /// Only events with a larger id (the inspector polls with its last id).
    pub after: Option<u64>,
}

impl Filter {
    fn accepts(&self, e: &Entry) -> bool {
        if self.after.is_some_and(|a| e.id <= a) {
            return false;
        }
        match &e.what {
            What::Change { table, .. } => {
                self.topic.is_none()
                    && self
                        .table
                        .as_deref()
                        .is_none_or(|t| match t.split_once('.') {
                            Some((s, n)) => s == table.schema && n == table.table,
                            None => t == table.table,
                        })
            }
            What::Broadcast { topic, .. } => {
                self.table.is_none()
                    && self
                        .topic
                        .as_deref()
                        .is_none_or(|t| topic == t || topic.strip_prefix("realtime:") == Some(t))
            }
        }
    }
}

/// The ring of recent events.
#[derive(Debug)]
pub struct EventLog {
    slots: Box<[Mutex<Option<Entry>>]>,
    /// Id of the next event (ids start at 1).
    next: AtomicU64,
    /// Events with a smaller id were cleared.
    cleared_below: AtomicU64,
    /// Totals since start, by kind.
    broadcasts: AtomicU64,
    changes: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A writer that keeps the first `limit` bytes and then fails, so a
/// serializer stops early instead of encoding a large payload in full.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    cut: bool,
}

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            self.cut = true;
            return Err(std::io::Error::other("preview full"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON value's text, at most [`PREVIEW_BYTES`]; and whether it was cut.
fn preview_json(v: &Value) -> (String, bool) {
    let mut w = Bounded {
        buf: Vec::new(),
        limit: PREVIEW_BYTES,
        cut: false,
    };
    let _ = serde_json::to_writer(&mut w, v);
    (String::from_utf8_lossy(&w.buf).into_owned(), w.cut)
}

/// Raw bytes as text, at most [`PREVIEW_BYTES`]; and whether they were cut.
fn preview_bytes(b: &[u8]) -> (String, bool) {
    let cut = b.len() > PREVIEW_BYTES;
    let b = &b[..b.len().min(PREVIEW_BYTES)];
    (String::from_utf8_lossy(b).into_owned(), cut)
}

impl EventLog {
    /// A log keeping the last `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        EventLog {
            slots: (0..capacity.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicU64::new(1),
            cleared_below: AtomicU64::new(0),
            broadcasts: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        }
    }

    /// How many events the log keeps.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn push(&self, what: What, kept: Kept) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            id,
            at_ms: now_ms(),
            what,
            kept,
        };
        let slot = &self.slots[(id % self.slots.len() as u64) as usize];
        let mut guard = slot.lock();
        // A slower writer of an older id must not overwrite a newer event.
        if guard.as_ref().is_none_or(|e| e.id < id) {
            *guard = Some(entry);
        }
    }

    /// Records a JSON-origin broadcast (`message` is `{type, event, payload}`);
    /// `frame` is a text frame it was sent as, when it reached anyone.
    pub fn broadcast_json(
        &self,
        topic: &str,
        private: bool,
        message: &Value,
        frame: Option<&Bytes>,
        deliveries: usize,
    ) {
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        let event = message
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let preview = match frame {
            Some(f) if f.len() <= SHARE_BYTES => Kept::Frame(f.clone()),
            // Large, or sent to nobody: encode at most PREVIEW_BYTES of it.
            _ => {
                let (text, cut) = preview_json(message.get("payload").unwrap_or(&Value::Null));
                Kept::Text(Bytes::from(text), cut)
            }
        };
        let what = What::Broadcast {
            topic: topic.to_owned(),
            event,
            private,
            deliveries,
        };
        self.push(what, preview);
    }

    /// Records a binary-origin broadcast; `json` says whether `payload` is JSON text.
    pub fn broadcast_bytes(
        &self,
        topic: &str,
        private: bool,
        event: &str,
        json: bool,
        payload: &[u8],
        deliveries: usize,
    ) {
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        let preview = if json {
            let cut = payload.len() > PREVIEW_BYTES;
            Kept::Text(
                Bytes::copy_from_slice(&payload[..payload.len().min(PREVIEW_BYTES)]),
                cut,
            )
        } else {
            Kept::Note(format!("<{} bytes, binary>", payload.len()))
        };
        let what = What::Broadcast {
            topic: topic.to_owned(),
            event: event.to_owned(),
            private,
            deliveries,
        };
        self.push(what, preview);
    }

    /// Records the changes of one ingest batch (before routing).
    pub fn changes(&self, batch: &[Change]) {
        self.changes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for c in batch {
            let image = c.record.as_ref().or(c.old_record.as_ref());
            let preview = image.map_or(Kept::Note(String::new()), Kept::raw);
            let what = What::Change {
                table: Arc::clone(&c.table),
                op: c.op.as_str(),
                commit_timestamp: c.commit_timestamp.to_string(),
            };
            self.push(what, preview);
        }
    }

    /// Hides every event recorded so far.
    pub fn clear(&self) -> u64 {
        let next = self.next.load(Ordering::Relaxed);
        self.cleared_below.fetch_max(next, Ordering::Relaxed);
        next.saturating_sub(1)
    }

    /// Totals since start: (broadcasts, changes).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.broadcasts.load(Ordering::Relaxed),
            self.changes.load(Ordering::Relaxed),
        )
    }

    /// The id of the newest event (0 when none).
    pub fn last_id(&self) -> u64 {
        self.next.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// The newest `limit` events matching `filter`, oldest first, as JSON.
    pub fn read(&self, filter: &Filter, limit: usize) -> Vec<Value> {
        let next = self.next.load(Ordering::Relaxed);
        let cap = self.slots.len() as u64;
        let oldest = next
            .saturating_sub(cap)
            .max(self.cleared_below.load(Ordering::Relaxed))
            .max(1);
        let mut out = Vec::new();
        let mut id = next;
        while id > oldest && out.len() < limit {
            id -= 1;
            if filter.after.is_some_and(|a| id <= a) {
                break;
            }
            let slot = self.slots[(id % cap) as usize].lock();
            if let Some(e) = slot.as_ref().filter(|e| e.id == id && filter.accepts(e)) {
                out.push(e.clone());
            }
        }
        out.reverse();
        out.iter().map(to_json).collect()
    }
}

fn to_json(e: &Entry) -> Value {
    let mut v = match &e.what {
        What::Broadcast {
            topic,
            event,
            private,
            deliveries,
        } => json!({
            "kind": "broadcast",
            "topic": topic,
            "event": event,
            "private": private,
            "deliveries": deliveries,
        }),
        What::Change {
            table,
            op,
            commit_timestamp,
        } => json!({
            "kind": "postgres_changes",
            "schema": table.schema,
            "table": table.table,
            "type": op,
            "commit_timestamp": commit_timestamp,
        }),
    };
    let (preview, truncated) = e.kept.preview();
    v["id"] = json!(e.id);
    v["at"] = json!(super::rfc3339_ms(e.at_ms));
    v["payload"] = json!(preview);
    v["truncated"] = json!(truncated);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bc(log: &EventLog, topic: &str, n: i64) {
        let message = json!({"type": "broadcast", "event": "e", "payload": {"n": n}});
        let frame = phoenix_channel::encode_text(
            phoenix_channel::Vsn::V2,
            None,
            None,
            topic,
            "broadcast",
            &message,
        )
        .unwrap();
        log.broadcast_json(topic, false, &message, Some(&frame), 1);
    }

    #[test]
    fn ring_keeps_the_newest_and_filters() {
        let log = EventLog::new(4);
        for n in 1..=6 {
            bc(
                &log,
                if n % 2 == 0 {
                    "realtime:even"
                } else {
                    "realtime:odd"
                },
                n,
            );
        }
        let all = log.read(&Filter::default(), 100);
        let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
        assert_eq!(
            ids,
            vec![3, 4, 5, 6],
            "capacity 4: the newest four, oldest first"
        );
        assert_eq!(all[3]["payload"], r#"{"n":6}"#);
        let even = log.read(
            &Filter {
                topic: Some("even".into()),
                ..Filter::default()
            },
            100,
        );
        assert_eq!(even.len(), 2);
        let last = log.read(&Filter::default(), 1);
        assert_eq!(last[0]["id"], 6, "limit keeps the newest");
        let after = log.read(
            &Filter {
                after: Some(5),
                ..Filter::default()
            },
            100,
        );
        assert_eq!(after.len(), 1);
        assert_eq!(log.clear(), 6);
        assert!(log.read(&Filter::default(), 100).is_empty());
        bc(&log, "realtime:odd", 7);
        assert_eq!(log.read(&Filter::default(), 100).len(), 1);
        assert_eq!(log.totals(), (7, 0));
    }

    fn v1(topic: &str, message: &Value) -> Bytes {
        let vsn = phoenix_channel::Vsn::V1;
        phoenix_channel::encode_text(vsn, None, None, topic, "broadcast", message).unwrap()
    }

    #[test]
    fn previews_are_bounded_and_taken_from_the_frame() {
        let big = json!({"event": "e", "payload": {"blob": "x".repeat(10 * PREVIEW_BYTES)}});
        let log = EventLog::new(4);
        log.broadcast_json(
            "realtime:big",
            false,
            &big,
            Some(&v1("realtime:big", &big)),
            0,
        );
        log.broadcast_json("realtime:big", false, &big, None, 0);
        for e in log.read(&Filter::default(), 10) {
            assert_eq!(e["payload"].as_str().unwrap().len(), PREVIEW_BYTES);
            assert_eq!(e["truncated"], true);
        }
        let log = EventLog::new(2);
        log.broadcast_bytes("realtime:bin", true, "e", false, &[0u8; 5000], 0);
        let small = json!({"event": "e", "payload": {"k": "v"}});
        log.broadcast_json(
            "realtime:small",
            false,
            &small,
            Some(&v1("realtime:small", &small)),
            1,
        );
        let got = log.read(&Filter::default(), 10);
        assert_eq!(got[0]["payload"], "<5000 bytes, binary>");
        assert_eq!(got[0]["private"], true);
        assert_eq!(
            got[1]["payload"], r#"{"k":"v"}"#,
            "payload taken out of a V1 frame"
        );
        assert_eq!(got[1]["truncated"], false);
    }
}
