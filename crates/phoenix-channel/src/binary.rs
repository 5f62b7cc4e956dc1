//! V2 binary frames (WebSocket opcode 2). Every length is a `u8`.
//!
//! Kind 3, client → server user broadcast push:
//! ```text
//! 03 join_ref_len ref_len topic_len event_len metadata_len encoding
//!    join_ref | ref | topic | event | metadata | payload (rest)
//! ```
//! Kind 4, server → client user broadcast:
//! ```text
//! 04 topic_len event_len metadata_len encoding
//!    topic | event | metadata | payload (rest)
//! ```
//! Kinds 0–2 exist in Phoenix but realtime-js cannot decode them, so they are
//! neither accepted nor produced.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{DecodeError, EncodeError, Message, Payload, PayloadEncoding, Ref, UserBroadcast};

/// Kind byte of a client → server user broadcast push (the only kind decoded).
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
/// Kind byte of a server → client user broadcast (the only kind encoded).
pub const KIND_USER_BROADCAST: u8 = 4;

/// Header length of a kind-3 frame.
const PUSH_HEADER_LEN: usize = 7;
/// Header length of a kind-4 frame.
const BROADCAST_HEADER_LEN: usize = 5;

impl PayloadEncoding {
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(PayloadEncoding::Binary),
            1 => Ok(PayloadEncoding::Json),
            other => Err(DecodeError::UnknownEncoding(other)),
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            PayloadEncoding::Binary => 0,
            PayloadEncoding::Json => 1,
        }
    }
}

/// Decodes a kind-3 frame into a `broadcast` message carrying a [`UserBroadcast`].
///
/// Empty `join_ref`/`ref` fields become `None`; an empty metadata field becomes `None`.
/// Metadata must be a JSON object (upstream decodes it and drops the frame
/// otherwise); payload bytes are passed through unvalidated.
pub(crate) fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let (&kind, _) = buf.split_first().ok_or(DecodeError::Empty)?;
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(DecodeError::UnsupportedKind(kind));
    }
    let header = buf.get(..PUSH_HEADER_LEN).ok_or(DecodeError::Truncated)?;
    let [_, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding] = *header else {
        return Err(DecodeError::Truncated);
    };
    let encoding = PayloadEncoding::from_byte(encoding)?;

    let mut rest = &buf[PUSH_HEADER_LEN..];
    let mut take = |len: u8| -> Result<&[u8], DecodeError> {
        let len = usize::from(len);
        if rest.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (field, tail) = rest.split_at(len);
        rest = tail;
        Ok(field)
    };
    let join_ref = take(join_ref_len)?;
    let msg_ref = take(ref_len)?;
    let topic = take(topic_len)?;
    let event = take(event_len)?;
    let meta_len = usize::from(meta_len);
    if rest.len() < meta_len {
        return Err(DecodeError::Truncated);
    }

    let metadata = &rest[..meta_len];
    if meta_len > 0
        && (metadata.trim_ascii_start().first() != Some(&b'{')
            || serde_json::from_slice::<serde::de::IgnoredAny>(metadata).is_err())
    {
        return Err(DecodeError::InvalidMetadata);
    }

    let join_ref = opt_ref(join_ref, "join_ref")?;
    let msg_ref = opt_ref(msg_ref, "ref")?;
    let topic = utf8(topic, "topic")?;
    let event = utf8(event, "event")?;

    // One allocation for metadata + payload; both are slices of it.
    let body = Bytes::copy_from_slice(rest);
    let metadata = (meta_len > 0).then(|| body.slice(..meta_len));
    let payload = body.slice(meta_len..);

    Ok(Message {
        join_ref,
        msg_ref,
        topic,
        event: "broadcast".to_owned(),
        payload: Payload::UserBroadcast(UserBroadcast {
            event,
            metadata,
            encoding,
            payload,
        }),
    })
}

fn utf8(field: &[u8], name: &'static str) -> Result<String, DecodeError> {
    std::str::from_utf8(field)
        .map(str::to_owned)
        .map_err(|_| DecodeError::NotUtf8(name))
}

fn opt_ref(field: &[u8], name: &'static str) -> Result<Option<Ref>, DecodeError> {
    if field.is_empty() {
        Ok(None)
    } else {
        utf8(field, name).map(|s| Some(Ref::Str(s)))
    }
}

/// Encodes a kind-4 user broadcast (server → client, V2 only):
/// `04 topic_len event_len metadata_len encoding | topic | event | metadata | payload`.
///
/// `metadata` is JSON text (e.g. `{"id":"…"}`) or `None`. Encode once and
/// share the [`Bytes`] with every V2 subscriber.
///
/// # Errors
/// [`EncodeError::FieldTooLong`] if `topic`, `event` or `metadata` exceeds 255 bytes.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    metadata: Option<&[u8]>,
    encoding: PayloadEncoding,
    payload: &[u8],
) -> Result<Bytes, EncodeError> {
    let metadata = metadata.unwrap_or_default();
    let len =
        |field: &[u8], name| u8::try_from(field.len()).map_err(|_| EncodeError::FieldTooLong(name));
    let header = [
        KIND_USER_BROADCAST,
        len(topic.as_bytes(), "topic")?,
        len(event.as_bytes(), "event")?,
        len(metadata, "metadata")?,
        encoding.to_byte(),
    ];
    let mut out = BytesMut::with_capacity(
        BROADCAST_HEADER_LEN + topic.len() + event.len() + metadata.len() + payload.len(),
    );
    out.put_slice(&header);
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(metadata);
    out.put_slice(payload);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(header: [u8; 7], body: &[u8]) -> Vec<u8> {
        let mut v = header.to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decodes_push_with_metadata() {
        let frame = push(
            [3, 1, 2, 1, 2, 2, 0],
            b"1ab"
                .iter()
                .chain(b"tev{}\x00\xff")
                .copied()
                .collect::<Vec<_>>()
                .as_slice(),
        );
        let m = decode(&frame).unwrap();
        assert_eq!(m.join_ref, Some(Ref::Str("1".to_owned())));
        assert_eq!(m.msg_ref, Some(Ref::Str("ab".to_owned())));
        assert_eq!(m.topic, "t");
        assert_eq!(m.event, "broadcast");
        let Payload::UserBroadcast(ub) = m.payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(ub.event, "ev");
        assert_eq!(ub.metadata.as_deref(), Some(&b"{}"[..]));
        assert_eq!(ub.encoding, PayloadEncoding::Binary);
        assert_eq!(&ub.payload[..], b"\x00\xff");
    }

    #[test]
    fn empty_refs_and_metadata_are_none_and_payload_may_be_empty() {
        let m = decode(&push([3, 0, 0, 1, 1, 0, 1], b"te")).unwrap();
        assert_eq!((m.join_ref, m.msg_ref), (None, None));
        let Payload::UserBroadcast(ub) = m.payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(ub.metadata, None);
        assert!(ub.payload.is_empty());
    }

    #[test]
    fn errors_by_variant() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        for kind in [0, 1, 2, 4, 5, 255] {
            assert_eq!(
                decode(&[kind, 0, 0, 0, 0, 0, 0]),
                Err(DecodeError::UnsupportedKind(kind))
            );
        }
        assert_eq!(decode(&[3]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[3, 0, 0, 0, 0, 0]), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&push([3, 0, 0, 5, 0, 0, 1], b"abcd")),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&push([3, 0, 0, 1, 1, 3, 1], b"te{}")),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&push([3, 0, 0, 0, 0, 0, 2], b"")),
            Err(DecodeError::UnknownEncoding(2))
        );
        for meta in [&b"{"[..], b"[]", b"5", b"null", b"\xff\xfe", b"{} x"] {
            let mut body = b"te".to_vec();
            body.extend_from_slice(meta);
            let header = [3, 0, 0, 1, 1, meta.len() as u8, 1];
            assert_eq!(
                decode(&push(header, &body)),
                Err(DecodeError::InvalidMetadata),
                "{meta:?}"
            );
        }
        assert_eq!(
            decode(&push([3, 1, 0, 0, 0, 0, 1], b"\xff")),
            Err(DecodeError::NotUtf8("join_ref"))
        );
        assert_eq!(
            decode(&push([3, 0, 1, 0, 0, 0, 1], b"\xff")),
            Err(DecodeError::NotUtf8("ref"))
        );
        assert_eq!(
            decode(&push([3, 0, 0, 1, 0, 0, 1], b"\xff")),
            Err(DecodeError::NotUtf8("topic"))
        );
        assert_eq!(
            decode(&push([3, 0, 0, 0, 1, 0, 1], b"\xff")),
            Err(DecodeError::NotUtf8("event"))
        );
    }

    #[test]
    fn encodes_kind_4() {
        let b = encode_user_broadcast("t", "ev", None, PayloadEncoding::Binary, b"\x01").unwrap();
        assert_eq!(&b[..], b"\x04\x01\x02\x00\x00tev\x01");
        let b = encode_user_broadcast("t", "e", Some(b"{}"), PayloadEncoding::Json, b"{}").unwrap();
        assert_eq!(&b[..], b"\x04\x01\x01\x02\x01te{}{}");
    }

    #[test]
    fn encode_limits_are_255_bytes() {
        let max = "x".repeat(255);
        let long = "x".repeat(256);
        assert!(encode_user_broadcast(
            &max,
            &max,
            Some(max.as_bytes()),
            PayloadEncoding::Json,
            &[]
        )
        .is_ok());
        let err = |r: Result<Bytes, EncodeError>| match r {
            Err(EncodeError::FieldTooLong(f)) => f,
            other => panic!("expected FieldTooLong, got {other:?}"),
        };
        assert_eq!(
            err(encode_user_broadcast(
                &long,
                "e",
                None,
                PayloadEncoding::Json,
                &[]
            )),
            "topic"
        );
        assert_eq!(
            err(encode_user_broadcast(
                "t",
                &long,
                None,
                PayloadEncoding::Json,
                &[]
            )),
            "event"
        );
        assert_eq!(
            err(encode_user_broadcast(
                "t",
                "e",
                Some(long.as_bytes()),
                PayloadEncoding::Json,
                &[]
            )),
            "metadata"
        );
    }
}
