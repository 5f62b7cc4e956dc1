//! The replication tasks: one control task per replica (heartbeats, sync
//! answers, liveness, resync after a reconnect) and one pump per topic with
//! local subscribers (its subject's broadcasts and presence).
//!
//! Locks: `peers` and a topic's presence lock are held only for synchronous
//! work, never across an `.await`; presence messages are published while the
//! topic's presence lock is held, so one replica's deltas and snapshots of a
//! topic leave in the order it applied them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::bus::{Class, ClusterBus};
use super::wire::{self, Control, Message, PresenceMsg, TopicRef};
use super::{next_req, ClusterOptions, SYNC_TIMEOUT};
use crate::channel::broadcast::{deliver_json, deliver_user};
use crate::channel::publish_diff;
use crate::metrics::{
    CLUSTER_CONNECTED, CLUSTER_DROPPED, CLUSTER_EXPIRED, CLUSTER_PEERS, CLUSTER_RECEIVED,
};
use crate::presence::Owner;
use crate::registry::Topic;
use crate::state::Shared;

/// What this replica knows of another.
#[derive(Debug)]
struct Peer {
    last_seen: Instant,
    /// False once declared dead (kept a while, so hearing from it again triggers a resync).
    alive: bool,
}

/// Replication state shared by the control task, the pumps and the publish hooks.
#[derive(Debug)]
pub(super) struct Replicated {
    pub(super) node: u64,
    pub(super) bus: Arc<dyn ClusterBus>,
    opts: ClusterOptions,
    control_subject: String,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Asks the control task to resync every topic (a dead peer came back).
    resync: Notify,
    stop: CancellationToken,
    received: Counter,
    malformed: Counter,
    expired: Counter,
    peers_gauge: Gauge,
}

impl Replicated {
    pub(super) fn new(node: u64, bus: Arc<dyn ClusterBus>, opts: ClusterOptions) -> Self {
        Replicated {
            node,
            bus,
            control_subject: wire::control_subject(&opts.prefix),
            opts,
            peers: Mutex::new(HashMap::new()),
            resync: Notify::new(),
            stop: CancellationToken::new(),
            received: metrics::counter!(CLUSTER_RECEIVED),
            malformed: metrics::counter!(CLUSTER_DROPPED, "reason" => "malformed"),
            expired: metrics::counter!(CLUSTER_EXPIRED),
            peers_gauge: metrics::gauge!(CLUSTER_PEERS),
        }
    }

    /// Peers heard from within the node timeout.
    pub(super) fn live_peers(&self) -> Vec<u64> {
        self.peers
            .lock()
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(n, _)| *n)
            .collect()
    }

    pub(super) fn publish_data(&self, topic: TopicRef<'_>, bytes: Bytes) {
        let subject = wire::topic_subject(&self.opts.prefix, topic);
        self.bus.publish(subject, bytes, Class::Data);
    }

    fn publish_control(&self, msg: &Control) {
        let bytes = wire::encode_control(self.node, msg);
        self.bus
            .publish(self.control_subject.clone(), bytes, Class::Control);
    }

    fn send_to(&self, node: u64, msg: &Control) {
        let subject = wire::inbox_subject(&self.opts.prefix, node);
        let bytes = wire::encode_control(self.node, msg);
        self.bus.publish(subject, bytes, Class::Control);
    }

    /// Says goodbye and flushes. The control task stops.
    pub(super) async fn close(&self) {
        self.publish_control(&Control::Bye);
        self.stop.cancel();
        self.bus.close().await;
    }

    /// Records that `node` spoke. A peer that had been declared dead is alive
    /// again, but its metas were dropped here: resync.
    fn touch(&self, node: u64) {
        let came_back = {
            let mut peers = self.peers.lock();
            let now = Instant::now();
            match peers.get_mut(&node) {
                Some(p) => {
                    p.last_seen = now;
                    !std::mem::replace(&mut p.alive, true)
                }
                None => {
                    peers.insert(
                        node,
                        Peer {
                            last_seen: now,
                            alive: true,
                        },
                    );
                    tracing::info!(peer = %format!("{node:016x}"), "cluster peer joined");
                    false
                }
            }
        };
        if came_back {
            tracing::warn!(peer = %format!("{node:016x}"), "cluster peer declared dead is back: resyncing presence");
            self.resync.notify_one();
        }
        self.update_peer_gauge();
    }

    fn update_peer_gauge(&self) {
        let n = self.peers.lock().values().filter(|p| p.alive).count();
        self.peers_gauge.set(n as f64);
    }

    /// Declares silent peers dead and removes their metas everywhere.
    fn sweep(&self, shared: &Shared) {
        let now = Instant::now();
        let timeout = self.opts.node_timeout;
        let dead: Vec<u64> = {
            let mut peers = self.peers.lock();
            // Forget peers dead for long (a restarted replica has a new id anyway).
            peers.retain(|_, p| p.alive || now.duration_since(p.last_seen) < timeout * 10);
            peers
                .iter_mut()
                .filter(|(_, p)| p.alive && now.duration_since(p.last_seen) > timeout)
                .map(|(n, p)| {
                    p.alive = false;
                    *n
                })
                .collect()
        };
        for node in dead {
            tracing::warn!(peer = %format!("{node:016x}"), timeout_ms = timeout.as_millis() as u64,
                "cluster peer silent: declared dead, its presences leave");
            self.drop_node(shared, node);
        }
    }

    /// Removes `node`'s metas from every local topic (leave diffs to local
    /// clients) and stops waiting for its sync answers.
    fn drop_node(&self, shared: &Shared, node: u64) {
        for topic in shared.registry.topics() {
            {
                let mut presence = topic.presence.lock();
                let before = presence.entries_of(node).len();
                if let Some(diff) = presence.remove_node(node) {
                    self.expired.increment(before as u64);
                    publish_diff(shared, &topic, &diff);
                }
            }
            let req = topic.link.pending.lock().as_ref().map(|(r, _)| *r);
            if let Some(req) = req {
                topic.link.answered(req, node);
            }
        }
        self.update_peer_gauge();
    }

    /// A replica said goodbye.
    fn forget(&self, shared: &Shared, node: u64) {
        self.peers.lock().remove(&node);
        tracing::info!(peer = %format!("{node:016x}"), "cluster peer left");
        self.drop_node(shared, node);
    }

    /// Asks every live peer for the topic's state; finishes at once without peers.
    fn request_sync(&self, topic: &Topic) {
        let peers = self.live_peers();
        if peers.is_empty() || !self.bus.link().borrow().up {
            topic.link.finish_sync();
            return;
        }
        let req = next_req();
        *topic.link.pending.lock() = Some((req, peers));
        self.publish_control(&Control::Sync {
            req,
            private: topic.private,
            topic: topic.name.clone(),
        });
    }

    /// Answers a peer's sync request: our metas on the topic's subject (in
    /// order with our deltas), or "none" to its inbox.
    fn answer_sync(&self, shared: &Shared, from: u64, req: u64, private: bool, name: String) {
        match shared.registry.get(private, &name) {
            Some(topic) => {
                let presence = topic.presence.lock();
                let msg = PresenceMsg::State {
                    entries: presence.entries_of(self.node),
                    reply_to: Some((from, req)),
                };
                let t = topic.topic_ref();
                self.publish_data(t, wire::encode_presence(self.node, t, &msg));
            }
            None => self.send_to(
                from,
                &Control::NoState {
                    req,
                    private,
                    topic: name,
                },
            ),
        }
    }

    /// After a reconnect (or a dead peer's return): publish our metas of every
    /// topic and ask for everyone else's (answers are merged; no join waits).
    fn resync_all(&self, shared: &Shared) {
        for topic in shared.registry.topics() {
            let t = topic.topic_ref();
            {
                let presence = topic.presence.lock();
                let msg = PresenceMsg::State {
                    entries: presence.entries_of(self.node),
                    reply_to: None,
                };
                self.publish_data(t, wire::encode_presence(self.node, t, &msg));
            }
            self.publish_control(&Control::Sync {
                req: next_req(),
                private: topic.private,
                topic: topic.name.clone(),
            });
        }
    }

    fn on_control(&self, shared: &Shared, bytes: &[u8]) {
        let (node, msg) = match wire::decode(bytes) {
            Ok((node, Message::Control(c))) => (node, c),
            Ok(_) => return,
            Err(e) => {
                self.malformed.increment(1);
                tracing::debug!(cause = %e, "cluster control message dropped");
                return;
            }
        };
        if node == self.node {
            return;
        }
        match msg {
            Control::Heartbeat { hello } => {
                self.touch(node);
                if hello {
                    self.publish_control(&Control::Heartbeat { hello: false });
                }
            }
            Control::Bye => self.forget(shared, node),
            Control::Sync {
                req,
                private,
                topic,
            } => {
                self.touch(node);
                self.answer_sync(shared, node, req, private, topic);
            }
            Control::NoState {
                req,
                private,
                topic,
            } => {
                self.touch(node);
                if let Some(t) = shared.registry.get(private, &topic) {
                    t.link.answered(req, node);
                }
            }
        }
    }

    /// One message on a topic's subject.
    fn on_topic_message(&self, shared: &Shared, topic: &Topic, bytes: &[u8]) {
        let (node, msg) = match wire::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.malformed.increment(1);
                tracing::debug!(cause = %e, "cluster message dropped");
                return;
            }
        };
        if node == self.node {
            return;
        }
        let ours = |t: TopicRef<'_>| t == topic.topic_ref();
        match msg {
            Message::Json { topic: t, payload } if ours(t) => {
                self.received.increment(1);
                deliver_json(shared, topic, payload, None);
            }
            Message::User { topic: t, msg } if ours(t) => {
                self.received.increment(1);
                deliver_user(shared, topic, msg, None);
            }
            Message::Presence { topic: t, msg } if ours(t) => {
                self.received.increment(1);
                self.touch(node);
                self.apply_presence(shared, topic, node, msg);
            }
            // Another topic hashed to the same subject, or not a topic message.
            _ => {}
        }
    }

    fn apply_presence(&self, shared: &Shared, topic: &Topic, node: u64, msg: PresenceMsg) {
        match msg {
            PresenceMsg::Delta { joins, leaves } => {
                let mut presence = topic.presence.lock();
                for entry in joins {
                    if let Some(diff) = presence.put(node, entry) {
                        publish_diff(shared, topic, &diff);
                    }
                }
                for chan in leaves {
                    if let Some(diff) = presence.untrack(Owner { node, chan }) {
                        publish_diff(shared, topic, &diff);
                    }
                }
            }
            PresenceMsg::State { entries, reply_to } => {
                {
                    let mut presence = topic.presence.lock();
                    if let Some(diff) = presence.replace_node(node, entries) {
                        publish_diff(shared, topic, &diff);
                    }
                }
                if let Some((to, req)) = reply_to {
                    if to == self.node {
                        topic.link.answered(req, node);
                    }
                }
            }
        }
    }
}

/// The control task: heartbeats, liveness sweeps, sync answers, resyncs.
pub(super) async fn control(shared: Arc<Shared>, r: Arc<Replicated>) {
    let inbox = wire::inbox_subject(&r.opts.prefix, r.node);
    // Both subscriptions wait for the first connection; stop if we close first.
    let subs = tokio::select! {
        biased;
        _ = r.stop.cancelled() => return,
        subs = async { (r.bus.subscribe(r.control_subject.clone()).await, r.bus.subscribe(inbox).await) } => subs,
    };
    let (mut ctl, mut inbox) = match subs {
        (Ok(c), Ok(i)) => (c, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(cause = %e, "cluster control subscriptions failed: replication is off");
            return;
        }
    };
    let connected = metrics::gauge!(CLUSTER_CONNECTED);
    let mut link = r.bus.link();
    let mut seen_connects = 0;
    let mut tick = tokio::time::interval(r.opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Arms: shutdown; the link changed (reconnect → hello + resync); a dead
        // peer came back (resync); heartbeat tick (send + sweep); control and
        // inbox messages. All cancel-safe; the work is in the arm bodies.
        tokio::select! {
            biased;
            _ = r.stop.cancelled() => return,
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                let state = *link.borrow_and_update();
                connected.set(if state.up { 1.0 } else { 0.0 });
                if !state.up {
                    tracing::warn!("cluster bus disconnected: local delivery continues, cross-replica delivery resumes on reconnect");
                } else if state.connects != seen_connects {
                    if seen_connects > 0 {
                        tracing::info!("cluster bus reconnected: resyncing presence");
                    }
                    seen_connects = state.connects;
                    r.publish_control(&Control::Heartbeat { hello: true });
                    r.resync_all(&shared);
                }
            }
            _ = r.resync.notified() => r.resync_all(&shared),
            _ = tick.tick() => {
                r.publish_control(&Control::Heartbeat { hello: false });
                r.sweep(&shared);
            }
            Some(m) = ctl.next() => r.on_control(&shared, &m),
            Some(m) = inbox.next() => r.on_control(&shared, &m),
        }
    }
}

/// A topic's pump: subscribes to its subject, syncs its presence, then
/// delivers what arrives until the topic is dropped (`stop` closes), which
/// drops the subscription (the engine unsubscribes).
pub(super) async fn pump(
    shared: Arc<Shared>,
    r: Arc<Replicated>,
    topic: Weak<Topic>,
    mut stop: oneshot::Receiver<()>,
) {
    let Some(subject) = topic
        .upgrade()
        .map(|t| wire::topic_subject(&r.opts.prefix, t.topic_ref()))
    else {
        return;
    };
    let sub = tokio::select! {
        biased;
        _ = &mut stop => return,
        sub = r.bus.subscribe(subject) => sub,
    };
    let mut sub = match sub {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cause = %e, "cluster subscription failed: this topic stays local");
            if let Some(t) = topic.upgrade() {
                t.link.finish_sync();
            }
            return;
        }
    };
    match topic.upgrade() {
        Some(t) => r.request_sync(&t),
        None => return,
    }
    let deadline = tokio::time::sleep(SYNC_TIMEOUT);
    tokio::pin!(deadline);
    let mut waiting = true;
    loop {
        // Arms: the topic was dropped; a message on its subject; the sync deadline.
        tokio::select! {
            biased;
            _ = &mut stop => return,
            msg = sub.next() => {
                let (Some(bytes), Some(t)) = (msg, topic.upgrade()) else {
                    return;
                };
                r.on_topic_message(&shared, &t, &bytes);
            }
            _ = &mut deadline, if waiting => {
                waiting = false;
                if let Some(t) = topic.upgrade() {
                    if !t.link.synced.load(Ordering::Acquire) {
                        tracing::debug!(topic = %t.name, "presence sync timed out; merging late answers as diffs");
                        t.link.finish_sync();
                    }
                }
            }
        }
    }
}
