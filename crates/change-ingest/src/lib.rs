//! Everything Postgres-side of realtime-gateway: schema install, capture
//! triggers, wake-ups over LISTEN/NOTIFY, gap-free catch-up, retention,
//! Supabase publication sync, and a throwaway embedded PostgreSQL.
//!
//! # Design
//!
//! **Capture.** Enabling a table installs three statement-level `AFTER`
//! triggers (INSERT, UPDATE, DELETE) with transition tables. Each statement,
//! whatever its row count, runs one `INSERT … SELECT row_to_json(…)` into
//! `realtime_gateway.change_log(id identity, txid xid8 default
//! pg_current_xact_id(), table_oid, op, record json, old_record json,
//! created_at)`. UPDATE pairs `old_rows`/`new_rows` by ordinal position: the
//! executor appends the old and the new tuple of each updated row to the two
//! transition tuplestores in the same call, so position *i* is the same row in
//! both — correct even when the primary key changes or there is none (pairing
//! by key would break on key updates; `ctid` is not available). Row images
//! never go through a NOTIFY payload, so no row size can fail the writer; the
//! trigger functions touch no user data beyond `row_to_json`.
//!
//! **Wake-up.** A per-transaction NOTIFY takes a global lock held through the
//! commit flush and cuts concurrent insert throughput to ~0.12. So the trigger
//! notifies (empty payload) only when it wins `pg_try_advisory_xact_lock`
//! on a fixed key: at most one transaction at a time carries a NOTIFY, the
//! others skip it. A skipped writer that commits after the listener's read is
//! still in progress in that read's snapshot, so the listener re-reads with a
//! short backoff (1 ms → 100 ms) while its last snapshot had in-progress
//! transactions, and every `poll_interval` (1 s) regardless. Reads start at
//! least 5 ms apart, so under heavy writes many wake-ups become one read.
//! The listener's statements are prepared once per connection (`jit = off`);
//! an idle read is one round trip.
//!
//! **Gap-free reading.** Ids and txids are not assigned in commit order, so the
//! listener never reads "id > last". It keeps the snapshot it last read up to,
//! `S_prev`, takes `S_new = pg_current_snapshot()`, and reads exactly the
//! transactions visible in `S_new` but not in `S_prev`: those in `xip(S_prev)`
//! now visible, plus `[xmax(S_prev), xmax(S_new))` minus `xip(S_new)` — two
//! index range scans on `(txid, id)`, never a rescan of old rows even when a
//! long transaction holds `xmin` back. Within one such window, transactions are
//! ordered by the capture time of their last change (`clock_timestamp()`), then
//! txid, and rows by id: a transaction that waited on another's row lock
//! captures after the other committed, so conflicting changes of one row, and
//! each session's transactions, arrive in commit order. Rows are fetched in
//! batches of at most `batch_rows` rows and ~16 MiB, each awaited into a
//! bounded channel, so a 100k-row statement never sits in memory at once. The
//! cursor (`S_prev`, `S_new`, transactions left, last id sent) lives in the
//! ingest task: a lost connection or a Postgres restart resumes exactly where
//! it stopped (xid8 survives restarts), without duplicates. A fresh process
//! starts from the current snapshot (subscribers only expect changes after
//! they subscribe); nothing is persisted gateway-side.
//!
//! **Retention.** Replicas share the log, so rows are deleted by age, never by
//! "read". `realtime_gateway.prune(retention)` records the current snapshot
//! `xmin` as a timestamped mark and deletes `txid < xmin of the newest mark
//! older than retention`: every such transaction had finished then, so the
//! pruned set is a txid prefix recorded in `state.pruned_below`, and a reader
//! lost something iff `pruned_below > xmin(S_prev)` — then it emits
//! [`IngestEvent::Gap`] instead of silence.
//!
//! **Supabase compatibility.** Every `publication_sync_interval` the listener
//! calls `realtime_gateway.sync_publication(name)`: tables in the publication
//! are enabled (source `publication`), tables the sync enabled that left it are
//! disabled; manual enables are never undone by the sync.
//!
//! # Layout
//! - [`authz`]: row level security for changes: catalog, cohort evaluation, the "run as claims" settings.
//! - [`schema`]: versioned, idempotent migrations of the `realtime_gateway` schema ([`migrate`]).
//! - [`tables`]: enable / disable / list tables ([`enable_table`], [`disable_table`], [`list_tables`]).
//! - [`status`]: read-only probes for status reporting (rows of the log after a transaction).
//! - [`ingest`]: the listener task ([`spawn_ingest`]): wake-ups, catch-up, retention, publication sync.
//! - [`embedded`]: a throwaway local PostgreSQL for the zero-config default and for tests.
//! - [`metrics`]: the `realtime_ingest_*` metric names.
//! - [`Change`]: one captured row change, owned by this crate; [`IngestError`]: its one error type.

pub mod authz;
mod change;
pub mod embedded;
mod error;
pub mod ingest;
pub mod metrics;
pub mod realtime;
pub mod schema;
pub mod status;
pub mod tables;

use std::str::FromStr;
use std::time::Duration;

pub use change::*;
pub use error::IngestError;
pub use ingest::spawn_ingest;
pub use schema::{migrate, SCHEMA_VERSION};
pub use tables::{disable_table, enable_table, list_tables, TableListing};

/// The `NOTIFY` channel the capture triggers and `enable`/`disable` signal on.
pub const NOTIFY_CHANNEL: &str = "realtime_gateway";

/// `application_name` of the listener connection (to find it in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "realtime_gateway_listener";

/// Configuration of the ingest task.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// `postgres://user:password@host:port/database`.
    pub database_url: String,
    /// Most changes per [`IngestEvent::Changes`] batch (default 1000).
    pub batch_rows: usize,
    /// Row images larger than this (JSON bytes) keep only values of at most 64
    /// bytes and list the others in `Change::oversized_columns` (default 1 MiB).
    pub max_record_bytes: usize,
    /// Change-log rows older than this are deleted (default 15 min).
    pub retention: Duration,
    /// Publication whose tables are enabled automatically (default `supabase_realtime`).
    pub publication: Option<String>,
    /// How often the publication and the enabled tables are re-read (default 1 s).
    pub publication_sync_interval: Duration,
    /// Fallback read interval when no notification arrives (default 1 s).
    pub poll_interval: Duration,
    /// Batches buffered towards the gateway before reading pauses (default 8).
    pub channel_capacity: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            database_url: String::new(),
            batch_rows: 1000,
            max_record_bytes: 1024 * 1024,
            retention: Duration::from_secs(15 * 60),
            publication: Some("supabase_realtime".to_owned()),
            publication_sync_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            channel_capacity: 8,
        }
    }
}

impl IngestConfig {
    /// Defaults with the given database URL.
    pub fn new(database_url: impl Into<String>) -> Self {
        IngestConfig {
            database_url: database_url.into(),
            ..Default::default()
        }
    }
}

/// Parses a connection string into a `tokio_postgres::Config` with TCP keepalives
/// and a connect timeout, so a dead server is noticed.
pub(crate) fn pg_config(url: &str) -> Result<tokio_postgres::Config, IngestError> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| IngestError::InvalidUrl(error::PgDisplay(&e).to_string()))?;
    config
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    Ok(config)
}

/// Connects without TLS and spawns the connection driver (which logs and ends
/// when the connection closes). For admin work: migrations, enable/disable, list.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, IngestError> {
    let config = pg_config(url)?;
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(IngestError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %error::PgDisplay(&e), "postgres connection ended");
        }
    });
    Ok(client)
}
