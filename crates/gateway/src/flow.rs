//! Flow control for what comes from the database: lossless, paced delivery.
//!
//! Broadcast (from clients) and Presence are ephemeral: a client whose backlog
//! is full misses them (see [`crate::registry`]). Postgres Changes and
//! Broadcast from the database (`realtime.send`) come from a durable log, so
//! nothing forces a drop, and a subscriber that keeps reading must receive
//! every message, however large the statement. Their frames ("changes"
//! below) therefore take their own path:
//!
//! - **Paced queue.** Each connection has a FIFO of change frames
//!   ([`Paced`]) beside its lossy backlog. The router pushes and never waits;
//!   the writer takes from it after the backlog's frames, at most
//!   [`TAKE_BYTES`] at a time, so control frames and Broadcast are never
//!   starved and each channel's changes stay in order. When the queue goes
//!   from empty to non-empty the router wakes an idle writer with
//!   [`Outbound::Paced`].
//! - **Read-ahead budget.** The bytes waiting in paced queues are charged to
//!   one shared [`Budget`] (`CHANGES_BUFFER_BYTES`). The changes router and
//!   the database-broadcast deliverer wait for room before each change or
//!   message: once the budget is spent, the log is read only as
//!   fast as the slowest subscriber holding budget drains (ingest pauses
//!   behind its bounded channel). Gateway memory for changes in flight is
//!   bounded by the budget, whatever the statement size.
//! - **Stall cut.** A connection with queued changes whose writer made no
//!   socket progress for the grace (`CHANGES_LAG_GRACE_MS`) is cut by the
//!   watchdog ([`Flow::watch`]): its queue is dropped (the budget freed) and
//!   its channels take the usual lag path (`system` notice and `phx_error`
//!   under `LAG_POLICY=error`). Until its writer makes progress again, change
//!   frames for it are dropped on arrival, so it holds nobody back: a stalled
//!   client delays the others by at most the grace.
//!
//! Locks: each queue's `Mutex` and the `waiting` set are `parking_lot` locks
//! held for synchronous work only (order: `waiting`, then a queue). Nothing
//! here holds a lock across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LagPolicy;
use crate::metrics::Handles;
use crate::registry::{ChannelHandle, ConnHandle, Outbound};

/// Charged per queued frame on top of its bytes (queue slot, channel handle, `Bytes` header).
const ITEM_OVERHEAD: usize = 64;
/// The writer takes at most this many bytes of change frames at once (at least one frame).
pub(crate) const TAKE_BYTES: usize = 64 * 1024;
/// Queue capacity kept once a queue empties; larger ones are freed.
const KEEP_SLOTS: usize = 64;
/// Longest time between two stall checks (shorter when the grace is short).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A byte budget shared by many queues: takers charge it, drainers release
/// it, and anyone may wait until it has room.
///
/// Also usable as an admission check: [`Budget::try_take`] is all or nothing
/// (e.g. refuse a REST batch with 429 when it does not fit).
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Notified (all waiters) when `used` drops below `limit`.
    freed: Notify,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            limit,
            freed: Notify::new(),
        }
    }

    /// Bytes taken and not yet released.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether nothing more fits.
    pub fn is_exhausted(&self) -> bool {
        self.used() >= self.limit
    }

    /// Takes `n` bytes if they fit, all or nothing.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Takes `n` bytes unconditionally: the total may pass the limit by the
    /// last item; callers wait for [`Budget::room`] before the next one.
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives back `n` bytes; wakes every waiter when there is room again.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "budget released more than taken");
        if before >= self.limit && before - n < self.limit {
            self.freed.notify_waiters();
        }
    }

    /// Waits until the budget has room (returns at once if it has).
    pub async fn room(&self) {
        loop {
            // Registered before the check, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.is_exhausted() {
                return;
            }
            freed.await;
        }
    }
}

/// Bytes a queued frame holds (only text and binary frames are queued here).
fn frame_len(frame: &Outbound) -> usize {
    match frame {
        Outbound::Text(b) | Outbound::Binary(b) | Outbound::Pong(b) | Outbound::Close(b) => b.len(),
        Outbound::Paced => 0,
    }
}

/// One connection's queue of lossless frames (see the module docs).
#[derive(Debug, Default)]
pub struct Paced {
    queue: Mutex<Queue>,
    /// `queue.frames.len()`, readable without the lock: the writer looks after every batch.
    len: AtomicUsize,
    /// [`Flow`] clock (ms) of the writer's last socket progress.
    progress: AtomicU64,
    /// [`Flow`] clock (ms) since which the write in progress has been blocked,
    /// 0 when the writer is not writing: publishers that may wait (REST) tell a
    /// reader that is slow from one that stopped reading.
    writing_since: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<(Arc<ChannelHandle>, Outbound)>,
    /// Budget charged for `frames`.
    charged: usize,
    /// Clock (ms) when `frames` last became non-empty.
    since: u64,
    /// Clock (ms) of the cut; frames are dropped until the writer progresses
    /// past it. 0: not cut.
    cut_at: u64,
    /// The connection is closing: nothing more is queued.
    closed: bool,
}

impl Paced {
    /// Change frames waiting for the writer.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no change frame waits for the writer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Paced delivery of lossless frames, shared by the router, the writers and the watchdog.
#[derive(Debug)]
pub struct Flow {
    /// The read-ahead budget (`CHANGES_BUFFER_BYTES`).
    pub budget: Budget,
    /// A connection with queued frames and no progress for this long is cut.
    grace: Duration,
    /// Origin of the millisecond clock stamped by writers.
    origin: Instant,
    metrics: Handles,
    policy: LagPolicy,
    /// Connections whose queue may be non-empty (the watchdog's work list).
    waiting: Mutex<HashMap<u64, Arc<ConnHandle>>>,
}

impl Flow {
    /// A flow with a budget of `buffer_bytes` and the given grace.
    pub fn new(buffer_bytes: usize, grace: Duration, metrics: Handles, policy: LagPolicy) -> Self {
        Flow {
            budget: Budget::new(buffer_bytes),
            grace,
            origin: Instant::now(),
            metrics,
            policy,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Milliseconds since `origin`, never 0 (0 means "never" in the stamps).
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Queues a frame for `chan` in order with its other lossless frames;
    /// never waits (callers wait for [`Flow::room`] between items). Returns
    /// whether it was queued: not when the channel is errored, the connection
    /// is closing, or it was cut and has not progressed since (then the frame
    /// counts as dropped for the lag notice).
    pub fn offer(&self, chan: &Arc<ChannelHandle>, frame: Outbound) -> bool {
        if chan.dead.load(Ordering::Relaxed) {
            chan.missed(&self.metrics, self.policy);
            return false;
        }
        let conn = &chan.conn;
        let paced = &conn.paced;
        let cost = frame_len(&frame) + ITEM_OVERHEAD;
        let first = {
            let mut q = paced.queue.lock();
            if q.closed {
                return false;
            }
            if q.cut_at != 0 {
                // A cut needs a grace without progress, so a stamp at or after
                // the cut's millisecond is progress made since.
                if paced.progress.load(Ordering::Acquire) < q.cut_at {
                    drop(q);
                    chan.missed(&self.metrics, self.policy);
                    return false;
                }
                q.cut_at = 0; // reading again: paced like everyone else
            }
            let first = q.frames.is_empty();
            if first {
                q.since = self.now_ms();
            }
            // Charged before the frame is visible: the writer may take it (and
            // release its cost) as soon as the lock is dropped.
            self.budget.take(cost);
            q.frames.push_back((Arc::clone(chan), frame));
            q.charged += cost;
            paced.len.store(q.frames.len(), Ordering::Release);
            first
        };
        self.metrics.frames_sent.increment(1);
        if first {
            self.waiting.lock().insert(conn.id, Arc::clone(conn));
            // Wakes a writer waiting on an empty backlog. If the backlog is
            // full the writer is busy, and it looks at this queue after every batch.
            let _ = conn.tx.try_send(Outbound::Paced);
        }
        true
    }

    /// Waits until the budget has room; records how long the router was held back.
    pub async fn room(&self) {
        if !self.budget.is_exhausted() {
            return;
        }
        let started = Instant::now();
        self.budget.room().await;
        self.metrics
            .changes_paced
            .record(started.elapsed().as_secs_f64());
    }

    /// The writer's side: moves queued frames of `conn` into `batch` (at most
    /// [`TAKE_BYTES`], at least one frame) and releases their budget.
    pub(crate) fn take(&self, conn: &ConnHandle, batch: &mut Vec<Outbound>) {
        let paced = &conn.paced;
        if paced.is_empty() {
            return;
        }
        let (mut bytes, mut cost) = (0, 0);
        {
            let mut q = paced.queue.lock();
            while let Some((_, frame)) = q.frames.front() {
                let len = frame_len(frame);
                if cost > 0 && bytes + len > TAKE_BYTES {
                    break;
                }
                bytes += len;
                cost += len + ITEM_OVERHEAD;
                if let Some((_, frame)) = q.frames.pop_front() {
                    batch.push(frame);
                }
            }
            q.charged -= cost;
            if q.frames.is_empty() && q.frames.capacity() > KEEP_SLOTS {
                q.frames = VecDeque::new();
            }
            paced.len.store(q.frames.len(), Ordering::Release);
        }
        self.budget.release(cost);
    }

    /// The writer starts a socket write (it may block from now on).
    pub(crate) fn write_started(&self, conn: &ConnHandle) {
        conn.paced
            .writing_since
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// The writer's side: the socket took bytes. One clock reading is both the
    /// progress the stall cut looks at and the start of the next blocked span.
    pub(crate) fn progressed(&self, conn: &ConnHandle) {
        let now = self.now_ms();
        conn.paced.progress.store(now, Ordering::Release);
        conn.paced.writing_since.store(now, Ordering::Relaxed);
    }

    /// The writer's socket write completed.
    pub(crate) fn write_done(&self, conn: &ConnHandle) {
        conn.paced.writing_since.store(0, Ordering::Relaxed);
    }

    /// How long the write in progress has been blocked; `None` when not writing.
    pub fn writing_for(&self, conn: &ConnHandle) -> Option<Duration> {
        match conn.paced.writing_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }

    /// The connection is closing: drops its queue (breaking the channel →
    /// connection reference cycle) and releases its budget.
    pub fn forget(&self, conn: &ConnHandle) {
        let frames = {
            let mut q = conn.paced.queue.lock();
            q.closed = true;
            self.budget.release(std::mem::take(&mut q.charged));
            conn.paced.len.store(0, Ordering::Release);
            std::mem::take(&mut q.frames)
        };
        self.waiting.lock().remove(&conn.id);
        drop(frames);
    }

    /// Cuts every connection whose queue waited longer than the grace without
    /// its writer making progress; returns how many were cut.
    pub fn cut_stalled(&self) -> usize {
        let now = self.now_ms();
        let grace = self.grace.as_millis() as u64;
        let mut cut = Vec::new();
        let mut released = 0;
        self.waiting.lock().retain(|_, conn| {
            let mut q = conn.paced.queue.lock();
            if q.frames.is_empty() {
                return false;
            }
            let last = conn.paced.progress.load(Ordering::Acquire).max(q.since);
            if now.saturating_sub(last) < grace {
                return true;
            }
            // Under the queue lock: an offer after this sees `cut_at`.
            q.cut_at = now;
            released += std::mem::take(&mut q.charged);
            conn.paced.len.store(0, Ordering::Release);
            cut.push((Arc::clone(conn), std::mem::take(&mut q.frames)));
            false
        });
        self.budget.release(released);
        for (conn, frames) in &cut {
            tracing::warn!(
                conn_id = conn.id,
                dropped = frames.len(),
                grace_ms = grace,
                "client read nothing within the grace: its queued Postgres changes are dropped"
            );
            for (chan, _) in frames {
                chan.missed(&self.metrics, self.policy);
            }
            // The writer reports the lag after its next write; wake it in case it is idle.
            let _ = conn.tx.try_send(Outbound::Paced);
        }
        self.metrics.changes_stalled.increment(cut.len() as u64);
        cut.len()
    }

    /// The watchdog: cuts stalled connections and updates the buffer gauge
    /// until `cancel` fires.
    pub async fn watch(&self, cancel: CancellationToken) {
        let every = (self.grace / 4).clamp(Duration::from_millis(1), CHECK_EVERY);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Arms: shutdown, or the next check.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    self.cut_stalled();
                    self.metrics.changes_buffered.set(self.budget.used() as f64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
