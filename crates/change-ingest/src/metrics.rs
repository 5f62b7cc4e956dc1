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
/// Counter: change-log rows deleted by retention.
pub const PRUNED_ROWS_TOTAL: &str = "realtime_ingest_pruned_rows_total";
/// Counter: gaps reported (changes pruned before this replica read them).
pub const GAPS_TOTAL: &str = "realtime_ingest_gaps_total";
/// Counter: tables enabled or disabled by the publication sync.
pub const PUBLICATION_SYNC_CHANGES_TOTAL: &str = "realtime_ingest_publication_sync_changes_total";
/// Counter: changes skipped because their table no longer exists.
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
    describe_counter!(PRUNED_ROWS_TOTAL, "Change-log rows deleted by retention");
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
