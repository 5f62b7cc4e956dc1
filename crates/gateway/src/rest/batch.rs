//! The REST broadcast bodies: parsing and validation, no I/O.
//!
//! `POST /api/broadcast` takes `{"messages": [{topic, event, payload,
//! private?, id?}]}`. A batch is validated whole: any invalid message refuses
//! it with upstream's changeset errors, one map per message (`{}` for the
//! valid ones), so a batch is delivered whole or not at all. The body size is
//! bounded before it gets here (`MAX_BODY_SIZE`); payloads are checked
//! without being built (`RawValue`).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::limits::MAX_FIELD_BYTES;

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<BatchMessage<'a>>,
}

/// One message of a batch as the body has it (payload not built yet).
#[derive(Deserialize)]
struct BatchMessage<'a> {
    topic: String,
    event: String,
    /// The raw text, to check it before building it.
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    id: Option<Value>,
}

/// A validated batch message.
#[derive(Debug)]
pub struct Message {
    /// The subtopic (without `realtime:`).
    pub topic: String,
    /// The user event.
    pub event: String,
    /// The payload (a JSON object).
    pub payload: Map<String, Value>,
    /// Private channel.
    pub private: bool,
    /// Optional message id, sent back as `meta.id`.
    pub id: Option<Value>,
}

/// Parses and validates a batch body. `Err` is the 422 response body:
/// upstream's errors (a JSON error, an empty batch, or per-message errors).
pub fn parse(body: &[u8], max_payload: usize) -> Result<Vec<Message>, Value> {
    let batch: Batch<'_> = serde_json::from_slice(body)
        .map_err(|e| json!({"errors": {"messages": [e.to_string()]}}))?;
    if batch.messages.is_empty() {
        return Err(json!({"errors": {"messages": ["can't be blank"]}}));
    }
    let mut messages = Vec::with_capacity(batch.messages.len());
    let mut errors: Vec<Map<String, Value>> = Vec::new();
    for m in batch.messages {
        let (payload, e) = validate(&m, max_payload);
        if errors.is_empty() && !e.is_empty() {
            // From the first invalid message on, one entry per message (`{}`
            // for the valid ones, those before it included).
            errors = vec![Map::new(); messages.len()];
            messages.clear();
        }
        if !errors.is_empty() || !e.is_empty() {
            errors.push(e);
            continue;
        }
        messages.push(Message {
            topic: m.topic,
            event: m.event,
            payload: payload.unwrap_or_default(),
            private: m.private,
            id: m.id,
        });
    }
    if errors.is_empty() {
        Ok(messages)
    } else {
        Err(json!({"errors": {"messages": errors}}))
    }
}

/// Upstream's changeset errors for one batch message (`{}` when valid), and
/// its payload built when valid. A payload the raw check accepts but that does
/// not build (nested deeper than the JSON parser's limit) is invalid too: an
/// accepted message is never relayed without its payload.
fn validate(
    m: &BatchMessage<'_>,
    max_payload: usize,
) -> (Option<Map<String, Value>>, Map<String, Value>) {
    let mut errors = Map::new();
    let mut add = |field: &str, msg: &str| {
        errors.insert(field.to_owned(), json!([msg]));
    };
    let mut payload = None;
    match m.payload {
        None => add("payload", "can't be blank"),
        Some(p) if !p.get().starts_with('{') => add("payload", "is invalid"),
        Some(p) if p.get().len() > max_payload => {
            add("payload", "Payload size exceeds tenant limit")
        }
        Some(p) => match serde_json::from_str::<Map<String, Value>>(p.get()) {
            Ok(map) => payload = Some(map),
            Err(_) => add("payload", "is invalid"),
        },
    }
    if m.topic.is_empty() {
        add("topic", "can't be blank");
    } else if m.topic.len() + "realtime:".len() > MAX_FIELD_BYTES {
        add("topic", "should be at most 246 character(s)");
    }
    if m.event.is_empty() {
        add("event", "can't be blank");
    } else if m.event.len() > MAX_FIELD_BYTES {
        add("event", "should be at most 255 character(s)");
    }
    (payload, errors)
}

/// Whether a single-message body is one valid JSON value (checked without
/// building it).
pub fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_batches_parse_whole() {
        let body = br#"{"messages":[{"topic":"t","event":"e","payload":{"a":1},"id":"x"},{"topic":"u","event":"f","payload":{},"private":true}]}"#;
        let ms = parse(body, 100).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(Value::Object(ms[0].payload.clone()), json!({"a": 1}));
        assert!(ms[1].private);
    }

    #[test]
    fn invalid_batches_get_upstream_errors() {
        assert_eq!(
            parse(br#"{"messages":[]}"#, 100).unwrap_err(),
            json!({"errors": {"messages": ["can't be blank"]}})
        );
        let body = br#"{"messages":[{"topic":"t","event":"e","payload":{}},{"topic":"","event":"e","payload":1},{"topic":"t","event":"e","payload":{}},{"topic":"t","event":"e"}]}"#;
        assert_eq!(
            parse(body, 100).unwrap_err(),
            json!({"errors": {"messages": [{}, {"topic": ["can't be blank"], "payload": ["is invalid"]}, {}, {"payload": ["can't be blank"]}]}})
        );
        let big = format!(
            r#"{{"messages":[{{"topic":"t","event":"e","payload":{{"p":"{}"}}}}]}}"#,
            "x".repeat(200)
        );
        assert_eq!(
            parse(big.as_bytes(), 100).unwrap_err()["errors"]["messages"][0]["payload"],
            json!(["Payload size exceeds tenant limit"])
        );
        assert!(parse(b"not json", 100).unwrap_err()["errors"]["messages"][0].is_string());
        assert!(is_json(b" [1, 2] ") && !is_json(b"{") && !is_json(b""));
        // Deeper than the JSON parser builds: refused, never relayed as null.
        let deep = format!(
            r#"{{"messages":[{{"topic":"t","event":"e","payload":{{"a":{}1{}}}}}]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            parse(deep.as_bytes(), 10_000).unwrap_err()["errors"]["messages"][0]["payload"],
            json!(["is invalid"])
        );
    }
}
