//! What operators see without Prometheus: the recent-event log, the
//! connection registry, the change feed's progress, and the admin APIs over
//! them (`GET /api/realtime/status`, `/events`, `/connections`).
//!
//! Hooks into the hot paths are kept here and are one call each: publishing a
//! broadcast records one event (per message, never per subscriber), the
//! router records one event per change of an ingest batch, and a connection
//! registers once and deregisters once. Per-connection frame counters live in
//! [`ConnStats`](crate::registry::ConnStats).
//!
//! # Layout
//! - [`events`]: the bounded event ring.
//! - [`conns`]: current connections, last disconnects with their reason.
//! - [`api`]: the HTTP handlers (service_role when auth is configured).

pub mod api;
pub mod conns;
pub mod events;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use change_ingest::IngestEvent;
use parking_lot::Mutex;

use conns::Connections;
use events::EventLog;

/// Operational state shared by the whole gateway.
#[derive(Debug)]
pub struct Ops {
    /// Recent change and broadcast events.
    pub events: EventLog,
    /// Current connections and recent disconnects.
    pub conns: Connections,
    /// The change feed as this replica consumed it.
    pub feed: FeedProgress,
}

/// What the router has consumed of the change feed.
#[derive(Debug, Default)]
pub struct FeedProgress {
    /// The newest transaction id seen in a batch (or the log's position at startup).
    pub max_txid: AtomicU64,
    /// Commit-to-router delay of the last change of the last batch, microseconds.
    lag_micros: AtomicU64,
    /// When the last batch arrived (unix ms; 0 = none yet).
    last_batch_ms: AtomicU64,
    /// Enabled tables (`schema.table`), as ingest last reported them.
    tables: Mutex<Vec<String>>,
}

impl FeedProgress {
    /// Commit-to-router delay of the last change routed, in seconds.
    pub fn lag_seconds(&self) -> Option<f64> {
        (self.last_batch_ms.load(Ordering::Relaxed) > 0)
            .then(|| self.lag_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }

    /// When the last change batch arrived.
    pub fn last_batch_at(&self) -> Option<String> {
        let ms = self.last_batch_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| rfc3339_ms(ms))
    }

    /// Enabled tables.
    pub fn tables(&self) -> Vec<String> {
        self.tables.lock().clone()
    }
}

impl Ops {
    /// Fresh state; the event log keeps `event_capacity` events.
    pub fn new(event_capacity: usize) -> Self {
        Ops {
            events: EventLog::new(event_capacity),
            conns: Connections::default(),
            feed: FeedProgress::default(),
        }
    }

    /// Sees every ingest event before the router applies it (one call per
    /// batch; per change only the event-log entry).
    pub fn observe_ingest(&self, event: &IngestEvent) {
        match event {
            IngestEvent::Changes(batch) => {
                self.events.changes(batch);
                let Some(last) = batch.last() else { return };
                let max = batch.iter().map(|c| c.position.txid).max().unwrap_or(0);
                self.feed.max_txid.fetch_max(max, Ordering::Relaxed);
                let now_us = unix_micros();
                if let Some(at) = crate::changes::filter::parse_time(&last.commit_timestamp) {
                    let lag = (i128::from(now_us) - at).max(0) as u64;
                    self.feed.lag_micros.store(lag, Ordering::Relaxed);
                }
                self.feed
                    .last_batch_ms
                    .store(now_us / 1000, Ordering::Relaxed);
            }
            IngestEvent::TablesChanged(tables) => {
                let mut names: Vec<String> = tables
                    .iter()
                    .map(|t| format!("{}.{}", t.schema, t.table))
                    .collect();
                names.sort();
                *self.feed.tables.lock() = names;
            }
            _ => {}
        }
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time.
pub fn rfc3339(t: SystemTime) -> String {
    rfc3339_ms(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for unix milliseconds (UTC, proleptic Gregorian).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_795_859_139_044), "2026-11-28T09:45:39.044Z");
    }
}
