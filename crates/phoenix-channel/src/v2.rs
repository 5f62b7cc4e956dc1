//! V2 serializer (`vsn=2.x`) text frames: JSON arrays
//! `[join_ref, ref, topic, event, payload]`. Extra trailing elements in
//! client frames are ignored, as in Realtime's `V2Serializer`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::json::{self, RefJson};
use crate::{DecodeError, EncodeError, Message, Payload, Ref};

/// Decodes a V2 array frame. Fields are checked in array order.
pub(crate) fn decode(buf: &mut [u8]) -> Result<Message, DecodeError> {
    let mut scratch = Vec::new();
    let tape = json::parse(buf, &mut scratch)?;
    let nodes = &tape.0[..];
    match nodes.first() {
        Some(simd_json::Node::Array { len, .. }) if *len >= 5 => {}
        _ => return Err(DecodeError::WrongShape),
    }
    let mut it = json::array_elements(nodes);
    let mut next = || it.next().ok_or(DecodeError::WrongShape);
    let (join_ref, msg_ref, topic, event, payload) = (next()?, next()?, next()?, next()?, next()?);

    let join_ref = json::as_ref(join_ref).ok_or(DecodeError::InvalidField("join_ref"))?;
    let msg_ref = json::as_ref(msg_ref).ok_or(DecodeError::InvalidField("ref"))?;
    let topic = json::as_str(topic).ok_or(DecodeError::InvalidField("topic"))?;
    let event = json::as_str(event).ok_or(DecodeError::InvalidField("event"))?;

    Ok(Message {
        join_ref,
        msg_ref,
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload: Payload::Json(json::to_value(payload)?),
    })
}

/// Encodes a V2 server frame: `[join_ref, ref, topic, event, payload]`, `null` for absent refs.
pub(crate) fn encode<P: Serialize + ?Sized>(
    join_ref: Option<&Ref>,
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Result<Bytes, EncodeError> {
    encode_sized(
        join_ref,
        msg_ref,
        topic,
        event,
        payload,
        json::PAYLOAD_GUESS,
    )
}

/// [`encode`] with the payload's expected encoded length, so the frame is
/// allocated once, at its size.
pub(crate) fn encode_sized<P: Serialize + ?Sized>(
    join_ref: Option<&Ref>,
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
    payload_len: usize,
) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::with_capacity(json::text_capacity(topic, event, payload_len)).writer();
    // A tuple serializes as a JSON array.
    serde_json::to_writer(
        &mut out,
        &(RefJson(join_ref), RefJson(msg_ref), topic, event, payload),
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

    #[test]
    fn decodes_heartbeat_and_ignores_extra_elements() {
        let m = dec(r#"[null,"11","phoenix","heartbeat",{},"extra",[1]]"#).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref, Some(Ref::Str("11".to_owned())));
        assert_eq!(m.topic, "phoenix");
        assert_eq!(m.event, "heartbeat");
        assert_eq!(m.payload, Payload::Json(json!({})));
    }

    #[test]
    fn numeric_refs() {
        let m = dec(r#"[1,2,"t","e",null]"#).unwrap();
        assert_eq!(
            (m.join_ref, m.msg_ref),
            (Some(Ref::Num(1)), Some(Ref::Num(2)))
        );
        assert_eq!(m.payload, Payload::Json(json!(null)));
    }

    #[test]
    fn errors_by_variant() {
        assert_eq!(dec("[1,2"), Err(DecodeError::InvalidJson));
        assert_eq!(dec(r#"[null,"1","t","e"]"#), Err(DecodeError::WrongShape));
        assert_eq!(dec(r#"{"topic":"t"}"#), Err(DecodeError::WrongShape));
        assert_eq!(dec("null"), Err(DecodeError::WrongShape));
        let f = |field| Err(DecodeError::InvalidField(field));
        assert_eq!(dec(r#"[true,"1","t","e",{}]"#), f("join_ref"));
        assert_eq!(dec(r#"[null,1.0,"t","e",{}]"#), f("ref"));
        assert_eq!(dec(r#"[null,"1",null,"e",{}]"#), f("topic"));
        assert_eq!(dec(r#"[null,"1","t",2,{}]"#), f("event"));
    }

    #[test]
    fn encodes_array() {
        let six = Ref::Str("6".to_owned());
        let b = encode(
            Some(&six),
            None,
            "realtime:room1",
            "presence_state",
            &json!({}),
        )
        .unwrap();
        assert_eq!(
            &b[..],
            br#"["6",null,"realtime:room1","presence_state",{}]"#
        );
        let b = encode(None, Some(&Ref::Num(3)), "t", "e", &json!([1])).unwrap();
        assert_eq!(&b[..], br#"[null,3,"t","e",[1]]"#);
    }

    #[test]
    fn splices_raw_payload() {
        let raw =
            serde_json::value::RawValue::from_string(r#"{"b":1, "a":[2]}"#.to_owned()).unwrap();
        let b = encode(None, None, "t", "broadcast", &*raw).unwrap();
        assert_eq!(&b[..], br#"[null,null,"t","broadcast",{"b":1, "a":[2]}]"#);
    }
    #[test]
    fn sized_encoding_is_identical() {
        let raw = serde_json::value::to_raw_value(&json!({"a": "x".repeat(5000)})).unwrap();
        let plain = encode(None, None, "realtime:t", "postgres_changes", &*raw).unwrap();
        let sized = encode_sized(
            None,
            None,
            "realtime:t",
            "postgres_changes",
            &*raw,
            raw.get().len(),
        )
        .unwrap();
        assert_eq!(plain, sized);
    }
}
