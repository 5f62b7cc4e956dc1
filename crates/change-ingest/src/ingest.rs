//! The ingest task: one listener connection, wake-ups, gap-free catch-up,
//! retention and publication sync. See the crate docs for the design.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};
use tokio_util::sync::CancellationToken;

use crate::error::PgDisplay;
use crate::metrics as m;
use crate::tables::{enabled_oids, load_table_infos};
use crate::{
    Change, ChangePosition, IngestConfig, IngestError, IngestEvent, Op, TableInfo,
    LISTENER_APPLICATION_NAME,
};

/// A batch is flushed to the gateway once its row images reach this many bytes,
/// even below `batch_rows`.
const BATCH_BYTES: i64 = 16 * 1024 * 1024;
/// Most transactions fetched by one grouped query.
const GROUP_TXNS: usize = 1000;
/// Values kept in a trimmed (oversized) row image are at most this long (JSON bytes).
const TRIMMED_VALUE_BYTES: i32 = 64;
/// Re-read backoff while the last snapshot had in-progress transactions.
const SHORT_POLL_MIN: Duration = Duration::from_millis(1);
const SHORT_POLL_MAX: Duration = Duration::from_millis(100);
/// Reads start at least this far apart, so a stream of wake-ups under heavy
/// write load becomes one read per interval instead of one per notification
/// (the listener's reads compete with the writers for the same CPUs).
const MIN_READ_GAP: Duration = Duration::from_millis(5);
/// Under sustained load the gap widens up to this, so each read carries a
/// bigger batch: fewer round trips per change, less CPU taken from writers.
/// A quiet database keeps the short gap, so latency at low rates is unchanged.
const MAX_READ_GAP: Duration = Duration::from_millis(20);
/// A read returning at least this many changes counts as "under load".
const BUSY_READ_CHANGES: usize = 32;
/// Reconnect backoff.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Starts the ingest task. It connects, catches up and then delivers
/// [`IngestEvent`]s in order on the returned channel (bounded by
/// `channel_capacity`: a slow receiver pauses reading, it never grows memory)
/// until `cancel` fires or the receiver is dropped. It never gives up on the
/// database: connection failures are retried with backoff and jitter.
pub fn spawn_ingest(
    config: IngestConfig,
    cancel: CancellationToken,
) -> (mpsc::Receiver<IngestEvent>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
    let handle = tokio::spawn(async move {
        let mut ingest = Ingest {
            config,
            tx,
            cancel,
            cursor: None,
            tables: HashMap::new(),
            emitted_tables: None,
            live: false,
            statements: None,
            read_changes: 0,
        };
        ingest.run().await;
        tracing::info!("ingest task stopped");
    });
    (rx, handle)
}

/// Deletes change-log rows older than `retention` (see `realtime_gateway.prune`)
/// and returns how many were deleted. The ingest task calls this periodically;
/// it is public for the CLI and tests.
pub async fn prune(client: &Client, retention: Duration) -> Result<i64, IngestError> {
    let row = client
        .query_one(
            "select realtime_gateway.prune(make_interval(secs => $1))",
            &[&retention.as_secs_f64()],
        )
        .await?;
    Ok(row.get(0))
}

/// Why a session ended.
enum Stop {
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

/// A `pg_snapshot`, parsed so visibility is decided without a round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// In-progress txids, sorted.
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip1,xip2,...`.
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip_text = parts.next()?;
        let mut xip = xip_text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().ok())
            .collect::<Option<Vec<u64>>>()?;
        xip.sort_unstable();
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether transaction `txid` had finished when the snapshot was taken
    /// (what `pg_visible_in_snapshot` computes server-side).
    #[cfg(test)]
    fn visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }
}

/// A `{1,2,3}` literal for `$n::text::xid8[]`.
fn xid_array(txids: impl Iterator<Item = u64>) -> String {
    let list: Vec<String> = txids.map(|t| t.to_string()).collect();
    format!("{{{}}}", list.join(","))
}

/// One transaction of the window being read.
#[derive(Clone, Copy, Debug)]
struct Txn {
    txid: u64,
    rows: i64,
    bytes: i64,
}

/// The read position. Lives as long as the task, across reconnects.
#[derive(Debug)]
struct Cursor {
    /// Everything visible in this snapshot has been delivered (`S_prev`).
    prev: Snapshot,
    /// The window being delivered, if a read was interrupted or is in progress.
    pending: Option<Pending>,
    /// xmin of the oldest snapshot whose window has not been checked against
    /// `state.pruned_below` yet.
    verified_from: u64,
}

/// A window (`S_prev`, `S_new`] being delivered.
#[derive(Debug)]
struct Pending {
    new: Snapshot,
    /// Transactions left, in delivery order.
    txns: VecDeque<Txn>,
    /// Rows of the front transaction with id up to this were delivered.
    front_after_id: i64,
}

/// A fetched row before its table is resolved.
struct RawChange {
    position: ChangePosition,
    table_oid: u32,
    op: Op,
    commit_timestamp: String,
    created_us: i64,
    record: Option<Bytes>,
    old_record: Option<Bytes>,
    oversized_columns: Vec<String>,
    bytes: i64,
}

struct Ingest {
    config: IngestConfig,
    tx: mpsc::Sender<IngestEvent>,
    cancel: CancellationToken,
    cursor: Option<Cursor>,
    /// Table descriptions by oid, shared by every change of a table.
    tables: HashMap<u32, Arc<TableInfo>>,
    /// The enabled set last sent as `TablesChanged`; `None` forces a send.
    emitted_tables: Option<Vec<TableInfo>>,
    /// `Live` was sent and no `Disconnected` since.
    live: bool,
    /// Prepared on the current listener connection.
    statements: Option<Statements>,
    /// Changes sent since the current read began (sizes the next read gap).
    read_changes: usize,
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
            pg.connect(NoTls).await.map_err(IngestError::Connect)
        };
        let (client, mut connection) = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Err(Stop::Done),
            c = connecting => c?,
        };
        // Drive the connection with poll_message: awaiting it would drop notifications.
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let tables_dirty = Arc::new(AtomicBool::new(false));
        let dirty = tables_dirty.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        metrics::counter!(m::NOTIFICATIONS_TOTAL).increment(1);
                        if n.payload() == "tables" {
                            dirty.store(true, Ordering::Relaxed);
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

        // JIT compiles for hundreds of ms when row estimates are off: never worth
        // it for these small, latency-bound queries.
        client
            .batch_execute("set jit = off; listen realtime_gateway")
            .await?;
        crate::migrate(&client).await?;
        self.statements = Some(Statements::prepare(&client).await?);
        if self.cursor.is_none() {
            // A fresh process starts from now: subscribers expect changes after they join.
            let snap = current_snapshot(&client).await?;
            tracing::info!(
                xmin = snap.xmin,
                xmax = snap.xmax,
                "ingest starting from the current snapshot"
            );
            self.cursor = Some(Cursor {
                verified_from: snap.xmin,
                prev: snap,
                pending: None,
            });
        }
        self.emitted_tables = None;
        self.refresh_tables(&client).await?;
        let mut xip = self.read(&client, "start").await?;
        self.live = true;
        metrics::gauge!(m::CONNECTED).set(1.0);
        self.send(IngestEvent::Live).await?;
        tracing::info!("ingest listener live");

        let poll = self.config.poll_interval.max(Duration::from_millis(1));
        let sync_every = self
            .config
            .publication_sync_interval
            .max(Duration::from_millis(10));
        let prune_every =
            (self.config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut short = SHORT_POLL_MIN;
        let mut next_read;
        let mut last_read = Instant::now();
        let mut read_gap = MIN_READ_GAP;
        let mut next_sync = Instant::now();
        let mut next_prune = Instant::now();
        loop {
            if xip {
                next_read = Instant::now() + short;
                short = (short * 2).min(SHORT_POLL_MAX);
            } else {
                next_read = Instant::now() + poll;
                short = SHORT_POLL_MIN;
            }
            let next_maintenance = next_sync.min(next_prune);
            // Waits for: shutdown; a wake-up (None: the connection closed); the next
            // poll; the next publication sync / retention run. Work happens in the bodies.
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Stop::Done),
                woke = wake_rx.recv() => {
                    if woke.is_none() {
                        return Err(Stop::Lost(IngestError::ListenerClosed));
                    }
                    short = SHORT_POLL_MIN;
                    if tables_dirty.swap(false, Ordering::Relaxed) {
                        self.refresh_tables(&client).await?;
                    }
                    // Wake-ups arriving meanwhile coalesce in the channel.
                    tokio::time::sleep_until(last_read + read_gap).await;
                    last_read = Instant::now();
                    xip = self.read(&client, "notify").await?;
                    read_gap = if self.read_changes >= BUSY_READ_CHANGES {
                        (read_gap * 2).min(MAX_READ_GAP)
                    } else {
                        MIN_READ_GAP
                    };
                }
                _ = tokio::time::sleep_until(next_read) => {
                    last_read = Instant::now();
                    xip = self.read(&client, "poll").await?;
                }
                _ = tokio::time::sleep_until(next_maintenance) => {
                    let now = Instant::now();
                    if now >= next_sync {
                        self.sync_publication(&client).await?;
                        self.refresh_tables(&client).await?;
                        next_sync = now + sync_every;
                    }
                    if now >= next_prune {
                        let deleted = prune(&client, self.config.retention).await?;
                        if deleted > 0 {
                            metrics::counter!(m::PRUNED_ROWS_TOTAL).increment(deleted as u64);
                            tracing::debug!(deleted, "pruned change log");
                        }
                        next_prune = now + prune_every;
                    }
                    xip = true; // keep the read schedule short after maintenance
                }
            }
        }
    }

    async fn sync_publication(&mut self, client: &Client) -> Result<(), Stop> {
        let Some(publication) = self.config.publication.as_deref() else {
            return Ok(());
        };
        let row = client
            .query_one(
                "select realtime_gateway.sync_publication($1)",
                &[&publication],
            )
            .await?;
        let changed: i32 = row.get(0);
        if changed > 0 {
            metrics::counter!(m::PUBLICATION_SYNC_CHANGES_TOTAL).increment(changed as u64);
            tracing::info!(
                publication,
                changed,
                "publication sync changed enabled tables"
            );
        }
        Ok(())
    }

    /// Reloads the enabled tables and sends `TablesChanged` if they differ from
    /// what was last sent (set, columns, key or RLS flag).
    async fn refresh_tables(&mut self, client: &Client) -> Result<(), Stop> {
        let oids = enabled_oids(client).await?;
        let infos = load_table_infos(client, &oids).await?;
        let mut list: Vec<TableInfo> = infos.into_values().collect();
        list.sort_by(|a, b| (&a.schema, &a.table, a.oid).cmp(&(&b.schema, &b.table, b.oid)));
        if self.emitted_tables.as_ref() == Some(&list) {
            return Ok(());
        }
        let mut shared = Vec::with_capacity(list.len());
        for info in &list {
            let arc = match self.tables.get(&info.oid) {
                Some(existing) if **existing == *info => existing.clone(),
                _ => {
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

    /// Delivers everything committed since the last read. Returns whether the
    /// new snapshot had in-progress transactions (a skipped notifier may commit soon).
    async fn read(&mut self, client: &Client, reason: &'static str) -> Result<bool, Stop> {
        metrics::counter!(m::READS_TOTAL, "reason" => reason).increment(1);
        self.read_changes = 0;
        let Some(mut cursor) = self.cursor.take() else {
            return Ok(false);
        };
        let result = self.read_window(client, &mut cursor).await;
        let has_xip = !cursor.prev.xip.is_empty();
        self.cursor = Some(cursor);
        result.map(|()| has_xip)
    }

    async fn read_window(&mut self, client: &Client, cursor: &mut Cursor) -> Result<(), Stop> {
        let Some(statements) = self.statements.clone() else {
            return Err(Stop::Lost(IngestError::Protocol(
                "statements not prepared".into(),
            )));
        };
        // One round trip: the new snapshot, the retention state, and the
        // transactions that finished between `prev` and the new snapshot.
        let prev_xip = xid_array(cursor.prev.xip.iter().copied());
        let prev_xmax = cursor.prev.xmax.to_string();
        let rows = client
            .query(&statements.window, &[&prev_xip, &prev_xmax])
            .await?;
        let Some(first) = rows.first() else {
            return Err(Stop::Lost(IngestError::Protocol(
                "realtime_gateway.state is empty".into(),
            )));
        };
        let snapshot_text: String = first.try_get(0)?;
        let pruned_below: String = first.try_get(1)?;
        let pruned_at: Option<String> = first.try_get(2)?;
        // Gap check: rows below pruned_below may be gone; we needed everything not
        // visible in the snapshots read since `verified_from`.
        let pruned_below: u64 = pruned_below.parse().unwrap_or(0);
        if pruned_below > cursor.verified_from {
            let message = format!(
                "changes of transactions {}..{} were deleted by retention (pruned at {}) \
                 before this gateway read them; they cannot be delivered",
                cursor.verified_from,
                pruned_below,
                pruned_at.as_deref().unwrap_or("unknown")
            );
            tracing::error!(%message, "change-log gap");
            metrics::counter!(m::GAPS_TOTAL).increment(1);
            self.send(IngestEvent::Gap { message }).await?;
        }
        cursor.verified_from = cursor.prev.xmin;

        if cursor.pending.is_none() {
            let new = Snapshot::parse(&snapshot_text).ok_or_else(|| {
                Stop::Lost(IngestError::Protocol(format!(
                    "unparsable snapshot {snapshot_text}"
                )))
            })?;
            cursor.pending = Some(Pending {
                new,
                txns: window_txns(&rows)?,
                front_after_id: i64::MIN,
            });
        }
        let batch_rows = self.config.batch_rows.max(1);
        let max_record = i32::try_from(self.config.max_record_bytes).unwrap_or(i32::MAX);
        while let Some(pending) = cursor.pending.as_mut() {
            let Some(front) = pending.txns.front().copied() else {
                if let Some(done) = cursor.pending.take() {
                    cursor.prev = done.new;
                }
                break;
            };
            if pending.front_after_id > i64::MIN
                || front.rows > batch_rows as i64
                || front.bytes > BATCH_BYTES
            {
                self.read_large_txn(client, &statements, pending, front, batch_rows, max_record)
                    .await?;
            } else {
                self.read_group(client, &statements, pending, batch_rows, max_record)
                    .await?;
            }
        }
        Ok(())
    }

    /// Pages through one large transaction by id, flushing by rows and bytes.
    async fn read_large_txn(
        &mut self,
        client: &Client,
        statements: &Statements,
        pending: &mut Pending,
        front: Txn,
        batch_rows: usize,
        max_record: i32,
    ) -> Result<(), Stop> {
        let txid = front.txid.to_string();
        let limit = batch_rows as i64;
        let after = pending.front_after_id;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&max_record, &txid, &after, &limit];
        let stream = client.query_raw(&statements.large_txn, params).await?;
        pin_mut!(stream);
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut page_rows = 0usize;
        while let Some(row) = stream.try_next().await? {
            let raw = raw_change(&row)?;
            page_rows += 1;
            bytes += raw.bytes;
            batch.push(raw);
            if batch.len() >= batch_rows || bytes >= BATCH_BYTES {
                let last = batch.last().map(|r| r.position.seq).unwrap_or(after);
                self.flush(client, std::mem::take(&mut batch)).await?;
                pending.front_after_id = last;
                bytes = 0;
            }
        }
        if let Some(last) = batch.last().map(|r| r.position.seq) {
            self.flush(client, batch).await?;
            pending.front_after_id = last;
        }
        if page_rows < batch_rows {
            pending.txns.pop_front();
            pending.front_after_id = i64::MIN;
        }
        Ok(())
    }

    /// Fetches several whole small transactions in one query, in delivery order.
    async fn read_group(
        &mut self,
        client: &Client,
        statements: &Statements,
        pending: &mut Pending,
        batch_rows: usize,
        max_record: i32,
    ) -> Result<(), Stop> {
        let (mut rows, mut bytes, mut n) = (0i64, 0i64, 0usize);
        for t in pending.txns.iter() {
            if n > 0
                && (rows + t.rows > batch_rows as i64
                    || bytes + t.bytes > BATCH_BYTES
                    || n >= GROUP_TXNS)
            {
                break;
            }
            rows += t.rows;
            bytes += t.bytes;
            n += 1;
        }
        let txids = xid_array(pending.txns.iter().take(n).map(|t| t.txid));
        let fetched = client
            .query(&statements.group, &[&max_record, &txids])
            .await?;
        let batch = fetched
            .iter()
            .map(raw_change)
            .collect::<Result<Vec<_>, _>>()?;
        self.flush(client, batch).await?;
        pending.txns.drain(..n);
        Ok(())
    }

    /// Resolves tables and hands a batch to the gateway.
    async fn flush(&mut self, client: &Client, batch: Vec<RawChange>) -> Result<(), Stop> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut unknown: Vec<u32> = batch
            .iter()
            .map(|r| r.table_oid)
            .filter(|oid| !self.tables.contains_key(oid))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            unknown.dedup();
            for (oid, info) in load_table_infos(client, &unknown).await? {
                self.tables.insert(oid, Arc::new(info));
            }
        }
        let last_created = batch.last().map(|r| r.created_us).unwrap_or(0);
        let mut changes = Vec::with_capacity(batch.len());
        for raw in batch {
            let Some(table) = self.tables.get(&raw.table_oid) else {
                metrics::counter!(m::SKIPPED_TOTAL).increment(1);
                tracing::warn!(
                    table_oid = raw.table_oid,
                    "skipping change of a dropped table"
                );
                continue;
            };
            if !raw.oversized_columns.is_empty() {
                metrics::counter!(m::OVERSIZED_TOTAL).increment(1);
            }
            metrics::counter!(m::CHANGES_TOTAL, "op" => raw.op.as_str()).increment(1);
            self.read_changes += 1;
            changes.push(Change {
                position: raw.position,
                table: table.clone(),
                op: raw.op,
                commit_timestamp: raw.commit_timestamp,
                record: raw.record,
                old_record: raw.old_record,
                oversized_columns: raw.oversized_columns,
            });
        }
        if changes.is_empty() {
            return Ok(());
        }
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        metrics::gauge!(m::LAG_SECONDS).set((now_us - last_created).max(0) as f64 / 1e6);
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        self.send(IngestEvent::Changes(changes)).await
    }
}

/// Columns of a fetched change row; `$1` is `max_record_bytes`.
const ROW_COLUMNS: &str = "c.id, c.txid::text, c.table_oid, c.op,
    to_char(c.created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    (extract(epoch from c.created_at) * 1000000)::int8,
    case when octet_length(c.record::text) > $1
         then realtime_gateway.trim_record(c.record, 64)::text else c.record::text end,
    case when octet_length(c.old_record::text) > $1
         then realtime_gateway.trim_record(c.old_record, 64)::text else c.old_record::text end,
    case when octet_length(c.record::text) > $1
         then realtime_gateway.oversized_columns(c.record, 64) end,
    case when octet_length(c.old_record::text) > $1
         then realtime_gateway.oversized_columns(c.old_record, 64) end";

// Keep the SQL literal and the constant in step.
const _: () = assert!(TRIMMED_VALUE_BYTES == 64);

fn raw_change(row: &Row) -> Result<RawChange, Stop> {
    let bad = |what: &str| {
        Stop::Lost(IngestError::Protocol(format!(
            "unexpected change_log {what}"
        )))
    };
    let id: i64 = row.try_get(0)?;
    let txid: String = row.try_get(1)?;
    let txid: u64 = txid.parse().map_err(|_| bad("txid"))?;
    let op = match row.try_get::<_, i8>(3)? as u8 {
        b'I' => Op::Insert,
        b'U' => Op::Update,
        b'D' => Op::Delete,
        _ => return Err(bad("op")),
    };
    let record: Option<String> = row.try_get(6)?;
    let old_record: Option<String> = row.try_get(7)?;
    let mut oversized: Vec<String> = row
        .try_get::<_, Option<Vec<String>>>(8)?
        .unwrap_or_default();
    for column in row
        .try_get::<_, Option<Vec<String>>>(9)?
        .unwrap_or_default()
    {
        if !oversized.contains(&column) {
            oversized.push(column);
        }
    }
    let bytes = record.as_ref().map_or(0, |r| r.len()) + old_record.as_ref().map_or(0, |r| r.len());
    Ok(RawChange {
        position: ChangePosition { txid, seq: id },
        table_oid: row.try_get(2)?,
        op,
        commit_timestamp: row.try_get(4)?,
        created_us: row.try_get(5)?,
        record: record.map(Bytes::from),
        old_record: old_record.map(Bytes::from),
        oversized_columns: oversized,
        bytes: bytes as i64,
    })
}

/// The transactions of the window query's rows (columns 3..), in delivery
/// order: capture time of their last change, then txid.
fn window_txns(rows: &[Row]) -> Result<VecDeque<Txn>, Stop> {
    let mut txns = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(txid) = row.try_get::<_, Option<String>>(3)? else {
            continue;
        };
        let txid: u64 = txid
            .parse()
            .map_err(|_| Stop::Lost(IngestError::Protocol(format!("bad txid {txid}"))))?;
        let last_capture: i64 = row.try_get(5)?;
        txns.push((
            last_capture,
            Txn {
                txid,
                rows: row.try_get(4)?,
                bytes: row.try_get(6)?,
            },
        ));
    }
    txns.sort_by_key(|(last_capture, t)| (*last_capture, t.txid));
    Ok(txns.into_iter().map(|(_, t)| t).collect())
}

/// The listener's statements, prepared once per connection.
#[derive(Clone)]
struct Statements {
    window: Statement,
    large_txn: Statement,
    group: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        // $1: xip of prev, $2: xmax of prev. Finished since prev = prev's in-progress
        // transactions now visible, plus txids from prev.xmax visible in the new
        // snapshot: two index range scans, never a rescan of delivered rows.
        let window = client
            .prepare(
                "with s as materialized (
                     select pg_current_snapshot() as snap, st.pruned_below, st.pruned_at
                     from realtime_gateway.state st limit 1)
                 select s.snap::text, s.pruned_below::text,
                        to_char(s.pruned_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        w.txid::text, w.n, w.last_us, w.bytes
                 from s left join lateral (
                     select c.txid, count(*) as n,
                            (extract(epoch from max(c.created_at)) * 1000000)::int8 as last_us,
                            sum(coalesce(octet_length(c.record::text), 0)
                                + coalesce(octet_length(c.old_record::text), 0))::int8 as bytes
                     from realtime_gateway.change_log c
                     where (c.txid = any($1::text::xid8[])
                            or (c.txid >= $2::text::xid8 and c.txid < pg_snapshot_xmax(s.snap)))
                       and pg_visible_in_snapshot(c.txid, s.snap)
                     group by c.txid) w on true",
            )
            .await?;
        let large_txn = client
            .prepare(&format!(
                "select {ROW_COLUMNS} from realtime_gateway.change_log c
                 where c.txid = $2::text::xid8 and c.id > $3 order by c.id limit $4"
            ))
            .await?;
        let group = client
            .prepare(&format!(
                "select {ROW_COLUMNS}
                 from unnest($2::text::xid8[]) with ordinality as g(txid, rank)
                 join realtime_gateway.change_log c on c.txid = g.txid
                 order by g.rank, c.id"
            ))
            .await?;
        Ok(Statements {
            window,
            large_txn,
            group,
        })
    }
}

async fn current_snapshot(client: &Client) -> Result<Snapshot, Stop> {
    let row = client
        .query_one("select pg_current_snapshot()::text", &[])
        .await?;
    let text: String = row.get(0);
    Snapshot::parse(&text)
        .ok_or_else(|| Stop::Lost(IngestError::Protocol(format!("unparsable snapshot {text}"))))
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
fn backoff(failures: u32) -> Duration {
    let exp = RECONNECT_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(RECONNECT_MAX);
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = Snapshot::parse("12:20:15,12").unwrap();
        assert_eq!(s.xip, vec![12, 15]);
        assert!(s.visible(11));
        assert!(s.visible(13));
        assert!(!s.visible(12));
        assert!(!s.visible(15));
        assert!(s.visible(19));
        assert!(!s.visible(20));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.xip.is_empty());
        assert!(empty.visible(6) && !empty.visible(7));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) < Duration::from_millis(100));
        assert!(backoff(30) <= RECONNECT_MAX);
        assert!(backoff(30) >= RECONNECT_MAX / 2);
    }
}
