//! The change type this crate hands to the gateway.

use std::sync::Arc;

use bytes::Bytes;

/// INSERT, UPDATE, DELETE or TRUNCATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// The table was truncated (no row images). supabase-js has no event for it:
    /// the gateway tells the table's subscribers with a `system` message.
    Truncate,
}

impl Op {
    /// The wire name: `INSERT`, `UPDATE`, `DELETE` or `TRUNCATE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
    }
}

/// One column of an enabled table, in `attnum` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `pg_type.typname` (`int4`, `text`, `_int4`, `jsonb`, ...).
    pub type_name: String,
}

/// What the gateway needs to know about an enabled table. Shared by all its changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Table oid.
    pub oid: u32,
    /// Schema name (unquoted).
    pub schema: String,
    /// Table name (unquoted).
    pub table: String,
    /// Columns in attnum order.
    pub columns: Vec<Column>,
    /// Primary-key column names.
    pub primary_key: Vec<String>,
    /// Whether row level security is enabled (DELETE then carries only the PK in `old_record`).
    pub rls_enabled: bool,
}

/// One committed row change, in commit order.
///
/// Row images are raw JSON text (`row_to_json`), so a change nobody subscribed
/// to is never parsed: the gateway decodes it only when a binding matches the table.
#[derive(Clone, Debug)]
pub struct Change {
    /// Position in the change log: unique per change. The ingest task already
    /// delivers each change exactly once (across reconnects too), so the gateway
    /// need not deduplicate. Within one transaction `seq` increases in delivery
    /// order; across transactions delivery follows commit order, which txids do
    /// not, so positions are not monotonic across transactions.
    pub position: ChangePosition,
    /// The table, shared by every change of that table. Its columns are the ones of
    /// this change's row image: after ADD/DROP/RENAME COLUMN, changes captured before
    /// and after carry different `TableInfo`s (same oid).
    pub table: Arc<TableInfo>,
    /// INSERT, UPDATE or DELETE.
    pub op: Op,
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC; the same for every change of a transaction
    /// (its commit time with `track_commit_timestamp = on`, else the capture time of
    /// its last change).
    pub commit_timestamp: Arc<str>,
    /// New row as a JSON object (INSERT, UPDATE); `None` if it was left out (see `oversized`).
    pub record: Option<Bytes>,
    /// Old row as a JSON object (UPDATE, DELETE).
    pub old_record: Option<Bytes>,
    /// Columns whose values were left out because the row exceeded `max_record_bytes`
    /// (or, for a row too large to render at all, every column but the primary key).
    /// Non-empty means the event must carry `errors: ["Error 413: Payload Too Large"]`.
    pub oversized_columns: Vec<String>,
}

/// Where a change sits in the log: the writer's transaction id and the row's sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangePosition {
    /// `pg_current_xact_id()` of the writing transaction (xid8, epoch-aware).
    pub txid: u64,
    /// Log row id (orders rows within a transaction).
    pub seq: i64,
}

/// What the ingest task reports, in order.
#[derive(Clone, Debug)]
pub enum IngestEvent {
    /// Committed changes, in commit order. Batches are bounded by `IngestConfig::batch_rows`.
    Changes(Vec<Change>),
    /// The listener is connected and caught up: bindings on enabled tables are live.
    Live,
    /// The listener lost its connection; it reconnects with backoff and catches up.
    Disconnected,
    /// Changes were pruned before this replica read them: subscribers must be told.
    Gap {
        /// Human-readable description naming the gap (txid range and time).
        message: String,
    },
    /// The set of enabled tables changed (enable/disable, publication sync), or one of
    /// them changed (columns, name: routing is by `oid`).
    TablesChanged(Vec<Arc<TableInfo>>),
    /// An enabled table was dropped; every change it had was delivered before this.
    TableDropped(Arc<TableInfo>),
}
