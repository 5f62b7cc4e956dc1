//! Property tests: encode → decode round trips, never-panic on arbitrary
//! input, and a differential check of the simd-json decoder against a
//! reference decoder built on serde_json.

use bytes::Bytes;
use phoenix_channel::{
    decode_binary, decode_text, encode_text, DecodeError, Message, Payload, PayloadEncoding, Ref,
    UserBroadcast, Vsn, KIND_USER_BROADCAST_PUSH,
};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

// ---------------------------------------------------------------- strategies

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn arb_ref() -> impl Strategy<Value = Option<Ref>> {
    prop::option::of(prop_oneof![
        any::<String>().prop_map(Ref::Str),
        any::<i64>().prop_map(Ref::Num),
    ])
}

/// A UTF-8 string of at most 255 bytes (≤ 63 chars of ≤ 4 bytes).
fn short_str() -> impl Strategy<Value = String> {
    "\\PC{0,63}"
}

/// Kind-3 metadata: empty, or a JSON object of at most 255 bytes.
fn arb_metadata() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec((short_str(), arb_json()), 0..4).prop_filter_map(
            "fits in 255 bytes",
            |kv| {
                let text = Value::Object(kv.into_iter().collect()).to_string();
                (text.len() <= 255).then(|| text.into_bytes())
            }
        ),
    ]
}

// ---------------------------------------------------------------- kind-3 encoder (client side)

/// What realtime-js's serializer produces for `channel.send` on vsn=2.0.0.
fn encode_push(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    metadata: &[u8],
    encoding: u8,
    payload: &[u8],
) -> Vec<u8> {
    let len = |b: &[u8]| u8::try_from(b.len()).expect("field ≤ 255 bytes");
    let mut out = vec![
        KIND_USER_BROADCAST_PUSH,
        len(join_ref.as_bytes()),
        len(msg_ref.as_bytes()),
        len(topic.as_bytes()),
        len(event.as_bytes()),
        len(metadata),
        encoding,
    ];
    for field in [
        join_ref.as_bytes(),
        msg_ref.as_bytes(),
        topic.as_bytes(),
        event.as_bytes(),
        metadata,
        payload,
    ] {
        out.extend_from_slice(field);
    }
    out
}

// ---------------------------------------------------------------- reference decoder (serde_json)

fn ref_of(v: &Value) -> Option<Option<Ref>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(Ref::Str(s.clone()))),
        Value::Number(n) if !n.is_f64() => n.as_i64().map(|n| Some(Ref::Num(n))),
        _ => None,
    }
}

/// The codec's rules, restated on top of `serde_json::Value`.
fn reference_decode(vsn: Vsn, buf: &[u8]) -> Result<Message, DecodeError> {
    let v: Value = serde_json::from_slice(buf).map_err(|_| DecodeError::InvalidJson)?;
    let field = DecodeError::InvalidField;
    match vsn {
        Vsn::V1 => {
            let Value::Object(mut map) = v else {
                return Err(DecodeError::WrongShape);
            };
            let topic = map
                .get("topic")
                .and_then(Value::as_str)
                .ok_or(field("topic"))?
                .to_owned();
            let event = map
                .get("event")
                .and_then(Value::as_str)
                .ok_or(field("event"))?
                .to_owned();
            let payload = map.remove("payload").ok_or(field("payload"))?;
            let msg_ref = map.get("ref").and_then(ref_of).ok_or(field("ref"))?;
            let join_ref = match map.get("join_ref") {
                None => None,
                Some(v) => ref_of(v).ok_or(field("join_ref"))?,
            };
            Ok(Message {
                join_ref,
                msg_ref,
                topic,
                event,
                payload: Payload::Json(payload),
            })
        }
        Vsn::V2 => {
            let Value::Array(mut items) = v else {
                return Err(DecodeError::WrongShape);
            };
            if items.len() < 5 {
                return Err(DecodeError::WrongShape);
            }
            items.truncate(5);
            let payload = items.pop().unwrap_or_default();
            let join_ref = ref_of(&items[0]).ok_or(field("join_ref"))?;
            let msg_ref = ref_of(&items[1]).ok_or(field("ref"))?;
            let topic = items[2].as_str().ok_or(field("topic"))?.to_owned();
            let event = items[3].as_str().ok_or(field("event"))?.to_owned();
            Ok(Message {
                join_ref,
                msg_ref,
                topic,
                event,
                payload: Payload::Json(payload),
            })
        }
    }
}

// ---------------------------------------------------------------- JSON-ish inputs

const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    " ",
    "\n",
    "null",
    "true",
    "false",
    "nul",
    "0",
    "-0",
    "7",
    "-7",
    "1.5",
    "-0.0",
    "1e3",
    "1E-2",
    "1e400",
    "01",
    "1.",
    ".5",
    "+1",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "9223372036854775807",
    "-9223372036854775808",
    "\"topic\"",
    "\"event\"",
    "\"payload\"",
    "\"ref\"",
    "\"join_ref\"",
    "\"x\"",
    "\"\"",
    "\"phoenix\"",
    "\"realtime:room1\"",
    "\"6\"",
    "\"\\u00e9\"",
    "\"\\ud83d\\ude00\"",
    "\"\\ud800\"",
    "\"\\udc00\"",
    "\"a\\ud800b\"",
    "\"\\\\ud800\"",
    "\"\\n\"",
    "\"\\x\"",
    "\"\u{1}\"",
    "\"é\"",
    "\"",
    "\\",
];

fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..24).prop_map(|t| t.concat().into_bytes())
}

/// Well-formed-ish frames: valid JSON of the right (or nearly right) shape.
fn frame_like() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        4 => any::<String>().prop_map(Value::String),
        2 => any::<i64>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => arb_json(),
    ];
    let v1 = prop::collection::vec(
        (
            prop::sample::select(&["topic", "event", "payload", "ref", "join_ref", "x"][..]),
            field.clone(),
        ),
        0..7,
    )
    .prop_map(|kv| {
        let body: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    });
    // All required keys present (in any order), so many inputs decode.
    let full_v1 = (
        Just(vec!["topic", "event", "payload", "ref", "join_ref", "x"]).prop_shuffle(),
        prop::collection::vec(field.clone(), 6),
    )
        .prop_map(|(keys, values)| {
            let body: Vec<String> = keys
                .into_iter()
                .zip(values)
                .map(|(k, v)| {
                    let v = match (k, v) {
                        ("topic" | "event", Value::Number(_)) => Value::from("t"),
                        (_, v) => v,
                    };
                    format!("{}:{v}", Value::from(k))
                })
                .collect();
            format!("{{{}}}", body.join(","))
        });
    let v2 = prop::collection::vec(field, 0..7).prop_map(|items| Value::Array(items).to_string());
    prop_oneof![v1, full_v1, v2].prop_map(String::into_bytes)
}

/// A JSON-ish input, sometimes with one byte deleted, inserted or replaced.
fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![token_soup(), frame_like()],
        prop::option::of((any::<prop::sample::Index>(), any::<u8>(), 0..3u8)),
    )
        .prop_map(|(mut bytes, mutation)| {
            if let (Some((at, byte, op)), false) = (mutation, bytes.is_empty()) {
                let i = at.index(bytes.len());
                match op {
                    0 => {
                        bytes.remove(i);
                    }
                    1 => bytes.insert(i, byte),
                    _ => bytes[i] = byte,
                }
            }
            bytes
        })
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn v2_encode_decode_round_trip(
        join_ref in arb_ref(),
        msg_ref in arb_ref(),
        topic in any::<String>(),
        event in any::<String>(),
        payload in arb_json(),
    ) {
        let frame = encode_text(Vsn::V2, join_ref.as_ref(), msg_ref.as_ref(), &topic, &event, &payload).unwrap();
        let decoded = decode_text(Vsn::V2, &mut frame.to_vec()).unwrap();
        prop_assert_eq!(decoded, Message { join_ref, msg_ref, topic, event, payload: Payload::Json(payload) });
    }

    #[test]
    fn v1_encode_decode_round_trip(
        join_ref in arb_ref(),
        msg_ref in arb_ref(),
        topic in any::<String>(),
        event in any::<String>(),
        payload in arb_json(),
    ) {
        // V1 server frames never carry join_ref, so it decodes as None.
        let frame = encode_text(Vsn::V1, join_ref.as_ref(), msg_ref.as_ref(), &topic, &event, &payload).unwrap();
        let decoded = decode_text(Vsn::V1, &mut frame.to_vec()).unwrap();
        prop_assert_eq!(decoded, Message { join_ref: None, msg_ref, topic, event, payload: Payload::Json(payload) });
    }

    #[test]
    fn kind3_encode_decode_round_trip(
        join_ref in short_str(),
        msg_ref in short_str(),
        topic in short_str(),
        event in short_str(),
        metadata in arb_metadata(),
        json in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let frame = encode_push(&join_ref, &msg_ref, &topic, &event, &metadata, u8::from(json), &payload);
        let opt = |s: String| (!s.is_empty()).then_some(Ref::Str(s));
        let expected = Message {
            join_ref: opt(join_ref),
            msg_ref: opt(msg_ref),
            topic,
            event: "broadcast".to_owned(),
            payload: Payload::UserBroadcast(UserBroadcast {
                event,
                metadata: (!metadata.is_empty()).then(|| Bytes::from(metadata)),
                encoding: if json { PayloadEncoding::Json } else { PayloadEncoding::Binary },
                payload: Bytes::from(payload),
            }),
        };
        prop_assert_eq!(decode_binary(&frame), Ok(expected));
    }

    #[test]
    fn kind3_metadata_must_be_a_json_object(metadata in prop::collection::vec(any::<u8>(), 1..=255)) {
        let frame = encode_push("1", "2", "t", "e", &metadata, 1, b"{}");
        let is_object = metadata.trim_ascii_start().first() == Some(&b'{')
            && serde_json::from_slice::<Value>(&metadata).is_ok();
        match decode_binary(&frame) {
            Ok(_) => prop_assert!(is_object, "accepted {:?}", String::from_utf8_lossy(&metadata)),
            Err(e) => {
                prop_assert_eq!(e, DecodeError::InvalidMetadata);
                prop_assert!(!is_object);
            }
        }
    }

    #[test]
    fn kind3_truncated_anywhere_is_truncated(
        topic in short_str(),
        event in short_str(),
        metadata in prop::collection::vec(any::<u8>(), 1..16),
        cut in any::<prop::sample::Index>(),
    ) {
        let frame = encode_push("1", "2", &topic, &event, &metadata, 1, b"");
        // Every proper prefix of at least the kind byte is too short.
        let len = 1 + cut.index(frame.len() - 1);
        prop_assert_eq!(decode_binary(&frame[..len]), Err(DecodeError::Truncated));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_text(Vsn::V1, &mut bytes.clone());
        let _ = decode_text(Vsn::V2, &mut bytes.clone());
        let _ = decode_binary(&bytes);
        let mut push = bytes;
        push.insert(0, KIND_USER_BROADCAST_PUSH);
        let _ = decode_binary(&push);
    }

    #[test]
    fn simd_json_agrees_with_serde_json(input in json_ish()) {
        for vsn in [Vsn::V1, Vsn::V2] {
            let simd = decode_text(vsn, &mut input.clone());
            let reference = reference_decode(vsn, &input);
            prop_assert_eq!(simd, reference, "{:?} on {:?}", vsn, String::from_utf8_lossy(&input));
        }
    }
}
