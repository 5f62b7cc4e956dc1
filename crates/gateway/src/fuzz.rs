//! Fuzzing entry points, shared by the cargo-fuzz targets
//! (`crates/gateway/fuzz`, nightly) and the corpus replay test
//! (`tests/fuzz_replay.rs`, every `cargo test`). Each takes arbitrary bytes,
//! must never panic, hang or allocate without bound, and asserts the
//! invariants its parser promises.

use serde_json::{Map, Value};

use crate::changes::filter::{self, Condition, FilterOp, Kind, MAX_IN_VALUES};
use crate::limits::MAX_FIELD_BYTES;
use crate::rest::batch;

/// Column types the filter target assigns to columns (by name hash).
const TYPES: [&str; 13] = [
    "int4",
    "int8",
    "int2",
    "numeric",
    "float8",
    "bool",
    "text",
    "varchar",
    "uuid",
    "timestamptz",
    "date",
    "jsonb",
    "oid",
];

/// The phoenix-channel decoders (text V1/V2, binary) on arbitrary bytes.
pub fn codec(data: &[u8]) {
    use phoenix_channel::{decode_binary, decode_text, Vsn};
    let _ = decode_text(Vsn::V1, &mut data.to_vec());
    let _ = decode_text(Vsn::V2, &mut data.to_vec());
    let _ = decode_binary(data);
}

/// `postgres_changes` filters: `<filter>\n<row JSON>` (the row is optional).
/// Parse, join-time type checks, then evaluation under every kind; a
/// condition and its negation never both hold.
pub fn filter(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (filter_text, row_text) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(conds) = filter::parse(filter_text) else {
        return;
    };
    for c in &conds {
        assert!(!c.values.is_empty() && c.values.len() <= MAX_IN_VALUES);
        assert!(c.op == FilterOp::In || c.values.len() == 1);
        let pattern_op = matches!(
            c.op,
            FilterOp::Like | FilterOp::Ilike | FilterOp::Match | FilterOp::Imatch
        );
        assert_eq!(c.pattern.is_some(), pattern_op, "{c:?}");
    }
    let type_of = |col: &str| {
        let h = col
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31) ^ usize::from(b));
        Some(TYPES[h % TYPES.len()])
    };
    let _ = filter::check_types(&conds, type_of);
    let row = match serde_json::from_str::<Value>(row_text) {
        Ok(Value::Object(m)) => m,
        _ => row_from(&conds),
    };
    for kind in [Kind::Number, Kind::Bool, Kind::Time, Kind::Uuid, Kind::Text] {
        let _ = filter::matches(&conds, |_| kind, &row);
        for c in &conds {
            let mut negated = c.clone();
            negated.negated = !c.negated;
            let yes = filter::matches(std::slice::from_ref(c), |_| kind, &row);
            let no = filter::matches(&[negated], |_| kind, &row);
            assert!(!(yes && no), "{c:?} and its negation both hold on {row:?}");
        }
    }
}

/// A row whose columns carry the conditions' own values (as strings, and as
/// numbers when they parse), so comparisons are exercised beyond NULL.
fn row_from(conds: &[Condition]) -> Map<String, Value> {
    conds
        .iter()
        .map(|c| {
            let v = &c.values[0];
            let value = v
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| Value::String(v.clone()), Value::Number);
            (c.column.clone(), value)
        })
        .collect()
}

/// REST broadcast bodies: the batch parser's promises (a batch is accepted
/// whole and every accepted message is valid, or refused with errors), and
/// the single endpoint's JSON check.
pub fn rest_body(data: &[u8]) {
    const MAX_PAYLOAD: usize = 1000;
    match batch::parse(data, MAX_PAYLOAD) {
        Ok(messages) => {
            assert!(!messages.is_empty());
            for m in &messages {
                assert!(
                    !m.topic.is_empty() && m.topic.len() + "realtime:".len() <= MAX_FIELD_BYTES
                );
                assert!(!m.event.is_empty() && m.event.len() <= MAX_FIELD_BYTES);
                assert!(serde_json::to_string(&m.payload).is_ok());
            }
        }
        Err(errors) => {
            let list = &errors["errors"]["messages"];
            assert!(list.is_array(), "{errors}");
            // Per-message errors: exactly one entry per message of the body.
            if list[0].is_object() {
                #[derive(serde::Deserialize)]
                struct Count {
                    messages: Vec<serde::de::IgnoredAny>,
                }
                let n = serde_json::from_slice::<Count>(data)
                    .ok()
                    .map(|c| c.messages.len());
                assert_eq!(n, Some(list.as_array().map_or(0, Vec::len)), "{errors}");
            }
        }
    }
    let _ = batch::is_json(data);
}
