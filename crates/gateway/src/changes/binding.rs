//! One `postgres_changes` entry of a join: its id, its echo, and Realtime's
//! subscription checks (params, event, filter, `select`, table enabled, columns,
//! filter values against the column types).

use std::sync::Arc;

use change_ingest::{Op, TableInfo};
use serde_json::{json, Map, Value};

use super::filter::{self, Condition, FilterError};

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
    pub(super) fn describe(&self) -> String {
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

/// A validated binding (its channel is the index entry holding it).
#[derive(Debug)]
pub(super) struct Binding {
    pub(super) id: u32,
    /// `None` = `*`.
    pub(super) event: Option<Op>,
    /// `None` = `*`.
    pub(super) schema: Option<String>,
    /// `None` = `*`.
    pub(super) table: Option<String>,
    /// Parsed filter (kinds are resolved per table at match time).
    pub(super) conditions: Vec<Condition>,
    /// Column list (`select`); the primary key is always added.
    pub(super) select: Option<Arc<[String]>>,
    /// The request as Realtime's messages describe it.
    pub(super) describe: String,
}

impl Binding {
    /// Event, schema and table match (filters are checked separately).
    pub(super) fn wants(&self, op: Op, table: &TableInfo) -> bool {
        self.wants_op(op)
            && self.schema.as_deref().is_none_or(|s| s == table.schema)
            && self.table.as_deref().is_none_or(|t| t == table.table)
    }

    /// The event matches (the table is known to match).
    pub(super) fn wants_op(&self, op: Op) -> bool {
        self.event.is_none_or(|e| e == op)
    }
}

/// Why a binding was not registered.
#[derive(Debug)]
pub(super) struct Invalid {
    pub(super) message: String,
    /// The table is not known as enabled yet: worth waiting for.
    pub(super) may_become_valid: bool,
}

impl Invalid {
    pub(super) fn final_(message: String) -> Self {
        Invalid {
            message,
            may_become_valid: false,
        }
    }
}

/// Realtime's subscription checks: params, event, filter, select, table
/// enabled, columns. `table_info` resolves an enabled table; `any_table`
/// says whether some enabled table matches a wildcard pattern.
pub(super) fn validate<'a>(
    req: &BindingRequest,
    table_info: impl Fn(&str, &str) -> Option<&'a TableInfo>,
    any_table: impl Fn(Option<&str>, Option<&str>) -> bool,
) -> Result<Binding, Invalid> {
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
        Some(Value::String(f)) => filter::parse(f).map_err(|e| match e {
            FilterError::Syntax(d) => {
                Invalid::final_(format!("Error parsing `filter` params: {d}"))
            }
            FilterError::Exception(d) => Invalid::final_(exception(req, &d)),
        })?,
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
    let binding = Binding {
        id: req.id,
        event,
        schema,
        table,
        conditions,
        select,
        describe: req.describe(),
    };
    match (&binding.schema, &binding.table) {
        (Some(s), Some(t)) => {
            let Some(info) = table_info(s, t) else {
                let (s, t) = (quote_ident(s), quote_ident(t));
                return Err(Invalid {
                    message: format!(
                        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}. The table {s}.{t} is not enabled for realtime (or does not exist): run `select realtime_gateway.enable('{s}.{t}')`, `realtime-gateway tables enable {s}.{t}`, or add it to the publication supabase_realtime",
                        req.describe()
                    ),
                    may_become_valid: true,
                });
            };
            let type_of = |c: &str| {
                info.columns
                    .iter()
                    .find(|col| col.name == c)
                    .map(|col| col.type_name.as_str())
            };
            if let Some(c) = binding
                .conditions
                .iter()
                .find(|c| type_of(&c.column).is_none())
            {
                return Err(Invalid::final_(exception(
                    req,
                    &format!("invalid column for filter {}", c.column),
                )));
            }
            filter::check_types(&binding.conditions, type_of)
                .map_err(|d| Invalid::final_(exception(req, &d)))?;
            if let Some(c) = binding
                .select
                .iter()
                .flat_map(|s| s.iter())
                .find(|c| type_of(c).is_none())
            {
                return Err(Invalid::final_(exception(
                    req,
                    &format!("invalid column for select {c}"),
                )));
            }
        }
        (schema, table) => {
            if !any_table(schema.as_deref(), table.as_deref()) {
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
    Ok(binding)
}

/// Upstream's message for a subscription its database-side check refused.
fn exception(req: &BindingRequest, detail: &str) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {detail}",
        req.describe()
    )
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
