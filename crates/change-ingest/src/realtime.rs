//! Supabase Realtime's `realtime.messages`: private-channel authorization
//! (policy probes under the user's claims), Broadcast from the database
//! (captured rows → [`DbMessage`]), replay, and daily partitions.
//!
//! # Authorization (as upstream `Realtime.Tenants.Authorization`)
//! - **Read** (at join, and on every token refresh): in a transaction that is
//!   always rolled back, insert one probe row per extension (`broadcast`, and
//!   `presence` when presence is enabled) for the topic as the gateway's own
//!   user, switch to the user's role and claims ([`set_run_as`]), and select
//!   the probes back: a probe the user's SELECT policies let through means "may
//!   read" that extension.
//! - **Write** (lazily, at the first broadcast or track): same settings, insert
//!   a row under a savepoint; `insufficient_privilege` (the INSERT policy's
//!   `WITH CHECK` failed) means "may not write"; rolled back either way.
//!
//! [`set_run_as`] uses the one "act as these claims" helper (shared contract
//! 2, [`crate::authz::claims::SET_CLAIMS_SQL`]) and adds `realtime.topic`, all
//! transaction-local, exactly as Supabase sets them.

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, GenericClient};

use crate::authz::claims::{AsClaims, SET_CLAIMS_SQL};
use crate::{Change, IngestError, Op};

/// Applies `claims` (the shared [`SET_CLAIMS_SQL`]) and the topic
/// (`realtime.topic`, what `realtime.topic()` returns) to the current
/// transaction, as Supabase does before evaluating policies.
pub async fn set_run_as<C: GenericClient>(
    client: &C,
    claims: AsClaims<'_>,
    topic: &str,
) -> Result<(), IngestError> {
    client.execute(SET_CLAIMS_SQL, &claims.params()).await?;
    client
        .execute(
            "select pg_catalog.set_config('realtime.topic', $1::pg_catalog.text, true)",
            &[&topic],
        )
        .await?;
    Ok(())
}

/// What a channel may read, from its policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadPolicies {
    /// May receive broadcasts.
    pub broadcast: bool,
    /// May receive presence (`None`: presence was not checked).
    pub presence: Option<bool>,
}

/// Which extension a write check is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extension {
    /// `broadcast`.
    Broadcast,
    /// `presence`.
    Presence,
}

impl Extension {
    fn as_str(self) -> &'static str {
        match self {
            Extension::Broadcast => "broadcast",
            Extension::Presence => "presence",
        }
    }
}

/// Evaluates the read policies of `topic` (the subtopic, as policies see it
/// through `realtime.topic()`). Rolled back, whatever happens.
pub async fn read_policies(
    client: &mut Client,
    topic: &str,
    claims: AsClaims<'_>,
    check_presence: bool,
) -> Result<ReadPolicies, IngestError> {
    let tx = client.transaction().await?;
    let b = uuid::Uuid::new_v4().to_string();
    let p = uuid::Uuid::new_v4().to_string();
    tx.execute(
        "insert into realtime.messages (id, topic, extension, private)
         select x.id::uuid, $1, x.ext, true
         from (values ($2::text, 'broadcast'), ($3::text, 'presence')) as x(id, ext)
         where x.ext = 'broadcast' or $4",
        &[&topic, &b, &p, &check_presence],
    )
    .await?;
    set_run_as(&tx, claims, topic).await?;
    let rows = tx
        .query(
            "select id::text from realtime.messages where id = any($1::text[]::uuid[])",
            &[&vec![b.as_str(), p.as_str()]],
        )
        .await?;
    let seen = |id: &str| rows.iter().any(|r| r.get::<_, &str>(0) == id);
    let policies = ReadPolicies {
        broadcast: seen(&b),
        presence: check_presence.then(|| seen(&p)),
    };
    tx.rollback().await?;
    Ok(policies)
}

/// Whether `run_as` may write `extension` messages on `topic` (its INSERT
/// policies). Rolled back, whatever happens.
pub async fn may_write(
    client: &mut Client,
    topic: &str,
    claims: AsClaims<'_>,
    extension: Extension,
) -> Result<bool, IngestError> {
    let mut tx = client.transaction().await?;
    set_run_as(&tx, claims, topic).await?;
    let sp = tx.savepoint("write_check").await?;
    let result = sp
        .execute(
            "insert into realtime.messages (topic, extension, private) values ($1, $2, true)",
            &[&topic, &extension.as_str()],
        )
        .await;
    let allowed = match result {
        Ok(_) => true,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            false
        }
        Err(e) => return Err(e.into()),
    };
    drop(sp);
    tx.rollback().await?;
    Ok(allowed)
}

/// A message stored in (and captured from) `realtime.messages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbMessage {
    /// `id` (uuid text): delivered as `meta.id`.
    pub id: String,
    /// Subtopic (`room-7`).
    pub topic: String,
    /// Event name.
    pub event: String,
    /// Private-channel message.
    pub private: bool,
    /// The payload: raw JSON text, or bytes (`binary_payload`).
    pub payload: DbPayload,
}

/// A stored message's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbPayload {
    /// JSON text (the `payload jsonb` column).
    Json(Bytes),
    /// Raw bytes (`binary_payload bytea`).
    Binary(Bytes),
}

/// Whether a captured change is a row of `realtime.messages`.
pub fn is_messages_change(change: &Change) -> bool {
    change.table.schema == "realtime" && change.table.table == "messages"
}

#[derive(serde::Deserialize)]
struct Row<'a> {
    id: Option<String>,
    topic: Option<String>,
    extension: Option<String>,
    event: Option<String>,
    private: Option<bool>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    binary_payload: Option<String>,
}

/// Parses a captured `realtime.messages` INSERT into a broadcast, if it is one
/// (extension `broadcast`, with a topic, event and payload).
pub fn parse_message(change: &Change) -> Option<DbMessage> {
    if change.op != Op::Insert || !is_messages_change(change) {
        return None;
    }
    parse_row(change.record.as_deref()?)
}

fn parse_row(json: &[u8]) -> Option<DbMessage> {
    let row: Row<'_> = serde_json::from_slice(json).ok()?;
    if row.extension.as_deref() != Some("broadcast") {
        return None;
    }
    let payload = match (row.payload, row.binary_payload) {
        (Some(p), _) if p.get() != "null" => {
            DbPayload::Json(Bytes::copy_from_slice(p.get().as_bytes()))
        }
        (_, Some(hex)) => DbPayload::Binary(Bytes::from(decode_bytea_hex(&hex)?)),
        _ => return None,
    };
    Some(DbMessage {
        id: row.id?,
        topic: row.topic?,
        event: row.event?,
        private: row.private.unwrap_or(false),
        payload,
    })
}

/// Hex bytea → bytes: `0a0b…` as captured rows carry it (like upstream), or
/// `\x0a0b…` as `row_to_json` renders it (replay).
fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x").unwrap_or(text);
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Most messages a replay returns (upstream's hard limit).
pub const REPLAY_MAX: i64 = 25;

/// Stored private broadcasts of `topic` inserted at or after `since_ms` (unix
/// milliseconds), oldest first, at most `limit` (clamped to 1..=25): the
/// newest ones, as upstream selects them.
pub async fn replay(
    client: &Client,
    topic: &str,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<DbMessage>, IngestError> {
    let limit = limit.clamp(1, REPLAY_MAX);
    let rows = client
        .query(
            "select row_to_json(m)::text from (
                 select id, topic, extension, event, private, payload, binary_payload, inserted_at
                 from realtime.messages
                 where topic = $1 and private is true and extension = 'broadcast'
                   and inserted_at >= (to_timestamp($2::float8 / 1000) at time zone 'utc')
                   and inserted_at < (now() at time zone 'utc') + interval '1 minute'
                 order by inserted_at desc limit $3) m
             order by m.inserted_at",
            &[&topic, &(since_ms as f64), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| parse_row(r.get::<_, &str>(0).as_bytes()))
        .collect())
}

/// Keeps `realtime.messages` usable: daily partitions from yesterday to three
/// days ahead (as upstream), partitions older than `retention_days` dropped,
/// and its inserts captured (so `realtime.send` reaches subscribers).
/// Returns the names of dropped partitions. Its DDL waits at most
/// [`MESSAGES_LOCK_TIMEOUT`] for a lock (a long transaction on a partition fails
/// this run, retried by the next, instead of queueing writers behind the DDL).
pub async fn maintain_messages(
    client: &Client,
    retention_days: u32,
) -> Result<Vec<String>, IngestError> {
    client
        .batch_execute(&format!("set lock_timeout = '{MESSAGES_LOCK_TIMEOUT}'"))
        .await?;
    let result = maintain_messages_locked(client, retention_days).await;
    client.batch_execute("reset lock_timeout").await?;
    result
}

/// How long `realtime.messages` maintenance DDL may wait for a lock.
pub const MESSAGES_LOCK_TIMEOUT: &str = "2s";

async fn maintain_messages_locked(
    client: &Client,
    retention_days: u32,
) -> Result<Vec<String>, IngestError> {
    // `inserted_at` is `timestamp` set by now(): partitions follow the server's
    // time zone as upstream's do (days in UTC when the server runs in UTC).
    client
        .batch_execute(
            "do $do$
             declare d date;
             begin
                 for d in select g::date from generate_series(current_date - 1, current_date + 3, interval '1 day') g loop
                     if pg_catalog.to_regclass(pg_catalog.format('realtime.%I', 'messages_' || to_char(d, 'YYYY_MM_DD'))) is null then
                         begin
                             execute pg_catalog.format(
                                 'create table realtime.%I partition of realtime.messages for values from (%L) to (%L)',
                                 'messages_' || to_char(d, 'YYYY_MM_DD'), d, d + 1);
                         exception when duplicate_table or invalid_object_definition then
                             null; -- another replica created it, or a custom partition covers the day
                         end;
                     end if;
                 end loop;
             end
             $do$",
        )
        .await?;
    let old = client
        .query(
            "select c.relname::text from pg_catalog.pg_inherits i
             join pg_catalog.pg_class c on c.oid = i.inhrelid
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where i.inhparent = 'realtime.messages'::regclass and n.nspname = 'realtime'
               and c.relname ~ '^messages_\\d{4}_\\d{2}_\\d{2}$'
               and to_date(substr(c.relname, 10), 'YYYY_MM_DD') < current_date - $1::int",
            &[&(retention_days as i32)],
        )
        .await?;
    let mut dropped = Vec::new();
    for row in old {
        let name: String = row.get(0);
        client
            .batch_execute(&format!(
                "drop table if exists realtime.{}",
                crate::tables::quote_ident(&name)
            ))
            .await?;
        dropped.push(name);
    }
    let enabled: bool = client
        .query_one(
            "select exists (select 1 from realtime_gateway.enabled_tables
                            where table_oid = 'realtime.messages'::regclass)",
            &[],
        )
        .await?
        .get(0);
    if !enabled {
        client
            .execute(
                "select realtime_gateway.enable('realtime.messages'::regclass, 'manual')",
                &[],
            )
            .await?;
    }
    Ok(dropped)
}

/// A few connections for authorization checks and replays (each check is a
/// short transaction, so it needs a connection of its own). Dead connections
/// are replaced on the next checkout.
#[derive(Debug)]
pub struct Pool {
    url: String,
    idle: Mutex<Vec<Client>>,
    permits: std::sync::Arc<Semaphore>,
    timeout: Duration,
}

/// A connection checked out of a [`Pool`]; returned on drop.
#[derive(Debug)]
pub struct Pooled<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            self.pool.idle.lock().push(c);
        }
    }
}

impl Pool {
    /// A pool of at most `size` connections to `url`; a checkout waits at most `timeout`.
    pub fn new(url: &str, size: usize, timeout: Duration) -> Pool {
        Pool {
            url: url.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: std::sync::Arc::new(Semaphore::new(size.max(1))),
            timeout,
        }
    }

    /// A connection (idle one, or a new one).
    pub async fn get(&self) -> Result<Pooled<'_>, IngestError> {
        let permit = tokio::time::timeout(
            self.timeout,
            std::sync::Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        .map_err(|_| IngestError::Protocol("no database connection free in time".into()))?
        .map_err(|_| IngestError::Protocol("pool closed".into()))?;
        let reuse = {
            let mut idle = self.idle.lock();
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reuse {
            Some(c) => c,
            None => tokio::time::timeout(self.timeout, crate::connect(&self.url))
                .await
                .map_err(|_| IngestError::Protocol("connecting timed out".into()))??,
        };
        Ok(Pooled {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_rows() {
        let m = parse_row(
            br#"{"topic":"room-7","extension":"broadcast","payload":{"x":1,"id":"u"},"event":"ev","private":false,"updated_at":"t","inserted_at":"t","id":"6f1c","binary_payload":null}"#,
        )
        .unwrap();
        assert_eq!(m.topic, "room-7");
        assert_eq!(
            m.payload,
            DbPayload::Json(Bytes::from_static(br#"{"x":1,"id":"u"}"#))
        );
        assert!(!m.private);
        let bin = parse_row(
            br#"{"topic":"t","extension":"broadcast","payload":null,"event":"e","private":true,"id":"i","binary_payload":"\\x00ff"}"#,
        )
        .unwrap();
        assert_eq!(
            bin.payload,
            DbPayload::Binary(Bytes::from_static(&[0, 255]))
        );
        // Captured rows carry bytea like upstream: hex without the prefix.
        let bin = parse_row(
            br#"{"topic":"t","extension":"broadcast","payload":null,"event":"e","private":true,"id":"i","binary_payload":"00ff"}"#,
        )
        .unwrap();
        assert_eq!(
            bin.payload,
            DbPayload::Binary(Bytes::from_static(&[0, 255]))
        );
        // Probe rows (presence) and rows without payload are not broadcasts.
        assert!(
            parse_row(br#"{"topic":"t","extension":"presence","id":"i","event":null}"#).is_none()
        );
        assert!(parse_row(
            br#"{"topic":"t","extension":"broadcast","id":"i","event":"e","payload":null}"#
        )
        .is_none());
    }
}
