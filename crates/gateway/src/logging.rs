//! Log setup: the filter (`RUST_LOG`, else `LOG_LEVEL` with Supabase
//! Realtime's level names) and the format (text or JSON). Only `main` installs
//! the subscriber.
//!
//! Every WebSocket connection runs inside one `conn` span carrying `conn_id`,
//! `peer` and the token's `sub`, so each line about a connection names it and
//! `grep conn_id=42` (or `jq 'select(.span.conn_id==42)'`) tells one client's story.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Libraries whose `info` lines are noise for operators.
const QUIET: &str = "tokio_postgres=warn";

/// Maps a `LOG_LEVEL` value to a `tracing` level directive.
///
/// Supabase Realtime (Elixir's Logger) uses `debug`, `info`, `notice`,
/// `warning`, `error`, `critical`, `alert`, `emergency`; `tracing` has five
/// levels, so `notice` is `info` and the last three are `error`.
pub fn level_directive(level: &str) -> Result<&'static str, String> {
    Ok(match level.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" | "notice" => "info",
        "warn" | "warning" => "warn",
        "error" | "critical" | "alert" | "emergency" => "error",
        "off" | "none" => "off",
        other => {
            return Err(format!(
                "LOG_LEVEL {other:?} is not a level: use debug, info, notice, warning, error, critical, alert or emergency"
            ))
        }
    })
}

/// The filter directives: `RUST_LOG` when set and non-empty, else `LOG_LEVEL`
/// (default `info`) with noisy libraries quieted.
pub fn directives(rust_log: Option<&str>, log_level: Option<&str>) -> Result<String, String> {
    if let Some(rust_log) = rust_log.filter(|s| !s.trim().is_empty()) {
        return Ok(rust_log.to_owned());
    }
    let level = match log_level.filter(|s| !s.trim().is_empty()) {
        Some(l) => level_directive(l)?,
        None => "info",
    };
    Ok(match level {
        // Quieting tokio_postgres to `warn` would make it louder than these.
        "error" | "off" => level.to_owned(),
        _ => format!("{level},{QUIET}"),
    })
}

/// Installs the global subscriber (stderr). Call once, first thing in `main`.
pub fn init(config: &Config) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(directives(
        rust_log.as_deref(),
        config.log_level.as_deref(),
    )?)
    .map_err(|e| format!("invalid RUST_LOG: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        // One object per line; the current span's fields under `span`, every
        // enclosing span's under `spans`.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    result.map_err(|e| format!("installing the log subscriber: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supabase_level_names() {
        assert_eq!(level_directive("warning"), Ok("warn"));
        assert_eq!(level_directive("WARNING"), Ok("warn"));
        assert_eq!(level_directive("notice"), Ok("info"));
        assert_eq!(level_directive("emergency"), Ok("error"));
        assert_eq!(level_directive(" debug "), Ok("debug"));
        assert!(level_directive("loud").unwrap_err().contains("loud"));
    }

    #[test]
    fn rust_log_wins_then_log_level_then_info() {
        assert_eq!(
            directives(Some("gateway=trace"), Some("error")).unwrap(),
            "gateway=trace"
        );
        assert_eq!(
            directives(Some(""), Some("warning")).unwrap(),
            "warn,tokio_postgres=warn"
        );
        assert_eq!(directives(None, Some("error")).unwrap(), "error");
        assert_eq!(directives(None, None).unwrap(), "info,tokio_postgres=warn");
        assert!(directives(None, Some("nope")).is_err());
    }
}
