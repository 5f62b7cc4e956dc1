//! Errors a client can see, each with Realtime's code, reported in one place.

use crate::auth::AuthError;

/// Who is at fault (drives log level and the `fault` metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bad input from the client.
    Client,
    /// The database failed.
    Database,
    /// A bug or resource problem on our side.
    Internal,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Database => "database",
            Fault::Internal => "internal",
        }
    }
}

/// Why a `phx_join` was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `realtime:` with an empty subtopic.
    #[error("You must provide a topic name")]
    TopicNameRequired,
    /// A topic longer than the binary frame format allows.
    #[error("Topic name must be at most 255 bytes")]
    TopicNameTooLong,
    /// The payload is not a JSON object (a string, a number, ...).
    #[error("The join payload must be a JSON object")]
    PayloadNotObject,
    /// More `postgres_changes` entries than `MAX_POSTGRES_CHANGES_PER_JOIN`.
    #[error("Too many postgres_changes entries: at most {0} per join")]
    TooManyBindings(usize),
    /// `TENANT_MAX_CHANNELS_PER_CLIENT` reached.
    #[error("Too many channels")]
    TooManyChannels,
    /// `CLIENT_MAX_JOINS_PER_SECOND` or `TENANT_MAX_JOINS_PER_SECOND` reached;
    /// the socket is disconnected after the reply, as upstream.
    #[error("Too many joins per second")]
    TooManyJoins,
    /// `TENANT_MAX_CONCURRENT_USERS` reached.
    #[error("Too many connected users")]
    TooManyUsers,
    /// The token was refused.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// Private channel: the policies allow reading neither broadcast nor presence.
    #[error("You do not have permissions to read from this Channel topic: {0}")]
    Unauthorized(String),
    /// Private channel: the database could not be asked.
    #[error("Realtime was unable to connect to the project database")]
    Database,
    /// `config.broadcast.replay` on a public channel.
    #[error("Replay is not allowed for public channels")]
    ReplayPublic,
    /// `config.broadcast.replay` with values that are not integers.
    #[error("Replay params are not valid")]
    ReplayParams,
    /// The replay query failed.
    #[error("Realtime was unable to replay messages")]
    ReplayFailed,
}

impl JoinError {
    /// Realtime's error code.
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::TopicNameRequired => "TopicNameRequired",
            JoinError::TopicNameTooLong => "TopicNameTooLong",
            JoinError::PayloadNotObject | JoinError::TooManyBindings(_) => "InvalidJoinPayload",
            JoinError::TooManyChannels => "ChannelRateLimitReached",
            JoinError::TooManyJoins => "ClientJoinRateLimitReached",
            JoinError::TooManyUsers => "ConnectionRateLimitReached",
            JoinError::Auth(e) => e.code(),
            JoinError::Unauthorized(_) => "Unauthorized",
            JoinError::Database => "UnableToConnectToProject",
            JoinError::ReplayPublic | JoinError::ReplayParams | JoinError::ReplayFailed => {
                "UnableToReplayMessages"
            }
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            JoinError::Database | JoinError::ReplayFailed => Fault::Database,
            _ => Fault::Client,
        }
    }

    /// The reply's `reason`: `"<Code>: <message>"`, as Realtime formats it.
    pub fn reason(&self) -> String {
        format!("{}: {self}", self.code())
    }

    /// Logs and counts the error (the reply is the caller's).
    pub fn report(&self) {
        report(self.code(), self.fault(), &self.to_string());
    }
}

/// Why a joined channel is shut down (`system` error with the message, then
/// `phx_close`) or a message on it refused; messages are upstream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// `CLIENT_MAX_EVENTS_PER_SECOND` or `TENANT_MAX_EVENTS_PER_SECOND` reached.
    #[error("Too many messages per second")]
    TooManyMessages,
    /// More presence calls than `CLIENT_PRESENCE_MAX_CALLS` per window.
    #[error("Client presence rate limit exceeded")]
    PresenceRateLimit,
    /// A presence meta over `MAX_PAYLOAD_SIZE_IN_KB`.
    #[error("Track message size exceeded")]
    TrackTooLarge,
    /// A broadcast over `MAX_PAYLOAD_SIZE_IN_KB`: dropped; with `ack` the reply
    /// is `{"status":"error","response":"payload_size_exceeded"}`.
    #[error("payload_size_exceeded")]
    BroadcastTooLarge,
    /// A broadcast whose payload is not a JSON object (or not JSON at all while
    /// its encoding byte says JSON): dropped, never relayed.
    #[error("Broadcast payload must be a JSON object")]
    InvalidBroadcastPayload,
}

impl ChannelError {
    /// Realtime's error code (the metric label).
    pub fn code(&self) -> &'static str {
        match self {
            ChannelError::TooManyMessages => "MessagePerSecondRateLimitReached",
            ChannelError::PresenceRateLimit => "ClientPresenceRateLimitReached",
            ChannelError::TrackTooLarge | ChannelError::BroadcastTooLarge => "PayloadSizeExceeded",
            ChannelError::InvalidBroadcastPayload => "InvalidBroadcastPayload",
        }
    }

    /// Logs and counts the error.
    pub fn report(&self) {
        report(self.code(), Fault::Client, &self.to_string());
    }
}

/// Logs an error a client saw (client faults at debug) and counts it.
pub fn report(code: &'static str, fault: Fault, message: &str) {
    match fault {
        Fault::Client => tracing::debug!(error_code = code, message, "client error"),
        Fault::Database | Fault::Internal => {
            tracing::error!(error_code = code, message, "error")
        }
    }
    metrics::counter!(crate::metrics::ERRORS, "code" => code, "fault" => fault.as_str())
        .increment(1);
}
