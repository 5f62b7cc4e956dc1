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
/// Broadcasts from the database that had local subscribers.
pub const DB_BROADCASTS: &str = "realtime_database_broadcasts_total";
/// Commit-to-enqueue latency of Postgres changes.
pub const CHANGE_LATENCY: &str = "realtime_postgres_changes_latency_seconds";
/// Connections cut because they read nothing for `CHANGES_LAG_GRACE_MS` with changes queued.
pub const CHANGES_STALLED: &str = "realtime_postgres_changes_stalled_connections_total";
/// Bytes of Postgres changes queued for clients (the read-ahead budget in use).
pub const CHANGES_BUFFERED: &str = "realtime_postgres_changes_buffered_bytes";
/// Time the changes router waited for the read-ahead budget (one sample per wait).
pub const CHANGES_PACED: &str = "realtime_postgres_changes_paced_seconds";
/// Duration of one row level security round trip (a routing step).
pub const RLS_CHECK_SECONDS: &str = "realtime_postgres_changes_rls_check_seconds";
/// Hits withheld because evaluating the subscriber's policies raised.
pub const RLS_ERRORS: &str = "realtime_postgres_changes_rls_errors_total";
/// Whether the cluster bus is connected (1) or not (0); absent without a bus.
pub const CLUSTER_CONNECTED: &str = "realtime_cluster_connected";
/// Live peer replicas.
pub const CLUSTER_PEERS: &str = "realtime_cluster_peers";
/// Messages handed to the cluster bus.
pub const CLUSTER_PUBLISHED: &str = "realtime_cluster_published_total";
/// Messages from other replicas delivered here (broadcasts and presence).
pub const CLUSTER_RECEIVED: &str = "realtime_cluster_received_total";
/// Cluster messages dropped, by reason (`buffer_full`, `too_large`, `publish_error`, `slow_consumer`, `malformed`).
pub const CLUSTER_DROPPED: &str = "realtime_cluster_dropped_total";
/// Presence metas removed because their replica died.
pub const CLUSTER_EXPIRED: &str = "realtime_cluster_presence_expired_total";

/// Buckets of [`CHANGE_LATENCY`], seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
    describe_counter!(
        DB_BROADCASTS,
        "Broadcasts from the database (realtime.send) with local subscribers"
    );
    describe_gauge!(CLUSTER_CONNECTED, "Cluster bus connected (1) or not (0)");
    describe_gauge!(CLUSTER_PEERS, "Live peer replicas");
    describe_counter!(CLUSTER_PUBLISHED, "Messages handed to the cluster bus");
    describe_counter!(
        CLUSTER_RECEIVED,
        "Messages from other replicas delivered to this one"
    );
    describe_counter!(CLUSTER_DROPPED, "Cluster messages dropped, by reason");
    describe_counter!(
        CLUSTER_EXPIRED,
        "Presence metas removed because their replica died"
    );
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
    describe_histogram!(
        RLS_CHECK_SECONDS,
        "Duration of one row level security round trip (one routing step)"
    );
    describe_counter!(
        RLS_ERRORS,
        "Deliveries withheld because evaluating the subscriber's RLS policies raised"
    );
}

/// A counter the gateway can also read back (the status API and the
/// inspector's deliveries/s): the Prometheus recorder's counter plus our own
/// running total. Both are one relaxed atomic add; no lock.
#[derive(Clone, Debug)]
pub struct Tally {
    counter: Counter,
    total: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Tally {
    fn new(counter: Counter) -> Self {
        Tally {
            counter,
            total: Default::default(),
        }
    }

    /// Adds `n`.
    pub fn increment(&self, n: u64) {
        self.counter.increment(n);
        self.total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The total since the process started.
    pub fn get(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Pre-registered handles for the hot paths (no registry lookup per frame).
#[derive(Clone, Debug)]
pub struct Handles {
    /// [`FRAMES_SENT`].
    pub frames_sent: Tally,
    /// [`LAGGED_FRAMES`].
    pub lagged: Tally,
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
            frames_sent: Tally::new(counter!(FRAMES_SENT)),
            lagged: Tally::new(counter!(LAGGED_FRAMES)),
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
