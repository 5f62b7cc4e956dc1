//! realtime-gateway: a Supabase-compatible realtime server.
//!
//! One WebSocket speaking the Phoenix channel protocol carries Broadcast,
//! Presence and Postgres Changes, exactly as `@supabase/supabase-js` expects.
//!
//! # Layout
//! - [`config`]: the one `Config` (clap, env fallbacks).
//! - [`server`]: accept loop, HTTP routing, WebSocket upgrade, graceful shutdown.
//! - [`socket`]: one connection = a reader task (decode, session) and a writer task (batched writes).
//! - [`channel`]: protocol handling per event (join/leave, broadcast, presence), no socket.
//! - [`registry`]: topics, subscribers, encode-once fan-out, lag accounting.
//! - [`presence`]: presence state and diffs of one topic.
//! - [`changes`]: Postgres Changes bindings, filters and routing.
//! - [`database`]: migrate, start ingest, route changes (when a database is configured).
//! - [`rest`]: REST broadcast and tables endpoints.
//! - [`limits`]: rate limiters and input bounds (channels, joins, events, presence, payload size).
//! - [`auth`]: JWT verification. [`error`]: client-visible errors with Realtime's codes.
//! - [`metrics`]: metric names and hot-path handles. [`state`]: what every handler shares.

pub mod auth;
pub mod changes;
pub mod channel;
pub mod config;
pub mod database;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod registry;
pub mod rest;
pub mod server;
pub mod socket;
pub mod state;

pub use config::Config;
pub use state::Shared;
