//! Phoenix channel wire codec, as spoken by Supabase Realtime and realtime-js.
//!
//! Pure: no sockets, no tokio. The gateway decodes every client frame with
//! [`decode_text`] / [`decode_binary`] and encodes every server frame with
//! [`encode_text`] / [`encode_user_broadcast`]. Encoders write straight into
//! [`bytes::Bytes`], so one encoded frame can be shared by every subscriber.
//!
//! # Layout
//! - [`Vsn`]: serializer version chosen per connection by the `vsn` query param.
//! - [`Message`], [`Ref`], [`Payload`], [`UserBroadcast`]: a decoded client frame.
//! - `v1`: JSON objects `{topic, event, payload, ref, join_ref}`; server frames carry no `join_ref`.
//! - `v2`: JSON arrays `[join_ref, ref, topic, event, payload]`.
//! - `binary`: V2 binary frames; kind 3 (client user broadcast push) decoded, kind 4 (server user broadcast) encoded.
//! - `json` (private): the simd-json tape walk shared by the text decoders, and `Ref`'s JSON form.
//! - [`DecodeError`] / [`EncodeError`]: malformed input is an error value, never a panic.
//! - `tests/golden.rs` (frames from PROTOCOL.md), `tests/prop.rs` (round trips, simd-json vs
//!   serde_json), `fuzz/` (standalone cargo-fuzz project, target `decode`).

mod binary;
mod error;
mod json;
mod message;
mod v1;
mod v2;

pub use binary::{encode_user_broadcast, KIND_USER_BROADCAST, KIND_USER_BROADCAST_PUSH};
pub use error::{DecodeError, EncodeError};
pub use message::{Message, Payload, PayloadEncoding, Ref, UserBroadcast, Vsn};

use bytes::Bytes;
use serde::Serialize;

/// Decodes a text frame (V1 object or V2 array, per `vsn`).
///
/// simd-json parses in place, so the buffer is scratch space afterwards.
pub fn decode_text(vsn: Vsn, buf: &mut [u8]) -> Result<Message, DecodeError> {
    match vsn {
        Vsn::V1 => v1::decode(buf),
        Vsn::V2 => v2::decode(buf),
    }
}

/// Decodes a binary frame. Only kind 3 (user broadcast push) is accepted.
pub fn decode_binary(buf: &[u8]) -> Result<Message, DecodeError> {
    binary::decode(buf)
}

/// Encodes a server → client text frame.
///
/// V1: `{"topic":…,"event":…,"payload":…,"ref":…}` (never a `join_ref`).
/// V2: `[join_ref, ref, topic, event, payload]`.
/// `payload` may be a [`serde_json::value::RawValue`] to splice pre-encoded JSON.
pub fn encode_text<P: Serialize + ?Sized>(
    vsn: Vsn,
    join_ref: Option<&Ref>,
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
) -> Result<Bytes, EncodeError> {
    match vsn {
        Vsn::V1 => v1::encode(msg_ref, topic, event, payload),
        Vsn::V2 => v2::encode(join_ref, msg_ref, topic, event, payload),
    }
}

/// [`encode_text`] for a payload whose encoded length is known (e.g. a
/// [`serde_json::value::RawValue`]): the frame is allocated once at its size,
/// with no spare capacity, which matters for frames that wait in a queue.
pub fn encode_text_sized<P: Serialize + ?Sized>(
    vsn: Vsn,
    join_ref: Option<&Ref>,
    msg_ref: Option<&Ref>,
    topic: &str,
    event: &str,
    payload: &P,
    payload_len: usize,
) -> Result<Bytes, EncodeError> {
    match vsn {
        Vsn::V1 => v1::encode_sized(msg_ref, topic, event, payload, payload_len),
        Vsn::V2 => v2::encode_sized(join_ref, msg_ref, topic, event, payload, payload_len),
    }
}

/// Encodes a `phx_reply`: payload `{"status": status, "response": response}`.
pub fn encode_reply<R: Serialize + ?Sized>(
    vsn: Vsn,
    join_ref: Option<&Ref>,
    msg_ref: Option<&Ref>,
    topic: &str,
    status: &str,
    response: &R,
) -> Result<Bytes, EncodeError> {
    #[derive(Serialize)]
    struct Reply<'a, R: ?Sized> {
        status: &'a str,
        response: &'a R,
    }
    encode_text(
        vsn,
        join_ref,
        msg_ref,
        topic,
        "phx_reply",
        &Reply { status, response },
    )
}
