//! One `Config`, parsed once in `main` with clap (flags with env fallbacks), passed down.
//!
//! Names follow Supabase Realtime's where the meaning matches (`PORT`,
//! `DB_HOST`, `API_JWT_SECRET`, ...) so the gateway drops into Supabase's
//! self-hosted compose file. README.md documents every option.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// What happens to a channel whose client cannot keep up with its backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LagPolicy {
    /// Tell the channel how many frames were dropped (`system` message), then
    /// `phx_error` it so realtime-js rejoins and the app refetches.
    Error,
    /// Count and log the drops, keep delivering what fits.
    Skip,
}

/// Whether to start a throwaway local PostgreSQL when no database is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmbeddedPostgres {
    /// Start one when no database is configured (the default).
    Auto,
    /// Never: without a database only Broadcast and Presence are served.
    Off,
}

/// Gateway configuration. Every field is a flag with an environment fallback.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Port for WebSocket, REST and /metrics.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Address to bind.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind_addr: IpAddr,

    /// PostgreSQL URL (`postgres://user:pass@host:port/db`). When absent, the
    /// Supabase-style `DB_HOST`/`DB_PORT`/`DB_USER`/`DB_PASSWORD`/`DB_NAME` are used.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Database host (Supabase's `DB_HOST`), used when `DATABASE_URL` is absent.
    #[arg(long, env = "DB_HOST")]
    pub db_host: Option<String>,
    /// Database port (`DB_PORT`).
    #[arg(long, env = "DB_PORT", default_value_t = 5432)]
    pub db_port: u16,
    /// Database user (`DB_USER`).
    #[arg(long, env = "DB_USER", default_value = "postgres")]
    pub db_user: String,
    /// Database password (`DB_PASSWORD`).
    #[arg(long, env = "DB_PASSWORD")]
    pub db_password: Option<String>,
    /// Database name (`DB_NAME`).
    #[arg(long, env = "DB_NAME", default_value = "postgres")]
    pub db_name: String,

    /// Start a throwaway PostgreSQL when no database is configured (`auto`), or never (`off`).
    #[arg(long, env = "EMBEDDED_POSTGRES", value_enum, default_value_t = EmbeddedPostgres::Auto)]
    pub embedded_postgres: EmbeddedPostgres,

    /// HS256 secret for verifying JWTs (`API_JWT_SECRET`). Without it tokens are not verified.
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Largest WebSocket message accepted, in bytes (Supabase: 5,000,000).
    #[arg(long, env = "MAX_FRAME_SIZE", default_value_t = 5_000_000)]
    pub max_frame_size: usize,

    /// Close a socket that sent no frame for this long (milliseconds).
    #[arg(long, env = "IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// Frames queued per client before frames are dropped and the lag policy applies.
    #[arg(long, env = "CLIENT_BACKLOG", default_value_t = 1024)]
    pub client_backlog: usize,

    /// What to do with a channel whose client cannot keep up.
    #[arg(long, env = "LAG_POLICY", value_enum, default_value_t = LagPolicy::Error)]
    pub lag_policy: LagPolicy,

    /// Give up on a socket write that makes no progress for this long (milliseconds).
    #[arg(long, env = "WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    pub write_timeout_ms: u64,

    /// On SIGTERM/Ctrl-C, wait at most this long for sockets to close (milliseconds).
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Concurrent WebSocket connections accepted; more get HTTP 429.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1_000_000)]
    pub max_connections: usize,

    /// Largest REST request body, in bytes.
    #[arg(long, env = "MAX_BODY_SIZE", default_value_t = 5_000_000)]
    pub max_body_size: usize,

    /// Largest row image delivered whole; larger rows carry `Error 413: Payload Too Large`.
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = 1024 * 1024)]
    pub max_record_bytes: usize,

    /// How long captured changes are kept for catch-up (seconds).
    #[arg(long, env = "CHANGE_RETENTION_SECS", default_value_t = 900)]
    pub change_retention_secs: u64,

    /// Publication whose tables are enabled automatically (Supabase compatibility); empty to disable.
    #[arg(long, env = "PUBLICATION", default_value = "supabase_realtime")]
    pub publication: String,

    // ---- Limits and hostile input (issue 10). Supabase's env names where upstream
    // has one; defaults are generous for one self-hosted deployment, every one finite.
    // README.md ("Limits") lists Supabase's per-plan numbers as example settings.
    /// Channels one socket may join (Supabase: 100). `MAX_CHANNELS_PER_CLIENT` is an alias.
    #[arg(long, env = "TENANT_MAX_CHANNELS_PER_CLIENT")]
    pub tenant_max_channels_per_client: Option<usize>,
    /// Former name of `TENANT_MAX_CHANNELS_PER_CLIENT` (used when that one is unset).
    #[arg(
        long = "max-channels-per-client",
        env = "MAX_CHANNELS_PER_CLIENT",
        hide = true
    )]
    pub legacy_max_channels_per_client: Option<usize>,

    /// Joins per second over the whole gateway (Supabase: 100 per tenant); bursts
    /// of one second's worth are allowed. Over it: `ClientJoinRateLimitReached`.
    #[arg(long, env = "TENANT_MAX_JOINS_PER_SECOND", default_value_t = 100_000)]
    pub tenant_max_joins_per_second: u32,

    /// Joins per second on one socket; bursts up to the channel limit are allowed
    /// (a reconnecting client rejoins all its channels at once).
    #[arg(long, env = "CLIENT_MAX_JOINS_PER_SECOND", default_value_t = 100)]
    pub client_max_joins_per_second: u32,

    /// Client events (broadcast, presence, REST messages, ...) per second over the
    /// whole gateway (Supabase: 100 per tenant, Pro 500); bursts of one second's worth.
    #[arg(long, env = "TENANT_MAX_EVENTS_PER_SECOND", default_value_t = 100_000)]
    pub tenant_max_events_per_second: u32,

    /// Client events per second on one socket; over it the offending channel gets
    /// `Too many messages per second` and is closed (the others stay joined).
    #[arg(long, env = "CLIENT_MAX_EVENTS_PER_SECOND", default_value_t = 1_000)]
    pub client_max_events_per_second: u32,

    /// Presence calls (track/untrack) per channel per window (Supabase: 5).
    #[arg(long, env = "CLIENT_PRESENCE_MAX_CALLS", default_value_t = 5)]
    pub client_presence_max_calls: u32,

    /// The presence-call window, milliseconds (Supabase: 30,000).
    #[arg(long, env = "CLIENT_PRESENCE_WINDOW_MS", default_value_t = 30_000)]
    pub client_presence_window_ms: u64,

    /// Connections with at least one joined channel (Supabase: 200 per tenant, Pro 500).
    #[arg(long, env = "TENANT_MAX_CONCURRENT_USERS", default_value_t = 250_000)]
    pub tenant_max_concurrent_users: usize,

    /// Largest broadcast or presence message, in kilobytes of 1,000 bytes
    /// (Supabase's `max_payload_size_in_kb`: 3,000; Free plan 256). It also
    /// bounds the presence metas one socket keeps tracked across its channels.
    #[arg(long, env = "MAX_PAYLOAD_SIZE_IN_KB", default_value_t = 5_000)]
    pub max_payload_size_in_kb: usize,

    /// `postgres_changes` entries one join may carry.
    #[arg(long, env = "MAX_POSTGRES_CHANGES_PER_JOIN", default_value_t = 100)]
    pub max_postgres_changes_per_join: usize,

    /// Close a socket that has had no channel joined for this long (milliseconds; Supabase: 10 min).
    #[arg(long, env = "NO_CHANNEL_TIMEOUT_IN_MS", default_value_t = 600_000)]
    pub no_channel_timeout_in_ms: u64,

    /// Close an HTTP connection whose request head has not fully arrived after
    /// this long (milliseconds): slow or silent clients cannot hold sockets.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// TCP connections speaking HTTP at once (WebSocket handshakes in
    /// progress, REST clients; ~26 KiB each while a request head is read).
    /// At the cap, a new connection's request waits for a slot, within
    /// `HEADER_READ_TIMEOUT_MS`. Silent connections do not count.
    #[arg(long, env = "MAX_HTTP_CONNECTIONS", default_value_t = 10_000)]
    pub max_http_connections: usize,

    /// REST broadcasts wait for a subscriber whose backlog is full while its
    /// socket keeps taking data; one whose write stays blocked this long
    /// (milliseconds) gets the lag policy instead.
    #[arg(long, env = "SLOW_CLIENT_GRACE_MS", default_value_t = 2_000)]
    pub slow_client_grace_ms: u64,
}

impl Config {
    /// The database URL: `DATABASE_URL`, else one built from `DB_*`, else `None`.
    pub fn database_url(&self) -> Option<String> {
        if let Some(url) = self.database_url.as_ref().filter(|u| !u.is_empty()) {
            return Some(url.clone());
        }
        let host = self.db_host.as_ref().filter(|h| !h.is_empty())?;
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let auth = match &self.db_password {
            Some(p) => format!("{}:{}", enc(&self.db_user), enc(p)),
            None => enc(&self.db_user),
        };
        Some(format!(
            "postgres://{auth}@{host}:{}/{}",
            self.db_port,
            enc(&self.db_name)
        ))
    }

    /// Idle timeout as a `Duration`.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Write timeout as a `Duration`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// Shutdown grace period as a `Duration`.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Channels one socket may join: `TENANT_MAX_CHANNELS_PER_CLIENT`, else
    /// `MAX_CHANNELS_PER_CLIENT`, else Supabase's 100.
    pub fn max_channels_per_client(&self) -> usize {
        self.tenant_max_channels_per_client
            .or(self.legacy_max_channels_per_client)
            .unwrap_or(100)
    }

    /// Largest broadcast/presence payload in bytes.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_size_in_kb.saturating_mul(1000)
    }

    /// Checks values that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.client_backlog == 0 {
            return Err("CLIENT_BACKLOG must be at least 1".into());
        }
        if self.max_frame_size < 1024 {
            return Err("MAX_FRAME_SIZE must be at least 1024 bytes".into());
        }
        if self.idle_timeout_ms == 0 {
            return Err("IDLE_TIMEOUT_MS must be positive".into());
        }
        for (name, v) in [
            (
                "TENANT_MAX_JOINS_PER_SECOND",
                self.tenant_max_joins_per_second,
            ),
            (
                "CLIENT_MAX_JOINS_PER_SECOND",
                self.client_max_joins_per_second,
            ),
            (
                "TENANT_MAX_EVENTS_PER_SECOND",
                self.tenant_max_events_per_second,
            ),
            (
                "CLIENT_MAX_EVENTS_PER_SECOND",
                self.client_max_events_per_second,
            ),
            ("CLIENT_PRESENCE_MAX_CALLS", self.client_presence_max_calls),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_http_connections == 0 {
            return Err("MAX_HTTP_CONNECTIONS must be at least 1".into());
        }
        if self.header_read_timeout_ms == 0 || self.no_channel_timeout_in_ms == 0 {
            return Err(
                "HEADER_READ_TIMEOUT_MS and NO_CHANNEL_TIMEOUT_IN_MS must be positive".into(),
            );
        }
        Ok(())
    }
}

/// Parses a config from an argument list (tests build configs this way).
pub fn parse_from<I, T>(args: I) -> Config
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        config: Config,
    }
    <Wrapper as clap::Parser>::parse_from(args).config
}
