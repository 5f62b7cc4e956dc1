//! The listener's statements, prepared once per connection.

use tokio_postgres::{Client, Statement};

/// Values kept in a trimmed (oversized) row image are at most this long (JSON bytes).
pub(super) const TRIMMED_VALUE_BYTES: i32 = 64;

/// Columns of a fetched change row; `$1` is `max_record_bytes`.
const ROW_COLUMNS: &str = "c.id, c.txid::text, c.table_oid, c.op,
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

/// The window query: one round trip returns the new snapshot, the retention state, the
/// WAL insert and flush positions, the server clock, and per transaction that finished
/// since the previous snapshot (matched by `{FILTER}`): txid, boot, row count, capture
/// time of its last change, bytes, commit timestamp, and the slots holding its rows.
/// `$3`: `track_commit_timestamp`.
const WINDOW: &str = "with s as materialized (
         select pg_current_snapshot() as snap, st.pruned_below, st.pruned_at,
                pg_current_wal_insert_lsn() as ins, pg_current_wal_flush_lsn() as fl,
                clock_timestamp() as now
         from realtime_gateway.state st limit 1)
     select s.snap::text, s.pruned_below::text,
            to_char(s.pruned_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
            s.ins::text, s.fl::text, s.now,
            w.txid::text, w.boot, w.n, w.last_us, w.bytes,
            to_char(coalesce(case when $3 then pg_xact_commit_timestamp(w.txid::xid) end, w.last_at)
                    at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
            w.slots
     from s left join lateral (
         select c.txid, c.boot, count(*) as n, max(c.created_at) as last_at,
                (extract(epoch from max(c.created_at)) * 1000000)::int8 as last_us,
                sum(coalesce(octet_length(c.record::text), 0)
                    + coalesce(octet_length(c.old_record::text), 0))::int8 as bytes,
                array_agg(distinct c.slot) as slots
         from realtime_gateway.change_log c
         where {FILTER} and pg_visible_in_snapshot(c.txid, s.snap)
         group by c.txid, c.boot) w on true";

/// Finished since `prev` ($1: its xip, $2: its xmax): prev's in-progress transactions now
/// visible, plus txids from prev's xmax visible in the new snapshot. Two index range scans
/// per slot, never a rescan of delivered rows.
const NORMAL_FILTER: &str = "(c.txid = any($1::text::xid8[])
    or (c.txid >= $2::text::xid8 and c.txid < pg_snapshot_xmax(s.snap)))";

/// After a restart or failover: the old boot's ($4) transactions not visible in `prev`,
/// plus every row of another boot captured at or after the last read ($5). Transaction
/// ids handed out again cannot be mistaken for delivered ones: their boot differs.
const RECOVERY_FILTER: &str =
    "((c.boot = $4 and (c.txid = any($1::text::xid8[]) or c.txid >= $2::text::xid8))
    or (c.boot <> $4 and c.created_at >= $5))";

/// Session settings of the listener. Its statements are prepared once and run for
/// hours while the log grows from empty, often before autovacuum ever analyzed a
/// partition: a generic plan made early (a hash join over sequential scans of tiny
/// partitions) would scan the whole log on every read later. Index scans and nested
/// loops are right at every size for these point and range lookups. JIT compiles
/// for hundreds of ms when estimates are off: never worth it here.
pub(super) const SESSION: &str = "set jit = off; set enable_seqscan = off;
    set enable_hashjoin = off; set enable_mergejoin = off";

#[derive(Clone, Debug)]
pub(super) struct Statements {
    pub(super) window: Statement,
    pub(super) recovery_window: Statement,
    /// `$1` max_record, `$2` txid, `$3` after id, `$4` limit, `$5` boot, `$6` slots.
    pub(super) large_txn: Statement,
    /// `$1` max_record, `$2` txids, `$3` boots (parallel arrays, delivery order), `$4` slots.
    pub(super) group: Statement,
    /// `$1` txids, `$2` boots: those whose rows still exist.
    pub(super) survivors: Statement,
    /// Takes the idle lock (the wake-up gate); true if taken.
    pub(super) go_idle: Statement,
    pub(super) stop_idle: Statement,
}

impl Statements {
    pub(super) async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        let window = client
            .prepare(&WINDOW.replace("{FILTER}", NORMAL_FILTER))
            .await?;
        let recovery_window = client
            .prepare(&WINDOW.replace("{FILTER}", RECOVERY_FILTER))
            .await?;
        let large_txn = client
            .prepare(&format!(
                "select {ROW_COLUMNS} from realtime_gateway.change_log c
                 where c.txid = $2::text::xid8 and c.boot = $5 and c.id > $3 and c.slot = any($6)
                 order by c.id limit $4"
            ))
            .await?;
        let group = client
            .prepare(&format!(
                "select {ROW_COLUMNS}
                 from unnest($2::text::xid8[], $3::timestamptz[]) with ordinality as g(txid, boot, rank)
                 cross join lateral (
                     select * from realtime_gateway.change_log l
                     where l.txid = g.txid and l.boot = g.boot and l.slot = any($4)
                     order by l.id) c
                 order by g.rank, c.id"
            ))
            .await?;
        let survivors = client
            .prepare(
                "select g.txid::text
                 from unnest($1::text::xid8[], $2::timestamptz[]) as g(txid, boot)
                 where exists (select 1 from realtime_gateway.change_log c
                               where c.txid = g.txid and c.boot = g.boot)",
            )
            .await?;
        let go_idle = client
            .prepare("select pg_try_advisory_lock(1380406359, 1)")
            .await?;
        let stop_idle = client
            .prepare("select pg_advisory_unlock(1380406359, 1)")
            .await?;
        Ok(Statements {
            window,
            recovery_window,
            large_txn,
            group,
            survivors,
            go_idle,
            stop_idle,
        })
    }
}
