//! What the listener learns about the server on every (re)connect, and what changed
//! since the cursor was built: nothing, a restart (crash or clean), a failover (new
//! timeline), or another cluster altogether.

use std::time::SystemTime;

use tokio_postgres::Client;

use super::cursor::Origin;
use super::Stop;
use crate::IngestError;

/// Facts about the server, read once per connection.
#[derive(Clone, Debug)]
pub(super) struct ServerInfo {
    pub(super) origin: Origin,
    /// `track_commit_timestamp = on`: commit times come from `pg_xact_commit_timestamp`.
    pub(super) track_commit_timestamp: bool,
    /// `max_prepared_transactions > 0`: PREPARE TRANSACTION is possible, so the
    /// triggers never NOTIFY (a transaction that did cannot be prepared) and the
    /// listener polls.
    pub(super) two_phase: bool,
}

/// How the server relates to the one the cursor was built on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Transition {
    /// Same postmaster: only the connection was lost.
    Same,
    /// The server restarted (after a crash or not): transaction ids above the last
    /// flushed one may be handed out again.
    Restarted,
    /// A standby was promoted or a backup restored (new timeline): it may lack any
    /// change delivered from the old one.
    FailedOver { from: u32, to: u32 },
    /// A different cluster (`system_identifier` differs): the old position means nothing.
    OtherCluster,
}

impl ServerInfo {
    pub(super) async fn read(client: &Client) -> Result<ServerInfo, Stop> {
        let row = client
            .query_one(
                "select pg_postmaster_start_time(), pg_walfile_name(pg_current_wal_lsn()),
                        current_setting('track_commit_timestamp') = 'on',
                        current_setting('max_prepared_transactions')::int > 0",
                &[],
            )
            .await?;
        let boot: SystemTime = row.try_get(0)?;
        let walfile: String = row.try_get(1)?;
        let timeline = walfile
            .get(..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .ok_or_else(|| {
                Stop::Lost(IngestError::Protocol(format!(
                    "unexpected WAL file name {walfile}"
                )))
            })?;
        // Restricted on some managed services: then only boot and timeline are compared.
        let system_id = match client
            .query_one("select system_identifier from pg_control_system()", &[])
            .await
        {
            Ok(row) => row.try_get(0).ok(),
            Err(e) if e.as_db_error().is_some() => None,
            Err(e) => return Err(e.into()),
        };
        Ok(ServerInfo {
            origin: Origin {
                boot,
                timeline,
                system_id,
            },
            track_commit_timestamp: row.try_get(2)?,
            two_phase: row.try_get(3)?,
        })
    }
}

/// What changed between `was` (the cursor's server) and `now`.
pub(super) fn transition(was: &Origin, now: &Origin) -> Transition {
    if let (Some(a), Some(b)) = (was.system_id, now.system_id) {
        if a != b {
            return Transition::OtherCluster;
        }
    }
    if was.timeline != now.timeline {
        return Transition::FailedOver {
            from: was.timeline,
            to: now.timeline,
        };
    }
    if was.boot != now.boot {
        return Transition::Restarted;
    }
    Transition::Same
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn transitions() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let o = |boot, timeline, system_id| Origin {
            boot,
            timeline,
            system_id,
        };
        let base = o(t0, 1, Some(7));
        assert_eq!(transition(&base, &base), Transition::Same);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            transition(&base, &o(later, 1, Some(7))),
            Transition::Restarted
        );
        assert_eq!(
            transition(&base, &o(later, 2, Some(7))),
            Transition::FailedOver { from: 1, to: 2 }
        );
        assert_eq!(
            transition(&base, &o(later, 2, Some(8))),
            Transition::OtherCluster
        );
        // Unknown system identifiers are not evidence of another cluster.
        assert_eq!(transition(&base, &o(t0, 1, None)), Transition::Same);
    }
}
