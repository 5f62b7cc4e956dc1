//! Postgres Changes: bindings, filters and routing of captured changes to channels.
//!
//! A join's `postgres_changes` entries become bindings, indexed by
//! `(schema, table)` and grouped by channel (wildcards in a separate group).
//! The router task consumes [`IngestEvent`]s from `change-ingest`. A batch of
//! changes is routed in stages: **match** under the index read lock into an
//! owned plan (a change nobody is bound to is never parsed), **authorize**
//! with no lock held (column privileges and primary-key rules from a cached
//! catalog; row level security judged per claims cohort in one round trip
//! per step, only for tables whose policies apply), then **deliver**:
//! `data` is built once per column variant (row images spliced in as raw
//! JSON) and one frame per distinct `(topic, ids, vsn)`, shared by every
//! channel that needs it. Delivery is lossless: frames go to each
//! connection's paced queue, and the router waits for room in the
//! read-ahead budget before each change (see [`crate::flow`]); only a client
//! that reads nothing for the grace loses changes, with the lag notice.
//!
//! # Layout
//! - [`binding`]: one `postgres_changes` entry ([`BindingRequest`]), its id and validation.
//! - `index`: the bindings index, pending bindings, "Subscribed to PostgreSQL".
//! - `route`: match (under the lock) and deliver (without it).
//! - `authorize`: claims cohorts, join-time privilege checks, RLS verdicts per hit.
//! - `encode`: the `data` object of a change.
//! - [`filter`]: filter parsing and typed evaluation.
//! - [`Changes`]: the router's public face: subscribe, unsubscribe, apply, run.
//! - `rest`: `GET/POST/DELETE /api/realtime/tables`.

mod authorize;
pub mod binding;
mod encode;
pub mod filter;
mod index;
pub mod rest;
mod route;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use change_ingest::{Change, IngestEvent, Op};
use parking_lot::RwLock;
use phoenix_channel::encode_text;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use authorize::Authz;
pub use binding::{parse_legacy_topic, BindingRequest};
use change_ingest::authz::Catalog;
use index::{Index, Outcome, PENDING_GRACE};

use crate::auth::Claims;
use crate::registry::{ChannelHandle, Fanout, Outbound};

/// A channel's registered bindings (returned by [`Changes::subscribe`]).
#[derive(Debug)]
pub struct ChannelBindings {
    chan_id: u64,
}

/// Whether changes can be delivered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No database configured: bindings get an error.
    NoDatabase,
    /// Connecting or reconnecting: bindings wait for `Live` to be confirmed.
    Connecting,
    /// The feed is live.
    Live,
}

/// State of the change feed, as `/readyz` and the status API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedState {
    /// No database configured: Postgres Changes are off.
    NotConfigured,
    /// Connecting or reconnecting to the database (catching up after).
    Connecting,
    /// The listener is connected and caught up.
    Live,
}

/// The Postgres Changes router, shared by all connections.
#[derive(Debug)]
pub struct Changes {
    index: RwLock<Index>,
    /// Database URL, set when a database is configured.
    db_url: OnceLock<String>,
    /// Query connection for the tables REST endpoints; replaced when it dies.
    db: parking_lot::Mutex<Option<Arc<tokio_postgres::Client>>>,
    /// (channel, table) whose policy evaluation is failing: told once per episode.
    episodes: parking_lot::Mutex<HashSet<(u64, u32)>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            index: RwLock::new(Index::new()),
            db_url: OnceLock::new(),
            db: parking_lot::Mutex::new(None),
            episodes: parking_lot::Mutex::new(HashSet::new()),
        }
    }
}

/// A `system` message for one channel.
fn system_frame(
    chan: &ChannelHandle,
    extension: &str,
    status: &str,
    message: &str,
) -> Option<Bytes> {
    let payload = json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": chan.subtopic(),
    });
    let jr = chan.join_ref.as_ref();
    encode_text(chan.vsn, jr, None, &chan.topic, "system", &payload).ok()
}

/// Pushes a `system` message to one channel (never waits).
fn system(
    fanout: &Fanout,
    chan: &Arc<ChannelHandle>,
    extension: &str,
    status: &str,
    message: &str,
) {
    if let Some(frame) = system_frame(chan, extension, status, message) {
        fanout.deliver(chan, Outbound::Text(frame));
    }
}

/// Queues a `system` message behind the channel's changes (the paced queue),
/// so it arrives in order with them: gaps and policy errors.
fn system_in_order(
    fanout: &Fanout,
    chan: &Arc<ChannelHandle>,
    extension: &str,
    status: &str,
    message: &str,
) {
    if let Some(frame) = system_frame(chan, extension, status, message) {
        fanout.flow.offer(chan, Outbound::Text(frame));
    }
}

const SUBSCRIBED: &str = "Subscribed to PostgreSQL";

/// How often the router checks whether roles, grants or policies changed.
const CATALOG_REFRESH: Duration = Duration::from_secs(1);

/// Tells a channel it is live.
fn confirm(fanout: &Fanout, chan: Option<Arc<ChannelHandle>>) {
    if let Some(chan) = chan {
        system(fanout, &chan, "postgres_changes", "ok", SUBSCRIBED);
    }
}

/// Tells a channel one of its bindings was refused.
fn refuse(fanout: &Fanout, chan: &Arc<ChannelHandle>, message: &str) {
    crate::error::report(
        "PostgresChangesSubscribe",
        crate::error::Fault::Client,
        message,
    );
    system(fanout, chan, "postgres_changes", "error", message);
}

impl Changes {
    /// Marks the database as configured (bindings now wait for the feed) and
    /// stores the query connection the REST endpoints use.
    /// A database is configured but not attached yet: bindings wait for it
    /// (`Connecting`) instead of being refused.
    pub fn expect_database(&self) {
        let mut idx = self.index.write();
        if idx.status == Status::NoDatabase {
            idx.status = Status::Connecting;
        }
    }

    pub fn attach_database(&self, url: &str, client: tokio_postgres::Client) {
        let _ = self.db_url.set(url.to_owned());
        *self.db.lock() = Some(Arc::new(client));
        let mut idx = self.index.write();
        if idx.status == Status::NoDatabase {
            idx.status = Status::Connecting;
        }
    }

    /// The change feed's state (one read of the index lock).
    pub fn feed_state(&self) -> FeedState {
        match self.index.read().status {
            Status::NoDatabase => FeedState::NotConfigured,
            Status::Connecting => FeedState::Connecting,
            Status::Live => FeedState::Live,
        }
    }

    /// A live query connection, reconnecting if the last one died; `None`
    /// when no database is configured.
    pub async fn db(
        &self,
    ) -> Option<Result<Arc<tokio_postgres::Client>, change_ingest::IngestError>> {
        let url = self.db_url.get()?;
        if let Some(c) = self.db.lock().as_ref().filter(|c| !c.is_closed()) {
            return Some(Ok(Arc::clone(c)));
        }
        // Connect without holding the lock; a racing request may connect too, harmlessly.
        match change_ingest::connect(url).await {
            Ok(client) => {
                let client = Arc::new(client);
                *self.db.lock() = Some(Arc::clone(&client));
                Some(Ok(client))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Validates and registers a channel's bindings; tells the channel (with a
    /// `system` message) whether it is live or what is wrong.
    pub fn subscribe(
        &self,
        fanout: &Fanout,
        chan: &Arc<ChannelHandle>,
        requests: Vec<BindingRequest>,
        legacy: bool,
        claims: Arc<Claims>,
    ) -> ChannelBindings {
        let mut idx = self.index.write();
        if idx.status == Status::NoDatabase {
            system(
                fanout,
                chan,
                "postgres_changes",
                "error",
                "Postgres Changes are unavailable: the gateway has no database configured",
            );
            return ChannelBindings { chan_id: chan.id };
        }
        idx.add_channel(chan, &claims);
        let deadline = Instant::now() + PENDING_GRACE;
        for req in requests {
            if let Outcome::Refused(message) = idx.add_binding(chan, req, legacy, deadline) {
                refuse(fanout, chan, &message);
            }
        }
        confirm(fanout, idx.settle(chan.id));
        ChannelBindings { chan_id: chan.id }
    }

    /// Replaces the claims of a channel's bindings (a valid `access_token`
    /// refresh): changes routed from now on are judged as them.
    pub fn update_claims(&self, chan_id: u64, claims: Arc<Claims>) {
        self.index.write().update_claims(chan_id, &claims);
    }

    /// Removes a channel's bindings.
    pub fn unsubscribe(&self, bindings: ChannelBindings) {
        self.index.write().remove_channel(bindings.chan_id);
        let mut episodes = self.episodes.lock();
        if !episodes.is_empty() {
            episodes.retain(|(c, _)| *c != bindings.chan_id);
        }
    }

    /// Refuses pending bindings whose grace period is over, and reports
    /// bindings refused by a token refresh.
    pub fn expire_pending(&self, fanout: &Fanout, now: Instant) {
        let mut idx = self.index.write();
        for (chan, message) in std::mem::take(&mut idx.notices) {
            refuse(fanout, &chan, &message);
            idx.settle(chan.id);
        }
        for p in idx.take_expired(now) {
            refuse(fanout, &p.chan, &p.message);
            confirm(fanout, idx.settle(p.chan.id));
        }
    }

    /// Installs a new authorization catalog (see `Index::set_catalog`).
    fn install_catalog(&self, fanout: &Fanout, catalog: Arc<Catalog>) {
        let mut idx = self.index.write();
        let (refused, touched) = idx.set_catalog(catalog);
        for (chan, message) in refused {
            refuse(fanout, &chan, &message);
        }
        for id in touched {
            confirm(fanout, idx.settle(id));
        }
    }

    /// Applies one ingest event. Changes wait for room in the read-ahead
    /// budget (no lock is held meanwhile).
    async fn apply(&self, fanout: &Fanout, event: IngestEvent, authz: &mut Authz) {
        match event {
            IngestEvent::Changes(batch) => self.route(fanout, &batch, authz).await,
            IngestEvent::TablesChanged(tables) => {
                // The catalog first (no lock held), so bindings on a newly
                // enabled table are checked against its privileges.
                let catalog = authz.load(tables.iter().map(|t| t.oid).collect()).await;
                let mut idx = self.index.write();
                // Pending bindings whose table is now enabled go live.
                let (mut refused, mut touched) = idx.set_tables(tables);
                if let Some(catalog) = catalog {
                    let (r, t) = idx.set_catalog(catalog);
                    refused.extend(r);
                    touched.extend(t);
                }
                for (chan, message) in refused {
                    refuse(fanout, &chan, &message);
                }
                for id in touched {
                    confirm(fanout, idx.settle(id));
                }
            }
            IngestEvent::Live => {
                let mut idx = self.index.write();
                idx.status = Status::Live;
                for chan in idx.settle_all() {
                    confirm(fanout, Some(chan));
                }
            }
            IngestEvent::Disconnected => {
                // Nothing is lost (ingest catches up); new bindings wait for Live.
                self.index.write().status = Status::Connecting;
            }
            IngestEvent::Gap { message } => {
                // Through the paced queues: in order with the changes around the gap.
                let idx = self.index.read();
                for c in idx.channels.values().filter(|c| c.registered > 0) {
                    system_in_order(fanout, &c.chan, "postgres_changes", "error", &message);
                }
            }
            IngestEvent::TableDropped(table) => {
                let message = format!(
                    "Table {}.{} was dropped: no more changes will arrive for it",
                    table.schema, table.table
                );
                for chan in self.index.read().channels_on(&table) {
                    system_in_order(fanout, &chan, "postgres_changes", "error", &message);
                }
            }
        }
    }

    /// supabase-js has no TRUNCATE event: the table's subscribers get a `system`
    /// message, in order with the changes around it, so the app can refetch.
    fn truncated(&self, fanout: &Fanout, change: &Change) {
        let t = &change.table;
        let message = format!(
            "Table {}.{} was truncated (TRUNCATE at {}): every row was deleted",
            t.schema, t.table, change.commit_timestamp
        );
        for chan in self.index.read().channels_on(t) {
            system_in_order(fanout, &chan, "postgres_changes", "ok", &message);
        }
    }

    /// Routes a batch in steps: match a run of changes under the read lock,
    /// release it, authorize (may await the database), deliver. Steps are
    /// bounded (see `route::match_changes`); running them in order keeps
    /// every channel's changes in commit order.
    async fn route(&self, fanout: &Fanout, batch: &[Change], authz: &mut Authz) {
        let mut rest = batch;
        while !rest.is_empty() {
            if rest[0].op == Op::Truncate {
                self.truncated(fanout, &rest[0]);
                rest = &rest[1..];
                continue;
            }
            let run = rest
                .iter()
                .position(|c| c.op == Op::Truncate)
                .unwrap_or(rest.len());
            let (mut plan, mut catalog) = {
                let idx = self.index.read();
                (
                    route::match_changes(&idx, &rest[..run]),
                    Arc::clone(&idx.catalog),
                )
            };
            let taken = plan.changes.len();
            let run = &rest[..taken];
            if let Some(fresh) = authz.cover(&catalog, run, &plan).await {
                self.install_catalog(fanout, Arc::clone(&fresh));
                catalog = fresh;
            }
            authz
                .authorize(&catalog, run, &mut plan, &self.episodes)
                .await;
            route::deliver(fanout, run, &mut plan).await;
            rest = &rest[taken..];
        }
    }

    /// Consumes the ingest feed until it ends; `observe` sees each event first
    /// (the operations event log and feed progress).
    pub async fn run(
        &self,
        fanout: &Fanout,
        mut rx: mpsc::Receiver<IngestEvent>,
        observe: impl Fn(&IngestEvent),
    ) {
        let mut authz = Authz::new(self.db_url.get().map(String::as_str));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_refresh = Instant::now();
        loop {
            // Arms: the next ingest event, or a tick to expire pending
            // bindings and (every second) look for privilege changes.
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => {
                        observe(&event);
                        self.apply(fanout, event, &mut authz).await;
                    }
                    None => return,
                },
                now = tick.tick() => {
                    self.expire_pending(fanout, now);
                    if now >= next_refresh {
                        next_refresh = now + CATALOG_REFRESH;
                        if let Some(catalog) = authz.refresh().await {
                            self.install_catalog(fanout, catalog);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
