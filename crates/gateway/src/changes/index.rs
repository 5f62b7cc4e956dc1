//! The bindings index: which channel listens to which table, pending
//! bindings, and the "Subscribed to PostgreSQL" bookkeeping.
//!
//! Bindings are grouped **by channel** inside each table's [`Group`] (and in
//! the wildcard group): routing visits each listening channel once, and
//! leaving removes a channel from each of its groups in O(1) (swap-remove at
//! a slot remembered in a map), whatever the number of other subscribers.
//! Every method here is synchronous and runs under the router's `RwLock`.
//!
//! Each entry carries its channel's claims [`Cohort`]; a binding is
//! registered only when its role exists and may read the columns its filter
//! and `select` name (checked against the cached [`Catalog`], re-checked
//! whenever the catalog or the channel's role changes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use change_ingest::authz::{Catalog, Cohort};
use change_ingest::TableInfo;
use tokio::time::Instant;

use super::authorize::{check_binding, Cohorts};
use super::binding::{validate, Binding, BindingRequest, Invalid};
use super::Status;
use crate::auth::Claims;
use crate::registry::ChannelHandle;

/// How long a binding on a table not (yet) known as enabled waits for it.
pub(super) const PENDING_GRACE: Duration = Duration::from_millis(2500);

/// One channel's bindings within a group.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) chan: Arc<ChannelHandle>,
    /// wscat topic join: the payload is the bare `data`.
    pub(super) legacy: bool,
    /// Who the channel acts as (replaced on a token refresh).
    pub(super) cohort: Arc<Cohort>,
    pub(super) bindings: Vec<Binding>,
}

/// The channels bound to one table (or to wildcards), each once.
#[derive(Debug, Default)]
pub(super) struct Group {
    pub(super) entries: Vec<Entry>,
    /// Channel id → position in `entries`.
    slots: HashMap<u64, usize>,
}

impl Group {
    /// The channel's entry, if it has bindings here.
    pub(super) fn get(&self, chan_id: u64) -> Option<&Entry> {
        self.slots.get(&chan_id).map(|&i| &self.entries[i])
    }

    pub(super) fn contains(&self, chan_id: u64) -> bool {
        self.slots.contains_key(&chan_id)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn add(&mut self, state: &ChanState, legacy: bool, binding: Binding) {
        match self.slots.get(&state.chan.id) {
            Some(&i) => self.entries[i].bindings.push(binding),
            None => {
                self.slots.insert(state.chan.id, self.entries.len());
                self.entries.push(Entry {
                    chan: Arc::clone(&state.chan),
                    legacy,
                    cohort: Arc::clone(&state.cohort),
                    bindings: vec![binding],
                });
            }
        }
    }

    /// Takes a channel's entry from another group (its bindings join this one's).
    fn absorb(&mut self, entry: Entry) {
        match self.slots.get(&entry.chan.id) {
            Some(&i) => self.entries[i].bindings.extend(entry.bindings),
            None => {
                self.slots.insert(entry.chan.id, self.entries.len());
                self.entries.push(entry);
            }
        }
    }

    fn get_mut(&mut self, chan_id: u64) -> Option<&mut Entry> {
        let i = *self.slots.get(&chan_id)?;
        Some(&mut self.entries[i])
    }

    /// Keeps the bindings `keep` accepts (entries left empty go); `Err`
    /// carries the refusal reported to the channel. Returns the refusals.
    fn retain_bindings(
        &mut self,
        only: Option<u64>,
        mut keep: impl FnMut(&Entry, &Binding) -> Result<(), String>,
    ) -> Vec<(Arc<ChannelHandle>, String)> {
        let mut refused = Vec::new();
        let mut emptied = false;
        let range = match only.and_then(|id| self.slots.get(&id)) {
            Some(&i) => i..i + 1,
            None if only.is_some() => return refused,
            None => 0..self.entries.len(),
        };
        for entry in &mut self.entries[range] {
            let mut bindings = std::mem::take(&mut entry.bindings);
            bindings.retain(|b| match keep(entry, b) {
                Ok(()) => true,
                Err(message) => {
                    refused.push((Arc::clone(&entry.chan), message));
                    false
                }
            });
            emptied |= bindings.is_empty();
            entry.bindings = bindings;
        }
        if emptied {
            self.entries.retain(|e| !e.bindings.is_empty());
            self.slots = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.chan.id, i))
                .collect();
        }
        refused
    }

    /// O(1): swap-remove at the channel's slot.
    fn remove(&mut self, chan_id: u64) {
        let Some(i) = self.slots.remove(&chan_id) else {
            return;
        };
        self.entries.swap_remove(i);
        if let Some(moved) = self.entries.get(i) {
            self.slots.insert(moved.chan.id, i);
        }
    }
}

/// Per channel: what it is bound to and whether it was confirmed.
#[derive(Debug)]
pub(super) struct ChanState {
    pub(super) chan: Arc<ChannelHandle>,
    /// "Subscribed to PostgreSQL" was sent.
    confirmed: bool,
    /// Tables this channel has bindings on, and whether it has wildcard ones:
    /// leaving touches only those groups.
    tables: Vec<(String, String)>,
    in_wildcard: bool,
    pub(super) registered: usize,
    pending: usize,
    /// Who the channel acts as: its claims' cohort (RLS judges changes as
    /// them); replaced by [`super::Changes::update_claims`].
    cohort: Arc<Cohort>,
}

/// A binding waiting for its table to be enabled.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) chan: Arc<ChannelHandle>,
    request: BindingRequest,
    legacy: bool,
    deadline: Instant,
    /// The error to send if the deadline passes.
    pub(super) message: String,
}

/// What happened to one binding request.
#[derive(Debug)]
pub(super) enum Outcome {
    Registered,
    Pending,
    Refused(String),
}

#[derive(Debug)]
pub(super) struct Index {
    pub(super) status: Status,
    /// Enabled tables by `(schema, table)`.
    tables: HashMap<(String, String), Arc<TableInfo>>,
    /// The name each enabled table has in `tables` and `by_table`, by oid.
    names: HashMap<u32, (String, String)>,
    /// Bindings on one table: schema → table → group (looked up by `&str`,
    /// so routing a change allocates nothing).
    by_table: HashMap<String, HashMap<String, Group>>,
    pub(super) wildcard: Group,
    /// Channels with bindings (registered or pending).
    pub(super) channels: HashMap<u64, ChanState>,
    /// Channels not yet confirmed: `Live` looks only at these.
    unconfirmed: HashSet<u64>,
    /// Bindings on tables this gateway does not know as enabled yet: enabling
    /// (SQL, REST, publication sync) reaches us a moment later through ingest,
    /// so they wait up to [`PENDING_GRACE`] before being refused.
    pending: Vec<Pending>,
    /// Roles and privileges (replaced whole when it changes).
    pub(super) catalog: Arc<Catalog>,
    cohorts: Cohorts,
    /// Bindings refused outside the router task (a token refresh changed the
    /// role): their `system` errors go out on the router's next tick.
    pub(super) notices: Vec<(Arc<ChannelHandle>, String)>,
}

impl Index {
    pub(super) fn new() -> Self {
        Index {
            status: Status::NoDatabase,
            tables: HashMap::new(),
            names: HashMap::new(),
            by_table: HashMap::new(),
            wildcard: Group::default(),
            channels: HashMap::new(),
            unconfirmed: HashSet::new(),
            pending: Vec::new(),
            catalog: Arc::new(Catalog::default()),
            cohorts: Cohorts::default(),
            notices: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(super) fn unconfirmed_is_empty(&self) -> bool {
        self.unconfirmed.is_empty()
    }

    /// The group of bindings on one table.
    pub(super) fn table_group(&self, schema: &str, table: &str) -> Option<&Group> {
        self.by_table.get(schema)?.get(table)
    }

    /// The group of bindings on a change's table, found by oid: a change can
    /// be read with a newer description than the last `TablesChanged` (a table
    /// renamed and altered since carries its new name before its bindings moved).
    pub(super) fn group_of(&self, table: &TableInfo) -> Option<&Group> {
        match self.names.get(&table.oid) {
            Some((schema, name)) => self.table_group(schema, name),
            None => self.table_group(&table.schema, &table.table),
        }
    }

    /// Starts tracking a channel (before its bindings are added).
    pub(super) fn add_channel(&mut self, chan: &Arc<ChannelHandle>, claims: &Claims) {
        let cohort = self.cohorts.of(claims);
        self.channels.insert(
            chan.id,
            ChanState {
                chan: Arc::clone(chan),
                confirmed: false,
                tables: Vec::new(),
                in_wildcard: false,
                registered: 0,
                pending: 0,
                cohort,
            },
        );
        self.unconfirmed.insert(chan.id);
    }

    /// Validates one request: registers it, parks it until its table is
    /// enabled, or says why it was refused.
    pub(super) fn add_binding(
        &mut self,
        chan: &Arc<ChannelHandle>,
        req: BindingRequest,
        legacy: bool,
        deadline: Instant,
    ) -> Outcome {
        match self.register(chan, &req, legacy) {
            Ok(()) => {
                self.bump(chan.id, |c| c.registered += 1);
                Outcome::Registered
            }
            Err(e) if e.may_become_valid => {
                self.bump(chan.id, |c| c.pending += 1);
                self.pending.push(Pending {
                    chan: Arc::clone(chan),
                    request: req,
                    legacy,
                    deadline,
                    message: e.message,
                });
                Outcome::Pending
            }
            Err(e) => Outcome::Refused(e.message),
        }
    }

    /// Forgets a channel and all its bindings.
    pub(super) fn remove_channel(&mut self, chan_id: u64) {
        self.unconfirmed.remove(&chan_id);
        let Some(state) = self.channels.remove(&chan_id) else {
            return;
        };
        for (schema, table) in &state.tables {
            if let Some(tables) = self.by_table.get_mut(schema) {
                if let Some(group) = tables.get_mut(table) {
                    group.remove(chan_id);
                    if group.is_empty() {
                        tables.remove(table);
                    }
                }
                if tables.is_empty() {
                    self.by_table.remove(schema);
                }
            }
        }
        if state.in_wildcard {
            self.wildcard.remove(chan_id);
        }
        if state.pending > 0 {
            self.pending.retain(|p| p.chan.id != chan_id);
        }
    }

    /// Takes the pending bindings whose grace period is over (their channels'
    /// counters are updated; the caller refuses them and calls [`Index::settle`]).
    pub(super) fn take_expired(&mut self, now: Instant) -> Vec<Pending> {
        if self.pending.iter().all(|p| p.deadline > now) {
            return Vec::new();
        }
        let (expired, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending = keep;
        for p in &expired {
            self.bump(p.chan.id, |c| c.pending -= 1);
        }
        expired
    }

    /// Replaces the enabled tables and retries pending bindings. Returns the
    /// ones refused for good (to report) and the channels whose pending
    /// bindings were resolved (to [`Index::settle`]).
    pub(super) fn set_tables(
        &mut self,
        tables: Vec<Arc<TableInfo>>,
    ) -> (Vec<(Arc<ChannelHandle>, String)>, Vec<u64>) {
        self.follow_renames(&tables);
        self.names = tables
            .iter()
            .map(|t| (t.oid, (t.schema.clone(), t.table.clone())))
            .collect();
        self.tables = tables
            .into_iter()
            .map(|t| ((t.schema.clone(), t.table.clone()), t))
            .collect();
        self.retry_pending()
    }

    /// Installs a new catalog: bindings that became invalid (role dropped,
    /// a filtered or selected column revoked) are refused, pending ones
    /// retried. Same return as [`Index::set_tables`].
    pub(super) fn set_catalog(
        &mut self,
        catalog: Arc<Catalog>,
    ) -> (Vec<(Arc<ChannelHandle>, String)>, Vec<u64>) {
        self.catalog = catalog;
        let mut refused = self.revalidate(None);
        let mut touched: Vec<u64> = refused.iter().map(|(c, _)| c.id).collect();
        let (more, resolved) = self.retry_pending();
        refused.extend(more);
        touched.extend(resolved);
        (refused, touched)
    }

    /// A token refresh: the channel acts as `claims` from the next change on.
    /// A new role re-checks its bindings (refusals queue in `notices`).
    pub(super) fn update_claims(&mut self, chan_id: u64, claims: &Claims) {
        let cohort = self.cohorts.of(claims);
        let Some(state) = self.channels.get_mut(&chan_id) else {
            return;
        };
        let role_changed = state.cohort.role != cohort.role;
        state.cohort = Arc::clone(&cohort);
        let (tables, wildcard) = (state.tables.clone(), state.in_wildcard);
        for (s, t) in &tables {
            if let Some(e) = self
                .by_table
                .get_mut(s)
                .and_then(|g| g.get_mut(t))
                .and_then(|g| g.get_mut(chan_id))
            {
                e.cohort = Arc::clone(&cohort);
            }
        }
        if wildcard {
            if let Some(e) = self.wildcard.get_mut(chan_id) {
                e.cohort = Arc::clone(&cohort);
            }
        }
        if role_changed {
            let refused = self.revalidate(Some(chan_id));
            self.notices.extend(refused);
        }
    }

    /// Re-runs the subscriber-dependent checks on registered bindings (all,
    /// or one channel's), removing and returning the ones now refused.
    fn revalidate(&mut self, only: Option<u64>) -> Vec<(Arc<ChannelHandle>, String)> {
        let catalog = Arc::clone(&self.catalog);
        let mut refused = Vec::new();
        for (schema, tables) in &mut self.by_table {
            for (table, group) in tables.iter_mut() {
                let info = self.tables.get(&(schema.clone(), table.clone()));
                refused.extend(group.retain_bindings(only, |entry, b| {
                    match info {
                        // Not in the catalog: just dropped (ingest reports it to
                        // the channel) or not loaded yet (routing loads it).
                        Some(t) if !catalog.has_table(t.oid) => Ok(()),
                        _ => check_binding(&catalog, info.map(|t| &**t), &entry.cohort.role, b)
                            .map_err(|e| e.message),
                    }
                }));
            }
            tables.retain(|_, g| !g.is_empty());
        }
        self.by_table.retain(|_, t| !t.is_empty());
        refused.extend(self.wildcard.retain_bindings(only, |entry, b| {
            check_binding(&catalog, None, &entry.cohort.role, b).map_err(|e| e.message)
        }));
        for (chan, _) in &refused {
            self.bump(chan.id, |c| c.registered -= 1);
        }
        refused
    }

    /// Retries every pending binding (tables or catalog changed).
    fn retry_pending(&mut self) -> (Vec<(Arc<ChannelHandle>, String)>, Vec<u64>) {
        let mut refused = Vec::new();
        let mut touched = Vec::new();
        for mut p in std::mem::take(&mut self.pending) {
            match self.register(&p.chan, &p.request, p.legacy) {
                Ok(()) => self.bump(p.chan.id, |c| {
                    c.pending -= 1;
                    c.registered += 1;
                }),
                Err(e) if e.may_become_valid => {
                    p.message = e.message;
                    self.pending.push(p);
                    continue;
                }
                Err(e) => {
                    self.bump(p.chan.id, |c| c.pending -= 1);
                    refused.push((Arc::clone(&p.chan), e.message));
                }
            }
            touched.push(p.chan.id);
        }
        (refused, touched)
    }

    /// Routing follows a table by oid: bindings on a table that was renamed (or moved
    /// to another schema) move to its new name.
    fn follow_renames(&mut self, tables: &[Arc<TableInfo>]) {
        for new in tables {
            let Some(((old_schema, old_table), _)) = self.tables.iter().find(|(key, t)| {
                t.oid == new.oid && **key != (new.schema.clone(), new.table.clone())
            }) else {
                continue;
            };
            let (old_schema, old_table) = (old_schema.clone(), old_table.clone());
            let Some(group) = self
                .by_table
                .get_mut(&old_schema)
                .and_then(|tables| tables.remove(&old_table))
            else {
                continue;
            };
            if self
                .by_table
                .get(&old_schema)
                .is_some_and(HashMap::is_empty)
            {
                self.by_table.remove(&old_schema);
            }
            let target = self
                .by_table
                .entry(new.schema.clone())
                .or_default()
                .entry(new.table.clone())
                .or_default();
            for mut entry in group.entries {
                for b in &mut entry.bindings {
                    b.schema = Some(new.schema.clone());
                    b.table = Some(new.table.clone());
                }
                let chan_id = entry.chan.id;
                target.absorb(entry);
                if let Some(state) = self.channels.get_mut(&chan_id) {
                    for key in &mut state.tables {
                        if key.0 == old_schema && key.1 == old_table {
                            *key = (new.schema.clone(), new.table.clone());
                        }
                    }
                    state.tables.dedup();
                }
            }
        }
    }

    /// The channels with a binding on `table` (by name or wildcard), whatever
    /// their event and filters: told when it is truncated or dropped.
    pub(super) fn channels_on(&self, table: &TableInfo) -> Vec<Arc<ChannelHandle>> {
        let mut out: Vec<Arc<ChannelHandle>> = self
            .group_of(table)
            .map(|g| g.entries.iter().map(|e| Arc::clone(&e.chan)).collect())
            .unwrap_or_default();
        for entry in &self.wildcard.entries {
            let wants = entry.bindings.iter().any(|b| {
                b.schema.as_deref().is_none_or(|s| s == table.schema)
                    && b.table.as_deref().is_none_or(|t| t == table.table)
            });
            if wants && !out.iter().any(|c| c.id == entry.chan.id) {
                out.push(Arc::clone(&entry.chan));
            }
        }
        out
    }

    /// Resolves a channel after its bindings changed: forgotten when nothing
    /// is registered or pending; returns it when it should now be told
    /// "Subscribed to PostgreSQL" (everything resolved, something registered,
    /// feed live, not told yet).
    pub(super) fn settle(&mut self, chan_id: u64) -> Option<Arc<ChannelHandle>> {
        let live = self.status == Status::Live;
        let state = self.channels.get_mut(&chan_id)?;
        if state.registered == 0 && state.pending == 0 {
            self.remove_channel(chan_id);
            return None;
        }
        if live && !state.confirmed && state.pending == 0 {
            state.confirmed = true;
            self.unconfirmed.remove(&chan_id);
            return Some(Arc::clone(&state.chan));
        }
        None
    }

    /// The feed became live: the channels to confirm now.
    pub(super) fn settle_all(&mut self) -> Vec<Arc<ChannelHandle>> {
        let ids: Vec<u64> = self.unconfirmed.iter().copied().collect();
        ids.into_iter().filter_map(|id| self.settle(id)).collect()
    }

    fn bump(&mut self, chan_id: u64, f: impl FnOnce(&mut ChanState)) {
        if let Some(c) = self.channels.get_mut(&chan_id) {
            f(c);
        }
    }

    /// Validates one request and adds it to its group.
    fn register(
        &mut self,
        chan: &Arc<ChannelHandle>,
        req: &BindingRequest,
        legacy: bool,
    ) -> Result<(), Invalid> {
        let tables = &self.tables;
        let binding = validate(
            req,
            |s, t| tables.get(&(s.to_owned(), t.to_owned())).map(|t| &**t),
            |schema, table| {
                tables
                    .keys()
                    .any(|(s, t)| schema.is_none_or(|x| x == s) && table.is_none_or(|x| x == t))
            },
        )?;
        let Some(state) = self.channels.get_mut(&chan.id) else {
            return Ok(()); // the channel left meanwhile
        };
        let info = match (&binding.schema, &binding.table) {
            (Some(s), Some(t)) => tables.get(&(s.clone(), t.clone())).map(|t| &**t),
            _ => None,
        };
        check_binding(&self.catalog, info, &state.cohort.role, &binding)?;
        match (&binding.schema, &binding.table) {
            (Some(s), Some(t)) => {
                if !state.tables.iter().any(|(xs, xt)| xs == s && xt == t) {
                    state.tables.push((s.clone(), t.clone()));
                }
                self.by_table
                    .entry(s.clone())
                    .or_default()
                    .entry(t.clone())
                    .or_default()
                    .add(state, legacy, binding);
            }
            _ => {
                state.in_wildcard = true;
                self.wildcard.add(state, legacy, binding);
            }
        }
        Ok(())
    }
}
