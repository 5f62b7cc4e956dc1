//! Metric names of the ingest side (`realtime_ingest_*`), recorded with the
//! `metrics` macros. Only the binary installs an exporter.

/// Counter: changes delivered to the gateway. Label `op` (`INSERT`, `UPDATE`, `DELETE`).
pub const CHANGES_TOTAL: &str = "realtime_ingest_changes_total";
/// Counter: batches (`IngestEvent::Changes`) delivered to the gateway.
pub const BATCHES_TOTAL: &str = "realtime_ingest_batches_total";
/// Counter: read cycles of the change log. Label `reason` (`notify`, `poll`, `start`).
pub const READS_TOTAL: &str = "realtime_ingest_reads_total";
/// Counter: wake-up notifications received.
pub const NOTIFICATIONS_TOTAL: &str = "realtime_ingest_notifications_total";
/// Counter: listener (re)connections that failed or dropped. Label `reason`.
pub const RECONNECTS_TOTAL: &str = "realtime_ingest_reconnects_total";
/// Gauge: 1 while the listener is connected and caught up, else 0.
pub const CONNECTED: &str = "realtime_ingest_connected";
/// Gauge: seconds between a change's capture and its hand-over to the gateway (last batch).
pub const LAG_SECONDS: &str = "realtime_ingest_lag_seconds";
/// Counter: rows whose JSON exceeded `max_record_bytes` and were trimmed.
pub const OVERSIZED_TOTAL: &str = "realtime_ingest_oversized_records_total";
/// Counter: change-log slots (5-minute partitions) truncated by retention.
pub const PRUNED_SLOTS_TOTAL: &str = "realtime_ingest_pruned_slots_total";
/// Gauge: seconds a change-log slot has been due for pruning but held back by an open
/// transaction (a prepared transaction or an idle-in-transaction session), else 0.
pub const RETENTION_PINNED_SECONDS: &str = "realtime_ingest_retention_pinned_seconds";
/// Counter: DDL of the maintenance task that gave up on a busy table (`lock_timeout`)
/// and is retried on the next round. Label `task` (`sync`, `retention`).
pub const LOCK_BUSY_TOTAL: &str = "realtime_ingest_lock_busy_total";
/// Counter: gaps reported (changes pruned before this replica read them).
pub const GAPS_TOTAL: &str = "realtime_ingest_gaps_total";
/// Counter: tables enabled or disabled by the publication sync.
pub const PUBLICATION_SYNC_CHANGES_TOTAL: &str = "realtime_ingest_publication_sync_changes_total";
/// Counter: changes skipped because their table was dropped before it was ever read.
pub const SKIPPED_TOTAL: &str = "realtime_ingest_skipped_changes_total";

/// Registers descriptions for all metrics above. Call once at startup, after
/// installing the recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(CHANGES_TOTAL, "Changes delivered to the gateway, by op");
    describe_counter!(BATCHES_TOTAL, "Change batches delivered to the gateway");
    describe_counter!(READS_TOTAL, "Change-log read cycles, by reason");
    describe_counter!(NOTIFICATIONS_TOTAL, "Wake-up notifications received");
    describe_counter!(
        RECONNECTS_TOTAL,
        "Listener connections lost or failed, by reason"
    );
    describe_gauge!(CONNECTED, "1 while the listener is connected and caught up");
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Capture-to-hand-over delay of the last delivered change"
    );
    describe_counter!(
        OVERSIZED_TOTAL,
        "Row images trimmed for exceeding max_record_bytes"
    );
    describe_counter!(
        PRUNED_SLOTS_TOTAL,
        "Change-log slots truncated by retention"
    );
    describe_gauge!(
        RETENTION_PINNED_SECONDS,
        Unit::Seconds,
        "How long retention has been held back by an open transaction"
    );
    describe_counter!(
        LOCK_BUSY_TOTAL,
        "Maintenance DDL that found a table busy and will retry, by task"
    );
    describe_counter!(
        GAPS_TOTAL,
        "Gaps reported: changes pruned before they were read"
    );
    describe_counter!(
        PUBLICATION_SYNC_CHANGES_TOTAL,
        "Tables enabled/disabled by the publication sync"
    );
    describe_counter!(
        SKIPPED_TOTAL,
        "Changes skipped because their table was dropped"
    );
}
