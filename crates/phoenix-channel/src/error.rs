//! Codec errors. Malformed input is a value, never a panic.

/// Why a client frame could not be decoded. The gateway logs it and drops the frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid JSON.
    #[error("invalid JSON")]
    InvalidJson,
    /// V1: not an object; V2: not an array of at least 5 elements.
    #[error("frame has the wrong shape for this serializer")]
    WrongShape,
    /// A required field is missing or has the wrong type.
    #[error("missing or invalid field `{0}`")]
    InvalidField(&'static str),
    /// Empty binary frame.
    #[error("empty binary frame")]
    Empty,
    /// A binary kind other than 3 (user broadcast push).
    #[error("unsupported binary frame kind {0}")]
    UnsupportedKind(u8),
    /// A binary frame shorter than its header says.
    #[error("truncated binary frame")]
    Truncated,
    /// A binary frame whose payload encoding byte is neither 0 (binary) nor 1 (JSON).
    #[error("unknown binary payload encoding {0}")]
    UnknownEncoding(u8),
    /// A binary push whose metadata is not a JSON object.
    #[error("binary push metadata is not a JSON object")]
    InvalidMetadata,
    /// A binary string field that is not UTF-8.
    #[error("binary field `{0}` is not UTF-8")]
    NotUtf8(&'static str),
    /// `vsn` is neither 1.x nor 2.x.
    #[error("unsupported serializer version")]
    UnsupportedVsn,
}

/// Why a server frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Binary frames carry u8 lengths: topic, event and metadata must be ≤ 255 bytes.
    #[error("binary field `{0}` is longer than 255 bytes")]
    FieldTooLong(&'static str),
    /// The payload could not be serialized.
    #[error("payload could not be serialized: {0}")]
    Json(#[from] serde_json::Error),
}
