//! What replicas say to each other: subject names and message envelopes.
//!
//! **Subjects.** A topic's messages travel on `<prefix>.t.<pub|priv>.<token>`,
//! where the token is the topic name escaped to subject-safe characters
//! (`[A-Za-z0-9-]` kept, `_` doubled, any other byte `_XX` in hex: injective,
//! so two topics never share a subject) or, for names whose escaped form is
//! long, `h` + a 128-bit FNV-1a hash. A hash can collide, so every envelope also
//! carries the topic and receivers drop messages for a topic not theirs.
//! Private and public topics are separate namespaces. `<prefix>.ctl` carries
//! heartbeats and presence sync requests (every replica listens);
//! `<prefix>.node.<id>` is a replica's inbox.
//!
//! **Envelopes.** `[version, kind, node id (u64 LE)]`, then per kind:
//! broadcasts carry the topic and the payload bytes as the publisher received
//! them (decoded by no one in between; the receiving replica encodes client
//! frames once per serializer, as for a local publish); presence and control
//! messages carry a small JSON body.

use bytes::{BufMut, Bytes, BytesMut};
use phoenix_channel::PayloadEncoding;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::broadcast::UserMessage;
use crate::presence::Entry;

const VERSION: u8 = 1;
const KIND_JSON: u8 = 1;
const KIND_USER: u8 = 2;
const KIND_PRESENCE: u8 = 3;
const KIND_CONTROL: u8 = 4;
const NO_METADATA: u32 = u32::MAX;
/// Escaped topic names longer than this are hashed (NATS control lines stay short).
const MAX_TOKEN: usize = 192;

/// Why an envelope could not be read (counted and dropped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its fields say.
    #[error("truncated cluster message")]
    Truncated,
    /// Another wire version or an unknown kind.
    #[error("unknown cluster message version {0} or kind {1}")]
    Unknown(u8, u8),
    /// A field that must be UTF-8 or JSON is not.
    #[error("malformed cluster message: {0}")]
    Malformed(&'static str),
}

/// A topic as the registry keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicRef<'a> {
    /// Private channels are a separate namespace.
    pub private: bool,
    /// `realtime:<name>`.
    pub name: &'a str,
}

/// The subject of a topic's messages.
pub fn topic_subject(prefix: &str, topic: TopicRef<'_>) -> String {
    let ns = if topic.private { "priv" } else { "pub" };
    let mut out = String::with_capacity(prefix.len() + 8 + topic.name.len() + 8);
    out.push_str(prefix);
    out.push_str(".t.");
    out.push_str(ns);
    out.push('.');
    let start = out.len();
    for &b in topic.name.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' => out.push(b as char),
            b'_' => out.push_str("__"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('_');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
        if out.len() - start > MAX_TOKEN {
            out.truncate(start);
            let (a, b) = fnv128(topic.name.as_bytes());
            out.push_str(&format!("h{a:016x}{b:016x}"));
            break;
        }
    }
    out
}

/// The control subject (heartbeats, sync requests).
pub fn control_subject(prefix: &str) -> String {
    format!("{prefix}.ctl")
}

/// A replica's inbox.
pub fn inbox_subject(prefix: &str, node: u64) -> String {
    format!("{prefix}.node.{node:016x}")
}

/// Whether `prefix` is usable as a subject prefix: dot-separated non-empty
/// tokens of `[A-Za-z0-9_-]`.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// Two independent 64-bit FNV-1a hashes (stable across builds and replicas).
fn fnv128(data: &[u8]) -> (u64, u64) {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for &x in data {
        a = (a ^ u64::from(x)).wrapping_mul(PRIME);
        b = (b ^ u64::from(x.rotate_left(3))).wrapping_mul(PRIME);
    }
    (a, b)
}

/// A presence message on a topic's subject.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PresenceMsg {
    /// Metas the sender added or replaced (`joins`) and channels it untracked.
    Delta {
        /// New or updated metas.
        #[serde(default)]
        joins: Vec<Entry>,
        /// Untracked channels.
        #[serde(default)]
        leaves: Vec<u64>,
    },
    /// Every meta the sender owns on this topic: replaces what receivers hold for it.
    State {
        /// The metas.
        entries: Vec<Entry>,
        /// The sync request this answers (`(node, request id)`), if any.
        #[serde(default)]
        reply_to: Option<(u64, u64)>,
    },
}

/// A control message (`<prefix>.ctl` or an inbox).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Control {
    /// "I am alive" (every heartbeat interval). `hello` asks peers to answer at once.
    Heartbeat {
        /// Set by a replica that just connected.
        #[serde(default)]
        hello: bool,
    },
    /// The sender is shutting down: forget it now.
    Bye,
    /// The sender got its first subscriber of a topic: every replica answers,
    /// with its state on the topic's subject or [`Control::NoState`] to the inbox.
    Sync {
        /// Request id (per sender).
        req: u64,
        /// The topic's namespace.
        private: bool,
        /// The topic.
        topic: String,
    },
    /// Answer to [`Control::Sync`] from a replica without subscribers of the topic.
    NoState {
        /// The request answered.
        req: u64,
        /// The topic's namespace.
        private: bool,
        /// The topic.
        topic: String,
    },
}

/// A decoded envelope, borrowing from the received bytes.
#[derive(Debug)]
pub enum Message<'a> {
    /// A JSON-origin broadcast: the whole `{type, event, payload}` map.
    Json {
        /// Its topic.
        topic: TopicRef<'a>,
        /// The map, as the publisher received it.
        payload: &'a RawValue,
    },
    /// A binary-origin user broadcast.
    User {
        /// Its topic.
        topic: TopicRef<'a>,
        /// The message.
        msg: UserMessage<'a>,
    },
    /// A presence delta or snapshot.
    Presence {
        /// Its topic.
        topic: TopicRef<'a>,
        /// The message.
        msg: PresenceMsg,
    },
    /// A control message.
    Control(Control),
}

fn header(kind: u8, node: u64, capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(10 + capacity);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
    buf.put_u64_le(node);
    buf
}

fn put_topic(buf: &mut BytesMut, topic: TopicRef<'_>) {
    buf.put_u8(u8::from(topic.private));
    buf.put_u32_le(topic.name.len() as u32);
    buf.put_slice(topic.name.as_bytes());
}

/// Encodes a JSON-origin broadcast (`payload` is the serialized map).
pub fn encode_json(node: u64, topic: TopicRef<'_>, payload: &[u8]) -> Bytes {
    let mut buf = header(KIND_JSON, node, 5 + topic.name.len() + payload.len());
    put_topic(&mut buf, topic);
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a binary-origin user broadcast.
pub fn encode_user(node: u64, topic: TopicRef<'_>, msg: UserMessage<'_>) -> Bytes {
    let UserMessage {
        event,
        metadata,
        encoding,
        payload,
    } = msg;
    let meta_len = metadata.map_or(0, <[u8]>::len);
    let mut buf = header(
        KIND_USER,
        node,
        16 + topic.name.len() + event.len() + meta_len + payload.len(),
    );
    put_topic(&mut buf, topic);
    buf.put_u32_le(event.len() as u32);
    buf.put_slice(event.as_bytes());
    buf.put_u8(match encoding {
        PayloadEncoding::Binary => 0,
        PayloadEncoding::Json => 1,
    });
    match metadata {
        Some(m) => {
            buf.put_u32_le(m.len() as u32);
            buf.put_slice(m);
        }
        None => buf.put_u32_le(NO_METADATA),
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a presence message for a topic.
pub fn encode_presence(node: u64, topic: TopicRef<'_>, msg: &PresenceMsg) -> Bytes {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut buf = header(KIND_PRESENCE, node, 5 + topic.name.len() + body.len());
    put_topic(&mut buf, topic);
    buf.put_slice(&body);
    buf.freeze()
}

/// Encodes a control message.
pub fn encode_control(node: u64, msg: &Control) -> Bytes {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut buf = header(KIND_CONTROL, node, body.len());
    buf.put_slice(&body);
    buf.freeze()
}

/// A cursor over the received bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| WireError::Malformed("string not UTF-8"))
    }

    fn topic(&mut self) -> Result<TopicRef<'a>, WireError> {
        let private = self.u8()? != 0;
        Ok(TopicRef {
            private,
            name: self.str()?,
        })
    }
}

/// Decodes an envelope: the sender's node id and the message.
pub fn decode(bytes: &[u8]) -> Result<(u64, Message<'_>), WireError> {
    let mut r = Reader(bytes);
    let (version, kind) = (r.u8()?, r.u8()?);
    if version != VERSION {
        return Err(WireError::Unknown(version, kind));
    }
    let node = u64::from_le_bytes(r.take(8)?.try_into().map_err(|_| WireError::Truncated)?);
    let msg = match kind {
        KIND_JSON => {
            let topic = r.topic()?;
            let payload = serde_json::from_slice(r.0)
                .map_err(|_| WireError::Malformed("broadcast payload is not JSON"))?;
            Message::Json { topic, payload }
        }
        KIND_USER => {
            let topic = r.topic()?;
            let event = r.str()?;
            let encoding = match r.u8()? {
                0 => PayloadEncoding::Binary,
                _ => PayloadEncoding::Json,
            };
            let metadata = match r.u32()? {
                NO_METADATA => None,
                n => Some(r.take(n as usize)?),
            };
            Message::User {
                topic,
                msg: UserMessage {
                    event,
                    metadata,
                    encoding,
                    payload: r.0,
                },
            }
        }
        KIND_PRESENCE => {
            let topic = r.topic()?;
            let msg = serde_json::from_slice(r.0)
                .map_err(|_| WireError::Malformed("presence message is not valid JSON"))?;
            Message::Presence { topic, msg }
        }
        KIND_CONTROL => Message::Control(
            serde_json::from_slice(r.0)
                .map_err(|_| WireError::Malformed("control message is not valid JSON"))?,
        ),
        other => return Err(WireError::Unknown(version, other)),
    };
    Ok((node, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: TopicRef<'static> = TopicRef {
        private: false,
        name: "realtime:room-1",
    };

    #[test]
    fn subjects_are_safe_and_separate_namespaces() {
        assert_eq!(topic_subject("rt", T), "rt.t.pub.realtime_3Aroom-1");
        let private = TopicRef { private: true, ..T };
        assert_eq!(topic_subject("rt", private), "rt.t.priv.realtime_3Aroom-1");
        assert_eq!(
            topic_subject(
                "rt",
                TopicRef {
                    private: false,
                    name: "a.b *>_ é"
                }
            ),
            "rt.t.pub.a_2Eb_20_2A_3E___20_C3_A9"
        );
        let long = "x".repeat(300);
        let s = topic_subject(
            "rt",
            TopicRef {
                private: false,
                name: &long,
            },
        );
        assert!(
            s.starts_with("rt.t.pub.h") && s.len() == "rt.t.pub.h".len() + 32,
            "{s}"
        );
        assert!(valid_prefix("realtime") && valid_prefix("a.b-c_d"));
        assert!(
            !valid_prefix("")
                && !valid_prefix("a..b")
                && !valid_prefix("a.*")
                && !valid_prefix("a b")
        );
    }

    proptest! {
        #[test]
        fn subject_tokens_are_injective_and_subject_safe(a in ".{0,80}", b in ".{0,80}") {
            let sa = topic_subject("p", TopicRef { private: false, name: &a });
            let sb = topic_subject("p", TopicRef { private: false, name: &b });
            prop_assert!(sa.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.'));
            prop_assert_eq!(sa.split('.').count(), 4);
            prop_assert_eq!(a == b, sa == sb);
        }

        #[test]
        fn user_broadcasts_round_trip(event in ".{0,40}", meta in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                                      payload in proptest::collection::vec(any::<u8>(), 0..200), json in any::<bool>()) {
            let enc = if json { PayloadEncoding::Json } else { PayloadEncoding::Binary };
            let user = UserMessage { event: &event, metadata: meta.as_deref(), encoding: enc, payload: &payload };
            let bytes = encode_user(42, T, user);
            let (node, msg) = decode(&bytes).unwrap();
            prop_assert_eq!(node, 42);
            match msg {
                Message::User { topic, msg: m } => {
                    prop_assert_eq!(topic, T);
                    prop_assert_eq!(m.event, event.as_str());
                    prop_assert_eq!(m.metadata, meta.as_deref());
                    prop_assert_eq!(m.encoding, enc);
                    prop_assert_eq!(m.payload, &payload[..]);
                }
                other => prop_assert!(false, "decoded as {:?}", other),
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn json_presence_and_control_round_trip() {
        let bytes = encode_json(
            1,
            T,
            br#"{"type":"broadcast","event":"e","payload":{"a":1}}"#,
        );
        match decode(&bytes).unwrap() {
            (1, Message::Json { topic, payload }) => {
                assert_eq!(topic, T);
                assert_eq!(
                    payload.get(),
                    r#"{"type":"broadcast","event":"e","payload":{"a":1}}"#
                );
            }
            other => panic!("{other:?}"),
        }
        let entry = Entry {
            chan: 3,
            key: "k".into(),
            phx_ref: "r".into(),
            phx_ref_prev: None,
            meta: serde_json::Map::new(),
        };
        let bytes = encode_presence(
            2,
            T,
            &PresenceMsg::Delta {
                joins: vec![entry.clone()],
                leaves: vec![9],
            },
        );
        match decode(&bytes).unwrap() {
            (
                2,
                Message::Presence {
                    topic,
                    msg: PresenceMsg::Delta { joins, leaves },
                },
            ) => {
                assert_eq!(topic, T);
                assert_eq!(joins, vec![entry]);
                assert_eq!(leaves, vec![9]);
            }
            other => panic!("{other:?}"),
        }
        let sync = Control::Sync {
            req: 5,
            private: true,
            topic: "realtime:x".into(),
        };
        match decode(&encode_control(3, &sync)).unwrap() {
            (3, Message::Control(c)) => assert_eq!(c, sync),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&[2, 1]).unwrap_err(), WireError::Unknown(2, 1));
        assert_eq!(decode(&[1, 1, 0]).unwrap_err(), WireError::Truncated);
        let mut bad = encode_json(1, T, b"{}").to_vec();
        bad.truncate(bad.len() - 1);
        assert!(matches!(decode(&bad), Err(WireError::Malformed(_))));
    }
}
