//! The `data` object of a change, built once per column variant.
//!
//! Row images arrive as raw JSON text and are spliced in unchanged unless a
//! column list (`select`) or the RLS primary-key-only rule for DELETE narrows
//! them; only then are they parsed (at most once per change, see [`Parsed`]).

use change_ingest::authz::TableAccess;
use change_ingest::{Change, Op};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The parsed row images of one change, each computed at most once.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    record: Option<Option<Map<String, Value>>>,
    old: Option<Option<Map<String, Value>>>,
}

impl Parsed {
    /// The new row (INSERT, UPDATE).
    pub(super) fn record(&mut self, change: &Change) -> Option<&Map<String, Value>> {
        self.record
            .get_or_insert_with(|| parse_row(change.record.as_ref()))
            .as_ref()
    }

    /// The old row (UPDATE, DELETE).
    pub(super) fn old(&mut self, change: &Change) -> Option<&Map<String, Value>> {
        self.old
            .get_or_insert_with(|| parse_row(change.old_record.as_ref()))
            .as_ref()
    }

    /// The row filters see: the old row for DELETE, the new one otherwise.
    pub(super) fn filtered_row(&mut self, change: &Change) -> Option<&Map<String, Value>> {
        if change.op == Op::Delete {
            self.old(change)
        } else {
            self.record(change)
        }
    }
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

/// The `data` object of a change.
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

/// The event payload of a subscribed (non-legacy) channel.
#[derive(Serialize)]
pub(super) struct Event<'a> {
    pub(super) ids: &'a [u32],
    pub(super) data: &'a RawValue,
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

/// Encodes `data` for a change, narrowed to `select` + primary key and to the
/// columns the role may read (`access`, `None` = all). `old_pk_only`: the old
/// row of an UPDATE was not visible to the subscriber (only its key shows).
pub(super) fn encode_data(
    change: &Change,
    parsed: &mut Parsed,
    select: Option<&[String]>,
    access: Option<&TableAccess>,
    old_pk_only: bool,
) -> Option<Box<RawValue>> {
    let t = &change.table;
    let readable = |c: &str| access.is_none_or(|a| a.can_select(c));
    let is_pk = |c: &str| t.primary_key.iter().any(|p| p == c) && readable(c);
    let keep = |c: &str| readable(c) && select.is_none_or(|s| s.iter().any(|x| x == c) || is_pk(c));
    let narrowed = select.is_some() || access.is_some();
    let columns = t
        .columns
        .iter()
        .filter(|c| keep(&c.name))
        .map(|c| ColumnJson {
            name: &c.name,
            kind: &c.type_name,
        })
        .collect();
    let pk_only_old = change.op == Op::Delete && t.rls_enabled || old_pk_only;
    let record = match change.op {
        Op::Delete => None,
        _ if narrowed => parsed.record(change).and_then(|r| narrow(r, &keep)),
        _ => change.record.as_deref().and_then(raw_json),
    };
    let old_record = match change.op {
        Op::Insert => None,
        _ if pk_only_old => parsed.old(change).and_then(|r| narrow(r, &is_pk)),
        _ if narrowed => parsed.old(change).and_then(|r| narrow(r, &keep)),
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

/// `data` for a change the subscriber may not receive rows of: Realtime's
/// `Error 401: Unauthorized` / `Error 400: Bad Request, no primary key`.
pub(super) fn encode_error(change: &Change, error: &str) -> Option<Box<RawValue>> {
    let t = &change.table;
    let empty = RawValue::from_string("{}".to_owned()).ok()?;
    let data = Data {
        schema: &t.schema,
        table: &t.table,
        commit_timestamp: &change.commit_timestamp,
        kind: change.op.as_str(),
        columns: Vec::new(),
        record: (change.op != Op::Delete).then_some(&*empty),
        old_record: (change.op != Op::Insert).then_some(&*empty),
        errors: Some(vec![error.to_owned()]),
    };
    serde_json::value::to_raw_value(&data).ok()
}
