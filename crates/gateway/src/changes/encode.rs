//! The `data` object of a change, built once per column variant.
//!
//! Row images arrive as raw JSON text and are spliced in unchanged unless a
//! column list (`select`) or the RLS primary-key-only rule for DELETE narrows
//! them; only then are they parsed (at most once per change, see [`Parsed`]).

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

/// Encodes `data` for a change, optionally narrowed to `select` + primary key.
pub(super) fn encode_data(
    change: &Change,
    parsed: &mut Parsed,
    select: Option<&[String]>,
) -> Option<Box<RawValue>> {
    let t = &change.table;
    let is_pk = |c: &str| t.primary_key.iter().any(|p| p == c);
    let keep = |c: &str| select.is_none_or(|s| s.iter().any(|x| x == c) || is_pk(c));
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
        (_, Some(_)) => parsed.record(change).and_then(|r| narrow(r, &keep)),
    };
    let old_record = match change.op {
        Op::Insert => None,
        _ if pk_only_old => parsed.old(change).and_then(|r| narrow(r, &is_pk)),
        _ if select.is_some() => parsed.old(change).and_then(|r| narrow(r, &keep)),
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
