//! One time base for every process of a run.
//!
//! Latency is `receive time - send time`, where both ends may live in different
//! processes (the publisher and readers here, the `ceiling` server in a child).
//! `CLOCK_MONOTONIC` is system-wide on Linux, so nanoseconds read from it are
//! comparable across processes on the same host and never jump.

use rustix::time::{clock_gettime, ClockId};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
