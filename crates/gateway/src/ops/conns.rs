//! Current connections and the last disconnects, for `GET /api/realtime/connections`.
//!
//! A connection registers once (at the upgrade) and deregisters once (when its
//! task ends); joins and leaves update its channel list. None of this is on a
//! per-message path: the per-message counters live in the connection's
//! [`ConnStats`](crate::registry::ConnStats), bumped by its own tasks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

use crate::registry::ConnHandle;

/// How many disconnects are remembered.
pub const DISCONNECTS_KEPT: usize = 100;

/// Why a connection ended, as operators ask about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The client sent a close frame.
    ClientClose,
    /// The client went away without one (network, process killed).
    ClientGone,
    /// No frame within `IDLE_TIMEOUT_MS`.
    Idle,
    /// The client could not keep up: its socket writes stalled past `WRITE_TIMEOUT_MS`.
    Lag,
    /// Its token expired (for closes that end the whole socket).
    TokenExpired,
    /// A limit was exceeded (message size, rate).
    Limit,
    /// The gateway shut down (drain).
    Shutdown,
    /// A WebSocket protocol violation.
    ProtocolError,
}

impl DisconnectReason {
    /// All reasons, for per-reason totals.
    pub const ALL: [DisconnectReason; 8] = [
        DisconnectReason::ClientClose,
        DisconnectReason::ClientGone,
        DisconnectReason::Idle,
        DisconnectReason::Lag,
        DisconnectReason::TokenExpired,
        DisconnectReason::Limit,
        DisconnectReason::Shutdown,
        DisconnectReason::ProtocolError,
    ];

    /// The label used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClose => "client_close",
            DisconnectReason::ClientGone => "client_gone",
            DisconnectReason::Idle => "idle",
            DisconnectReason::Lag => "lag",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::Limit => "limit",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::ProtocolError => "protocol_error",
        }
    }
}

/// Who connected, fixed at the upgrade.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    /// Connection id (the `conn_id` of its log span).
    pub id: u64,
    /// The TCP peer (the proxy's address behind nginx).
    pub peer: SocketAddr,
    /// The first `X-Forwarded-For` address, when a proxy sent one (informational: not verified).
    pub forwarded_for: Option<String>,
    /// When the upgrade was accepted.
    pub since: SystemTime,
}

/// One joined channel, as the connections API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelInfo {
    /// `realtime:<name>`.
    pub topic: String,
    /// A private channel.
    pub private: bool,
    /// Presence enabled at join.
    pub presence: bool,
    /// `postgres_changes` bindings requested at join.
    pub postgres_changes: usize,
}

#[derive(Debug)]
struct Live {
    meta: ConnMeta,
    sub: Option<String>,
    role: String,
    handle: Arc<ConnHandle>,
    channels: Mutex<Vec<ChannelInfo>>,
}

#[derive(Debug)]
struct Ended {
    json: Value,
}

/// The registry of current connections and recent disconnects.
#[derive(Debug, Default)]
pub struct Connections {
    live: DashMap<u64, Arc<Live>>,
    ended: Mutex<VecDeque<Ended>>,
    totals: DashMap<DisconnectReason, u64>,
}

fn live_json(l: &Live) -> Value {
    let s = &l.handle.stats;
    json!({
        "id": l.meta.id,
        "peer": l.meta.peer.to_string(),
        "forwarded_for": l.meta.forwarded_for,
        "sub": l.sub,
        "role": l.role,
        "since": super::rfc3339(l.meta.since),
        "connected_secs": SystemTime::now().duration_since(l.meta.since).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "frames_in": s.frames_in.load(Ordering::Relaxed),
        "frames_out": s.frames_out.load(Ordering::Relaxed),
        "lagged_frames": s.lagged.load(Ordering::Relaxed),
        "channels": *l.channels.lock(),
    })
}

impl Connections {
    /// Registers a connection (at the upgrade, before its first frame).
    pub fn register(
        &self,
        meta: ConnMeta,
        sub: Option<String>,
        role: String,
        handle: Arc<ConnHandle>,
    ) {
        let id = meta.id;
        let live = Live {
            meta,
            sub,
            role,
            handle,
            channels: Mutex::new(Vec::new()),
        };
        self.live.insert(id, Arc::new(live));
    }

    /// A channel was joined on connection `id`.
    pub fn joined(&self, id: u64, info: ChannelInfo) {
        if let Some(l) = self.live.get(&id) {
            let mut chans = l.channels.lock();
            chans.retain(|c| c.topic != info.topic);
            chans.push(info);
        }
    }

    /// A channel was left (or closed) on connection `id`.
    pub fn left(&self, id: u64, topic: &str) {
        if let Some(l) = self.live.get(&id) {
            l.channels.lock().retain(|c| c.topic != topic);
        }
    }

    /// The connection ended: forget it, remember why. A connection whose
    /// writes stalled is counted as `lag`, whatever its reader saw next.
    /// Returns the reason recorded.
    pub fn ended(
        &self,
        id: u64,
        reason: DisconnectReason,
        detail: Option<String>,
    ) -> DisconnectReason {
        let Some((_, l)) = self.live.remove(&id) else {
            *self.totals.entry(reason).or_insert(0) += 1;
            return reason;
        };
        let stalled = l.handle.stats.write_stalled.load(Ordering::Relaxed);
        let (reason, detail) = if stalled {
            (
                DisconnectReason::Lag,
                Some("socket writes stalled past WRITE_TIMEOUT_MS".to_owned()),
            )
        } else {
            (reason, detail)
        };
        *self.totals.entry(reason).or_insert(0) += 1;
        let mut json = live_json(&l);
        json["ended"] = json!(super::rfc3339(SystemTime::now()));
        json["reason"] = json!(reason.as_str());
        json["detail"] = json!(detail);
        if let Some(o) = json.as_object_mut() {
            o.remove("channels");
        }
        let mut ended = self.ended.lock();
        if ended.len() == DISCONNECTS_KEPT {
            ended.pop_front();
        }
        ended.push_back(Ended { json });
        reason
    }

    /// Open connections.
    pub fn count(&self) -> usize {
        self.live.len()
    }

    /// Channels by kind over all connections: (total, presence, with postgres_changes, private).
    pub fn channel_kinds(&self) -> (usize, usize, usize, usize) {
        let mut k = (0, 0, 0, 0);
        for l in self.live.iter() {
            for c in l.channels.lock().iter() {
                k.0 += 1;
                k.1 += usize::from(c.presence);
                k.2 += usize::from(c.postgres_changes > 0);
                k.3 += usize::from(c.private);
            }
        }
        k
    }

    /// Disconnects since start, by reason.
    pub fn totals(&self) -> Value {
        let mut o = serde_json::Map::new();
        for r in DisconnectReason::ALL {
            o.insert(
                r.as_str().into(),
                json!(self.totals.get(&r).map_or(0, |n| *n)),
            );
        }
        Value::Object(o)
    }

    /// Up to `limit` current connections (oldest first) and the last disconnects (newest last).
    pub fn snapshot(&self, limit: usize) -> Value {
        // Clone the Arcs out first: no shard lock is held while serializing.
        let mut live: Vec<Arc<Live>> = self.live.iter().map(|e| Arc::clone(e.value())).collect();
        live.sort_by_key(|l| l.meta.id);
        let total = live.len();
        live.truncate(limit);
        let connections: Vec<Value> = live.iter().map(|l| live_json(l)).collect();
        let disconnects: Vec<Value> = self.ended.lock().iter().map(|e| e.json.clone()).collect();
        json!({
            "count": total,
            "truncated": total > connections.len(),
            "connections": connections,
            "disconnects": disconnects,
        })
    }
}
