//! realtime-gateway: a Supabase-compatible realtime server.
//!
//! One WebSocket speaking the Phoenix channel protocol carries Broadcast,
//! Presence and Postgres Changes, exactly as `@supabase/supabase-js` expects.
//!
//! # Layout
//! - [`config`]: the one `Config` (clap, env fallbacks).
//! - [`server`]: accept loop, WebSocket upgrade checks. `routes`: which handler answers which path.
//! - [`health`]: `/healthz`, `/readyz`, Supabase's tenant health; drain state and readiness hooks.
//! - [`shutdown`]: signal → drain (`DRAIN_DELAY_MS`) → close sockets (1001) → exit within the grace.
//! - [`inspector`]: the built-in `/inspector` page (assets compiled in).
//! - [`ops`]: recent-event log, connection registry, status/events/connections admin APIs.
//! - [`logging`]: `RUST_LOG` / `LOG_LEVEL` (Supabase's level names), text or JSON lines.
//! - [`socket`]: one connection = a reader task (decode, session) and a writer task (batched writes).
//! - [`channel`]: protocol handling per event (join/leave, broadcast, presence), no socket.
//! - [`registry`]: topics, subscribers, encode-once fan-out, lag accounting.
//! - [`flow`]: flow control for Postgres Changes (paced queues, read-ahead budget, stall cut).
//! - [`presence`]: presence state and diffs of one topic.
//! - [`cluster`]: many replicas as one gateway (the `ClusterBus`, NATS, presence replication).
//! - [`changes`]: Postgres Changes bindings, filters and routing.
//! - [`database`]: migrate, start ingest, route changes (when a database is configured).
//! - [`db_broadcast`]: Broadcast from the database (`realtime.send`), live and replayed.
//! - [`rest`]: REST broadcast and tables endpoints.
//! - [`limits`]: rate limiters and input bounds (channels, joins, events, presence, payload size).
//! - [`auth`]: JWT verification. [`error`]: client-visible errors with Realtime's codes.
//! - [`metrics`]: metric names and hot-path handles. [`state`]: what every handler shares.
//! - `fuzz`: fuzzing entry points (codec, filters, REST bodies) for `fuzz/` and the replay test.

pub mod auth;
pub mod changes;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod database;
pub mod db_broadcast;
pub mod error;
pub mod flow;
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod inspector;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod presence;
pub mod registry;
pub mod rest;
mod routes;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod state;

pub use config::Config;
pub use state::Shared;
