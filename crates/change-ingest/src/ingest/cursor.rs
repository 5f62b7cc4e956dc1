//! The read position: snapshots, the window being delivered, and the delivered
//! transactions whose commits may not be durable yet.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

/// A `pg_snapshot`, parsed so visibility is decided without a round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub(super) xmin: u64,
    pub(super) xmax: u64,
    /// In-progress txids, sorted.
    pub(super) xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip1,xip2,...`.
    pub(super) fn parse(text: &str) -> Option<Snapshot> {
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
    pub(super) fn visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }
}

/// A `{1,2,3}` literal for `$n::text::xid8[]`.
pub(super) fn xid_array(txids: impl Iterator<Item = u64>) -> String {
    let list: Vec<String> = txids.map(|t| t.to_string()).collect();
    format!("{{{}}}", list.join(","))
}

/// One transaction of the window being read.
#[derive(Clone, Debug)]
pub(super) struct Txn {
    pub(super) txid: u64,
    /// `pg_postmaster_start_time()` of the server that ran it: with `txid`, unique
    /// even when transaction ids are handed out again after a crash or failover.
    pub(super) boot: SystemTime,
    pub(super) rows: i64,
    pub(super) bytes: i64,
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, one per transaction.
    pub(super) commit_timestamp: Arc<str>,
    /// Change-log slots (partitions) holding its rows: fetches read only those.
    pub(super) slots: Vec<i16>,
}

/// A window (`S_prev`, `S_new`] being delivered.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) new: Snapshot,
    /// `pg_current_wal_insert_lsn()` when `new` was taken: every commit visible in
    /// `new` is durable once the WAL is flushed up to here.
    pub(super) insert_lsn: u64,
    /// Transactions left, in delivery order.
    pub(super) txns: VecDeque<Txn>,
    /// Rows of the front transaction with id up to this were delivered.
    pub(super) front_after_id: i64,
}

/// Where the reader stands in the history of the server (see `identity.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Origin {
    /// `pg_postmaster_start_time()` of the server `prev` was taken on.
    pub(super) boot: SystemTime,
    /// Its timeline.
    pub(super) timeline: u32,
    /// Its `system_identifier`, if readable.
    pub(super) system_id: Option<i64>,
}

/// The read position. Lives as long as the task, across reconnects.
#[derive(Debug)]
pub(super) struct Cursor {
    /// Everything visible in this snapshot has been delivered (`S_prev`).
    pub(super) prev: Snapshot,
    /// The server `prev` belongs to.
    pub(super) origin: Origin,
    /// Server clock when `prev` (or the window being delivered) was read: rows of
    /// another boot captured at or after this are new after a restart or failover.
    pub(super) read_at: SystemTime,
    /// The server restarted or failed over since `prev`: the next read also takes the
    /// old boot's transactions not visible in `prev` and every later row of another boot.
    pub(super) recovering: bool,
    /// The window being delivered, if a read was interrupted or is in progress.
    pub(super) pending: Option<Pending>,
    /// xmin of the oldest snapshot whose window has not been checked against
    /// `state.pruned_below` yet.
    pub(super) verified_from: u64,
    /// Delivered transactions not known to be durable yet.
    pub(super) unconfirmed: Unconfirmed,
}

impl Cursor {
    /// A cursor that starts at `snap`: everything visible in it counts as delivered.
    pub(super) fn at(snap: Snapshot, read_at: SystemTime, origin: Origin) -> Cursor {
        Cursor {
            verified_from: snap.xmin,
            prev: snap,
            origin,
            read_at,
            recovering: false,
            pending: None,
            unconfirmed: Unconfirmed::default(),
        }
    }

    /// Moves to `snap`, dropping whatever was left to deliver (after a gap).
    pub(super) fn skip_to(&mut self, snap: Snapshot, read_at: SystemTime, origin: &Origin) {
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        *self = Cursor::at(snap, read_at, origin.clone());
        self.unconfirmed = unconfirmed;
    }
}

/// Delivered transactions whose commit records may not be flushed yet (asynchronous
/// commit): after a crash, those that vanished were delivered but forgotten by the
/// database, and subscribers must be told.
#[derive(Debug, Default)]
pub(super) struct Unconfirmed {
    /// (insert LSN of the window's snapshot, transactions delivered from it).
    windows: VecDeque<(u64, Vec<(u64, SystemTime)>)>,
    len: usize,
    /// More were delivered than are tracked: after a crash, assume some were lost.
    pub(super) overflowed: bool,
}

/// Most unconfirmed transactions tracked (normally a few windows' worth).
const UNCONFIRMED_MAX: usize = 100_000;

impl Unconfirmed {
    /// Records a transaction delivered from the window whose snapshot had `insert_lsn`.
    pub(super) fn delivered(&mut self, insert_lsn: u64, txid: u64, boot: SystemTime) {
        if self.len >= UNCONFIRMED_MAX {
            self.overflowed = true;
            return;
        }
        match self.windows.back_mut() {
            Some((lsn, txns)) if *lsn == insert_lsn => {
                if txns.last().map(|t| t.0) != Some(txid) {
                    txns.push((txid, boot));
                    self.len += 1;
                }
            }
            _ => {
                self.windows.push_back((insert_lsn, vec![(txid, boot)]));
                self.len += 1;
            }
        }
    }

    /// Forgets windows whose commits are durable (WAL flushed past their snapshot).
    pub(super) fn flushed(&mut self, flush_lsn: u64) {
        while let Some((lsn, txns)) = self.windows.front() {
            if *lsn > flush_lsn {
                break;
            }
            self.len -= txns.len();
            self.windows.pop_front();
        }
        if self.windows.is_empty() {
            self.overflowed = false;
        }
    }

    /// Takes everything tracked (after a restart: to check what survived).
    pub(super) fn take(&mut self) -> (Vec<(u64, SystemTime)>, bool) {
        let all = self.windows.drain(..).flat_map(|(_, t)| t).collect();
        let overflowed = std::mem::take(&mut self.overflowed);
        self.len = 0;
        (all, overflowed)
    }
}

/// Parses a `pg_lsn` text (`16/B374D848`).
pub(super) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
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
    fn lsn() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn unconfirmed_until_flushed() {
        let boot = SystemTime::UNIX_EPOCH;
        let mut u = Unconfirmed::default();
        u.delivered(10, 1, boot);
        u.delivered(10, 1, boot); // several batches of one transaction
        u.delivered(10, 2, boot);
        u.delivered(20, 3, boot);
        u.flushed(15);
        let (left, overflowed) = u.take();
        assert_eq!(left, vec![(3, boot)]);
        assert!(!overflowed);
    }
}
