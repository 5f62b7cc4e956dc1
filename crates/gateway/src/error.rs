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
    /// `MAX_CHANNELS_PER_CLIENT` reached.
    #[error("Too many channels")]
    TooManyChannels,
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
            JoinError::TooManyChannels => "ChannelRateLimitReached",
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
