//! Reading windows: the snapshot difference, transactions in delivery order, bounded
//! batches, and turning log rows into [`Change`]s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::cursor::{parse_lsn, xid_array, Cursor, Pending, Snapshot, Txn};
use super::sql::Statements;
use super::{Ingest, Stop};
use crate::metrics as m;
use crate::render;
use crate::tables::load_table_infos;
use crate::{Change, ChangePosition, Column, IngestError, IngestEvent, Op, TableInfo};

/// A batch is flushed to the gateway once its row images reach this many bytes,
/// even below `batch_rows`.
const BATCH_BYTES: i64 = 16 * 1024 * 1024;
/// Most transactions fetched by one grouped query.
const GROUP_TXNS: usize = 1000;

/// What a read found.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ReadOutcome {
    /// Changes handed to the gateway.
    pub(super) changes: usize,
    /// The new snapshot had transactions in progress (a writer that skipped the
    /// wake-up may commit soon).
    pub(super) in_progress: bool,
}

/// A fetched row before its table is resolved.
struct RawChange {
    position: ChangePosition,
    table_oid: u32,
    op: Op,
    /// A row image is a `[key, reason]` placeholder (too large to render).
    placeholder: bool,
    record: Option<String>,
    old_record: Option<String>,
    oversized_columns: Vec<String>,
    bytes: i64,
}

fn protocol(what: String) -> Stop {
    Stop::Lost(IngestError::Protocol(what))
}

impl Ingest {
    /// Delivers everything committed since the last read.
    pub(super) async fn read(
        &mut self,
        client: &Client,
        reason: &'static str,
    ) -> Result<ReadOutcome, Stop> {
        metrics::counter!(m::READS_TOTAL, "reason" => reason).increment(1);
        self.read_changes = 0;
        let Some(mut cursor) = self.cursor.take() else {
            return Ok(ReadOutcome::default());
        };
        let started = std::time::Instant::now();
        let result = self.read_window(client, &mut cursor).await;
        let in_progress = !cursor.prev.xip.is_empty();
        self.cursor = Some(cursor);
        result?;
        tracing::trace!(
            reason,
            changes = self.read_changes,
            in_progress,
            elapsed_us = started.elapsed().as_micros() as u64,
            "read"
        );
        self.emit_dropped().await?;
        Ok(ReadOutcome {
            changes: self.read_changes,
            in_progress,
        })
    }

    async fn read_window(&mut self, client: &Client, cursor: &mut Cursor) -> Result<(), Stop> {
        let (Some(statements), Some(server)) = (self.statements.clone(), self.server.clone())
        else {
            return Err(protocol("statements not prepared".into()));
        };
        let prev_xip = xid_array(cursor.prev.xip.iter().copied());
        let prev_xmax = cursor.prev.xmax.to_string();
        let track = server.track_commit_timestamp;
        let rows = if cursor.recovering && cursor.pending.is_none() {
            client
                .query(
                    &statements.recovery_window,
                    &[
                        &prev_xip,
                        &prev_xmax,
                        &track,
                        &cursor.origin.boot,
                        &cursor.read_at,
                    ],
                )
                .await?
        } else {
            client
                .query(&statements.window, &[&prev_xip, &prev_xmax, &track])
                .await?
        };
        let Some(first) = rows.first() else {
            return Err(protocol("realtime_gateway.state is empty".into()));
        };
        let snapshot_text: String = first.try_get(0)?;
        let pruned_below: String = first.try_get(1)?;
        let pruned_at: Option<String> = first.try_get(2)?;
        let insert_lsn: String = first.try_get(3)?;
        let flush_lsn: String = first.try_get(4)?;
        let read_at: SystemTime = first.try_get(5)?;
        let bad_lsn = || protocol(format!("unparsable LSN {insert_lsn} / {flush_lsn}"));
        let insert_lsn = parse_lsn(&insert_lsn).ok_or_else(bad_lsn)?;
        let flush_lsn = parse_lsn(&flush_lsn).ok_or_else(bad_lsn)?;
        cursor.unconfirmed.flushed(flush_lsn);
        let new = Snapshot::parse(&snapshot_text)
            .ok_or_else(|| protocol(format!("unparsable snapshot {snapshot_text}")))?;

        // Gap check: rows below pruned_below may be gone; we needed everything not
        // visible in the snapshots read since `verified_from`. After a gap, skip
        // ahead: subscribers refetch anyway, replaying the backlog would only delay them.
        let pruned_below: u64 = pruned_below.parse().unwrap_or(0);
        if pruned_below > cursor.verified_from {
            let message = format!(
                "changes of transactions {}..{} were deleted by retention (pruned at {}) \
                 before this gateway read them; they cannot be delivered",
                cursor.verified_from,
                pruned_below,
                pruned_at.as_deref().unwrap_or("unknown")
            );
            self.gap(message).await?;
            cursor.skip_to(new, read_at, &server.origin);
            return Ok(());
        }
        cursor.verified_from = cursor.prev.xmin;

        if cursor.pending.is_none() {
            cursor.pending = Some(Pending {
                new,
                insert_lsn,
                txns: window_txns(&rows)?,
                front_after_id: i64::MIN,
            });
            cursor.read_at = read_at;
            if cursor.recovering {
                // The pending window now holds everything the old server left.
                cursor.recovering = false;
                cursor.origin = server.origin.clone();
            }
        }
        let batch_rows = self.config.batch_rows.max(1);
        let max_record = i32::try_from(self.config.max_record_bytes).unwrap_or(i32::MAX);
        while let Some(pending) = cursor.pending.as_mut() {
            let Some(front) = pending.txns.front().cloned() else {
                if let Some(done) = cursor.pending.take() {
                    cursor.prev = done.new;
                }
                break;
            };
            if pending.front_after_id > i64::MIN
                || front.rows > batch_rows as i64
                || front.bytes > BATCH_BYTES
            {
                self.read_large_txn(client, &statements, cursor, front, batch_rows, max_record)
                    .await?;
            } else {
                self.read_group(client, &statements, cursor, batch_rows, max_record)
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
        cursor: &mut Cursor,
        front: Txn,
        batch_rows: usize,
        max_record: i32,
    ) -> Result<(), Stop> {
        let Some(pending) = cursor.pending.as_mut() else {
            return Ok(());
        };
        let txid = front.txid.to_string();
        let limit = batch_rows as i64;
        let after = pending.front_after_id;
        let params: [&(dyn ToSql + Sync); 6] = [
            &max_record,
            &txid,
            &after,
            &limit,
            &front.boot,
            &front.slots,
        ];
        let stream = client.query_raw(&statements.large_txn, params).await?;
        pin_mut!(stream);
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut page_rows = 0usize;
        let mut last = after;
        while let Some(row) = stream.try_next().await? {
            let raw = raw_change(&row)?;
            page_rows += 1;
            bytes += raw.bytes;
            last = raw.position.seq;
            batch.push((raw, Arc::clone(&front.commit_timestamp)));
            if batch.len() >= batch_rows || bytes >= BATCH_BYTES {
                self.flush(client, std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        self.flush(client, batch).await?;
        let Some(pending) = cursor.pending.as_mut() else {
            return Ok(());
        };
        if page_rows > 0 {
            cursor
                .unconfirmed
                .delivered(pending.insert_lsn, front.txid, front.boot);
        }
        pending.front_after_id = last;
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
        cursor: &mut Cursor,
        batch_rows: usize,
        max_record: i32,
    ) -> Result<(), Stop> {
        let Some(pending) = cursor.pending.as_mut() else {
            return Ok(());
        };
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
        // Taken out of the window only once delivered: a lost connection retries them.
        let group: Vec<Txn> = pending.txns.iter().take(n).cloned().collect();
        let txids = xid_array(group.iter().map(|t| t.txid));
        let boots: Vec<SystemTime> = group.iter().map(|t| t.boot).collect();
        let mut slots: Vec<i16> = group.iter().flat_map(|t| t.slots.iter().copied()).collect();
        slots.sort_unstable();
        slots.dedup();
        let fetched = client
            .query(&statements.group, &[&max_record, &txids, &boots, &slots])
            .await?;
        let mut batch = Vec::with_capacity(fetched.len());
        let mut txn = group.iter().peekable();
        for row in &fetched {
            let raw = raw_change(row)?;
            // Rows come in group order: advance to the row's transaction.
            while txn.peek().is_some_and(|t| t.txid != raw.position.txid) {
                txn.next();
            }
            let Some(t) = txn.peek() else {
                return Err(protocol("grouped rows out of order".into()));
            };
            batch.push((raw, Arc::clone(&t.commit_timestamp)));
        }
        self.flush(client, batch).await?;
        let Some(pending) = cursor.pending.as_mut() else {
            return Ok(());
        };
        pending.txns.drain(..n);
        let insert_lsn = pending.insert_lsn;
        for t in &group {
            cursor.unconfirmed.delivered(insert_lsn, t.txid, t.boot);
        }
        Ok(())
    }

    /// Resolves tables and row images, and hands a batch to the gateway.
    async fn flush(
        &mut self,
        client: &Client,
        batch: Vec<(RawChange, Arc<str>)>,
    ) -> Result<(), Stop> {
        if batch.is_empty() {
            return Ok(());
        }
        self.load_unknown_tables(client, batch.iter().map(|(r, _)| r.table_oid))
            .await?;
        let mut changes = Vec::with_capacity(batch.len());
        for (raw, commit_timestamp) in batch {
            let Some(current) = self.tables.get(&raw.table_oid).cloned() else {
                metrics::counter!(m::SKIPPED_TOTAL).increment(1);
                tracing::warn!(
                    table_oid = raw.table_oid,
                    "skipping change of a table dropped before it was ever read"
                );
                continue;
            };
            if raw.op == Op::Truncate {
                // TRUNCATE of a partitioned table fires on every partition.
                let key = (raw.position.txid, raw.table_oid);
                if self.last_truncate == Some(key) {
                    continue;
                }
                self.last_truncate = Some(key);
            }
            let change = self.resolve(client, raw, current, commit_timestamp).await?;
            if !change.oversized_columns.is_empty() {
                metrics::counter!(m::OVERSIZED_TOTAL).increment(1);
            }
            metrics::counter!(m::CHANGES_TOTAL, "op" => change.op.as_str()).increment(1);
            self.read_changes += 1;
            changes.push(change);
        }
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(at) = changes.last().and_then(|c| time_of(&c.commit_timestamp)) {
            if let Ok(lag) = SystemTime::now().duration_since(at) {
                metrics::gauge!(m::LAG_SECONDS).set(lag.as_secs_f64());
            }
        }
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        self.send(IngestEvent::Changes(changes)).await
    }

    /// Loads the descriptions of tables not seen yet.
    async fn load_unknown_tables(
        &mut self,
        client: &Client,
        oids: impl Iterator<Item = u32>,
    ) -> Result<(), Stop> {
        let mut unknown: Vec<u32> = oids.filter(|oid| !self.tables.contains_key(oid)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        for (oid, info) in load_table_infos(client, &unknown).await? {
            self.tables.insert(oid, Arc::new(info));
        }
        Ok(())
    }

    /// Builds the change: the table description matching its row image (columns may
    /// have been added, dropped or renamed since), placeholders of oversized rows, and
    /// `bytea` rendered like upstream.
    async fn resolve(
        &mut self,
        client: &Client,
        raw: RawChange,
        current: Arc<TableInfo>,
        commit_timestamp: Arc<str>,
    ) -> Result<Change, Stop> {
        let mut oversized = raw.oversized_columns;
        let mut record = raw.record.map(String::into_bytes);
        let mut old_record = raw.old_record.map(String::into_bytes);
        if raw.placeholder {
            for image in [&mut record, &mut old_record].into_iter().flatten() {
                if let Some((key, _reason)) = render::placeholder(image) {
                    *image = key;
                }
            }
        }
        // The image whose keys name the columns (DELETE: the old row).
        let shape = record.as_deref().or(old_record.as_deref());
        let table = match shape {
            Some(image) if !raw.placeholder => {
                self.table_for(client, current, image, &oversized).await?
            }
            _ => current,
        };
        if raw.placeholder {
            let keys: Vec<String> = [&record, &old_record]
                .into_iter()
                .flatten()
                .flat_map(|image| render::keys(image))
                .collect();
            for column in &table.columns {
                if !keys.contains(&column.name) && !oversized.contains(&column.name) {
                    oversized.push(column.name.clone());
                }
            }
        }
        if table.columns.iter().any(|c| c.type_name == "bytea") {
            let is_bytea = |key: &[u8]| {
                table
                    .columns
                    .iter()
                    .any(|c| c.type_name == "bytea" && render::key_is(key, &c.name))
            };
            for image in [&mut record, &mut old_record].into_iter().flatten() {
                if let Some(stripped) = render::strip_bytea_prefix(image, is_bytea) {
                    *image = stripped;
                }
            }
        }
        Ok(Change {
            position: raw.position,
            table,
            op: raw.op,
            commit_timestamp,
            record: record.map(Bytes::from),
            old_record: old_record.map(Bytes::from),
            oversized_columns: oversized,
        })
    }

    /// The description of `current`'s table whose columns are `image`'s keys (besides
    /// the `trimmed` ones, left out of an oversized image): the current one, a reloaded
    /// one (the table changed since it was loaded), an earlier one, or one made from
    /// the keys (types from any version that had the column).
    async fn table_for(
        &mut self,
        client: &Client,
        current: Arc<TableInfo>,
        image: &[u8],
        trimmed: &[String],
    ) -> Result<Arc<TableInfo>, Stop> {
        let matches = |t: &TableInfo| {
            let names = t
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .filter(|name| !trimmed.iter().any(|x| x == name));
            render::keys_are(image, names)
        };
        if matches(&current) {
            return Ok(current);
        }
        let oid = current.oid;
        if let Some(v) = self
            .versions
            .get(&oid)
            .and_then(|versions| versions.iter().find(|v| matches(v)))
        {
            return Ok(Arc::clone(v));
        }
        if let Some(fresh) = load_table_infos(client, &[oid]).await?.remove(&oid) {
            if fresh != *current {
                let fresh = Arc::new(fresh);
                self.remember_version(&current);
                self.tables.insert(oid, Arc::clone(&fresh));
                self.tables_dirty = true;
                if matches(&fresh) {
                    return Ok(fresh);
                }
            }
        }
        let known = self.tables.get(&oid).cloned().unwrap_or(current);
        let type_of = |name: &str| {
            std::iter::once(&known)
                .chain(self.versions.get(&oid).into_iter().flatten())
                .flat_map(|t| t.columns.iter())
                .find(|c| c.name == name)
                .map_or_else(|| "unknown".to_owned(), |c| c.type_name.clone())
        };
        let mut names = render::keys(image);
        names.extend(trimmed.iter().cloned());
        let columns: Vec<Column> = names
            .into_iter()
            .map(|name| Column {
                type_name: type_of(&name),
                name,
            })
            .collect();
        let made = Arc::new(TableInfo {
            columns,
            ..(*known).clone()
        });
        self.remember_version(&made);
        Ok(made)
    }

    /// Keeps a few earlier shapes of a table for changes captured before a schema change.
    fn remember_version(&mut self, info: &Arc<TableInfo>) {
        const KEEP: usize = 4;
        let versions = self.versions.entry(info.oid).or_default();
        if versions.iter().any(|v| v.columns == info.columns) {
            return;
        }
        if versions.len() >= KEEP {
            versions.remove(0);
        }
        versions.push(Arc::clone(info));
    }
}

fn raw_change(row: &Row) -> Result<RawChange, Stop> {
    let id: i64 = row.try_get(0)?;
    let txid: String = row.try_get(1)?;
    let txid: u64 = txid
        .parse()
        .map_err(|_| protocol(format!("unexpected change_log txid {txid}")))?;
    let code = row.try_get::<_, i8>(3)? as u8;
    let op = match code {
        b'I' => Op::Insert,
        b'U' => Op::Update,
        b'D' => Op::Delete,
        b'T' => Op::Truncate,
        _ => return Err(protocol(format!("unexpected change_log op {code}"))),
    };
    let record: Option<String> = row.try_get(4)?;
    let old_record: Option<String> = row.try_get(5)?;
    let mut oversized: Vec<String> = row
        .try_get::<_, Option<Vec<String>>>(6)?
        .unwrap_or_default();
    for column in row
        .try_get::<_, Option<Vec<String>>>(7)?
        .unwrap_or_default()
    {
        if !oversized.contains(&column) {
            oversized.push(column);
        }
    }
    let bytes = record.as_ref().map_or(0, |r| r.len()) + old_record.as_ref().map_or(0, |r| r.len());
    let placeholder = [&record, &old_record]
        .into_iter()
        .flatten()
        .any(|image| image.starts_with('['));
    Ok(RawChange {
        position: ChangePosition { txid, seq: id },
        table_oid: row.try_get(2)?,
        op,
        placeholder,
        record,
        old_record,
        oversized_columns: oversized,
        bytes: bytes as i64,
    })
}

/// The transactions of the window query's rows (columns 6..), in delivery order:
/// capture time of their last change, then txid.
fn window_txns(rows: &[Row]) -> Result<VecDeque<Txn>, Stop> {
    let mut txns = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(txid) = row.try_get::<_, Option<String>>(6)? else {
            continue;
        };
        let txid: u64 = txid
            .parse()
            .map_err(|_| protocol(format!("bad txid {txid}")))?;
        let last_capture: i64 = row.try_get(9)?;
        let commit_timestamp: String = row.try_get(11)?;
        txns.push((
            last_capture,
            Txn {
                txid,
                boot: row.try_get(7)?,
                rows: row.try_get(8)?,
                bytes: row.try_get(10)?,
                commit_timestamp: commit_timestamp.into(),
                slots: row.try_get(12)?,
            },
        ));
    }
    txns.sort_by_key(|(last_capture, t)| (*last_capture, t.txid));
    Ok(txns.into_iter().map(|(_, t)| t).collect())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` as a time (for the lag gauge).
fn time_of(ts: &str) -> Option<SystemTime> {
    let b = ts.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms_total = ((days * 86_400 + h * 3600 + mi * 60 + s) * 1000) + ms;
    u64::try_from(ms_total)
        .ok()
        .map(|ms| UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_timestamps_parse() {
        let t = time_of("2026-11-22T10:20:30.456Z").unwrap();
        let ms = t.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms, 1_795_342_830_456);
        assert!(time_of("2026-11-22 10:20:30").is_none());
    }
}
