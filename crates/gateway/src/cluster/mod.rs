//! Scale-out: many replicas behave as one gateway.
//!
//! Postgres Changes need nothing here (every replica reads the shared log),
//! and neither do broadcasts from the database (each replica reads those from
//! the log too and delivers them locally: they must never be published here,
//! or N replicas would deliver them N times). Broadcast and Presence cross
//! replicas over a [`ClusterBus`]:
//!
//! - **local** (no `NATS_URL`): there is no bus. Every hook below is one
//!   branch on `None`; a single replica works exactly as before.
//! - **nats** (`NATS_URL`): [`nats::NatsBus`].
//!
//! What goes over the bus (subjects and envelopes: [`wire`]):
//!
//! - A replica subscribes to a topic's subject only while it has local
//!   subscribers of that topic (a pump task per topic whose life is the
//!   `Topic`'s), so NATS routes a room's traffic only to replicas that have
//!   clients in it.
//! - A broadcast is delivered locally first, then published once; receivers
//!   encode client frames once per serializer, as for a local publish. The bus
//!   never echoes a message to its publisher (and receivers drop their own node
//!   id anyway), so no client gets a message twice.
//! - Presence: each replica owns its channels' metas and publishes deltas on
//!   the topic's subject, under the topic's presence lock (so the stream of one
//!   replica's deltas and snapshots is in the order it applied them). The first
//!   local subscriber of a topic sends a sync request on the control subject;
//!   every live peer answers, with its snapshot on the topic's subject (ordered
//!   with its deltas: a snapshot replaces what receivers hold for that replica)
//!   or "none" to the inbox. Joins wait (at most [`SYNC_TIMEOUT`]) until every
//!   live peer answered, so `presence_state` is complete and the subscription is
//!   live cluster-wide when the client gets its reply.
//! - Liveness: heartbeats every `CLUSTER_HEARTBEAT_MS`; a replica silent for
//!   `CLUSTER_NODE_TIMEOUT_MS` is dead and its metas leave everywhere (with the
//!   leave diffs clients expect). A dead replica heard from again, and this
//!   replica after a reconnect, resync every topic.
//!
//! Files: [`bus`] (the engine interface), [`nats`], [`wire`], `replica`
//! (the tasks: control, per-topic pumps, sync, sweeping).

pub mod bus;
pub mod nats;
mod replica;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};

pub use bus::{Class, ClusterBus, LinkState};
use replica::Replicated;
use wire::TopicRef;

use crate::channel::broadcast::UserMessage;
use crate::health::Probe;
use crate::presence::{Owner, Presence};
use crate::registry::Topic;
use crate::state::Shared;

/// How long a join waits for peers' presence state before answering anyway.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// Timing and naming of a replicated gateway.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Subject prefix (replicas with the same prefix are one gateway).
    pub prefix: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which a replica is dead.
    pub node_timeout: Duration,
}

/// This replica's view of the cluster: its node id and, with a bus, the
/// replication state. Held by [`Shared`].
#[derive(Debug)]
pub struct Cluster {
    node: u64,
    inner: Option<Arc<Replicated>>,
}

/// What `/readyz` and logs show about the bus.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// `local` or the engine's name (`nats`).
    pub bus: &'static str,
    /// This replica's node id (hex).
    pub node: String,
    /// Whether the bus is connected (always true for `local`).
    pub connected: bool,
    /// Live peers heard from within the node timeout.
    pub peers: usize,
}

/// The cross-replica side of one topic, kept in its [`Topic`].
#[derive(Debug, Default)]
pub struct TopicLink {
    /// Set once every live peer answered the sync request (or it timed out).
    synced: AtomicBool,
    /// Wakes joins waiting for `synced`.
    notify: Notify,
    /// The sync request in flight: its id and the peers not yet heard from.
    pending: Mutex<Option<(u64, Vec<u64>)>>,
    /// Dropped with the topic: stops its pump (which unsubscribes).
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl TopicLink {
    fn finish_sync(&self) {
        *self.pending.lock() = None;
        self.synced.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Records `node`'s answer to request `req`; finishes the sync after the last one.
    fn answered(&self, req: u64, node: u64) {
        let done = {
            let mut pending = self.pending.lock();
            match pending.as_mut() {
                Some((r, waiting)) if *r == req => {
                    waiting.retain(|n| *n != node);
                    waiting.is_empty()
                }
                _ => false,
            }
        };
        if done {
            self.finish_sync();
        }
    }
}

impl Cluster {
    /// A single replica: no bus.
    pub fn local() -> Cluster {
        Cluster {
            node: new_node_id(),
            inner: None,
        }
    }

    /// A replica of a cluster connected through `bus`.
    pub fn replicated(bus: Arc<dyn ClusterBus>, options: ClusterOptions) -> Cluster {
        let node = new_node_id();
        Cluster {
            node,
            inner: Some(Arc::new(Replicated::new(node, bus, options))),
        }
    }

    /// This replica's node id (also part of every `phx_ref` it makes).
    pub fn node(&self) -> u64 {
        self.node
    }

    /// The owner of a local channel's presence.
    pub fn owner(&self, chan: u64) -> Owner {
        Owner {
            node: self.node,
            chan,
        }
    }

    /// The bus state, for `/readyz` and the logs.
    pub fn status(&self) -> ClusterStatus {
        let node = format!("{:016x}", self.node);
        match &self.inner {
            None => ClusterStatus {
                bus: "local",
                node,
                connected: true,
                peers: 0,
            },
            Some(r) => ClusterStatus {
                bus: r.bus.engine(),
                node,
                connected: r.bus.link().borrow().up,
                peers: r.live_peers().len(),
            },
        }
    }

    /// Starts the replication tasks (heartbeats, control) and shows the bus in
    /// `/readyz`. No-op when local.
    ///
    /// The bus never makes the replica unready: without NATS it still serves
    /// its own clients (local delivery goes on), and failing readiness on every
    /// replica at once would take the whole service out of its load balancer.
    /// `realtime_cluster_connected` is the signal to alert on.
    pub fn start(shared: &Arc<Shared>) {
        let Some(r) = &shared.cluster.inner else {
            return;
        };
        tokio::spawn(replica::control(Arc::clone(shared), Arc::clone(r)));
        let link = r.bus.link();
        let engine = r.bus.engine();
        shared.health.set_cluster_bus_probe(move || {
            let up = link.borrow().up;
            Probe {
                ok: true,
                state: if up {
                    format!("{engine}: connected")
                } else {
                    format!("{engine}: disconnected (local delivery only, reconnecting)")
                },
            }
        });
    }

    /// Says goodbye (peers forget this replica at once) and flushes the bus.
    pub async fn close(&self) {
        if let Some(r) = &self.inner {
            r.close().await;
        }
    }

    /// A topic got its first local subscriber: subscribe to its subject and
    /// sync its presence from the peers. No-op when local.
    pub fn attach(&self, shared: &Arc<Shared>, topic: &Arc<Topic>) {
        let Some(r) = &self.inner else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        *topic.link.stop.lock() = Some(tx);
        tokio::spawn(replica::pump(
            Arc::clone(shared),
            Arc::clone(r),
            Arc::downgrade(topic),
            rx,
        ));
    }

    /// Waits (at most [`SYNC_TIMEOUT`]) until the topic's subscription is live
    /// and its peers' presence merged. Returns at once when local or when the
    /// bus is down.
    pub async fn synced(&self, topic: &Topic) {
        let Some(r) = &self.inner else {
            return;
        };
        if !r.bus.link().borrow().up {
            return;
        }
        let notified = topic.link.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if topic.link.synced.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(SYNC_TIMEOUT, notified).await;
    }

    /// Publishes a JSON-origin broadcast (`payload` is the whole map) to the other replicas.
    pub fn publish_json<P: Serialize + ?Sized>(&self, private: bool, name: &str, payload: &P) {
        let Some(r) = &self.inner else {
            return;
        };
        let topic = TopicRef { private, name };
        match serde_json::to_vec(payload) {
            Ok(json) => r.publish_data(topic, wire::encode_json(self.node, topic, &json)),
            Err(e) => tracing::error!(cause = %e, "broadcast could not be encoded for the cluster"),
        }
    }

    /// Publishes a binary-origin user broadcast to the other replicas.
    pub fn publish_user(&self, private: bool, name: &str, msg: UserMessage<'_>) {
        let Some(r) = &self.inner else {
            return;
        };
        let topic = TopicRef { private, name };
        let bytes = wire::encode_user(self.node, topic, msg);
        r.publish_data(topic, bytes);
    }

    /// Tells the other replicas what a local channel now tracks on `topic`
    /// (nothing: it untracked). Call with the topic's presence lock held, right
    /// after the change, so deltas leave in the order they were applied.
    pub fn presence_changed(&self, topic: &Topic, presence: &Presence, chan: u64) {
        let Some(r) = &self.inner else {
            return;
        };
        let msg = match presence.entry(self.owner(chan)) {
            Some(e) => wire::PresenceMsg::Delta {
                joins: vec![e.clone()],
                leaves: Vec::new(),
            },
            None => wire::PresenceMsg::Delta {
                joins: Vec::new(),
                leaves: vec![chan],
            },
        };
        let t = topic.topic_ref();
        r.publish_data(t, wire::encode_presence(self.node, t, &msg));
    }
}

/// A random non-zero node id, fresh per process (a restarted replica is a new node).
fn new_node_id() -> u64 {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

/// Counts sync requests per replica (ids only need to be unique per sender).
static REQ_IDS: AtomicU64 = AtomicU64::new(1);

fn next_req() -> u64 {
    REQ_IDS.fetch_add(1, Ordering::Relaxed)
}
