//! Read-only probes of the change log for status reporting (the gateway's
//! `GET /api/realtime/status`): how far behind the log a reader is.

use tokio_postgres::Client;

use crate::IngestError;

/// The next transaction id PostgreSQL will assign (`xmax` of the current
/// snapshot): changes of later transactions are newer than this moment.
pub async fn next_txid(client: &Client) -> Result<u64, IngestError> {
    let row = client
        .query_one(
            "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// Committed change-log rows of transactions after `txid`, counted up to `cap`
/// (an index range scan on `(txid, id)`, bounded by the cap). For a reader
/// whose newest delivered change came from `txid`, this estimates the rows it
/// has not read yet (from below: rows of older transactions that committed
/// late are not counted).
pub async fn rows_after(client: &Client, txid: u64, cap: i64) -> Result<i64, IngestError> {
    let row = client
        .query_one(
            "select count(*) from (select 1 from realtime_gateway.change_log \
             where txid > $1::text::xid8 limit $2) s",
            &[&txid.to_string(), &cap],
        )
        .await?;
    Ok(row.get(0))
}
