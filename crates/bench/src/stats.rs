//! Counters and latency histograms shared by thousands of reader tasks.
//!
//! Readers record into one of a few sharded accumulators (one lock per read
//! chunk, not per frame). Latencies are kept per ramp step, keyed by the step
//! number the publisher wrote into each message, so late arrivals still count
//! toward the step that sent them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

const SHARDS: usize = 16;
/// Samples of unexpected frames/errors kept for the report.
const MAX_SAMPLES: usize = 12;

/// Per-step accumulator.
#[derive(Debug, Clone)]
pub struct StepAcc {
    /// Latency in microseconds.
    pub hist: Histogram<u64>,
    /// Messages delivered (first arrival of a seq).
    pub delivered: u64,
    /// Messages skipped over (gaps in seq).
    pub gaps: u64,
    /// Messages seen again or out of order.
    pub dups: u64,
}

/// A new latency histogram (1 µs .. 10 min, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl StepAcc {
    fn new() -> Self {
        StepAcc {
            hist: new_hist(),
            delivered: 0,
            gaps: 0,
            dups: 0,
        }
    }
    fn merge(&mut self, o: &StepAcc) {
        let _ = self.hist.add(&o.hist);
        self.delivered += o.delivered;
        self.gaps += o.gaps;
        self.dups += o.dups;
    }
}

/// One shard.
#[derive(Debug, Default)]
pub struct Shard {
    steps: Vec<StepAcc>,
    delivered: u64,
    bytes: u64,
}

impl Shard {
    fn step(&mut self, s: u32) -> &mut StepAcc {
        let s = s as usize;
        while self.steps.len() <= s {
            self.steps.push(StepAcc::new());
        }
        &mut self.steps[s]
    }
    /// Records one delivered message; `lat_us = None` when the sender's time is unknown.
    pub fn delivered(&mut self, step: u32, lat_us: Option<u64>, gap: u64, bytes: usize) {
        self.delivered += 1;
        self.bytes += bytes as u64;
        let acc = self.step(step);
        acc.delivered += 1;
        acc.gaps += gap;
        if let Some(l) = lat_us {
            acc.hist.saturating_record(l.max(1));
        }
    }
    /// Records a duplicate / out-of-order message.
    pub fn duplicate(&mut self, step: u32) {
        self.step(step).dups += 1;
    }
}

/// Everything the readers of one class (e.g. fast or slow) report.
#[derive(Debug)]
pub struct Stats {
    shards: Vec<Mutex<Shard>>,
    /// Clients connected and joined.
    pub joined: AtomicU64,
    /// TCP connect / upgrade failures.
    pub connect_errors: AtomicU64,
    /// Join replies with status error, or join timeouts.
    pub join_errors: AtomicU64,
    /// Connections that ended before the run did (EOF, close frame, reset).
    pub dropped: AtomicU64,
    /// `phx_error` frames received.
    pub phx_errors: AtomicU64,
    /// `phx_close` frames received.
    pub phx_closes: AtomicU64,
    /// Rejoins (after `phx_error`/`phx_close`) that were answered ok.
    pub rejoined: AtomicU64,
    /// `system` frames received.
    pub system_msgs: AtomicU64,
    /// Other frames that are neither data nor expected replies.
    pub other_frames: AtomicU64,
    /// Heartbeats sent.
    pub hb_sent: AtomicU64,
    /// Heartbeat replies received.
    pub hb_replies: AtomicU64,
    join_hist: Mutex<Histogram<u64>>,
    samples: Mutex<Vec<String>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty stats.
    pub fn new() -> Self {
        Stats {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            joined: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            join_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            phx_errors: AtomicU64::new(0),
            phx_closes: AtomicU64::new(0),
            rejoined: AtomicU64::new(0),
            system_msgs: AtomicU64::new(0),
            other_frames: AtomicU64::new(0),
            hb_sent: AtomicU64::new(0),
            hb_replies: AtomicU64::new(0),
            join_hist: Mutex::new(new_hist()),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// The shard for reader `id`.
    pub fn shard(&self, id: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[id % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records how long connect + join took.
    pub fn record_join(&self, us: u64) {
        self.join_hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us.max(1));
    }

    /// Connect+join latency histogram.
    pub fn join_hist(&self) -> Histogram<u64> {
        self.join_hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keeps a sample line (first few only).
    pub fn sample(&self, line: String) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < MAX_SAMPLES && !s.contains(&line) {
            s.push(line);
        }
    }

    /// The kept sample lines.
    pub fn samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Total messages delivered (all steps) and payload bytes.
    pub fn delivered(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(d, b), s| {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            (d + s.delivered, b + s.bytes)
        })
    }

    /// Merged accumulator of one step.
    pub fn step(&self, step: u32) -> StepAcc {
        let mut acc = StepAcc::new();
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = s.steps.get(step as usize) {
                acc.merge(a);
            }
        }
        acc
    }

    /// Gaps and duplicates over all steps.
    pub fn gaps_dups(&self) -> (u64, u64) {
        let mut g = 0;
        let mut d = 0;
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            for a in &s.steps {
                g += a.gaps;
                d += a.dups;
            }
        }
        (g, d)
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
