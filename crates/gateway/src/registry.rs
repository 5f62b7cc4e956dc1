//! Topics and their subscribers: the fan-out core.
//!
//! A [`Topic`] lives in a [`DashMap`] keyed by `(private, "realtime:<name>")`.
//! Publishers encode a message once per serializer version present on the
//! topic, then hand the same [`Bytes`] to every subscriber's bounded backlog
//! with `try_send`: a publisher never waits for a client. When a backlog is
//! full the frame is dropped, counted, and the channel is flagged so its
//! connection's writer applies the lag policy (see `socket::writer`).
//!
//! Postgres Changes and Broadcast from the database do not drop: they go
//! through each connection's paced queue instead (see [`crate::flow`] and
//! [`Fanout::publish_from_log`]).
//!
//! Locks here are `parking_lot` locks held only for synchronous work; none is
//! ever held across an `.await`. The map's shard locks are never held while
//! waiting for a topic's subscriber lock (a large fan-out holds that one). The
//! one nesting is a topic's presence lock around its subscriber read lock, so
//! presence diffs go out in the order they were applied.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use phoenix_channel::{Ref, Vsn};
use tokio::sync::mpsc;

use crate::cluster::wire::TopicRef;
use crate::cluster::TopicLink;
use crate::config::LagPolicy;
use crate::flow::{Flow, Paced};
use crate::metrics::Handles;
use crate::presence::Presence;

/// One frame queued for a client's writer.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// A text frame.
    Text(Bytes),
    /// A binary frame.
    Binary(Bytes),
    /// A pong we owe the peer.
    Pong(Bytes),
    /// A close frame (echo of the client's, or ours); the writer stops after it.
    Close(Bytes),
    /// No frame: wakes the writer to take from the connection's paced queue
    /// (or to report a lag) when it waits on an empty backlog.
    Paced,
}

/// The per-connection side of fan-out: its backlog and its lag mailbox.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection id (logs only).
    pub id: u64,
    /// The bounded backlog (capacity `CLIENT_BACKLOG`) drained by the writer task.
    pub tx: mpsc::Sender<Outbound>,
    /// Channels that dropped frames since the writer last looked.
    pub lagged: Mutex<Vec<Arc<ChannelHandle>>>,
    /// Set when `lagged` gets an entry. The backlog is full whenever this is
    /// set, so the writer is about to take a batch and will see it: no wake-up
    /// needed (a stall cut sends [`Outbound::Paced`]).
    pub lag_pending: AtomicBool,
    /// Postgres Changes and database-broadcast frames waiting for the writer
    /// (lossless, paced: see [`crate::flow`]).
    pub paced: Paced,
    /// Per-connection counters for `GET /api/realtime/connections`.
    pub stats: ConnStats,
}

/// Per-connection counters, each bumped once per message or per written batch
/// by the task that owns that side (never per subscriber of a fan-out).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Client messages read (reader task).
    pub frames_in: AtomicU64,
    /// Frames written to the socket (writer task, once per batch).
    pub frames_out: AtomicU64,
    /// Frames dropped because the backlog was full (lag path only).
    pub lagged: AtomicU64,
    /// The writer gave up on a socket whose writes made no progress.
    pub write_stalled: AtomicBool,
}

/// One joined channel, as publishers see it.
#[derive(Debug)]
pub struct ChannelHandle {
    /// Unique per join (used for `self: false` and presence ownership).
    pub id: u64,
    /// Serializer of the owning connection.
    pub vsn: Vsn,
    /// The join's `join_ref`, for pushes that must carry it.
    pub join_ref: Option<Ref>,
    /// Full topic (`realtime:<name>`).
    pub topic: String,
    /// The owning connection.
    pub conn: Arc<ConnHandle>,
    /// Frames dropped in the current lag episode.
    pub dropped: AtomicU64,
    /// Set once the lag policy errored this channel: nothing more is delivered.
    pub dead: AtomicBool,
    /// Set once the writer told the client about the drops (later drops are not counted in `dropped`).
    pub reported: AtomicBool,
    /// Position in its topic's subscriber list (changed only under that list's write lock).
    pub slot: AtomicUsize,
    /// What this channel may receive ([`READ_BROADCAST`], [`READ_PRESENCE`]):
    /// both on public topics; on private ones what its policies allow.
    pub reads: AtomicU8,
    /// Ids of the stored messages replayed at join (`config.broadcast.replay`,
    /// at most 25). The live path skips them: a message committed before the
    /// join may still be on its way through the feed when it is replayed.
    pub replayed: OnceLock<Box<[String]>>,
}

/// [`ChannelHandle::reads`] bit: broadcasts (socket, REST, database).
pub const READ_BROADCAST: u8 = 1;
/// [`ChannelHandle::reads`] bit: presence diffs.
pub const READ_PRESENCE: u8 = 2;

impl ConnHandle {
    /// The fan-out side of a new connection whose writer drains `tx`.
    pub fn new(id: u64, tx: mpsc::Sender<Outbound>) -> Self {
        ConnHandle {
            id,
            tx,
            lagged: Mutex::new(Vec::new()),
            lag_pending: AtomicBool::new(false),
            paced: Paced::default(),
            stats: ConnStats::default(),
        }
    }
}

impl ChannelHandle {
    /// A newly joined channel of `conn` on `topic` (`realtime:<name>`).
    pub fn new(
        id: u64,
        vsn: Vsn,
        join_ref: Option<Ref>,
        topic: String,
        conn: Arc<ConnHandle>,
    ) -> Self {
        ChannelHandle {
            id,
            vsn,
            join_ref,
            topic,
            conn,
            dropped: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            slot: AtomicUsize::new(0),
            reads: AtomicU8::new(READ_BROADCAST | READ_PRESENCE),
            replayed: OnceLock::new(),
        }
    }

    /// Whether the stored message `id` was already pushed to this channel as a replay.
    fn was_replayed(&self, id: &str) -> bool {
        self.replayed
            .get()
            .is_some_and(|ids| ids.iter().any(|r| r == id))
    }

    /// Counts a frame this channel missed. The first miss of a lag episode
    /// hands the channel to its connection's writer, which applies the lag
    /// policy; under `error` the channel is dead from then on.
    pub fn missed(self: &Arc<Self>, metrics: &Handles, policy: LagPolicy) {
        metrics.lagged.increment(1);
        self.conn.stats.lagged.fetch_add(1, Ordering::Relaxed);
        if self.dead.load(Ordering::Relaxed) {
            // Until the notice is written, count the miss for it too.
            if !self.reported.load(Ordering::Relaxed) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if policy == LagPolicy::Error {
            self.dead.store(true, Ordering::Relaxed);
        }
        if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            self.conn.lagged.lock().push(Arc::clone(self));
            self.conn.lag_pending.store(true, Ordering::Release);
        }
    }

    /// The subtopic (`room-1` for `realtime:room-1`), as `system` messages name it.
    pub fn subtopic(&self) -> &str {
        self.topic.strip_prefix("realtime:").unwrap_or(&self.topic)
    }
}

/// A topic: its subscribers and its presence state.
#[derive(Debug)]
pub struct Topic {
    /// `realtime:<name>`.
    pub name: String,
    /// Private and public topics with one name are separate namespaces.
    pub private: bool,
    subscribers: RwLock<Vec<Arc<ChannelHandle>>>,
    /// Set (under the subscriber write lock) when the last subscriber left and
    /// the topic is being removed from the map: a join that finds it must retry.
    retired: AtomicBool,
    /// Presence state; its lock also orders presence diffs.
    pub presence: Mutex<Presence>,
    /// The cross-replica side (subscription, presence sync); idle without a bus.
    pub link: TopicLink,
}

impl Topic {
    /// The topic as the cluster names it.
    pub fn topic_ref(&self) -> TopicRef<'_> {
        TopicRef {
            private: self.private,
            name: &self.name,
        }
    }
}

/// Everything the fan-out needs to deliver and account.
#[derive(Debug)]
pub struct Fanout {
    /// Metric handles.
    pub metrics: Handles,
    /// Lag policy.
    pub policy: LagPolicy,
    /// Lossless, paced delivery (Postgres Changes).
    pub flow: Arc<Flow>,
}

impl Fanout {
    /// Delivery with these metric handles, lag policy and flow control.
    pub fn new(metrics: Handles, policy: LagPolicy, flow: Arc<Flow>) -> Self {
        Fanout {
            metrics,
            policy,
            flow,
        }
    }

    /// Queues one frame for one channel without waiting. Returns whether it was queued.
    pub fn deliver(&self, chan: &Arc<ChannelHandle>, frame: Outbound) -> bool {
        let queued = self.enqueue(chan, frame);
        if queued {
            self.metrics.frames_sent.increment(1);
        }
        queued
    }

    /// [`Fanout::deliver`] without counting successes (callers count in bulk).
    fn enqueue(&self, chan: &Arc<ChannelHandle>, frame: Outbound) -> bool {
        if chan.dead.load(Ordering::Relaxed) {
            chan.missed(&self.metrics, self.policy);
            return false;
        }
        match chan.conn.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                chan.missed(&self.metrics, self.policy);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Delivers one message to every subscriber of `topic` except the channel `skip`.
    ///
    /// `encode` is called at most once per serializer version present among the
    /// subscribers, and the resulting bytes are shared by all of them; `None`
    /// means the message cannot be expressed for that version (it is dropped for it).
    pub fn publish_with(
        &self,
        topic: &Topic,
        skip: Option<u64>,
        encode: impl FnMut(Vsn) -> Option<Outbound>,
    ) -> usize {
        self.publish_to(topic, skip, 0, encode)
    }

    /// [`Fanout::publish_with`], to the subscribers whose [`ChannelHandle::reads`]
    /// has the `need` bit (private channels without read access are skipped).
    pub fn publish_to(
        &self,
        topic: &Topic,
        skip: Option<u64>,
        need: u8,
        encode: impl FnMut(Vsn) -> Option<Outbound>,
    ) -> usize {
        let n = for_each_subscriber(topic, skip, need, encode, |chan, frame| {
            self.enqueue(chan, frame.clone())
        });
        // One shared-counter update per message, not per subscriber.
        self.metrics.frames_sent.increment(n as u64);
        n
    }

    /// [`Fanout::publish_to`] through each connection's paced queue (flow
    /// control): lossless, charged to the read-ahead budget, a connection
    /// that makes no progress cut after `CHANGES_LAG_GRACE_MS` (see
    /// [`crate::flow`]). For messages read from the database's log (Broadcast
    /// from the database); the caller waits for [`Flow::room`] between messages.
    /// `id` names the stored message, so channels that got it as a replay at
    /// join are skipped.
    pub fn publish_from_log(
        &self,
        topic: &Topic,
        need: u8,
        id: Option<&str>,
        encode: impl FnMut(Vsn) -> Option<Outbound>,
    ) -> usize {
        for_each_subscriber(topic, None, need, encode, |chan, frame| {
            if id.is_some_and(|id| chan.was_replayed(id)) {
                return false;
            }
            self.flow.offer(chan, frame.clone())
        })
    }

    /// [`Fanout::publish_to`] for publishers that may wait (REST): a
    /// subscriber whose backlog is full is waited for, outside every lock, as
    /// long as its writer keeps making progress (no single write blocked for
    /// `grace`); one whose writer is stuck, or that already lags, gets the lag
    /// policy at once. A batch larger than the backlogs is thus delivered whole
    /// to every subscriber that keeps reading, and a client that stopped
    /// reading costs a publisher at most `grace`, once. Full subscribers of one
    /// message are waited for concurrently.
    pub async fn publish_paced(
        &self,
        topic: &Topic,
        skip: Option<u64>,
        need: u8,
        encode: impl FnMut(Vsn) -> Option<Outbound>,
        grace: Duration,
    ) -> usize {
        let mut waiting: Vec<(Arc<ChannelHandle>, Outbound)> = Vec::new();
        let mut n = for_each_subscriber(topic, skip, need, encode, |chan, frame| {
            let lagging =
                chan.dead.load(Ordering::Relaxed) || chan.dropped.load(Ordering::Relaxed) > 0;
            if lagging
                || self
                    .flow
                    .writing_for(&chan.conn)
                    .is_some_and(|d| d >= grace)
            {
                return self.enqueue(chan, frame.clone());
            }
            match chan.conn.tx.try_send(frame.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(frame)) => {
                    waiting.push((Arc::clone(chan), frame));
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if !waiting.is_empty() {
            let waits = waiting
                .into_iter()
                .map(|(chan, frame)| self.wait_for_room(chan, frame, grace));
            n += futures_util::future::join_all(waits)
                .await
                .into_iter()
                .filter(|queued| *queued)
                .count();
        }
        self.metrics.frames_sent.increment(n as u64);
        n
    }

    /// Queues `frame` once `chan`'s backlog has room, unless its writer stays
    /// blocked in one write for `grace` (then the lag policy applies).
    async fn wait_for_room(
        &self,
        chan: Arc<ChannelHandle>,
        frame: Outbound,
        grace: Duration,
    ) -> bool {
        loop {
            let wait = match self.flow.writing_for(&chan.conn) {
                Some(blocked) if blocked >= grace => return self.enqueue(&chan, frame),
                Some(blocked) => grace - blocked,
                None => grace,
            };
            match tokio::time::timeout(wait, chan.conn.tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(frame);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) => continue,
            }
        }
    }
}

/// Calls `deliver` for every subscriber of `topic` but `skip` whose read bits
/// include `need`, with the frame
/// for its serializer (encoded at most once per version present), under the
/// topic's subscriber read lock. Returns how many `deliver` calls returned true.
fn for_each_subscriber(
    topic: &Topic,
    skip: Option<u64>,
    need: u8,
    mut encode: impl FnMut(Vsn) -> Option<Outbound>,
    mut deliver: impl FnMut(&Arc<ChannelHandle>, &Outbound) -> bool,
) -> usize {
    let subs = topic.subscribers.read();
    let mut v1: Option<Option<Outbound>> = None;
    let mut v2: Option<Option<Outbound>> = None;
    let mut n = 0;
    for chan in subs.iter() {
        if Some(chan.id) == skip || chan.reads.load(Ordering::Relaxed) & need != need {
            continue;
        }
        let slot = match chan.vsn {
            Vsn::V1 => &mut v1,
            Vsn::V2 => &mut v2,
        };
        if slot.is_none() {
            *slot = Some(encode(chan.vsn));
        }
        if let Some(Some(frame)) = slot {
            n += usize::from(deliver(chan, frame));
        }
    }
    n
}

/// Key of a topic in the registry.
pub type TopicKey = (bool, String);

/// All topics with at least one subscriber.
#[derive(Debug, Default)]
pub struct Registry {
    topics: DashMap<TopicKey, Arc<Topic>>,
}

impl Registry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes a channel, creating the topic if needed. The flag says
    /// whether this call created it (the replica's first local subscriber).
    ///
    /// The map's shard lock is released before the topic's subscriber lock is
    /// taken: a large fan-out holds that lock for a while, and waiting for it
    /// under the shard lock would stall every topic of the shard.
    pub fn subscribe(&self, private: bool, chan: Arc<ChannelHandle>) -> (Arc<Topic>, bool) {
        loop {
            let mut created = false;
            let topic = Arc::clone(
                self.topics
                    .entry((private, chan.topic.clone()))
                    .or_insert_with(|| {
                        created = true;
                        Arc::new(Topic {
                            name: chan.topic.clone(),
                            private,
                            subscribers: RwLock::new(Vec::new()),
                            retired: AtomicBool::new(false),
                            presence: Mutex::new(Presence::default()),
                            link: TopicLink::default(),
                        })
                    })
                    .value(),
            );
            let mut subs = topic.subscribers.write();
            if topic.retired.load(Ordering::Relaxed) {
                // Its last subscriber left and it is on its way out of the map:
                // take (or create) the topic that replaces it.
                drop(subs);
                std::thread::yield_now();
                continue;
            }
            chan.slot.store(subs.len(), Ordering::Relaxed);
            subs.push(Arc::clone(&chan));
            drop(subs);
            return (topic, created);
        }
    }

    /// Removes a channel; drops the topic when it was the last subscriber.
    pub fn unsubscribe(&self, topic: &Arc<Topic>, chan: &ChannelHandle) {
        let retired = {
            let mut subs = topic.subscribers.write();
            // O(1): swap-remove at the stored slot (a mass disconnect of N
            // subscribers must not cost N² under the lock publishers need).
            let slot = chan.slot.load(Ordering::Relaxed);
            if subs.get(slot).is_some_and(|c| c.id == chan.id) {
                subs.swap_remove(slot);
                if let Some(moved) = subs.get(slot) {
                    moved.slot.store(slot, Ordering::Relaxed);
                }
            }
            // Retired under the subscriber lock: a join that got this topic
            // from the map sees the flag and retries, so none is lost.
            let retire = subs.is_empty() && !topic.retired.load(Ordering::Relaxed);
            if retire {
                topic.retired.store(true, Ordering::Relaxed);
            }
            retire
        };
        if retired {
            // No subscriber lock is taken under the shard lock.
            self.topics
                .remove_if(&(topic.private, topic.name.clone()), |_, t| {
                    Arc::ptr_eq(t, topic)
                });
        }
    }

    /// Every topic, at this moment (the cluster's sweeps and resyncs walk them).
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics.iter().map(|t| Arc::clone(t.value())).collect()
    }

    /// Looks up a topic.
    pub fn get(&self, private: bool, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .get(&(private, name.to_owned()))
            .map(|t| Arc::clone(t.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(
        id: u64,
        topic: &str,
        backlog: usize,
    ) -> (Arc<ChannelHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(backlog);
        let conn = Arc::new(ConnHandle::new(id, tx));
        let chan = Arc::new(ChannelHandle::new(
            id,
            Vsn::V2,
            None,
            topic.to_owned(),
            conn,
        ));
        (chan, rx)
    }

    fn fanout() -> Fanout {
        let flow = crate::flow::Flow::new(
            1 << 20,
            Duration::from_secs(5),
            Handles::new(),
            LagPolicy::Error,
        );
        Fanout::new(Handles::new(), LagPolicy::Error, Arc::new(flow))
    }

    fn text(n: u32) -> impl FnMut(Vsn) -> Option<Outbound> {
        move |_| Some(Outbound::Text(Bytes::from(n.to_string())))
    }

    #[test]
    fn a_stored_message_replayed_at_join_is_not_delivered_again_live() {
        let reg = Registry::new();
        let f = fanout();
        let (replayed, _ra) = channel(1, "realtime:r", 4);
        let (other, _rb) = channel(2, "realtime:r", 4);
        replayed
            .replayed
            .set(vec!["m1".to_owned()].into_boxed_slice())
            .unwrap();
        let (topic, _) = reg.subscribe(false, Arc::clone(&replayed));
        reg.subscribe(false, Arc::clone(&other));
        // m1 reaches only the channel that did not get it as a replay; m2 both.
        assert_eq!(
            f.publish_from_log(&topic, READ_BROADCAST, Some("m1"), text(1)),
            1
        );
        assert_eq!(
            f.publish_from_log(&topic, READ_BROADCAST, Some("m2"), text(2)),
            2
        );
        assert_eq!(replayed.conn.paced.len(), 1);
        assert_eq!(other.conn.paced.len(), 2);
    }

    #[test]
    fn a_topic_whose_last_subscriber_left_is_retired_and_replaced() {
        let reg = Registry::new();
        let (a, _ra) = channel(1, "realtime:t", 4);
        let (b, _rb) = channel(2, "realtime:t", 4);
        let (old, created) = reg.subscribe(false, Arc::clone(&a));
        assert!(created);
        reg.unsubscribe(&old, &a);
        assert!(old.retired.load(Ordering::Relaxed));
        assert!(reg.get(false, "realtime:t").is_none());
        let (new, created) = reg.subscribe(false, Arc::clone(&b));
        assert!(created, "the replacement is a new topic");
        assert!(
            !Arc::ptr_eq(&old, &new),
            "a join never lands in a retired topic"
        );
        assert!(Arc::ptr_eq(&reg.get(false, "realtime:t").unwrap(), &new));
    }

    #[tokio::test]
    async fn paced_publishing_waits_for_a_reader_that_keeps_reading() {
        let reg = Registry::new();
        let (chan, mut rx) = channel(1, "realtime:p", 2);
        let (topic, _) = reg.subscribe(false, Arc::clone(&chan));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Outbound::Text(b)) = rx.recv().await {
                got.push(String::from_utf8(b.to_vec()).unwrap());
                if got.len() == 20 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            got
        });
        let f = fanout();
        for n in 0..20 {
            assert_eq!(
                f.publish_paced(&topic, None, 0, text(n), Duration::from_secs(60))
                    .await,
                1
            );
        }
        let got = reader.await.unwrap();
        assert_eq!(got, (0..20).map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(chan.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_publishing_gives_up_on_a_writer_blocked_for_the_grace() {
        let reg = Registry::new();
        let (chan, _rx) = channel(1, "realtime:s", 1);
        let (topic, _) = reg.subscribe(false, Arc::clone(&chan));
        let f = fanout();
        let grace = Duration::from_secs(2);
        assert_eq!(f.publish_paced(&topic, None, 0, text(0), grace).await, 1);
        // The writer starts a write that never completes; the backlog is full.
        f.flow.write_started(&chan.conn);
        let t0 = tokio::time::Instant::now();
        assert_eq!(f.publish_paced(&topic, None, 0, text(1), grace).await, 0);
        assert!(
            t0.elapsed() >= grace - Duration::from_millis(1),
            "waited up to the grace"
        );
        assert!(
            chan.dead.load(Ordering::Relaxed),
            "then the lag policy applied"
        );
        // Later messages do not wait at all.
        let t1 = tokio::time::Instant::now();
        assert_eq!(f.publish_paced(&topic, None, 0, text(2), grace).await, 0);
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }
}
