//! Everything Postgres-side of realtime-gateway.
//!
//! (Skeleton: the public API below is the contract with `gateway`; see ARCHITECTURE.md.)
//!
//! # Layout
//! - `schema`: versioned, idempotent migrations of the `realtime_gateway` schema.
//! - `tables`: enable / disable / list tables (SQL functions, Rust API).
//! - `ingest`: the listener task: LISTEN wake-ups, gap-free catch-up, publication sync.
//! - `embedded`: a throwaway local PostgreSQL for the zero-config default and for tests.
//! - [`Change`]: one captured row change, owned by this crate.
