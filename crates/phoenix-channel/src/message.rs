//! Decoded client frames.

use bytes::Bytes;

/// Serializer version, chosen per connection by the `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `vsn=1.0.0` (and the default when `vsn` is absent): JSON objects.
    V1,
    /// `vsn=2.0.0`: JSON arrays plus binary user-broadcast frames.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query parameter; `None` means V1, as in Phoenix.
    /// Accepts `1.0.0`, `2.0.0` and any `1.x` / `2.x` version.
    pub fn from_param(param: Option<&str>) -> Result<Vsn, crate::DecodeError> {
        match param {
            None => Ok(Vsn::V1),
            Some(v) if v == "1" || v.starts_with("1.") => Ok(Vsn::V1),
            Some(v) if v == "2" || v.starts_with("2.") => Ok(Vsn::V2),
            Some(_) => Err(crate::DecodeError::UnsupportedVsn),
        }
    }
}

/// A `ref` or `join_ref` as the client sent it. realtime-js sends strings;
/// wscat users sometimes send numbers. It is echoed back with the same JSON type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ref {
    /// A JSON string.
    Str(String),
    /// A JSON integer.
    Num(i64),
}

/// One decoded client frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The channel join this message belongs to (null for heartbeats).
    pub join_ref: Option<Ref>,
    /// The push ref a reply must echo (may be null).
    pub msg_ref: Option<Ref>,
    /// `realtime:<name>` or `phoenix`.
    pub topic: String,
    /// `phx_join`, `heartbeat`, `broadcast`, `presence`, ...
    pub event: String,
    /// JSON payload, or the body of a binary user broadcast.
    pub payload: Payload,
}

/// The payload of a decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// A text frame's payload (any JSON value).
    Json(serde_json::Value),
    /// A binary kind-3 frame; `Message::event` is then `"broadcast"`.
    UserBroadcast(UserBroadcast),
}

/// How a user broadcast's payload bytes are encoded (byte 6 of kind 3, byte 4 of kind 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// 0: raw bytes (an `ArrayBuffer` on the client).
    Binary,
    /// 1: JSON text.
    Json,
}

/// A user broadcast carried in a binary frame.
#[derive(Clone, Debug, PartialEq)]
pub struct UserBroadcast {
    /// The user event name (`channel.send({event})`).
    pub event: String,
    /// Metadata JSON text; `None` when the frame has none.
    pub metadata: Option<Bytes>,
    /// Encoding of `payload`.
    pub encoding: PayloadEncoding,
    /// The payload bytes, exactly as sent.
    pub payload: Bytes,
}
