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

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, span fields (`conn_id`, `peer`, `sub`) included.
    Json,
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

    /// Address to bind. Default: `0.0.0.0` when auth is configured, else
    /// `127.0.0.1` (see `--insecure`).
    #[arg(long, env = "BIND_ADDR")]
    pub bind_addr: Option<IpAddr>,

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

    // --- PostgreSQL TLS (issue 9) -----------------------------------------------
    /// Supabase's `DB_SSL`: `true` encrypts the database connection without
    /// verifying the server (`sslmode=require`), `false` turns TLS off
    /// (`sslmode=disable`); unset, libpq's default `prefer` (TLS when offered).
    /// An `sslmode` in `DATABASE_URL` wins; for verification use
    /// `sslmode=verify-full&sslrootcert=/path/ca.pem` there.
    #[arg(long, env = "DB_SSL", value_parser = clap::builder::BoolishValueParser::new())]
    pub db_ssl: Option<bool>,

    /// Start a throwaway PostgreSQL when no database is configured (`auto`), or never (`off`).
    #[arg(long, env = "EMBEDDED_POSTGRES", value_enum, default_value_t = EmbeddedPostgres::Auto)]
    pub embedded_postgres: EmbeddedPostgres,

    // --- Authentication (issue 8; see SECURITY.md) ---------------------------
    /// HS256/384/512 secret for verifying JWTs (`API_JWT_SECRET`).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// JWKS as inline JSON (`{"keys": [...]}`), as Supabase's image takes it:
    /// RSA, EC (P-256/384), OKP (Ed25519) and `oct` keys.
    #[arg(long, env = "API_JWT_JWKS", hide_env_values = true)]
    pub jwt_jwks: Option<String>,

    /// URL of a JWKS (http or https), fetched at start and again when a token
    /// names an unknown `kid` (at most every 30 s).
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Opaque `sb_publishable_…` keys (comma-separated) accepted as the `anon` role.
    #[arg(
        long,
        env = "PUBLISHABLE_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub publishable_keys: Vec<String>,

    /// Opaque `sb_secret_…` keys (comma-separated) accepted as the `service_role` role.
    #[arg(
        long,
        env = "SECRET_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub secret_keys: Vec<String>,

    /// Serve on a non-loopback address without any authentication configured.
    #[arg(long, env = "INSECURE")]
    pub insecure: bool,

    /// When set, `GET /metrics` needs `Authorization: Bearer <JWT signed with it>`.
    #[arg(long, env = "METRICS_JWT_SECRET", hide_env_values = true)]
    pub metrics_jwt_secret: Option<String>,

    /// Delay before a refused WebSocket upgrade is answered (milliseconds), so
    /// a misconfigured client cannot spin (Supabase: 2000).
    #[arg(long, env = "CONNECT_ERROR_BACKOFF_MS", default_value_t = 2000)]
    pub connect_error_backoff_ms: u64,

    /// Delay before a refused join is answered (milliseconds); the socket keeps
    /// being served meanwhile (Supabase: 5000).
    #[arg(long, env = "CHANNEL_ERROR_BACKOFF_MS", default_value_t = 5000)]
    pub channel_error_backoff_ms: u64,
    /// Days of `realtime.messages` partitions kept (Broadcast from the
    /// database, replay); older daily partitions are dropped (Supabase: 3).
    #[arg(long, env = "MESSAGES_RETENTION_DAYS", default_value_t = 3)]
    pub messages_retention_days: u32,

    /// Database connections for private-channel policy checks and replays.
    #[arg(long, env = "AUTHZ_POOL_SIZE", default_value_t = 4)]
    pub authz_pool_size: usize,
    // --- end of authentication ------------------------------------------------
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

    /// On SIGTERM/Ctrl-C, exit within this long (milliseconds), drain delay included.
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

    /// Open WebSocket connections per user, counted by the verified token's
    /// `sub` claim; tokens without `sub` (anon and service keys) are not
    /// counted. Over it the upgrade gets HTTP 429 `Too many connections for
    /// this user`. No upstream env name exists (Supabase has no such limit).
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

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

    // ---- Flow control for Postgres Changes (issue 9) ----
    /// A client with Postgres changes queued whose socket takes nothing for
    /// this long is cut: its channels get the lag notice and `phx_error`, and
    /// it no longer holds back the change feed (milliseconds).
    #[arg(long, env = "CHANGES_LAG_GRACE_MS", default_value_t = 5_000)]
    pub changes_lag_grace_ms: u64,

    /// Bytes of Postgres changes (and database broadcasts) queued for
    /// clients, gateway-wide, before reading the change log pauses until
    /// clients drain some.
    #[arg(long, env = "CHANGES_BUFFER_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub changes_buffer_bytes: usize,

    // ---- Scale-out: the cluster bus (issue 12) ----
    /// NATS server URL(s), comma-separated (`nats://host:4222`, `tls://...`,
    /// `nats://user:pass@host`). Set it on every replica to make them one
    /// gateway for Broadcast and Presence; unset, the gateway is a single replica.
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// NATS credentials file (`.creds`: user JWT and NKey seed), when the server requires one.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// Subject prefix: replicas sharing a NATS server and this prefix form one gateway.
    #[arg(long, env = "NATS_SUBJECT_PREFIX", default_value = "realtime")]
    pub nats_subject_prefix: String,

    /// Bytes of broadcasts and presence queued for NATS at most; beyond it
    /// (NATS unreachable or slow) new messages are dropped and counted.
    #[arg(long, env = "NATS_BUFFER_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub nats_buffer_bytes: usize,

    /// Replica heartbeat interval (milliseconds).
    #[arg(long, env = "CLUSTER_HEARTBEAT_MS", default_value_t = 1000)]
    pub cluster_heartbeat_ms: u64,

    /// A replica not heard from for this long is dead: its presences leave on
    /// every other replica (milliseconds).
    #[arg(long, env = "CLUSTER_NODE_TIMEOUT_MS", default_value_t = 5000)]
    pub cluster_node_timeout_ms: u64,

    // ---- Operations (issue 11): drain, logging ----
    /// On SIGTERM, keep serving this long (milliseconds) with `/readyz` failing
    /// and new WebSocket upgrades refused (503) before closing sockets with
    /// 1001, so load balancers stop sending clients here first. Part of
    /// `SHUTDOWN_GRACE_MS`, so it must be shorter. A second signal skips it.
    #[arg(long, env = "DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// Log level when `RUST_LOG` is unset. Supabase Realtime's names are
    /// accepted (`debug`, `info`, `notice`, `warning`, `error`, `critical`, ...),
    /// as are `trace` and `warn`. `RUST_LOG` (an `EnvFilter`), when set, wins.
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Change and broadcast events kept for `GET /api/realtime/events` and the
    /// inspector (each keeps at most 1 KiB of its payload).
    #[arg(long, env = "EVENT_LOG_CAPACITY", default_value_t = 1000)]
    pub event_log_capacity: usize,
}

impl Config {
    /// The database URL: `DATABASE_URL`, else one built from `DB_*`, else `None`;
    /// with `DB_SSL`'s `sslmode` when the URL names none.
    pub fn database_url(&self) -> Option<String> {
        let url = match self.database_url.as_ref().filter(|u| !u.is_empty()) {
            Some(url) => url.clone(),
            None => {
                let host = self.db_host.as_ref().filter(|h| !h.is_empty())?;
                let enc = |s: &str| {
                    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                        .to_string()
                };
                let auth = match &self.db_password {
                    Some(p) => format!("{}:{}", enc(&self.db_user), enc(p)),
                    None => enc(&self.db_user),
                };
                format!(
                    "postgres://{auth}@{host}:{}/{}",
                    self.db_port,
                    enc(&self.db_name)
                )
            }
        };
        let Some(ssl) = self.db_ssl.filter(|_| !url.contains("sslmode=")) else {
            return Some(url);
        };
        let mode = if ssl { "require" } else { "disable" };
        Some(
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}sslmode={mode}")
            } else {
                format!("{url} sslmode={mode}")
            },
        )
    }

    /// Idle timeout as a `Duration`.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Write timeout as a `Duration`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `CHANGES_LAG_GRACE_MS` as a `Duration`.
    pub fn changes_lag_grace(&self) -> Duration {
        Duration::from_millis(self.changes_lag_grace_ms)
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

    /// The cluster's timing and naming.
    pub fn cluster_options(&self) -> crate::cluster::ClusterOptions {
        crate::cluster::ClusterOptions {
            prefix: self.nats_subject_prefix.clone(),
            heartbeat: Duration::from_millis(self.cluster_heartbeat_ms),
            node_timeout: Duration::from_millis(self.cluster_node_timeout_ms),
        }
    }

    /// Drain delay as a `Duration`.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// The auth settings.
    pub fn auth_settings(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            secret: self.jwt_secret.clone(),
            jwks: self.jwt_jwks.clone(),
            jwks_url: self.jwks_url.clone(),
            publishable_keys: self.publishable_keys.clone(),
            secret_keys: self.secret_keys.clone(),
        }
    }

    /// The address to bind: secure by default. Without auth the gateway
    /// serves only on loopback unless `--insecure` says otherwise.
    pub fn bind_addr(&self, auth_configured: bool) -> Result<IpAddr, String> {
        let default = if auth_configured {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([127, 0, 0, 1])
        };
        let addr = self.bind_addr.unwrap_or(default);
        if !auth_configured && !addr.is_loopback() && !self.insecure {
            return Err(format!(
                "refusing to serve on {addr} without authentication: set API_JWT_SECRET \
                 (or API_JWT_JWKS / --jwks-url), bind a loopback address, or pass \
                 --insecure (INSECURE=true) to accept any token from anyone"
            ));
        }
        Ok(addr)
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
        if self.changes_lag_grace_ms == 0 {
            return Err("CHANGES_LAG_GRACE_MS must be positive".into());
        }
        if self.changes_buffer_bytes < 64 * 1024 {
            return Err("CHANGES_BUFFER_BYTES must be at least 65536".into());
        }
        if let Some(url) = self.nats_url.as_deref().filter(|u| !u.is_empty()) {
            crate::cluster::nats::parse_urls(url)?;
        }
        if !crate::cluster::wire::valid_prefix(&self.nats_subject_prefix) {
            return Err(
                "NATS_SUBJECT_PREFIX must be dot-separated tokens of letters, digits, '_' and '-'"
                    .into(),
            );
        }
        if self.cluster_heartbeat_ms == 0
            || self.cluster_node_timeout_ms < 2 * self.cluster_heartbeat_ms
        {
            return Err("CLUSTER_HEARTBEAT_MS must be positive and CLUSTER_NODE_TIMEOUT_MS at least twice it".into());
        }
        if self.drain_delay_ms > 0 && self.drain_delay_ms >= self.shutdown_grace_ms {
            return Err(format!(
                "DRAIN_DELAY_MS ({}) must be shorter than SHUTDOWN_GRACE_MS ({}): the grace period includes the drain",
                self.drain_delay_ms, self.shutdown_grace_ms
            ));
        }
        if let Some(level) = &self.log_level {
            crate::logging::level_directive(level)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_by_default_binding() {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let any = IpAddr::from([0, 0, 0, 0]);
        // No auth: loopback by default; a public address needs --insecure.
        assert_eq!(parse_from(["gw"]).bind_addr(false), Ok(loopback));
        let public = parse_from(["gw", "--bind-addr", "0.0.0.0"]);
        assert!(public.bind_addr(false).unwrap_err().contains("--insecure"));
        let insecure = parse_from(["gw", "--bind-addr", "0.0.0.0", "--insecure"]);
        assert_eq!(insecure.bind_addr(false), Ok(any));
        assert_eq!(
            parse_from(["gw", "--bind-addr", "::1"]).bind_addr(false),
            Ok("::1".parse().unwrap())
        );
        // With auth: every interface by default, anything allowed.
        assert_eq!(parse_from(["gw"]).bind_addr(true), Ok(any));
        assert_eq!(public.bind_addr(true), Ok(any));
    }

    #[test]
    fn db_ssl_sets_sslmode_unless_the_url_has_one() {
        let parts = ["gw", "--db-host", "db.example.com", "--db-password", "p w"];
        assert_eq!(
            parse_from(parts).database_url().unwrap(),
            "postgres://postgres:p%20w@db.example.com:5432/postgres"
        );
        let with = |extra: &[&str]| {
            let mut args = parts.to_vec();
            args.extend_from_slice(extra);
            parse_from(args).database_url().unwrap()
        };
        assert!(with(&["--db-ssl", "true"]).ends_with("/postgres?sslmode=require"));
        assert!(with(&["--db-ssl", "false"]).ends_with("/postgres?sslmode=disable"));
        let url = |u: &str, ssl: &str| {
            parse_from(["gw", "--database-url", u, "--db-ssl", ssl])
                .database_url()
                .unwrap()
        };
        assert_eq!(
            url("postgres://h/db?application_name=x", "1"),
            "postgres://h/db?application_name=x&sslmode=require"
        );
        assert_eq!(
            url("postgres://h/db?sslmode=verify-full", "true"),
            "postgres://h/db?sslmode=verify-full"
        );
        assert_eq!(
            url("host=h dbname=db", "true"),
            "host=h dbname=db sslmode=require"
        );
    }
}
