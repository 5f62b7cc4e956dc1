//! V1 serializer (`vsn=1.x`): JSON objects.
//!
//! Client frames are `{"topic","event","payload","ref","join_ref"?}`; extra
//! keys are ignored. Server frames carry `topic, event, payload, ref` only —
//! Phoenix's V1 serializer never sends `join_ref`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::json::{self, RefJson};
use crate::{DecodeError, EncodeError, Message, Payload, Ref};

/// Decodes a V1 object frame.
///
/// Fields are checked in the order topic, event, payload, ref, join_ref; the
/// first problem is reported.
pub(crate) fn decode(buf: &mut [u8]) -> Result<Message, DecodeError> {
    let mut scratch = Vec::new();
    let tape = json::parse(buf, &mut scratch)?;
    let nodes = &tape.0[..];
    if !matches!(nodes.first(), Some(simd_json::Node::Object { .. })) {
        return Err(DecodeError::WrongShape);
    }

    let (mut topic, mut event, mut payload, mut msg_ref, mut join_ref) =
        (None, None, None, None, None);
    // Later duplicates overwrite earlier ones, as serde_json's map would.
    for (key, value) in json::object_entries(nodes) {
        match key {
            "topic" => topic = Some(value),
            "event" => event = Some(value),
            "payload" => payload = Some(value),
            "ref" => msg_ref = Some(value),
            "join_ref" => join_ref = Some(value),
            _ => {}
        }
    }

    let topic = topic
        .and_then(json::as_str)
        .ok_or(DecodeError::InvalidField("topic"))?;
    let event = event
        .and_then(json::as_str)
        .ok_or(DecodeError::InvalidField("event"))?;
    let payload = payload.ok_or(DecodeError::InvalidField("payload"))?;
    let msg_ref = msg_ref
        .and_then(json::as_ref)
        .ok_or(DecodeError::InvalidField("ref"))?;
    let join_ref = match join_ref {
        None => None,
        Some(v) => json::as_ref(v).ok_or(DecodeError::InvalidField("join_ref"))?,
    };

    Ok(Message {
        join_ref,
        msg_ref,
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload: Payload::Json(json::to_value(payload)?),
    })
}

/// Encodes a V1 server frame: `{"topic":…,"event":…,"payload":…,"ref":…}`.
pub(crate) fn encode<P: Serialize + ?Sized>(
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Result<Bytes, EncodeError> {
    encode_sized(msg_ref, topic, event, payload, json::PAYLOAD_GUESS)
}

/// [`encode`] with the payload's expected encoded length, so the frame is
/// allocated once, at its size.
pub(crate) fn encode_sized<P: Serialize + ?Sized>(
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
    payload_len: usize,
) -> Result<Bytes, EncodeError> {
    // Field order is the wire order.
    #[derive(Serialize)]
    struct Frame<'a, P: ?Sized> {
        topic: &'a str,
        event: &'a str,
        payload: &'a P,
        #[serde(rename = "ref")]
        msg_ref: RefJson<'a>,
    }

    let mut out = BytesMut::with_capacity(json::text_capacity(topic, event, payload_len)).writer();
    serde_json::to_writer(
        &mut out,
        &Frame {
            topic,
            event,
            payload,
            msg_ref: RefJson(msg_ref),
        },
    )?;
    Ok(out.into_inner().freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dec(s: &str) -> Result<Message, DecodeError> {
        decode(&mut s.as_bytes().to_vec())
    }

    fn s(v: &str) -> Option<Ref> {
        Some(Ref::Str(v.to_owned()))
    }

    #[test]
    fn decodes_join() {
        let m = dec(r#"{"topic":"realtime:room1","event":"phx_join","payload":{"config":{}},"ref":"6","join_ref":"6"}"#)
            .unwrap();
        assert_eq!(m.topic, "realtime:room1");
        assert_eq!(m.event, "phx_join");
        assert_eq!(m.msg_ref, s("6"));
        assert_eq!(m.join_ref, s("6"));
        assert_eq!(m.payload, Payload::Json(json!({"config":{}})));
    }

    #[test]
    fn join_ref_optional_ref_nullable_numbers_ok_extra_ignored() {
        let m = dec(r#"{"x":1,"topic":"phoenix","event":"heartbeat","payload":{},"ref":null}"#)
            .unwrap();
        assert_eq!((m.msg_ref, m.join_ref), (None, None));
        let m = dec(r#"{"topic":"t","event":"e","payload":1,"ref":7,"join_ref":-3}"#).unwrap();
        assert_eq!(
            (m.msg_ref, m.join_ref),
            (Some(Ref::Num(7)), Some(Ref::Num(-3)))
        );
        let m = dec(r#"{"topic":"t","event":"e","payload":1,"ref":7,"join_ref":null}"#).unwrap();
        assert_eq!(m.join_ref, None);
    }

    #[test]
    fn errors_by_variant() {
        assert_eq!(dec("{"), Err(DecodeError::InvalidJson));
        assert_eq!(dec(""), Err(DecodeError::InvalidJson));
        assert_eq!(dec("[1,2,3,4,5]"), Err(DecodeError::WrongShape));
        assert_eq!(dec(r#""x""#), Err(DecodeError::WrongShape));
        let f = |field| Err(DecodeError::InvalidField(field));
        assert_eq!(dec(r#"{"event":"e","payload":{},"ref":null}"#), f("topic"));
        assert_eq!(
            dec(r#"{"topic":1,"event":"e","payload":{},"ref":null}"#),
            f("topic")
        );
        assert_eq!(dec(r#"{"topic":"t","payload":{},"ref":null}"#), f("event"));
        assert_eq!(dec(r#"{"topic":"t","event":"e","ref":null}"#), f("payload"));
        assert_eq!(dec(r#"{"topic":"t","event":"e","payload":{}}"#), f("ref"));
        assert_eq!(
            dec(r#"{"topic":"t","event":"e","payload":{},"ref":1.5}"#),
            f("ref")
        );
        assert_eq!(
            dec(r#"{"topic":"t","event":"e","payload":{},"ref":"1","join_ref":[]}"#),
            f("join_ref")
        );
    }

    #[test]
    fn encodes_without_join_ref() {
        let b = encode(
            s("6").as_ref(),
            "realtime:room1",
            "phx_reply",
            &json!({"status":"ok"}),
        )
        .unwrap();
        assert_eq!(
            &b[..],
            br#"{"topic":"realtime:room1","event":"phx_reply","payload":{"status":"ok"},"ref":"6"}"#
        );
        let b = encode(None, "t", "e", &json!(null)).unwrap();
        assert_eq!(
            &b[..],
            br#"{"topic":"t","event":"e","payload":null,"ref":null}"#
        );
        let b = encode(Some(&Ref::Num(42)), "t", "e", &json!({})).unwrap();
        assert_eq!(
            &b[..],
            br#"{"topic":"t","event":"e","payload":{},"ref":42}"#
        );
    }

    #[test]
    fn encode_escapes_strings() {
        let b = encode(None, "a\"b", "\n", &json!("é")).unwrap();
        assert_eq!(
            &b[..],
            "{\"topic\":\"a\\\"b\",\"event\":\"\\n\",\"payload\":\"é\",\"ref\":null}".as_bytes()
        );
    }
}
