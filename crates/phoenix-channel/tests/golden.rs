//! Golden frames: every example frame in `/work/shared/PROTOCOL.md`, captured
//! from realtime-js 2.119.0 ([sim]) or taken from Realtime's serializer layouts.
//! Client frames must decode to the expected fields; server frames must be
//! produced byte-for-byte.

use phoenix_channel::{
    decode_binary, decode_text, encode_reply, encode_text, encode_user_broadcast, DecodeError,
    Message, Payload, PayloadEncoding, Ref, UserBroadcast, Vsn, KIND_USER_BROADCAST,
    KIND_USER_BROADCAST_PUSH,
};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

fn s(r: &str) -> Option<Ref> {
    Some(Ref::Str(r.to_owned()))
}

fn decode(vsn: Vsn, frame: &str) -> Message {
    decode_text(vsn, &mut frame.as_bytes().to_vec()).unwrap_or_else(|e| panic!("{frame}: {e:?}"))
}

fn json_payload(m: &Message) -> &Value {
    match &m.payload {
        Payload::Json(v) => v,
        Payload::UserBroadcast(_) => panic!("expected a JSON payload"),
    }
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).unwrap()
}

fn assert_frame(actual: bytes::Bytes, expected: &str) {
    assert_eq!(
        std::str::from_utf8(&actual).unwrap(),
        expected,
        "encoded frame differs"
    );
}

const JOIN_CONFIG: &str = r#"{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"messages","filter":"id=eq.1"},{"event":"*","schema":"public"}],"private":false}}"#;

// ---------------------------------------------------------------- client → server, V2

#[test]
fn v2_first_join_with_config() {
    // §2.1 [sim]
    let frame = format!(r#"["6","6","realtime:room1","phx_join",{JOIN_CONFIG}]"#);
    let m = decode(Vsn::V2, &frame);
    assert_eq!(m.join_ref, s("6"));
    assert_eq!(m.msg_ref, s("6"));
    assert_eq!(m.topic, "realtime:room1");
    assert_eq!(m.event, "phx_join");
    let p = json_payload(&m);
    assert_eq!(*p, serde_json::from_str::<Value>(JOIN_CONFIG).unwrap());
    assert_eq!(p["config"]["presence"]["key"], "u1");
    assert_eq!(p["config"]["postgres_changes"][0]["filter"], "id=eq.1");
    assert!(p.get("access_token").is_none());
}

#[test]
fn v2_rejoin_with_access_token_and_version() {
    // §2.1 [sim]: rejoins carry access_token and version next to config.
    let frame = r#"["7","7","realtime:room1","phx_join",{"config":{"broadcast":{"self":false,"ack":false},"presence":{"key":"","enabled":false},"postgres_changes":[],"private":false},"access_token":"<jwt-or-apikey>","version":"realtime-js/2.119.0"}]"#;
    let m = decode(Vsn::V2, frame);
    assert_eq!(m.join_ref, s("7"));
    let p = json_payload(&m);
    assert_eq!(p["access_token"], "<jwt-or-apikey>");
    assert_eq!(p["version"], "realtime-js/2.119.0");
}

#[test]
fn v2_heartbeat() {
    // §8.1 [sim]
    let m = decode(Vsn::V2, r#"[null,"11","phoenix","heartbeat",{}]"#);
    assert_eq!(m.join_ref, None);
    assert_eq!(m.msg_ref, s("11"));
    assert_eq!(m.topic, "phoenix");
    assert_eq!(m.event, "heartbeat");
    assert_eq!(*json_payload(&m), json!({}));
}

#[test]
fn v2_leave() {
    // §8.3 [sim]
    let m = decode(Vsn::V2, r#"["6","13","realtime:room1","phx_leave",{}]"#);
    assert_eq!((&m.join_ref, &m.msg_ref), (&s("6"), &s("13")));
    assert_eq!(m.event, "phx_leave");
    assert_eq!(*json_payload(&m), json!({}));
}

#[test]
fn v2_presence_track_and_untrack() {
    // §7 [sim]
    let m = decode(
        Vsn::V2,
        r#"["6","8","realtime:room1","presence",{"type":"presence","event":"track","payload":{"online_at":"t1"}}]"#,
    );
    assert_eq!((&m.join_ref, &m.msg_ref), (&s("6"), &s("8")));
    assert_eq!(m.event, "presence");
    assert_eq!(
        *json_payload(&m),
        json!({"type":"presence","event":"track","payload":{"online_at":"t1"}})
    );

    let m = decode(
        Vsn::V2,
        r#"["6","9","realtime:room1","presence",{"type":"presence","event":"untrack"}]"#,
    );
    assert_eq!(m.msg_ref, s("9"));
    let p = json_payload(&m);
    assert_eq!(p["event"], "untrack");
    assert!(p.get("payload").is_none());
}

#[test]
fn v2_access_token() {
    // §8.2 [sim]
    let m = decode(
        Vsn::V2,
        r#"["6","10","realtime:room1","access_token",{"access_token":"<jwt>"}]"#,
    );
    assert_eq!((&m.join_ref, &m.msg_ref), (&s("6"), &s("10")));
    assert_eq!(m.event, "access_token");
    assert_eq!(*json_payload(&m), json!({"access_token":"<jwt>"}));
}

#[test]
fn v2_text_broadcast_from_wscat() {
    // §6.1
    let m = decode(
        Vsn::V2,
        r#"["1","2","realtime:room1","broadcast",{"type":"broadcast","event":"e","payload":{"a":1}}]"#,
    );
    assert_eq!((&m.join_ref, &m.msg_ref), (&s("1"), &s("2")));
    assert_eq!(m.event, "broadcast");
    assert_eq!(
        *json_payload(&m),
        json!({"type":"broadcast","event":"e","payload":{"a":1}})
    );
}

#[test]
fn v2_not_an_array_is_wrong_shape() {
    // §1.4: anything that is not an array is dropped.
    let mut buf =
        br#"{"topic":"realtime:room1","event":"phx_join","payload":{},"ref":"6"}"#.to_vec();
    assert_eq!(decode_text(Vsn::V2, &mut buf), Err(DecodeError::WrongShape));
}

// ---------------------------------------------------------------- client → server, V1

#[test]
fn v1_join() {
    // §1.4 [sim], with the `{…}` filled in from the §2.1 capture.
    let frame = format!(
        r#"{{"topic":"realtime:room1","event":"phx_join","payload":{JOIN_CONFIG},"ref":"6","join_ref":"6"}}"#
    );
    let m = decode(Vsn::V1, &frame);
    assert_eq!((&m.join_ref, &m.msg_ref), (&s("6"), &s("6")));
    assert_eq!(m.topic, "realtime:room1");
    assert_eq!(m.event, "phx_join");
    assert_eq!(
        *json_payload(&m),
        serde_json::from_str::<Value>(JOIN_CONFIG).unwrap()
    );
}

#[test]
fn v1_heartbeat_without_join_ref() {
    // §1.4: join_ref is optional; ref may be null.
    let m = decode(
        Vsn::V1,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"11"}"#,
    );
    assert_eq!((&m.join_ref, &m.msg_ref), (&None, &s("11")));
    let m = decode(
        Vsn::V1,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null,"join_ref":null}"#,
    );
    assert_eq!((&m.join_ref, &m.msg_ref), (&None, &None));
}

#[test]
fn v1_broadcast() {
    // §6.1: on vsn=1.0.0 send() is a text frame with event "broadcast".
    let m = decode(
        Vsn::V1,
        r#"{"topic":"realtime:room1","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"a":1}},"ref":"3","join_ref":"1"}"#,
    );
    assert_eq!(m.event, "broadcast");
    assert_eq!(json_payload(&m)["payload"], json!({"a":1}));
}

#[test]
fn v1_missing_ref_key_is_invalid() {
    // §1.4: the `ref` key is required (its value may be null).
    let mut buf = br#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#.to_vec();
    assert_eq!(
        decode_text(Vsn::V1, &mut buf),
        Err(DecodeError::InvalidField("ref"))
    );
}

// ---------------------------------------------------------------- binary

#[test]
fn kind3_user_broadcast_push() {
    // §1.4 [sim]: header 03 01 01 0e 06 00 01.
    let mut frame = vec![0x03, 0x01, 0x01, 0x0e, 0x06, 0x00, 0x01];
    frame.extend_from_slice(b"6");
    frame.extend_from_slice(b"7");
    frame.extend_from_slice(b"realtime:room1");
    frame.extend_from_slice(b"cursor");
    frame.extend_from_slice(r#"{"x":3,"s":"é"}"#.as_bytes());
    assert_eq!(frame[0], KIND_USER_BROADCAST_PUSH);

    let m = decode_binary(&frame).unwrap();
    assert_eq!(
        m,
        Message {
            join_ref: s("6"),
            msg_ref: s("7"),
            topic: "realtime:room1".to_owned(),
            event: "broadcast".to_owned(),
            payload: Payload::UserBroadcast(UserBroadcast {
                event: "cursor".to_owned(),
                metadata: None,
                encoding: PayloadEncoding::Json,
                payload: bytes::Bytes::from(r#"{"x":3,"s":"é"}"#),
            }),
        }
    );
}

#[test]
fn kind4_user_broadcast_is_byte_exact() {
    // §1.4 [sim]: 04 0e 06 0c 01 + realtime:room1 + cursor + {"id":"abc"} + {"x":2}.
    let mut expected = vec![0x04, 0x0e, 0x06, 0x0c, 0x01];
    expected.extend_from_slice(b"realtime:room1");
    expected.extend_from_slice(b"cursor");
    expected.extend_from_slice(br#"{"id":"abc"}"#);
    expected.extend_from_slice(br#"{"x":2}"#);
    assert_eq!(expected[0], KIND_USER_BROADCAST);

    let b = encode_user_broadcast(
        "realtime:room1",
        "cursor",
        Some(br#"{"id":"abc"}"#),
        PayloadEncoding::Json,
        br#"{"x":2}"#,
    )
    .unwrap();
    assert_eq!(&b[..], &expected[..]);
}

#[test]
fn kind3_relayed_as_kind4() {
    // §6.1: a binary-origin broadcast fans out to V2 subscribers as kind 4.
    let mut frame = vec![0x03, 0x01, 0x01, 0x0e, 0x06, 0x00, 0x00];
    frame.extend_from_slice(b"67realtime:room1cursor\x00\x01\x02");
    let m = decode_binary(&frame).unwrap();
    let Payload::UserBroadcast(ub) = &m.payload else {
        panic!("expected a user broadcast")
    };
    let out = encode_user_broadcast(
        &m.topic,
        &ub.event,
        ub.metadata.as_deref(),
        ub.encoding,
        &ub.payload,
    )
    .unwrap();
    assert_eq!(
        &out[..],
        b"\x04\x0e\x06\x00\x00realtime:room1cursor\x00\x01\x02"
    );
}

#[test]
fn phoenix_binary_kinds_are_unsupported() {
    // §1.4: kinds 0/1/2 are never accepted (nor sent).
    for kind in 0..=2 {
        assert_eq!(
            decode_binary(&[kind, 0, 0, 0, 0]),
            Err(DecodeError::UnsupportedKind(kind))
        );
    }
}

// ---------------------------------------------------------------- server → client

#[test]
fn v1_join_reply_is_byte_exact() {
    // §1.4 [sim]
    let b = encode_reply(
        Vsn::V1,
        s("6").as_ref(),
        s("6").as_ref(),
        "realtime:room1",
        "ok",
        &json!({"postgres_changes":[]}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"{"topic":"realtime:room1","event":"phx_reply","payload":{"status":"ok","response":{"postgres_changes":[]}},"ref":"6"}"#,
    );
}

#[test]
fn v2_join_reply_with_postgres_changes_is_byte_exact() {
    // §2.3 [sim]. Field order follows the client's maps, so use structs.
    #[derive(Serialize)]
    struct Binding<'a> {
        event: &'a str,
        schema: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        table: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        filter: Option<&'a str>,
        id: u32,
    }
    #[derive(Serialize)]
    struct JoinResponse<'a> {
        postgres_changes: Vec<Binding<'a>>,
    }
    let response = JoinResponse {
        postgres_changes: vec![
            Binding {
                event: "INSERT",
                schema: "public",
                table: Some("messages"),
                filter: Some("id=eq.1"),
                id: 1000,
            },
            Binding {
                event: "*",
                schema: "public",
                table: None,
                filter: None,
                id: 1001,
            },
        ],
    };
    let b = encode_reply(
        Vsn::V2,
        s("6").as_ref(),
        s("6").as_ref(),
        "realtime:room1",
        "ok",
        &response,
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6","6","realtime:room1","phx_reply",{"status":"ok","response":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"messages","filter":"id=eq.1","id":1000},{"event":"*","schema":"public","id":1001}]}}]"#,
    );
}

#[test]
fn join_error_reply() {
    // §2.4
    let b = encode_reply(
        Vsn::V2,
        s("6").as_ref(),
        s("6").as_ref(),
        "realtime:x",
        "error",
        &json!({"reason":"PrivateOnly: This project only allows private channels"}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6","6","realtime:x","phx_reply",{"status":"error","response":{"reason":"PrivateOnly: This project only allows private channels"}}]"#,
    );
    // §8.4 unmatched topic, V1.
    let b = encode_reply(
        Vsn::V1,
        None,
        s("3").as_ref(),
        "room1",
        "error",
        &json!({"reason":"unmatched topic"}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"{"topic":"room1","event":"phx_reply","payload":{"status":"error","response":{"reason":"unmatched topic"}},"ref":"3"}"#,
    );
}

#[test]
fn heartbeat_reply_echoes_decoded_refs() {
    // §8.1 [sim]: decode the heartbeat, reply with its refs.
    let m = decode(Vsn::V2, r#"[null,"11","phoenix","heartbeat",{}]"#);
    let b = encode_reply(
        Vsn::V2,
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        "ok",
        &json!({}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"[null,"11","phoenix","phx_reply",{"status":"ok","response":{}}]"#,
    );

    // The same in V1.
    let m = decode(
        Vsn::V1,
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"11"}"#,
    );
    let b = encode_reply(
        Vsn::V1,
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        "ok",
        &json!({}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"11"}"#,
    );
}

#[test]
fn numeric_refs_are_echoed_as_numbers() {
    // wscat users may send integer refs; replies keep the JSON type.
    let m = decode(Vsn::V2, r#"[null,11,"phoenix","heartbeat",{}]"#);
    let b = encode_reply(
        Vsn::V2,
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        "ok",
        &json!({}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"[null,11,"phoenix","phx_reply",{"status":"ok","response":{}}]"#,
    );
}

#[test]
fn leave_reply_then_close() {
    // §8.3 [sim]
    let jr = s("6");
    let b = encode_reply(
        Vsn::V2,
        jr.as_ref(),
        s("13").as_ref(),
        "realtime:room1",
        "ok",
        &json!({}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6","13","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#,
    );
    let b = encode_text(
        Vsn::V2,
        jr.as_ref(),
        jr.as_ref(),
        "realtime:room1",
        "phx_close",
        &json!({}),
    )
    .unwrap();
    assert_frame(b, r#"["6","6","realtime:room1","phx_close",{}]"#);
}

#[test]
fn broadcast_ack_reply() {
    // §6.1: ack replies to the ref inside the kind-3 header.
    let mut frame = vec![0x03, 0x01, 0x01, 0x0e, 0x06, 0x00, 0x01];
    frame.extend_from_slice(br#"67realtime:room1cursor{"x":3}"#);
    let m = decode_binary(&frame).unwrap();
    let b = encode_reply(
        Vsn::V2,
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        "ok",
        &json!({}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6","7","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#,
    );
}

#[test]
fn presence_state_and_diff() {
    // §7
    let b = encode_text(
        Vsn::V2,
        s("6").as_ref(),
        None,
        "realtime:room1",
        "presence_state",
        &json!({"u2":{"metas":[{"name":"bob","phx_ref":"GHlA1fShRjMmZhnL"}]}}),
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6",null,"realtime:room1","presence_state",{"u2":{"metas":[{"name":"bob","phx_ref":"GHlA1fShRjMmZhnL"}]}}]"#,
    );
    // Raw payload keeps the capture's key order.
    let diff = raw(
        r#"{"joins":{"u3":{"metas":[{"phx_ref":"GHlA1fShRjMmZhnM","name":"carol"}]}},"leaves":{}}"#,
    );
    let b = encode_text(
        Vsn::V2,
        None,
        None,
        "realtime:room1",
        "presence_diff",
        &*diff,
    )
    .unwrap();
    assert_frame(
        b,
        r#"[null,null,"realtime:room1","presence_diff",{"joins":{"u3":{"metas":[{"phx_ref":"GHlA1fShRjMmZhnM","name":"carol"}]}},"leaves":{}}]"#,
    );
}

#[test]
fn system_messages() {
    // §3
    #[derive(Serialize)]
    struct System<'a> {
        extension: &'a str,
        status: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    }
    let b = encode_text(
        Vsn::V2,
        s("6").as_ref(),
        None,
        "realtime:room1",
        "system",
        &System {
            extension: "postgres_changes",
            status: "ok",
            message: "Subscribed to PostgreSQL",
            channel: Some("room1"),
        },
    )
    .unwrap();
    assert_frame(
        b,
        r#"["6",null,"realtime:room1","system",{"extension":"postgres_changes","status":"ok","message":"Subscribed to PostgreSQL","channel":"room1"}]"#,
    );
    let b = encode_text(
        Vsn::V2,
        None,
        None,
        "realtime:operations:t1",
        "system",
        &System {
            extension: "system",
            status: "ok",
            message: "Server requested disconnect",
            channel: None,
        },
    )
    .unwrap();
    assert_frame(
        b,
        r#"[null,null,"realtime:operations:t1","system",{"extension":"system","status":"ok","message":"Server requested disconnect"}]"#,
    );
}

#[test]
fn postgres_changes_event_spliced_raw() {
    // §4.1, compacted. The change JSON is built once and spliced as a RawValue.
    let data = r#"{"ids":[106243155],"data":{"schema":"public","table":"test","commit_timestamp":"2025-11-19T00:22:40.877Z","type":"UPDATE","columns":[{"name":"id","type":"int8"},{"name":"created_at","type":"timestamptz"},{"name":"text","type":"text"}],"record":{"id":46,"text":"content","created_at":"2025-11-03T09:32:55+00:00"},"old_record":{"id":46},"errors":null}}"#;
    let b = encode_text(
        Vsn::V2,
        None,
        None,
        "realtime:room1",
        "postgres_changes",
        &*raw(data),
    )
    .unwrap();
    assert_frame(
        b,
        &format!(r#"[null,null,"realtime:room1","postgres_changes",{data}]"#),
    );
    let b = encode_text(
        Vsn::V1,
        None,
        None,
        "realtime:room1",
        "postgres_changes",
        &*raw(data),
    )
    .unwrap();
    assert_frame(
        b,
        &format!(
            r#"{{"topic":"realtime:room1","event":"postgres_changes","payload":{data},"ref":null}}"#
        ),
    );
}

#[test]
fn text_broadcast_fan_out() {
    // §6.1: JSON-origin broadcasts fan out as [null,null,topic,"broadcast",map].
    let body = r#"{"type":"broadcast","event":"e","payload":{"a":1}}"#;
    let b = encode_text(
        Vsn::V2,
        None,
        None,
        "realtime:room1",
        "broadcast",
        &*raw(body),
    )
    .unwrap();
    assert_frame(
        b,
        &format!(r#"[null,null,"realtime:room1","broadcast",{body}]"#),
    );

    // Re-encoding a decoded payload is JSON-equal (serde_json's map sorts keys).
    let m = decode(
        Vsn::V2,
        &format!(r#"["1","2","realtime:room1","broadcast",{body}]"#),
    );
    let b = encode_text(Vsn::V2, None, None, &m.topic, &m.event, json_payload(&m)).unwrap();
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v,
        json!([null, null, "realtime:room1", "broadcast", {"type":"broadcast","event":"e","payload":{"a":1}}])
    );
}
