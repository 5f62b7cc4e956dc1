//! Metric names (all `realtime_`-prefixed) and the handles the hot paths use.
//!
//! Libraries only call the `metrics` macros; `main` installs the Prometheus
//! recorder and `/metrics` renders it. Labels come from bounded sets only.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram,
};

/// Open WebSocket connections.
pub const CONNECTIONS: &str = "realtime_connections_connected";
/// Channel joins accepted.
pub const CHANNEL_JOINS: &str = "realtime_channel_joins";
/// Channels currently joined.
pub const CHANNELS: &str = "realtime_channels_joined";
/// Client events handled, by event.
pub const CHANNEL_EVENTS: &str = "realtime_channel_events";
/// Frames delivered to client backlogs.
pub const FRAMES_SENT: &str = "realtime_frames_sent_total";
/// Frames dropped because a client's backlog was full.
pub const LAGGED_FRAMES: &str = "realtime_client_lagged_frames_total";
/// Client frames that could not be decoded.
pub const MALFORMED: &str = "realtime_malformed_messages_total";
/// Errors a client saw, by code and fault.
pub const ERRORS: &str = "realtime_errors_total";
/// Postgres changes delivered to channels.
pub const CHANGES_DELIVERED: &str = "realtime_postgres_changes_delivered_total";
/// Commit-to-enqueue latency of Postgres changes.
pub const CHANGE_LATENCY: &str = "realtime_postgres_changes_latency_seconds";
/// Connections cut because they read nothing for `CHANGES_LAG_GRACE_MS` with changes queued.
pub const CHANGES_STALLED: &str = "realtime_postgres_changes_stalled_connections_total";
/// Bytes of Postgres changes queued for clients (the read-ahead budget in use).
pub const CHANGES_BUFFERED: &str = "realtime_postgres_changes_buffered_bytes";
/// Time the changes router waited for the read-ahead budget (one sample per wait).
pub const CHANGES_PACED: &str = "realtime_postgres_changes_paced_seconds";

/// Registers descriptions (call once, after installing a recorder).
pub fn describe() {
    describe_gauge!(CONNECTIONS, "Open WebSocket connections");
    describe_counter!(CHANNEL_JOINS, "Channel joins accepted");
    describe_gauge!(CHANNELS, "Channels currently joined");
    describe_counter!(CHANNEL_EVENTS, "Client events handled, by event");
    describe_counter!(FRAMES_SENT, "Frames queued to client backlogs");
    describe_counter!(
        LAGGED_FRAMES,
        "Frames dropped because a client's backlog was full"
    );
    describe_counter!(MALFORMED, "Client frames that could not be decoded");
    describe_counter!(ERRORS, "Errors reported to clients, by code and fault");
    describe_counter!(CHANGES_DELIVERED, "Postgres changes queued to channels");
    describe_histogram!(
        CHANGE_LATENCY,
        "Commit to enqueue latency of Postgres changes"
    );
    describe_counter!(
        CHANGES_STALLED,
        "Connections cut because they read nothing within CHANGES_LAG_GRACE_MS while Postgres changes were queued for them"
    );
    describe_gauge!(
        CHANGES_BUFFERED,
        "Bytes of Postgres changes queued for clients (read-ahead budget in use)"
    );
    describe_histogram!(
        CHANGES_PACED,
        "Time the changes router waited for the read-ahead budget, per wait"
    );
}

/// Pre-registered handles for the hot paths (no registry lookup per frame).
#[derive(Clone, Debug)]
pub struct Handles {
    /// [`FRAMES_SENT`].
    pub frames_sent: Counter,
    /// [`LAGGED_FRAMES`].
    pub lagged: Counter,
    /// [`CONNECTIONS`].
    pub connections: Gauge,
    /// [`CHANNELS`].
    pub channels: Gauge,
    /// [`MALFORMED`].
    pub malformed: Counter,
    /// [`CHANNEL_JOINS`].
    pub joins: Counter,
    /// [`CHANGES_STALLED`].
    pub changes_stalled: Counter,
    /// [`CHANGES_BUFFERED`].
    pub changes_buffered: Gauge,
    /// [`CHANGES_PACED`].
    pub changes_paced: Histogram,
}

impl Handles {
    /// Registers the handles with the installed recorder (a no-op recorder if none).
    pub fn new() -> Self {
        Handles {
            frames_sent: counter!(FRAMES_SENT),
            lagged: counter!(LAGGED_FRAMES),
            connections: gauge!(CONNECTIONS),
            channels: gauge!(CHANNELS),
            malformed: counter!(MALFORMED),
            joins: counter!(CHANNEL_JOINS),
            changes_stalled: counter!(CHANGES_STALLED),
            changes_buffered: gauge!(CHANGES_BUFFERED),
            changes_paced: histogram!(CHANGES_PACED),
        }
    }
}

impl Default for Handles {
    fn default() -> Self {
        Self::new()
    }
}
