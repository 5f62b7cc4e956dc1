//! The ingest task: one listener connection, wake-ups, gap-free catch-up, crash and
//! failover detection. Publication sync and retention run on their own connection
//! ([`crate::maintenance`]), so they can never stop delivery. See the crate docs.

mod cursor;
mod identity;
mod read;
mod sql;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::error::PgDisplay;
use crate::metrics as m;
use crate::tables::{enabled_oids, load_table_infos};
use crate::{IngestConfig, IngestError, IngestEvent, TableInfo, LISTENER_APPLICATION_NAME};
use cursor::{xid_array, Cursor, Snapshot};
use identity::{transition, ServerInfo, Transition};
use read::ReadOutcome;
use sql::Statements;

pub use crate::maintenance::prune;

/// Re-read backoff while the last snapshot had in-progress transactions.
const SHORT_POLL_MIN: Duration = Duration::from_millis(1);
const SHORT_POLL_MAX: Duration = Duration::from_millis(100);
/// Reads start at least this far apart, so a stream of changes under heavy write
/// load becomes one read per interval (the listener's reads compete with the
/// writers for the same CPUs).
const MIN_READ_GAP: Duration = Duration::from_millis(5);
/// Under sustained load the gap widens up to this, so each read carries a bigger
/// batch: fewer round trips per change, less CPU taken from writers. A quiet
/// database keeps the short gap, so latency at low rates is unchanged.
const MAX_READ_GAP: Duration = Duration::from_millis(20);
/// A read returning at least this many changes counts as "under load".
const BUSY_READ_CHANGES: usize = 32;
/// How often the enabled tables are re-read (renames, column changes, drops).
const TABLES_REFRESH: Duration = Duration::from_secs(1);
/// Reconnect backoff.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Starts the ingest task (and the maintenance task beside it). It connects, catches
/// up and then delivers [`IngestEvent`]s in order on the returned channel (bounded by
/// `channel_capacity`: a slow receiver pauses reading, it never grows memory) until
/// `cancel` fires or the receiver is dropped. It never gives up on the database:
/// connection failures are retried with backoff and jitter.
pub fn spawn_ingest(
    config: IngestConfig,
    cancel: CancellationToken,
) -> (mpsc::Receiver<IngestEvent>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
    let handle = tokio::spawn(async move {
        let maintenance = AbortOnDrop(tokio::spawn(crate::maintenance::run(
            config.clone(),
            cancel.clone(),
        )));
        let mut ingest = Ingest {
            config,
            tx,
            cancel,
            cursor: None,
            server: None,
            tables: HashMap::new(),
            versions: HashMap::new(),
            emitted_tables: None,
            tables_dirty: false,
            dropped: Vec::new(),
            live: false,
            statements: None,
            read_changes: 0,
            last_truncate: None,
        };
        ingest.run().await;
        drop(maintenance);
        tracing::info!("ingest task stopped");
    });
    (rx, handle)
}

/// Why a session ended.
pub(crate) enum Stop {
    /// Shutdown requested, or the receiver is gone: do not reconnect.
    Done,
    /// The connection failed: reconnect.
    Lost(IngestError),
}

impl From<IngestError> for Stop {
    fn from(e: IngestError) -> Self {
        Stop::Lost(e)
    }
}

impl From<tokio_postgres::Error> for Stop {
    fn from(e: tokio_postgres::Error) -> Self {
        Stop::Lost(IngestError::Db(e))
    }
}

pub(crate) struct Ingest {
    config: IngestConfig,
    tx: mpsc::Sender<IngestEvent>,
    cancel: CancellationToken,
    cursor: Option<Cursor>,
    /// The server of the current connection.
    server: Option<ServerInfo>,
    /// Table descriptions by oid (current shape), shared by every change of a table.
    tables: HashMap<u32, Arc<TableInfo>>,
    /// Earlier shapes of tables whose columns changed, for changes captured before.
    versions: HashMap<u32, Vec<Arc<TableInfo>>>,
    /// The enabled set last sent as `TablesChanged`; `None` forces a send.
    emitted_tables: Option<Vec<TableInfo>>,
    /// A table's shape changed: refresh and re-send the enabled set.
    tables_dirty: bool,
    /// Dropped tables to report once the changes read so far are delivered.
    dropped: Vec<Arc<TableInfo>>,
    /// `Live` was sent and no `Disconnected` since.
    live: bool,
    /// Prepared on the current listener connection.
    statements: Option<Statements>,
    /// Changes sent since the current read began (sizes the next read gap).
    read_changes: usize,
    /// The last TRUNCATE delivered (txid, table): its partitions' duplicates are skipped.
    last_truncate: Option<(u64, u32)>,
}

impl Ingest {
    async fn run(&mut self) {
        let mut failures: u32 = 0;
        loop {
            match self.session().await {
                Stop::Done => return,
                Stop::Lost(e) => {
                    if self.live {
                        self.live = false;
                        failures = 0;
                        metrics::gauge!(m::CONNECTED).set(0.0);
                        if self.send(IngestEvent::Disconnected).await.is_err() {
                            return;
                        }
                    }
                    metrics::counter!(m::RECONNECTS_TOTAL, "reason" => reason(&e)).increment(1);
                    tracing::warn!(error = %e, failures, "ingest listener disconnected; reconnecting");
                }
            }
            failures = failures.saturating_add(1);
            let delay = backoff(failures);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Sends an event, giving up if shutdown is requested while the channel is full.
    async fn send(&self, event: IngestEvent) -> Result<(), Stop> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(Stop::Done),
            sent = self.tx.send(event) => sent.map_err(|_| Stop::Done),
        }
    }

    /// Reports changes that cannot be delivered.
    async fn gap(&self, message: String) -> Result<(), Stop> {
        tracing::error!(%message, "change-log gap");
        metrics::counter!(m::GAPS_TOTAL).increment(1);
        self.send(IngestEvent::Gap { message }).await
    }

    /// One listener connection, from connect to loss or shutdown.
    async fn session(&mut self) -> Stop {
        match self.session_inner().await {
            Ok(()) => Stop::Done,
            Err(stop) => stop,
        }
    }

    async fn session_inner(&mut self) -> Result<(), Stop> {
        let connecting = async {
            let mut pg = crate::pg_config(&self.config.database_url)?;
            pg.application_name(LISTENER_APPLICATION_NAME);
            crate::connect_with(&pg, &self.config.database_url).await
        };
        let (client, mut connection) = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Err(Stop::Done),
            c = connecting => c?,
        };
        // Drive the connection with poll_message: awaiting it would drop notifications.
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let tables_notified = Arc::new(AtomicBool::new(false));
        let notified = tables_notified.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        metrics::counter!(m::NOTIFICATIONS_TOTAL).increment(1);
                        if n.payload() == "tables" {
                            notified.store(true, Ordering::Relaxed);
                        }
                        // A full channel already holds a wake-up: coalesce.
                        let _ = wake_tx.try_send(());
                    }
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        tracing::debug!(notice = n.message(), "postgres notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %PgDisplay(&e), "listener connection failed");
                        return;
                    }
                    None => return,
                }
            }
        });
        let _driver = AbortOnDrop(driver);

        client.batch_execute(sql::SESSION).await?;
        client.batch_execute("listen realtime_gateway").await?;
        crate::migrate(&client).await?;
        self.statements = Some(Statements::prepare(&client).await?);
        let server = ServerInfo::read(&client).await?;
        self.server = Some(server.clone());
        self.check_origin(&client, &server).await?;
        self.emitted_tables = None;
        self.refresh_tables(&client).await?;
        let mut outcome = self.read(&client, "start").await?;
        self.live = true;
        metrics::gauge!(m::CONNECTED).set(1.0);
        self.send(IngestEvent::Live).await?;
        tracing::info!(
            two_phase = server.two_phase,
            "ingest listener live{}",
            if server.two_phase {
                " (max_prepared_transactions > 0: polling, no NOTIFY wake-ups)"
            } else {
                ""
            }
        );

        let statements = self.statements.clone().ok_or(Stop::Done)?;
        let mut pace = Pace {
            notify: !server.two_phase,
            idle: false,
            short: SHORT_POLL_MIN,
            last_read: Instant::now(),
            read_gap: MIN_READ_GAP,
        };
        let mut next_read = self
            .schedule(&client, &statements, &mut pace, outcome)
            .await?;
        let mut next_refresh = Instant::now() + TABLES_REFRESH;
        loop {
            // Waits for: shutdown; a wake-up (None: the connection closed); the next
            // read; the next tables refresh. Work happens in the bodies.
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Stop::Done),
                woke = wake_rx.recv() => {
                    if woke.is_none() {
                        return Err(Stop::Lost(IngestError::ListenerClosed));
                    }
                    pace.busy(&client, &statements).await?;
                    if tables_notified.swap(false, Ordering::Relaxed) || self.tables_dirty {
                        self.refresh_tables(&client).await?;
                    }
                    // Wake-ups arriving meanwhile coalesce in the channel.
                    tokio::time::sleep_until(pace.last_read + pace.read_gap).await;
                    pace.last_read = Instant::now();
                    outcome = self.read(&client, "notify").await?;
                    next_read = self.schedule(&client, &statements, &mut pace, outcome).await?;
                }
                _ = tokio::time::sleep_until(next_read) => {
                    if self.tables_dirty {
                        self.refresh_tables(&client).await?;
                    }
                    pace.last_read = Instant::now();
                    outcome = self.read(&client, "poll").await?;
                    next_read = self.schedule(&client, &statements, &mut pace, outcome).await?;
                }
                _ = tokio::time::sleep_until(next_refresh) => {
                    next_refresh = Instant::now() + TABLES_REFRESH;
                    self.refresh_tables(&client).await?;
                }
            }
        }
    }

    /// After a read: when to read next, going idle (and reading once more) when
    /// nothing is in flight. See the crate docs on wake-ups.
    async fn schedule(
        &mut self,
        client: &Client,
        statements: &Statements,
        pace: &mut Pace,
        mut outcome: ReadOutcome,
    ) -> Result<Instant, Stop> {
        loop {
            if outcome.changes > 0 {
                pace.busy(client, statements).await?;
                if outcome.changes >= BUSY_READ_CHANGES {
                    pace.read_gap = (pace.read_gap * 2).min(MAX_READ_GAP);
                }
                // Busy: writers do not notify while we hold no idle lock; read again soon.
                pace.short = SHORT_POLL_MIN;
                return Ok(pace.last_read + pace.read_gap);
            }
            pace.read_gap = MIN_READ_GAP;
            if outcome.in_progress {
                let at = Instant::now() + pace.short;
                pace.short = (pace.short * 2).min(SHORT_POLL_MAX);
                return Ok(at);
            }
            if pace.idle {
                return Ok(Instant::now() + self.config.poll_interval.max(Duration::from_millis(1)));
            }
            if !pace.notify {
                return Ok(
                    Instant::now() + self.config.fast_poll_interval.max(Duration::from_millis(1))
                );
            }
            // Nothing in flight: take the idle lock so the next writer notifies, then
            // read once more (a writer may have committed in between without
            // notifying). Another replica may hold it: then keep polling.
            pace.short = SHORT_POLL_MIN;
            if !client
                .query_one(&statements.go_idle, &[])
                .await?
                .get::<_, bool>(0)
            {
                let at = Instant::now() + pace.short;
                pace.short = (pace.short * 2).min(SHORT_POLL_MAX);
                return Ok(at);
            }
            pace.idle = true;
            pace.last_read = Instant::now();
            outcome = self.read(client, "idle").await?;
        }
    }

    /// Compares the server with the one the cursor was built on, and decides how the
    /// next read must look (see `identity.rs` and the crate docs).
    async fn check_origin(&mut self, client: &Client, server: &ServerInfo) -> Result<(), Stop> {
        let Some(cursor) = self.cursor.as_mut() else {
            // A fresh process starts from now: subscribers expect changes after they join.
            let (snap, read_at) = current_snapshot(client).await?;
            tracing::info!(
                xmin = snap.xmin,
                xmax = snap.xmax,
                "ingest starting from the current snapshot"
            );
            self.cursor = Some(Cursor::at(snap, read_at, server.origin.clone()));
            return Ok(());
        };
        match transition(&cursor.origin, &server.origin) {
            Transition::Same => Ok(()),
            Transition::Restarted => {
                tracing::warn!("PostgreSQL restarted since the last read: re-reading the window whose transaction ids may have been reused");
                cursor.recovering = true;
                let (delivered, overflowed) = cursor.unconfirmed.take();
                let lost = if delivered.is_empty() {
                    0
                } else {
                    let statements = self.statements.clone().ok_or(Stop::Done)?;
                    let txids = xid_array(delivered.iter().map(|t| t.0));
                    let boots: Vec<SystemTime> = delivered.iter().map(|t| t.1).collect();
                    let survived: Vec<String> = client
                        .query(&statements.survivors, &[&txids, &boots])
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    let lost: Vec<u64> = delivered
                        .iter()
                        .map(|t| t.0)
                        .filter(|t| !survived.contains(&t.to_string()))
                        .collect();
                    tracing::debug!(
                        ?lost,
                        tracked = delivered.len(),
                        "delivered transactions lost by the restart"
                    );
                    lost.len()
                };
                if lost > 0 || overflowed {
                    self.gap(format!(
                        "PostgreSQL restarted and lost {} transaction(s) whose changes were \
                         already delivered (asynchronous commit); refetch",
                        if overflowed {
                            "some".to_owned()
                        } else {
                            lost.to_string()
                        }
                    ))
                    .await?;
                }
                Ok(())
            }
            Transition::FailedOver { from, to } => {
                tracing::warn!(from, to, "PostgreSQL failed over: new timeline");
                cursor.recovering = true;
                cursor.unconfirmed.take();
                self.gap(format!(
                    "PostgreSQL failed over (timeline {from} -> {to}): changes delivered before \
                     may be missing from the new primary; refetch"
                ))
                .await
            }
            Transition::OtherCluster => {
                tracing::warn!("DATABASE_URL now reaches a different PostgreSQL cluster: starting over from its current snapshot");
                let (snap, read_at) = current_snapshot(client).await?;
                self.cursor = Some(Cursor::at(snap, read_at, server.origin.clone()));
                self.tables.clear();
                self.versions.clear();
                self.gap(
                    "the database is a different PostgreSQL cluster than before: changes since \
                     the last read cannot be delivered; refetch"
                        .into(),
                )
                .await
            }
        }
    }

    /// Reloads the enabled tables and sends `TablesChanged` if they differ from
    /// what was last sent (set, names, columns, key or RLS flag). Enabled tables that
    /// no longer exist are reported as dropped after the next read.
    async fn refresh_tables(&mut self, client: &Client) -> Result<(), Stop> {
        self.tables_dirty = false;
        let oids = enabled_oids(client).await?;
        let infos = load_table_infos(client, &oids).await?;
        let mut list: Vec<TableInfo> = infos.into_values().collect();
        list.sort_by(|a, b| (&a.schema, &a.table, a.oid).cmp(&(&b.schema, &b.table, b.oid)));
        if self.emitted_tables.as_ref() == Some(&list) {
            return Ok(());
        }
        if let Some(before) = &self.emitted_tables {
            let gone: Vec<u32> = before
                .iter()
                .filter(|t| !list.iter().any(|n| n.oid == t.oid))
                .map(|t| t.oid)
                .collect();
            if !gone.is_empty() {
                let existing = load_table_infos(client, &gone).await?;
                for oid in gone {
                    if existing.contains_key(&oid) {
                        continue; // disabled, not dropped
                    }
                    if let Some(info) = before.iter().find(|t| t.oid == oid) {
                        self.dropped.push(Arc::new(info.clone()));
                    }
                }
            }
        }
        let mut shared = Vec::with_capacity(list.len());
        for info in &list {
            let arc = match self.tables.get(&info.oid) {
                Some(existing) if **existing == *info => existing.clone(),
                Some(existing) => {
                    let old = Arc::clone(existing);
                    let versions = self.versions.entry(info.oid).or_default();
                    if !versions.iter().any(|v| v.columns == old.columns) {
                        versions.push(old);
                        if versions.len() > 4 {
                            versions.remove(0);
                        }
                    }
                    let arc = Arc::new(info.clone());
                    self.tables.insert(info.oid, arc.clone());
                    arc
                }
                None => {
                    let arc = Arc::new(info.clone());
                    self.tables.insert(info.oid, arc.clone());
                    arc
                }
            };
            shared.push(arc);
        }
        tracing::info!(tables = list.len(), "enabled tables changed");
        self.emitted_tables = Some(list);
        self.send(IngestEvent::TablesChanged(shared)).await
    }

    /// Reports tables found dropped, now that the changes before the drop were read.
    async fn emit_dropped(&mut self) -> Result<(), Stop> {
        for table in std::mem::take(&mut self.dropped) {
            tracing::info!(schema = %table.schema, table = %table.table, "enabled table dropped");
            self.send(IngestEvent::TableDropped(table)).await?;
        }
        Ok(())
    }
}

/// The listener's read pacing.
struct Pace {
    /// Writers can wake us (no 2PC): going idle is worth it.
    notify: bool,
    /// We hold the idle lock: the next writer notifies.
    idle: bool,
    /// Backoff of re-reads while transactions are in progress.
    short: Duration,
    last_read: Instant,
    /// Reads start at least this far apart.
    read_gap: Duration,
}

impl Pace {
    /// Releases the idle lock: from here on writers take it shared instead of notifying.
    async fn busy(&mut self, client: &Client, statements: &Statements) -> Result<(), Stop> {
        if self.idle {
            client.query_one(&statements.stop_idle, &[]).await?;
            self.idle = false;
        }
        Ok(())
    }
}

async fn current_snapshot(client: &Client) -> Result<(Snapshot, SystemTime), Stop> {
    let row = client
        .query_one("select pg_current_snapshot()::text, clock_timestamp()", &[])
        .await?;
    let text: String = row.try_get(0)?;
    let snap = Snapshot::parse(&text)
        .ok_or_else(|| Stop::Lost(IngestError::Protocol(format!("unparsable snapshot {text}"))))?;
    Ok((snap, row.try_get(1)?))
}

fn reason(e: &IngestError) -> &'static str {
    match e {
        IngestError::Connect(_) => "connect",
        IngestError::Db(e) if e.is_closed() => "closed",
        IngestError::Db(e) if e.as_db_error().is_some() => "query",
        IngestError::Db(_) => "io",
        IngestError::ListenerClosed => "closed",
        _ => "other",
    }
}

/// Exponential backoff with jitter: 100 ms doubling to 10 s, each delay drawn
/// from [d/2, d).
pub(crate) fn backoff(failures: u32) -> Duration {
    let exp = RECONNECT_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(RECONNECT_MAX);
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) < Duration::from_millis(100));
        assert!(backoff(30) <= RECONNECT_MAX);
        assert!(backoff(30) >= RECONNECT_MAX / 2);
    }
}
