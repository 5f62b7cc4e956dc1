//! Postgres Changes: bindings, filters and routing of captured changes to channels.
//!
//! A join's `postgres_changes` entries become [`Binding`]s, indexed by
//! `(schema, table)` (wildcards in a separate list). The router task consumes
//! [`IngestEvent`]s from `change-ingest`; for each change it looks up the
//! table's bindings — a change nobody is bound to is never parsed — evaluates
//! event and filters, then builds the `data` object **once** (row images are
//! spliced in as raw JSON) and one frame per distinct `(topic, ids, vsn)`,
//! shared by every channel that needs it. Delivery goes through the same
//! bounded backlogs and lag accounting as Broadcast.
//!
//! # Layout
//! - [`filter`]: filter parsing and typed evaluation.
//! - [`BindingRequest`]: one `postgres_changes` entry of a join, with its id.
//! - [`Changes`]: the index, the live/enabled status, and `route`.
//! - `rest`: `GET/POST/DELETE /api/realtime/tables`.

pub mod filter;
pub mod rest;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use change_ingest::{Change, IngestEvent, Op, TableInfo};
use parking_lot::RwLock;
use phoenix_channel::{encode_text, Vsn};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::registry::{ChannelHandle, Fanout, Outbound};
use filter::{Condition, Kind};

/// Ids are non-negative integers below 2^27, like Realtime's `:erlang.phash2/1`.
const ID_RANGE: u64 = 1 << 27;

/// Stable id of a binding: identical filter maps get identical ids.
fn binding_id(raw: &Map<String, Value>) -> u32 {
    // serde_json's Map is ordered by key, so this text is canonical.
    let text = serde_json::to_string(raw).unwrap_or_default();
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % ID_RANGE) as u32
}

/// One `postgres_changes` entry of a join.
#[derive(Debug, Clone)]
pub struct BindingRequest {
    /// The entry exactly as the client sent it (echoed back with `id`).
    pub raw: Map<String, Value>,
    /// Its id.
    pub id: u32,
}

impl BindingRequest {
    /// Wraps a raw entry.
    pub fn from_raw(raw: Map<String, Value>) -> Self {
        BindingRequest {
            id: binding_id(&raw),
            raw,
        }
    }

    /// The reply entry: the raw map plus `id`.
    pub fn echo(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("id".into(), json!(self.id));
        Value::Object(m)
    }

    fn str_field(&self, key: &str) -> Option<&str> {
        self.raw.get(key).and_then(Value::as_str)
    }

    /// `[event: *, schema: public, table: t, filters: [...]]`, as Realtime words it.
    fn describe(&self) -> String {
        format!(
            "[event: {}, schema: {}, table: {}, filters: [{}]]",
            self.str_field("event").unwrap_or("*"),
            self.str_field("schema").unwrap_or("public"),
            self.str_field("table").unwrap_or("*"),
            self.str_field("filter").unwrap_or_default()
        )
    }
}

/// A join without `config` on `realtime:<schema>[:<table>[:<filter>]]` or `realtime:*`.
pub fn parse_legacy_topic(topic: &str) -> Option<BindingRequest> {
    let sub = topic.strip_prefix("realtime:")?;
    if sub.is_empty() {
        return None;
    }
    let mut parts = sub.splitn(3, ':');
    let schema = parts.next().unwrap_or("*");
    let mut raw = Map::new();
    raw.insert("event".into(), json!("*"));
    raw.insert("schema".into(), json!(schema));
    if let Some(table) = parts.next() {
        raw.insert("table".into(), json!(table));
    }
    if let Some(filter) = parts.next() {
        raw.insert("filter".into(), json!(filter));
    }
    Some(BindingRequest::from_raw(raw))
}

/// A validated binding, registered in the index.
#[derive(Debug)]
struct Binding {
    chan: Arc<ChannelHandle>,
    id: u32,
    /// `None` = `*`.
    event: Option<Op>,
    /// `None` = `*`.
    schema: Option<String>,
    /// `None` = `*`.
    table: Option<String>,
    /// Raw filter text (kinds are resolved per table at match time).
    conditions: Vec<Condition>,
    /// Column list (`select`), plus the primary key.
    select: Option<Vec<String>>,
    /// wscat topic join: payload is the bare `data`.
    legacy: bool,
}

impl Binding {
    fn wants(&self, change: &Change) -> bool {
        self.event.is_none_or(|e| e == change.op)
            && self
                .schema
                .as_deref()
                .is_none_or(|s| s == change.table.schema)
            && self
                .table
                .as_deref()
                .is_none_or(|t| t == change.table.table)
    }
}

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

#[derive(Debug)]
struct Index {
    status: Status,
    /// Enabled tables by `(schema, table)`.
    tables: HashMap<(String, String), Arc<TableInfo>>,
    /// Bindings on one table: schema → table → bindings (looked up by `&str`,
    /// so routing a change allocates nothing).
    by_table: HashMap<String, HashMap<String, Vec<Arc<Binding>>>>,
    wildcard: Vec<Arc<Binding>>,
    /// Channels with bindings (registered or pending).
    channels: HashMap<u64, ChanState>,
    /// Bindings on tables this gateway does not know as enabled yet: enabling
    /// (SQL, REST, publication sync) reaches us a moment later through ingest,
    /// so they wait up to [`PENDING_GRACE`] before being refused.
    pending: Vec<Pending>,
}

/// How long a binding on a table not (yet) known as enabled waits for it.
const PENDING_GRACE: Duration = Duration::from_millis(2500);

#[derive(Debug)]
struct ChanState {
    chan: Arc<ChannelHandle>,
    /// "Subscribed to PostgreSQL" was sent.
    confirmed: bool,
    /// Tables this channel has bindings on, and whether it has wildcard ones:
    /// leaving touches only those lists, not every binding of every table.
    tables: Vec<(String, String)>,
    in_wildcard: bool,
    registered: usize,
    pending: usize,
}

#[derive(Debug)]
struct Pending {
    chan: Arc<ChannelHandle>,
    request: BindingRequest,
    legacy: bool,
    deadline: Instant,
    /// The error to send if the deadline passes.
    message: String,
}

/// Why a binding was not registered.
#[derive(Debug)]
struct Invalid {
    message: String,
    /// The table is not known as enabled yet: worth waiting for.
    may_become_valid: bool,
}

impl Invalid {
    fn final_(message: String) -> Self {
        Invalid {
            message,
            may_become_valid: false,
        }
    }
}

/// The Postgres Changes router, shared by all connections.
#[derive(Debug)]
pub struct Changes {
    index: RwLock<Index>,
    /// Database URL, set when a database is configured.
    db_url: OnceLock<String>,
    /// Query connection for the tables REST endpoints; replaced when it dies.
    db: parking_lot::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            index: RwLock::new(Index {
                status: Status::NoDatabase,
                tables: HashMap::new(),
                by_table: HashMap::new(),
                wildcard: Vec::new(),
                channels: HashMap::new(),
                pending: Vec::new(),
            }),
            db_url: OnceLock::new(),
            db: parking_lot::Mutex::new(None),
        }
    }
}

/// Pushes a `system` message to one channel (never waits).
fn system(
    fanout: &Fanout,
    chan: &Arc<ChannelHandle>,
    extension: &str,
    status: &str,
    message: &str,
) {
    let payload = json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": chan.subtopic(),
    });
    if let Ok(frame) = encode_text(
        chan.vsn,
        chan.join_ref.as_ref(),
        None,
        &chan.topic,
        "system",
        &payload,
    ) {
        fanout.deliver(chan, Outbound::Text(frame));
    }
}

const SUBSCRIBED: &str = "Subscribed to PostgreSQL";

impl Changes {
    /// Marks the database as configured (bindings now wait for the feed) and
    /// stores the query connection the REST endpoints use.
    pub fn attach_database(&self, url: &str, client: tokio_postgres::Client) {
        let _ = self.db_url.set(url.to_owned());
        *self.db.lock() = Some(Arc::new(client));
        let mut idx = self.index.write();
        if idx.status == Status::NoDatabase {
            idx.status = Status::Connecting;
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
        idx.channels.insert(
            chan.id,
            ChanState {
                chan: Arc::clone(chan),
                confirmed: false,
                tables: Vec::new(),
                in_wildcard: false,
                registered: 0,
                pending: 0,
            },
        );
        let deadline = Instant::now() + PENDING_GRACE;
        for req in requests {
            match register(&mut idx, chan, &req, legacy) {
                Ok(()) => bump(&mut idx, chan.id, |c| c.registered += 1),
                Err(e) if e.may_become_valid => {
                    bump(&mut idx, chan.id, |c| c.pending += 1);
                    idx.pending.push(Pending {
                        chan: Arc::clone(chan),
                        request: req,
                        legacy,
                        deadline,
                        message: e.message,
                    });
                }
                Err(e) => refuse(fanout, chan, &e.message),
            }
        }
        confirm_ready(&mut idx, fanout);
        ChannelBindings { chan_id: chan.id }
    }

    /// Removes a channel's bindings.
    pub fn unsubscribe(&self, bindings: ChannelBindings) {
        let mut idx = self.index.write();
        let Some(state) = idx.channels.remove(&bindings.chan_id) else {
            return;
        };
        let id = bindings.chan_id;
        for (schema, table) in &state.tables {
            if let Some(tables) = idx.by_table.get_mut(schema) {
                if let Some(list) = tables.get_mut(table) {
                    list.retain(|b| b.chan.id != id);
                    if list.is_empty() {
                        tables.remove(table);
                    }
                }
                if tables.is_empty() {
                    idx.by_table.remove(schema);
                }
            }
        }
        if state.in_wildcard {
            idx.wildcard.retain(|b| b.chan.id != id);
        }
        if state.pending > 0 {
            idx.pending.retain(|p| p.chan.id != id);
        }
    }

    /// Refuses pending bindings whose grace period is over.
    pub fn expire_pending(&self, fanout: &Fanout, now: Instant) {
        let mut idx = self.index.write();
        if idx.pending.iter().all(|p| p.deadline > now) {
            return;
        }
        let (expired, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut idx.pending)
            .into_iter()
            .partition(|p| p.deadline <= now);
        idx.pending = keep;
        for p in expired {
            refuse(fanout, &p.chan, &p.message);
            bump(&mut idx, p.chan.id, |c| c.pending -= 1);
        }
        confirm_ready(&mut idx, fanout);
    }

    /// Applies one ingest event.
    pub fn apply(&self, fanout: &Fanout, event: IngestEvent) {
        match event {
            IngestEvent::Changes(batch) => {
                let idx = self.index.read();
                for change in &batch {
                    route(&idx, fanout, change);
                }
            }
            IngestEvent::TablesChanged(tables) => {
                let mut idx = self.index.write();
                idx.tables = tables
                    .into_iter()
                    .map(|t| ((t.schema.clone(), t.table.clone()), t))
                    .collect();
                // Pending bindings whose table is now enabled go live.
                for p in std::mem::take(&mut idx.pending) {
                    match register(&mut idx, &p.chan, &p.request, p.legacy) {
                        Ok(()) => bump(&mut idx, p.chan.id, |c| {
                            c.pending -= 1;
                            c.registered += 1;
                        }),
                        Err(e) if e.may_become_valid => idx.pending.push(p),
                        Err(e) => {
                            refuse(fanout, &p.chan, &e.message);
                            bump(&mut idx, p.chan.id, |c| c.pending -= 1);
                        }
                    }
                }
                confirm_ready(&mut idx, fanout);
            }
            IngestEvent::Live => {
                let mut idx = self.index.write();
                idx.status = Status::Live;
                confirm_ready(&mut idx, fanout);
            }
            IngestEvent::Disconnected => {
                // Nothing is lost (ingest catches up); new bindings wait for Live.
                self.index.write().status = Status::Connecting;
            }
            IngestEvent::Gap { message } => {
                let idx = self.index.read();
                for c in idx.channels.values().filter(|c| c.registered > 0) {
                    system(fanout, &c.chan, "postgres_changes", "error", &message);
                }
            }
        }
    }

    /// Consumes the ingest feed until it ends.
    pub async fn run(&self, fanout: &Fanout, mut rx: mpsc::Receiver<IngestEvent>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Arms: the next ingest event, or a tick to expire pending bindings.
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => self.apply(fanout, event),
                    None => return,
                },
                now = tick.tick() => self.expire_pending(fanout, now),
            }
        }
    }
}

/// Adjusts a channel's counters.
fn bump(idx: &mut Index, chan_id: u64, f: impl FnOnce(&mut ChanState)) {
    if let Some(c) = idx.channels.get_mut(&chan_id) {
        f(c);
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

/// Sends "Subscribed to PostgreSQL" to channels that are now fully resolved
/// (nothing pending), have a live binding, and the feed is live. Channels
/// with nothing registered and nothing pending are forgotten.
fn confirm_ready(idx: &mut Index, fanout: &Fanout) {
    let live = idx.status == Status::Live;
    idx.channels
        .retain(|_, c| c.registered > 0 || c.pending > 0);
    for c in idx.channels.values_mut() {
        if live && !c.confirmed && c.pending == 0 && c.registered > 0 {
            c.confirmed = true;
            system(fanout, &c.chan, "postgres_changes", "ok", SUBSCRIBED);
        }
    }
}

/// Validates one request and adds it to the index.
fn register(
    idx: &mut Index,
    chan: &Arc<ChannelHandle>,
    req: &BindingRequest,
    legacy: bool,
) -> Result<(), Invalid> {
    let (event, schema, table, conditions, select) = validate(idx, req)?;
    let b = Arc::new(Binding {
        chan: Arc::clone(chan),
        id: req.id,
        event,
        schema,
        table,
        conditions,
        select,
        legacy,
    });
    let state = idx.channels.get_mut(&chan.id);
    match (&b.schema, &b.table) {
        (Some(s), Some(t)) => {
            if let Some(state) = state {
                if !state.tables.iter().any(|(xs, xt)| xs == s && xt == t) {
                    state.tables.push((s.clone(), t.clone()));
                }
            }
            idx.by_table
                .entry(s.clone())
                .or_default()
                .entry(t.clone())
                .or_default()
                .push(b);
        }
        _ => {
            if let Some(state) = state {
                state.in_wildcard = true;
            }
            idx.wildcard.push(b);
        }
    }
    Ok(())
}

type Validated = (
    Option<Op>,
    Option<String>,
    Option<String>,
    Vec<Condition>,
    Option<Vec<String>>,
);

/// Realtime's subscription checks: params, event, filter, select, table enabled, columns.
fn validate(idx: &Index, req: &BindingRequest) -> Result<Validated, Invalid> {
    let schema_raw = req.str_field("schema");
    let table_raw = req.str_field("table");
    if schema_raw.is_none() && table_raw.is_none() {
        return Err(Invalid::final_(format!(
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {}",
            req.describe()
        )));
    }
    let wild = |s: Option<&str>| s.filter(|v| *v != "*").map(str::to_owned);
    let schema = wild(Some(schema_raw.unwrap_or("public")));
    let table = wild(table_raw);
    let event = match req
        .str_field("event")
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("INSERT") => Some(Op::Insert),
        Some("UPDATE") => Some(Op::Update),
        Some("DELETE") => Some(Op::Delete),
        _ => None,
    };
    let conditions = match req.raw.get("filter") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(f)) => filter::parse(f)
            .map_err(|d| Invalid::final_(format!("Error parsing `filter` params: {d}")))?,
        Some(other) => {
            return Err(Invalid::final_(format!(
                "Error parsing `filter` params: [{other}]"
            )))
        }
    };
    let select = match req.raw.get("select") {
        None | Some(Value::Null) => None,
        Some(Value::Array(cols)) if cols.iter().all(Value::is_string) => {
            if schema.is_none() || table.is_none() {
                return Err(Invalid::final_(format!(
                    "Column selection is not supported for wildcard subscriptions: {}",
                    req.describe()
                )));
            }
            Some(
                cols.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect(),
            )
        }
        Some(_) => {
            return Err(Invalid::final_(
                "Error parsing `select` params: expected a list of column name strings".into(),
            ))
        }
    };
    match (&schema, &table) {
        (Some(s), Some(t)) => {
            let Some(info) = idx.tables.get(&(s.clone(), t.clone())) else {
                return Err(Invalid {
                    message: format!(
                        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}. The table {}.{} is not enabled for realtime (or does not exist): run `select realtime_gateway.enable('{}.{}')`, `realtime-gateway tables enable {}.{}`, or add it to the publication supabase_realtime",
                        req.describe(), quote_ident(s), quote_ident(t), quote_ident(s), quote_ident(t), quote_ident(s), quote_ident(t)
                    ),
                    may_become_valid: true,
                });
            };
            for c in &conditions {
                if !info.columns.iter().any(|col| col.name == c.column) {
                    return Err(Invalid::final_(format!(
                        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: invalid column for filter {}",
                        req.describe(), c.column
                    )));
                }
            }
            for c in select.iter().flatten() {
                if !info.columns.iter().any(|col| &col.name == c) {
                    return Err(Invalid::final_(format!(
                        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: invalid column for select {c}",
                        req.describe()
                    )));
                }
            }
        }
        _ => {
            let any = idx.tables.keys().any(|(s, t)| {
                schema.as_ref().is_none_or(|x| x == s) && table.as_ref().is_none_or(|x| x == t)
            });
            if !any {
                return Err(Invalid {
                    message: format!(
                        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}. No enabled table matches: enable one with `select realtime_gateway.enable('schema.table')`",
                        req.describe()
                    ),
                    may_become_valid: true,
                });
            }
        }
    }
    Ok((event, schema, table, conditions, select))
}

/// Quotes an identifier only when needed (for messages).
fn quote_ident(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.is_empty()
    {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// A parsed row image, computed at most once per change.
#[derive(Default)]
struct Parsed {
    record: Option<Option<Map<String, Value>>>,
    old: Option<Option<Map<String, Value>>>,
}

fn parse_row(raw: Option<&bytes::Bytes>) -> Option<Map<String, Value>> {
    let raw = raw?;
    let mut buf = raw.to_vec();
    simd_json::serde::from_slice::<Map<String, Value>>(&mut buf).ok()
}

#[derive(Serialize)]
struct ColumnJson<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// The `data` object of a change, built once (per `select` variant).
#[derive(Serialize)]
struct Data<'a> {
    schema: &'a str,
    table: &'a str,
    commit_timestamp: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    columns: Vec<ColumnJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_record: Option<&'a RawValue>,
    errors: Option<Vec<String>>,
}

fn raw_json(bytes: &[u8]) -> Option<Box<RawValue>> {
    let s = std::str::from_utf8(bytes).ok()?;
    RawValue::from_string(s.to_owned()).ok()
}

fn narrow(row: &Map<String, Value>, keep: &dyn Fn(&str) -> bool) -> Option<Box<RawValue>> {
    let m: Map<String, Value> = row
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::value::to_raw_value(&m).ok()
}

/// Encodes `data` for a change, optionally narrowed to `select` + primary key.
fn encode_data(
    change: &Change,
    parsed: &mut Parsed,
    select: Option<&[String]>,
) -> Option<Box<RawValue>> {
    let t = &change.table;
    let keep = |c: &str| {
        select.is_none_or(|s| s.iter().any(|x| x == c) || t.primary_key.iter().any(|p| p == c))
    };
    let columns = t
        .columns
        .iter()
        .filter(|c| keep(&c.name))
        .map(|c| ColumnJson {
            name: &c.name,
            kind: &c.type_name,
        })
        .collect();
    let pk_only_old = change.op == Op::Delete && t.rls_enabled;
    let record = match (change.op, select) {
        (Op::Delete, _) => None,
        (_, None) => change.record.as_deref().and_then(raw_json),
        (_, Some(_)) => {
            let row = parsed
                .record
                .get_or_insert_with(|| parse_row(change.record.as_ref()));
            row.as_ref().and_then(|r| narrow(r, &keep))
        }
    };
    let old_record = match change.op {
        Op::Insert => None,
        _ if pk_only_old || select.is_some() => {
            let row = parsed
                .old
                .get_or_insert_with(|| parse_row(change.old_record.as_ref()));
            let pk = |c: &str| t.primary_key.iter().any(|p| p == c);
            row.as_ref().and_then(|r| {
                if pk_only_old {
                    narrow(r, &pk)
                } else {
                    narrow(r, &keep)
                }
            })
        }
        _ => change.old_record.as_deref().and_then(raw_json),
    };
    // Every event carries the key a client expects, even if the row image is missing.
    let empty = RawValue::from_string("{}".to_owned()).ok()?;
    let errors = (!change.oversized_columns.is_empty()).then(|| {
        vec![
            "Error 413: Payload Too Large".to_owned(),
            format!("columns left out: {}", change.oversized_columns.join(", ")),
        ]
    });
    let data = Data {
        schema: &t.schema,
        table: &t.table,
        commit_timestamp: &change.commit_timestamp,
        kind: change.op.as_str(),
        columns,
        record: (change.op != Op::Delete).then(|| record.as_deref().unwrap_or(&empty)),
        old_record: (change.op != Op::Insert).then(|| old_record.as_deref().unwrap_or(&empty)),
        errors,
    };
    serde_json::value::to_raw_value(&data).ok()
}

#[derive(Serialize)]
struct Event<'a> {
    ids: &'a [u32],
    data: &'a RawValue,
}

/// One channel's matching bindings for a change.
struct Hit<'a> {
    chan: &'a Arc<ChannelHandle>,
    ids: Vec<u32>,
    legacy: bool,
    select: Option<&'a [String]>,
}

/// Routes one change to every matching binding.
fn route(idx: &Index, fanout: &Fanout, change: &Change) {
    let exact = idx
        .by_table
        .get(change.table.schema.as_str())
        .and_then(|tables| tables.get(change.table.table.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    if exact.is_empty() && idx.wildcard.is_empty() {
        return; // nobody listens: never parsed, never encoded
    }
    let mut parsed = Parsed::default();
    // Matching bindings grouped by channel, in binding order.
    let mut hits: Vec<Hit<'_>> = Vec::new();
    for b in exact.iter().chain(idx.wildcard.iter()) {
        if !b.wants(change) {
            continue;
        }
        if !b.conditions.is_empty() {
            // DELETE filters see the old row.
            let row = if change.op == Op::Delete {
                parsed
                    .old
                    .get_or_insert_with(|| parse_row(change.old_record.as_ref()))
            } else {
                parsed
                    .record
                    .get_or_insert_with(|| parse_row(change.record.as_ref()))
            };
            let Some(row) = row.as_ref() else { continue };
            let kind = |name: &str| {
                change
                    .table
                    .columns
                    .iter()
                    .find(|col| col.name == name)
                    .map_or(Kind::Text, |col| filter::kind_of(&col.type_name))
            };
            if !filter::matches(&b.conditions, kind, row) {
                continue;
            }
        }
        match hits.iter_mut().find(|h| h.chan.id == b.chan.id) {
            Some(hit) => {
                if !hit.ids.contains(&b.id) {
                    hit.ids.push(b.id);
                }
            }
            None => hits.push(Hit {
                chan: &b.chan,
                ids: vec![b.id],
                legacy: b.legacy,
                select: b.select.as_deref(),
            }),
        }
    }
    if hits.is_empty() {
        return;
    }
    // data: once per select variant (almost always just one).
    type SelectVariant<'a> = (Option<&'a [String]>, Option<Box<RawValue>>);
    let mut datas: Vec<SelectVariant<'_>> = Vec::new();
    // frames: once per distinct (topic, ids, vsn, legacy).
    let mut frames: HashMap<(&str, &[u32], Vsn, bool), Option<Outbound>> = HashMap::new();
    let mut delivered = 0;
    for Hit {
        chan,
        ids,
        legacy,
        select,
    } in &hits
    {
        let (chan, legacy, select) = (*chan, *legacy, *select);
        let data = match datas.iter().position(|(s, _)| *s == select) {
            Some(i) => &datas[i].1,
            None => {
                datas.push((select, encode_data(change, &mut parsed, select)));
                &datas.last().expect("just pushed").1
            }
        };
        let Some(data) = data.as_deref() else {
            continue;
        };
        let frame = frames
            .entry((chan.topic.as_str(), ids.as_slice(), chan.vsn, legacy))
            .or_insert_with(|| {
                let encoded = if legacy {
                    encode_text(chan.vsn, None, None, &chan.topic, "postgres_changes", data)
                } else {
                    encode_text(
                        chan.vsn,
                        None,
                        None,
                        &chan.topic,
                        "postgres_changes",
                        &Event { ids, data },
                    )
                };
                encoded.ok().map(Outbound::Text)
            });
        if let Some(frame) = frame {
            delivered += usize::from(fanout.deliver(chan, frame.clone()));
        }
    }
    if delivered > 0 {
        metrics::counter!(crate::metrics::CHANGES_DELIVERED).increment(delivered as u64);
        record_latency(&change.commit_timestamp);
    }
}

/// Commit (capture) time to enqueue, into the latency histogram.
fn record_latency(commit_timestamp: &str) {
    let Some(at) = filter::parse_time(commit_timestamp) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i128)
        .unwrap_or(at);
    let seconds = (now - at).max(0) as f64 / 1e6;
    metrics::histogram!(crate::metrics::CHANGE_LATENCY).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_bounded() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"event":"*","schema":"public","table":"t"}"#).unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"table":"t","schema":"public","event":"*"}"#).unwrap();
        assert_eq!(binding_id(&a), binding_id(&b));
        assert!(u64::from(binding_id(&a)) < ID_RANGE);
        let c: Map<String, Value> =
            serde_json::from_str(r#"{"event":"INSERT","schema":"public","table":"t"}"#).unwrap();
        assert_ne!(binding_id(&a), binding_id(&c));
    }

    fn channel(id: u64, topic: &str) -> (Arc<ChannelHandle>, mpsc::Receiver<Outbound>) {
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
        let (tx, rx) = mpsc::channel(64);
        let conn = Arc::new(crate::registry::ConnHandle::new(id, tx));
        let chan = Arc::new(ChannelHandle {
            id,
            vsn: Vsn::V2,
            join_ref: None,
            topic: topic.to_owned(),
            conn,
            dropped: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            slot: AtomicUsize::new(0),
        });
        (chan, rx)
    }

    fn frames(rx: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Outbound::Text(b)) = rx.try_recv() {
            out.push(String::from_utf8(b.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn unsubscribed_channels_stop_receiving_and_leave_no_index_entries() {
        let fanout = Fanout {
            metrics: crate::metrics::Handles::new(),
            policy: crate::config::LagPolicy::Error,
        };
        let changes = Changes::default();
        changes.index.write().status = Status::Connecting;
        let table = Arc::new(TableInfo {
            oid: 1,
            schema: "public".into(),
            table: "orders".into(),
            columns: vec![change_ingest::Column {
                name: "id".into(),
                type_name: "int8".into(),
            }],
            primary_key: vec!["id".into()],
            rls_enabled: false,
        });
        changes.apply(
            &fanout,
            IngestEvent::TablesChanged(vec![Arc::clone(&table)]),
        );
        changes.apply(&fanout, IngestEvent::Live);
        let req = |v: Value| BindingRequest::from_raw(v.as_object().cloned().unwrap());
        let (a, mut rx_a) = channel(1, "realtime:a");
        let (b, mut rx_b) = channel(2, "realtime:b");
        let bind_a = changes.subscribe(
            &fanout,
            &a,
            vec![
                req(json!({"event": "*", "schema": "public", "table": "orders"})),
                req(json!({"event": "*", "schema": "*"})),
            ],
            false,
        );
        let _bind_b = changes.subscribe(
            &fanout,
            &b,
            vec![req(
                json!({"event": "INSERT", "schema": "public", "table": "orders"}),
            )],
            false,
        );
        assert!(frames(&mut rx_a)[0].contains("Subscribed to PostgreSQL"));
        assert!(frames(&mut rx_b)[0].contains("Subscribed to PostgreSQL"));
        let insert = |id: i64| {
            IngestEvent::Changes(vec![Change {
                position: change_ingest::ChangePosition { txid: 1, seq: id },
                table: Arc::clone(&table),
                op: Op::Insert,
                commit_timestamp: "2026-11-22T00:00:00.000Z".into(),
                record: Some(bytes::Bytes::from(format!("{{\"id\":{id}}}"))),
                old_record: None,
                oversized_columns: Vec::new(),
            }])
        };
        changes.apply(&fanout, insert(1));
        let got_a = frames(&mut rx_a);
        assert_eq!(
            got_a.len(),
            1,
            "one frame for both of a's bindings: {got_a:?}"
        );
        assert_eq!(frames(&mut rx_b).len(), 1);

        changes.unsubscribe(bind_a);
        changes.apply(&fanout, insert(2));
        assert!(frames(&mut rx_a).is_empty(), "a left: no more changes");
        assert_eq!(frames(&mut rx_b).len(), 1, "b is unaffected");
        let idx = changes.index.read();
        assert!(idx.wildcard.is_empty());
        assert_eq!(idx.by_table["public"]["orders"].len(), 1);
        assert!(!idx.channels.contains_key(&1));
    }

    #[test]
    fn legacy_topics() {
        let b = parse_legacy_topic("realtime:public:orders:id=eq.1").unwrap();
        assert_eq!(b.raw["schema"], "public");
        assert_eq!(b.raw["table"], "orders");
        assert_eq!(b.raw["filter"], "id=eq.1");
        let b = parse_legacy_topic("realtime:*").unwrap();
        assert_eq!(b.raw["schema"], "*");
        assert!(b.raw.get("table").is_none());
        assert!(parse_legacy_topic("realtime:").is_none());
    }
}
