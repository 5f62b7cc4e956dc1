//! Phoenix channel frames as the benchmark clients write and read them.
//!
//! Writing: join, heartbeat and broadcast texts for V1 (objects) and V2
//! (arrays). Reading: the hot path only looks for the benchmark's own
//! `"seq":N,"t":T,"s":S` run inside a frame; anything else is a control frame
//! and is decoded with serde_json (rare: replies, system, phx_error, ...).

use std::fmt::Write as _;

use serde_json::Value;

/// Serializer version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Vsn {
    /// `vsn=1.0.0`: JSON objects.
    V1,
    /// `vsn=2.0.0`: JSON arrays.
    V2,
}

impl Vsn {
    /// Parses `1.0.0` / `2.0.0` (and `1`, `2`).
    pub fn parse(s: &str) -> Result<Vsn, String> {
        match s {
            "1" | "1.0" | "1.0.0" => Ok(Vsn::V1),
            "2" | "2.0" | "2.0.0" => Ok(Vsn::V2),
            other => Err(format!("unsupported vsn {other:?} (use 1.0.0 or 2.0.0)")),
        }
    }
    /// The query parameter value.
    pub fn param(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }
}

/// The join payload every benchmark client sends (realtime-js defaults).
pub const JOIN_PAYLOAD: &str = r#"{"config":{"broadcast":{"self":false,"ack":false},"presence":{"key":"","enabled":false},"postgres_changes":[],"private":false}}"#;

/// `phx_join` for `realtime:<topic>` with `join_ref = ref = jref`.
pub fn join_text(vsn: Vsn, topic: &str, jref: &str) -> String {
    match vsn {
        Vsn::V2 => format!(r#"["{jref}","{jref}","realtime:{topic}","phx_join",{JOIN_PAYLOAD}]"#),
        Vsn::V1 => format!(
            r#"{{"topic":"realtime:{topic}","event":"phx_join","payload":{JOIN_PAYLOAD},"ref":"{jref}","join_ref":"{jref}"}}"#
        ),
    }
}

/// `heartbeat` on topic `phoenix`.
pub fn heartbeat_text(vsn: Vsn, r: u64) -> String {
    match vsn {
        Vsn::V2 => format!(r#"[null,"{r}","phoenix","heartbeat",{{}}]"#),
        Vsn::V1 => {
            format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"{r}"}}"#)
        }
    }
}

/// The inner user payload `{"seq":N,"t":T,"s":S,"pad":"…"}` padded so that the
/// whole delivered frame is about `frame_bytes` long.
pub fn bench_payload(out: &mut String, seq: u64, t_ns: u64, step: u32, pad: usize) {
    let _ = write!(out, r#"{{"seq":{seq},"t":{t_ns},"s":{step},"pad":""#);
    for _ in 0..pad {
        out.push('x');
    }
    out.push_str("\"}");
}

/// Bytes of a delivered V2 broadcast frame around the inner payload.
pub fn delivered_overhead(topic: &str) -> usize {
    // [null,null,"realtime:<topic>","broadcast",{"type":"broadcast","event":"b","payload":<inner>}]
    let shell = format!(
        r#"[null,null,"realtime:{topic}","broadcast",{{"type":"broadcast","event":"b","payload":}}]"#
    );
    shell.len()
}

/// Pad length so a delivered frame is about `frame_bytes` (typical digits).
pub fn pad_for(topic: &str, frame_bytes: usize) -> usize {
    let mut probe = String::new();
    bench_payload(&mut probe, 100_000, 1_000_000_000_000_000, 10, 0);
    frame_bytes.saturating_sub(delivered_overhead(topic) + probe.len())
}

/// A publisher's V2 broadcast push (JSON text, as a wscat user would send it).
pub fn broadcast_text_v2(out: &mut String, topic: &str, jref: &str, r: u64, inner: &str) {
    let _ = write!(
        out,
        r#"["{jref}","{r}","realtime:{topic}","broadcast",{{"type":"broadcast","event":"b","payload":{inner}}}]"#
    );
}

/// What the hot path found in a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Publisher sequence number.
    pub seq: u64,
    /// Send time, `clock::now_ns()` of the sender (0 = unknown).
    pub t_ns: u64,
    /// Ramp step the message belongs to.
    pub step: u32,
}

fn digits(b: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let start = i;
    let mut v: u64 = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        v = v.wrapping_mul(10).wrapping_add((b[i] - b'0') as u64);
        i += 1;
    }
    (i > start).then_some((v, i))
}

/// Finds `"seq":N`, `"t":T` and `"s":S` in a frame, in any key order (the
/// server may re-encode the payload, e.g. with sorted keys). `None` = not a
/// benchmark message.
pub fn find_stamp(frame: &[u8]) -> Option<Stamp> {
    let num = |key: &[u8]| -> Option<u64> {
        let at = memchr::memmem::find(frame, key)?;
        digits(frame, at + key.len()).map(|(v, _)| v)
    };
    let seq = num(b"\"seq\":")?;
    let t_ns = num(b"\"t\":")?;
    let step = num(b"\"s\":")?;
    Some(Stamp {
        seq,
        t_ns,
        step: step as u32,
    })
}

/// A decoded control frame.
#[derive(Debug, Clone)]
pub struct Control {
    /// `join_ref` (V2 only).
    pub join_ref: Option<String>,
    /// `ref`.
    pub msg_ref: Option<String>,
    /// Topic.
    pub topic: String,
    /// Event.
    pub event: String,
    /// Payload.
    pub payload: Value,
}

impl Control {
    /// `payload.status` of a `phx_reply`.
    pub fn status(&self) -> Option<&str> {
        self.payload.get("status").and_then(Value::as_str)
    }
}

fn ref_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Decodes a text frame (either shape; the server's vsn decides which it sends).
pub fn parse_control(frame: &[u8]) -> Option<Control> {
    let v: Value = serde_json::from_slice(frame).ok()?;
    match v {
        Value::Array(a) if a.len() >= 5 => Some(Control {
            join_ref: ref_str(&a[0]),
            msg_ref: ref_str(&a[1]),
            topic: a[2].as_str()?.to_owned(),
            event: a[3].as_str()?.to_owned(),
            payload: a[4].clone(),
        }),
        Value::Object(m) => Some(Control {
            join_ref: m.get("join_ref").and_then(ref_str),
            msg_ref: m.get("ref").and_then(ref_str),
            topic: m.get("topic")?.as_str()?.to_owned(),
            event: m.get("event")?.as_str()?.to_owned(),
            payload: m.get("payload").cloned().unwrap_or(Value::Null),
        }),
        _ => None,
    }
}

/// Shortens a frame for a report line.
pub fn excerpt(frame: &[u8]) -> String {
    let s = String::from_utf8_lossy(frame);
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], frame.len())
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let mut inner = String::new();
        bench_payload(&mut inner, 42, 123_456_789, 3, 10);
        let mut frame = String::new();
        broadcast_text_v2(&mut frame, "bench", "1", 7, &inner);
        assert_eq!(
            find_stamp(frame.as_bytes()),
            Some(Stamp {
                seq: 42,
                t_ns: 123_456_789,
                step: 3
            })
        );
        assert_eq!(
            find_stamp(b"[null,\"1\",\"phoenix\",\"phx_reply\",{}]"),
            None
        );
        let sorted = br#"[null,null,"realtime:b","broadcast",{"event":"b","payload":{"pad":"x","s":2,"seq":9,"t":5},"type":"broadcast"}]"#;
        assert_eq!(
            find_stamp(sorted),
            Some(Stamp {
                seq: 9,
                t_ns: 5,
                step: 2
            })
        );
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v[4]["payload"]["seq"], 42);
    }

    #[test]
    fn pad_hits_size() {
        let pad = pad_for("bench", 200);
        let mut inner = String::new();
        bench_payload(&mut inner, 100_000, 1_000_000_000_000_000, 10, pad);
        assert_eq!(delivered_overhead("bench") + inner.len(), 200);
    }

    #[test]
    fn control_both_shapes() {
        let c =
            parse_control(br#"["1","1","realtime:x","phx_reply",{"status":"ok","response":{}}]"#)
                .unwrap();
        assert_eq!(c.status(), Some("ok"));
        assert_eq!(c.msg_ref.as_deref(), Some("1"));
        let c = parse_control(
            br#"{"topic":"realtime:x","event":"phx_reply","payload":{"status":"ok"},"ref":"1"}"#,
        )
        .unwrap();
        assert_eq!(c.event, "phx_reply");
        assert!(c.join_ref.is_none());
    }
}
