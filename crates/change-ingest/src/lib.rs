//! Everything Postgres-side of realtime-gateway: schema install, capture
//! triggers, wake-ups over LISTEN/NOTIFY, gap-free catch-up, crash and failover
//! safety, retention, Supabase publication sync, and a throwaway embedded PostgreSQL.
//!
//! # Design
//!
//! **Capture.** Enabling a table installs four statement-level `AFTER` triggers
//! (INSERT, UPDATE, DELETE with transition tables; TRUNCATE), `ENABLE ALWAYS` so they
//! also fire for replicated writes (`session_replication_role = replica`, as logical
//! replication applies rows; upstream Realtime sees those in the WAL). Each statement,
//! whatever its row count, runs one `INSERT … SELECT row_to_json(…)` into
//! `realtime_gateway.change_log(slot, op, table_oid, txid, id, boot, created_at,
//! record, old_record)`. UPDATE pairs `old_rows`/`new_rows` by ordinal position: the
//! executor appends the old and the new tuple of each updated row in the same call
//! (also for rows moving between partitions), so position *i* is the same row in
//! both — correct even when the key changes or there is none. The capture functions
//! pin `TimeZone`, `DateStyle`, `IntervalStyle`, `extra_float_digits`, `bytea_output`
//! and `lc_monetary`, so row images never depend on the writer's session; `bytea` is
//! then delivered as hex without `\x`, like upstream's `realtime.cast`.
//!
//! **Never failing the writer.** Row images never travel in a NOTIFY payload. A row
//! whose stored size exceeds 512 KiB is rendered in a read-only exception block (no
//! subtransaction id is assigned); if its JSON would exceed PostgreSQL's 1 GB limit
//! the log keeps `[primary key, "Error 413: Payload Too Large"]` instead, delivered as
//! an `Error 413` event with the key. NOTIFY is never sent when `PREPARE TRANSACTION`
//! is possible (`max_prepared_transactions > 0`), because a transaction that ran
//! NOTIFY cannot be prepared.
//!
//! **Partitioned tables.** Enabling a partitioned table installs the triggers on it
//! and on every partition (a statement addressed to a partition fires only that
//! partition's statement triggers); rows record the root (`pg_partition_root`), so
//! changes are reported under the root like `publish_via_partition_root`. Partitions
//! created later get their triggers from the maintenance task within a second.
//!
//! **Wake-up.** A NOTIFY takes a global lock held through the commit flush; one per
//! transaction cuts concurrent insert throughput to ~0.12 of a plain table. So a
//! writer notifies only when a listener is idle: an idle listener holds advisory lock
//! (class, 1) exclusively, and the trigger's `pg_try_advisory_xact_lock_shared`
//! fails exactly then. A busy listener holds nothing: writers take the lock shared
//! (no NOTIFY), so the listener cannot go idle before they commit; it reads again
//! every 5–20 ms while reads return changes, re-reads with a short backoff
//! (1 → 100 ms) while its last snapshot had transactions in progress, and otherwise
//! takes the idle lock and reads once more. With 2PC enabled it polls instead
//! (`fast_poll_interval`).
//!
//! **Gap-free reading.** Ids and txids are not assigned in commit order, so the
//! listener never reads "id > last". It keeps the snapshot it last read up to,
//! `S_prev`, takes `S_new = pg_current_snapshot()`, and reads exactly the
//! transactions visible in `S_new` but not in `S_prev`: those in `xip(S_prev)` now
//! visible, plus `[xmax(S_prev), xmax(S_new))` minus `xip(S_new)` — index range scans
//! on `(txid, id)`, never a rescan of old rows. Within one such window, transactions
//! are ordered by the capture time of their last change, then txid, and rows by id:
//! a transaction that waited on another's row lock captures after the other
//! committed, so conflicting changes of one row, and each session's transactions,
//! arrive in commit order. Every change of a transaction carries one
//! `commit_timestamp` (`pg_xact_commit_timestamp` with `track_commit_timestamp = on`,
//! else the capture time of its last change). Rows are fetched in batches of at most
//! `batch_rows` rows and ~16 MiB, each awaited into a bounded channel. The cursor
//! lives in the ingest task: a lost connection resumes exactly where it stopped.
//! A fresh process starts from the current snapshot (subscribers only expect
//! changes after they subscribe); nothing is persisted gateway-side.
//!
//! **Crashes and failovers.** Transaction ids above the last flushed one are handed
//! out again after a crash (or by a promoted standby), so a saved snapshot alone
//! would skip them. Every row carries `boot = pg_postmaster_start_time()`, and on
//! every (re)connect the listener compares the server's start time, timeline and
//! `system_identifier` with the cursor's. After a restart or failover it reads the
//! old boot's transactions not visible in `S_prev` plus every row of another boot
//! captured since its last read, so reused ids are never mistaken for delivered ones.
//! Delivered transactions are remembered until `pg_current_wal_flush_lsn()` passes
//! the insert position of their snapshot; after a crash, remembered ones whose rows
//! vanished (asynchronous commit) are reported as an [`IngestEvent::Gap`]. A timeline
//! change always reports a gap (a promoted asynchronous standby, or a restore, may
//! lack anything), then catches up the same way; another cluster (different
//! `system_identifier`) reports a gap and starts over from its current snapshot.
//!
//! **Retention.** Replicas share the log, so rows are pruned by age, never by
//! "read". `change_log` is list-partitioned by `slot` = 5-minute window of the capture
//! time modulo 8 (a 40-minute ring), and pruning truncates whole slots — O(1), no
//! vacuum, no index bloat, and inserts never fail because every slot always exists.
//! A slot is truncated once its last window ended at least `retention` ago (at most
//! 30 minutes) and every transaction that could have written it has finished; the
//! rows removed then all have txids below a recorded bound, `state.pruned_below`, and
//! a reader lost something iff `pruned_below > xmin(S_prev)` — then it emits
//! [`IngestEvent::Gap`] and skips ahead to the current snapshot instead of replaying
//! the backlog. A prepared or idle-in-transaction session that holds a due slot back
//! is logged and shown by `realtime_ingest_retention_pinned_seconds`.
//!
//! **Lock safety.** Triggers are created only when missing (`SHARE ROW EXCLUSIVE`,
//! which readers never wait for), every DDL the gateway runs has a `lock_timeout`, and
//! publication sync and retention run on their own connection
//! ([`maintenance`]), retrying busy tables on the next round, so a long transaction on
//! one table never stops delivery of the others.
//!
//! **Supabase compatibility.** Every `publication_sync_interval` the maintenance task
//! calls `realtime_gateway.sync_publication(name)`: tables in the publication are
//! enabled (source `publication`; a partition listed there enables its root), tables
//! the sync enabled that left it are disabled; manual enables are never undone.
//!
//! # Layout
//! - [`authz`]: row level security for changes: catalog, cohort evaluation, the "run as claims" settings.
//! - [`schema`]: versioned, idempotent migrations of the `realtime_gateway` schema ([`migrate`]).
//! - [`tables`]: enable / disable / list tables ([`enable_table`], [`disable_table`], [`list_tables`]).
//! - [`status`]: read-only probes for status reporting (rows of the log after a transaction).
//! - [`ingest`]: the listener task ([`spawn_ingest`]): wake-ups, catch-up, crash and failover detection.
//! - [`maintenance`]: publication sync and retention on their own connection.
//! - `tls`: TLS to PostgreSQL (rustls) with libpq's `sslmode` meanings, `sslrootcert`.
//! - [`embedded`]: a throwaway local PostgreSQL for the zero-config default and for tests.
//! - [`metrics`]: the `realtime_ingest_*` metric names.
//! - [`Change`]: one captured row change, owned by this crate; [`IngestError`]: its one error type.

pub mod authz;
mod change;
pub mod embedded;
mod error;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
pub mod realtime;
mod render;
pub mod schema;
pub mod status;
pub mod tables;
mod tls;

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
    /// Change-log rows older than this are deleted (default 15 min, at most 30 min).
    pub retention: Duration,
    /// Publication whose tables are enabled automatically (default `supabase_realtime`).
    pub publication: Option<String>,
    /// How often the publication and the enabled tables are re-read (default 1 s).
    pub publication_sync_interval: Duration,
    /// Fallback read interval of an idle listener when no notification arrives (default 1 s).
    pub poll_interval: Duration,
    /// Read interval of an idle listener when writers cannot wake it: with
    /// `max_prepared_transactions > 0` the triggers never NOTIFY (default 10 ms).
    pub fast_poll_interval: Duration,
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
            fast_poll_interval: Duration::from_millis(10),
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
/// and a connect timeout, so a dead server is noticed. TLS follows `sslmode` (see
/// [`tls`](crate::tls)); `verify-ca`/`verify-full` and `sslrootcert` are applied by
/// [`connect_with`].
pub(crate) fn pg_config(url: &str) -> Result<tokio_postgres::Config, IngestError> {
    let (mut config, _) = tls::split(url)?;
    config
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    Ok(config)
}

/// A connection and its driver, TLS or not.
pub(crate) type Connection = tokio_postgres::Connection<tokio_postgres::Socket, tls::RustlsStream>;

/// Connects with `config` (parsed from `url`, whose TLS settings it uses).
pub(crate) async fn connect_with(
    config: &tokio_postgres::Config,
    url: &str,
) -> Result<(tokio_postgres::Client, Connection), IngestError> {
    let (_, settings) = tls::split(url)?;
    config
        .connect(tls::connector(&settings)?)
        .await
        .map_err(IngestError::Connect)
}

/// Checks a connection string without connecting: its syntax, `sslmode`, and the
/// `sslrootcert` file. For a startup error instead of endless reconnects.
pub fn check_url(url: &str) -> Result<(), IngestError> {
    let (_, settings) = tls::split(url)?;
    tls::connector(&settings).map(|_| ())
}

/// Connects and spawns the connection driver (which logs and ends when the
/// connection closes). For admin work: migrations, enable/disable, list.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, IngestError> {
    let config = pg_config(url)?;
    let (client, connection) = connect_with(&config, url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %error::PgDisplay(&e), "postgres connection ended");
        }
    });
    Ok(client)
}
