//! The maintenance task: Supabase publication sync (plus capture triggers for new
//! partitions) and retention. It has its own connection with a short `lock_timeout`,
//! so DDL waiting for a busy table never holds up the listener, and a table it cannot
//! lock right now is simply retried on the next round.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::PgDisplay;
use crate::ingest::backoff;
use crate::metrics as m;
use crate::{IngestConfig, IngestError};

/// `application_name` of the maintenance connection.
pub const MAINTENANCE_APPLICATION_NAME: &str = "realtime_gateway_maintenance";

/// How long DDL of this task may wait for a table lock before giving up for this round.
const LOCK_TIMEOUT: &str = "200ms";

/// Retention longer than this does not fit the change-log ring (8 slots of 5 minutes,
/// two of them always live); `realtime_gateway.prune` clamps it.
pub const MAX_RETENTION: Duration = Duration::from_secs(30 * 60);

/// How often a pinned retention cutoff is logged.
const PINNED_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one retention run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Change-log slots (partitions) truncated.
    pub truncated: i32,
    /// Slots due that could not be locked right now (retried next time).
    pub busy: i32,
    /// A due slot is held back by a transaction still open: the oldest snapshot xmin.
    pub pinned_xmin: Option<u64>,
    /// Since when that slot has been due.
    pub pinned_since: Option<SystemTime>,
}

/// Runs retention once (see `realtime_gateway.prune`): truncates every change-log slot
/// whose changes are all older than `retention` and whose writers have all finished.
/// The maintenance task calls this periodically; public for the CLI and tests.
pub async fn prune(client: &Client, retention: Duration) -> Result<PruneReport, IngestError> {
    let row = client
        .query_one(
            "select truncated, busy, pinned_xmin::text, pinned_since
             from realtime_gateway.prune(make_interval(secs => $1))",
            &[&retention.as_secs_f64()],
        )
        .await?;
    let pinned_xmin: Option<String> = row.try_get(2)?;
    Ok(PruneReport {
        truncated: row.try_get(0)?,
        busy: row.try_get(1)?,
        pinned_xmin: pinned_xmin.and_then(|x| x.parse().ok()),
        pinned_since: row.try_get(3)?,
    })
}

/// The task: reconnects forever (with backoff) until `cancel`.
pub(crate) async fn run(config: IngestConfig, cancel: CancellationToken) {
    if config.retention > MAX_RETENTION {
        tracing::warn!(
            configured_secs = config.retention.as_secs(),
            max_secs = MAX_RETENTION.as_secs(),
            "change retention is longer than the change log holds; using the maximum"
        );
    }
    let mut failures: u32 = 0;
    loop {
        let connected = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            c = connect(&config) => c,
        };
        match connected {
            Ok(client) => {
                failures = 0;
                let e = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    e = rounds(&client, &config) => e,
                };
                tracing::warn!(error = %e, "maintenance connection lost; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "maintenance connection failed"),
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff(failures)) => {}
        }
    }
}

async fn connect(config: &IngestConfig) -> Result<Client, IngestError> {
    let mut pg = crate::pg_config(&config.database_url)?;
    pg.application_name(MAINTENANCE_APPLICATION_NAME);
    let (client, connection) = crate::connect_with(&pg, &config.database_url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %PgDisplay(&e), "maintenance connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "set lock_timeout = '{LOCK_TIMEOUT}'; set statement_timeout = '60s'; set jit = off"
        ))
        .await?;
    Ok(client)
}

/// Sync and prune on their schedules until a query fails.
async fn rounds(client: &Client, config: &IngestConfig) -> IngestError {
    let sync_every = config
        .publication_sync_interval
        .max(Duration::from_millis(10));
    let retention = config.retention.min(MAX_RETENTION);
    let prune_every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut next_sync = Instant::now();
    let mut next_prune = Instant::now();
    let mut pinned_logged: Option<Instant> = None;
    loop {
        tokio::time::sleep_until(next_sync.min(next_prune)).await;
        let now = Instant::now();
        if now >= next_sync {
            if let Err(e) = sync(client, config.publication.as_deref()).await {
                return e;
            }
            next_sync = now + sync_every;
        }
        if now >= next_prune {
            match prune(client, retention).await {
                Ok(report) => {
                    if let Err(e) = report_prune(client, &report, &mut pinned_logged).await {
                        return e;
                    }
                }
                Err(e) => return e,
            }
            next_prune = now + prune_every;
        }
    }
}

/// One publication sync (also installs the triggers new partitions of enabled tables lack).
async fn sync(client: &Client, publication: Option<&str>) -> Result<(), IngestError> {
    let row = client
        .query_one(
            "select enabled, disabled, repaired, busy from realtime_gateway.sync_publication($1)",
            &[&publication],
        )
        .await?;
    let (enabled, disabled, repaired, busy): (i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if enabled + disabled > 0 {
        metrics::counter!(m::PUBLICATION_SYNC_CHANGES_TOTAL).increment((enabled + disabled) as u64);
        tracing::info!(
            publication,
            enabled,
            disabled,
            "publication sync changed enabled tables"
        );
    }
    if repaired > 0 {
        tracing::info!(repaired, "installed missing capture triggers");
    }
    if busy > 0 {
        metrics::counter!(m::LOCK_BUSY_TOTAL, "task" => "sync").increment(busy as u64);
        tracing::info!(
            busy,
            "tables busy (lock_timeout {LOCK_TIMEOUT}); retrying on the next sync"
        );
    }
    Ok(())
}

async fn report_prune(
    client: &Client,
    report: &PruneReport,
    pinned_logged: &mut Option<Instant>,
) -> Result<(), IngestError> {
    if report.truncated > 0 {
        metrics::counter!(m::PRUNED_SLOTS_TOTAL).increment(report.truncated as u64);
        tracing::debug!(slots = report.truncated, "pruned change log");
    }
    if report.busy > 0 {
        metrics::counter!(m::LOCK_BUSY_TOTAL, "task" => "retention").increment(report.busy as u64);
    }
    let (Some(xmin), Some(since)) = (report.pinned_xmin, report.pinned_since) else {
        metrics::gauge!(m::RETENTION_PINNED_SECONDS).set(0.0);
        *pinned_logged = None;
        return Ok(());
    };
    let overdue = SystemTime::now().duration_since(since).unwrap_or_default();
    metrics::gauge!(m::RETENTION_PINNED_SECONDS).set(overdue.as_secs_f64());
    if pinned_logged.is_some_and(|at| at.elapsed() < PINNED_LOG_EVERY) {
        return Ok(());
    }
    *pinned_logged = Some(Instant::now());
    let holder = pinning_holder(client, xmin).await?;
    tracing::warn!(
        overdue_secs = overdue.as_secs(),
        xmin,
        holder = holder.as_deref().unwrap_or("unknown (another database, or a replication slot)"),
        "change-log retention is held back by an open transaction; the log keeps growing until it ends"
    );
    Ok(())
}

/// Who holds the oldest snapshot back: a prepared transaction or a session.
async fn pinning_holder(client: &Client, xmin: u64) -> Result<Option<String>, IngestError> {
    let xid32 = (xmin & 0xffff_ffff).to_string();
    let row = client
        .query_opt(
            "select format('prepared transaction %L (prepared %s, owner %s, database %s)',
                           gid, prepared, owner, database)
             from pg_prepared_xacts where transaction::text = $1
             union all
             (select format('pid %s (%s, user %s, application %L, transaction started %s)',
                            pid, state, usename, application_name, xact_start)
              from pg_stat_activity
              where backend_xid::text = $1 or backend_xmin::text = $1
              order by xact_start nulls last)
             limit 1",
            &[&xid32],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
