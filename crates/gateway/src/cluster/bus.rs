//! The transport between replicas: the narrow interface an engine implements.
//!
//! Everything above it (envelopes, interest, presence replication, liveness)
//! is engine-independent, so an engine needs only plain subject pub/sub:
//! publish without waiting (bounded, drops counted), subscribe to one subject
//! (dropping the subscription ends it), and say whether it is connected.
//! Replies go to per-node inbox subjects, so no request/reply primitive is
//! needed. NATS implements it (`nats.rs`); Redis sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`) would map one to one.

use std::fmt;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::Stream;
use tokio::sync::watch;

/// Messages received on one subscribed subject, in arrival order.
pub type Subscription = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// How urgent a published message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Broadcasts and presence: subject to the outbound byte budget.
    Data,
    /// Heartbeats and sync traffic: small, exempt from the byte budget.
    Control,
}

/// The link to the bus: up or down, and how many times it connected (a
/// change of `connects` while up means a reconnect: state may have been missed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Connected now.
    pub up: bool,
    /// Successful connections so far.
    pub connects: u64,
}

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cluster bus: {0}")]
pub struct BusError(pub String);

/// A cross-replica transport.
pub trait ClusterBus: Send + Sync + fmt::Debug + 'static {
    /// The engine's name (`nats`), for logs and status.
    fn engine(&self) -> &'static str;

    /// Queues `payload` for `subject` without waiting. Returns false when it
    /// was dropped (outbound buffer full, too large); the engine counts why.
    fn publish(&self, subject: String, payload: Bytes, class: Class) -> bool;

    /// Subscribes to `subject`. Resolves once the subscription has been sent
    /// to the server (messages published by others after they see it arrive).
    fn subscribe(&self, subject: String) -> BoxFuture<'static, Result<Subscription, BusError>>;

    /// The link state, now and on every change.
    fn link(&self) -> watch::Receiver<LinkState>;

    /// Sends what is queued (bounded wait) and closes.
    fn close(&self) -> BoxFuture<'static, ()>;
}
