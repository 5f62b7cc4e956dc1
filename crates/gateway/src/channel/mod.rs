//! Protocol handling for one connection: plain code, no socket.
//!
//! The reader task decodes a frame and calls [`Session::handle`]; handlers
//! queue replies on the connection's backlog and publish through the
//! registry. One module per event family: `join` (phx_join, phx_leave),
//! `broadcast`, `presence`; `auth` holds what a channel's token decides
//! (access_token refreshes, expiry checks, delayed join errors).

mod auth;
pub mod broadcast;
mod join;
mod presence;
mod private;

pub(crate) use presence::publish_diff;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use phoenix_channel::{encode_reply, encode_text, Message, Ref, Vsn};
use serde::Serialize;
use serde_json::json;

use crate::auth::Claims;
use crate::changes::ChannelBindings;
use crate::error::ChannelError;
use crate::limits::{PresenceWindow, Rate, MAX_FIELD_BYTES};
use crate::registry::{ChannelHandle, ConnHandle, Outbound, Topic};
use crate::state::Shared;
pub use private::may_write_broadcast;

/// A channel this connection has joined.
#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) handle: Arc<ChannelHandle>,
    pub(crate) topic: Arc<Topic>,
    pub(crate) broadcast_self: bool,
    pub(crate) broadcast_ack: bool,
    pub(crate) presence_key: String,
    pub(crate) bindings: Option<ChannelBindings>,
    /// The claims this channel acts with (join `access_token`, else the
    /// connection's); replaced by a valid `access_token` event.
    pub(crate) claims: Arc<Claims>,
    /// The token those claims came from (re-verified at `recheck_at`).
    pub(crate) token: Option<Arc<str>>,
    /// When the token is checked again: `min(5 min, exp)`.
    pub(crate) recheck_at: tokio::time::Instant,
    /// Presence calls in the current window (`CLIENT_PRESENCE_MAX_CALLS`).
    pub(crate) presence_calls: PresenceWindow,
    /// Size of the track message whose meta this channel keeps tracked.
    pub(crate) presence_bytes: usize,
    /// Private channels: the evaluated policies (`None` for public ones).
    pub(crate) policies: Option<private::Policies>,
}

/// What a connection authenticated with at the upgrade.
#[derive(Debug, Clone)]
pub struct ConnAuth {
    /// The `apikey` / `x-api-key` token.
    pub token: Option<Arc<str>>,
    /// Its claims.
    pub claims: Arc<Claims>,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) conn: Arc<ConnHandle>,
    pub(crate) vsn: Vsn,
    /// The connection's token and claims: the fallback for joins without `access_token`.
    pub(crate) conn_auth: ConnAuth,
    pub(crate) channels: HashMap<String, Joined>,
    /// Join error replies waiting out `CHANNEL_ERROR_BACKOFF_MS`, in due order.
    pub(crate) delayed: VecDeque<(tokio::time::Instant, Bytes)>,
    /// Earliest `recheck_at` of the joined channels (kept when channels change).
    pub(crate) next_recheck: Option<tokio::time::Instant>,
    /// `CLIENT_MAX_JOINS_PER_SECOND` (bursts up to the channel limit).
    pub(crate) joins: Rate,
    /// `CLIENT_MAX_EVENTS_PER_SECOND`.
    pub(crate) events: Rate,
    /// Whether this socket counts in `TENANT_MAX_CONCURRENT_USERS` (from its first join on).
    pub(crate) counted_user: bool,
    /// Set when a join was refused by the join rate: the socket is closed, as upstream.
    pub(crate) disconnect: bool,
    /// Sum of the channels' `presence_bytes` (bounded by `MAX_PAYLOAD_SIZE_IN_KB`).
    pub(crate) presence_bytes: usize,
}

impl Session {
    /// Creates the session of a new connection.
    pub fn new(shared: Arc<Shared>, conn: Arc<ConnHandle>, vsn: Vsn, conn_auth: ConnAuth) -> Self {
        let config = &shared.config;
        let joins = Rate::new(
            config.client_max_joins_per_second,
            config
                .client_max_joins_per_second
                .max(u32::try_from(config.max_channels_per_client()).unwrap_or(u32::MAX)),
        );
        let events = Rate::new(
            config.client_max_events_per_second,
            config.client_max_events_per_second,
        );
        Session {
            shared,
            conn,
            vsn,
            conn_auth,
            channels: HashMap::new(),
            delayed: VecDeque::new(),
            next_recheck: None,
            joins,
            events,
            counted_user: false,
            disconnect: false,
            presence_bytes: 0,
        }
    }

    /// Whether the socket must be closed (a refused join rate, as upstream).
    pub fn must_disconnect(&self) -> bool {
        self.disconnect
    }

    /// Whether no channel is joined.
    pub fn is_idle(&self) -> bool {
        self.channels.is_empty()
    }

    /// Handles one decoded client message; `size` is its length on the wire
    /// (what `MAX_PAYLOAD_SIZE_IN_KB` is checked against).
    pub async fn handle(&mut self, msg: Message, size: usize) {
        metrics::counter!(crate::metrics::CHANNEL_EVENTS, "event" => event_label(&msg.event))
            .increment(1);
        if !fields_within_bounds(&msg) {
            // Refs and event names are echoed and kept per join: bounded like
            // the binary format bounds them. Dropped as malformed (upstream
            // cannot encode them either).
            self.shared.fanout.metrics.malformed.increment(1);
            tracing::debug!("message with a ref or event over 255 bytes dropped");
            return;
        }
        if msg.topic == "phoenix" {
            if msg.event == "heartbeat" {
                self.reply(&msg, "ok", &json!({})).await;
            }
            return;
        }
        match msg.event.as_str() {
            "phx_join" => self.join(msg).await,
            "phx_leave" => self.leave(msg).await,
            _ => {
                let Some(joined) = self.channels.get(&msg.topic) else {
                    self.reply(&msg, "error", &json!({"reason": "unmatched topic"}))
                        .await;
                    return;
                };
                // A stale join_ref belongs to a previous join of this topic: ignore it.
                if msg.join_ref.is_some() && msg.join_ref != joined.handle.join_ref {
                    tracing::debug!(topic = %msg.topic, "message with stale join_ref ignored");
                    return;
                }
                // Every client event counts (as upstream's `count/1`); the
                // offender's channel is closed, the topic's other subscribers stay.
                if !self.events.try_acquire(1) || !self.shared.limits.events.try_acquire(1) {
                    self.shutdown_limit(&msg.topic, ChannelError::TooManyMessages)
                        .await;
                    return;
                }
                match msg.event.as_str() {
                    "broadcast" => self.broadcast(msg, size).await,
                    "presence" => self.presence(msg, size).await,
                    "access_token" => self.access_token(msg).await,
                    other => {
                        tracing::debug!(event = other, "unknown event ignored");
                    }
                }
            }
        }
    }

    /// Shuts a channel down for a limit it tripped (counted, then [`Session::shutdown`]).
    pub(crate) async fn shutdown_limit(&mut self, topic: &str, why: ChannelError) {
        why.report();
        self.shutdown(topic, &why.to_string()).await;
    }

    /// Upstream's `shutdown_response`: a `system` error with `message`, then
    /// `phx_close` (realtime-js goes to CLOSED and does not rejoin).
    pub(crate) async fn shutdown(&mut self, topic: &str, message: &str) {
        let Some(joined) = self.channels.get(topic) else {
            return;
        };
        let jr = joined.handle.join_ref.clone();
        let notice = system_payload("system", "error", message, joined.handle.subtopic());
        self.push(jr.as_ref(), None, topic, "system", &notice).await;
        self.close_channel(topic).await;
    }

    /// Queues a frame on this connection, waiting if its backlog is full.
    pub(crate) async fn send(&self, frame: Bytes) {
        let _ = self.conn.tx.send(Outbound::Text(frame)).await;
    }

    /// Replies to `msg` (same `join_ref` and `ref`).
    pub(crate) async fn reply<R: Serialize + ?Sized>(
        &self,
        msg: &Message,
        status: &str,
        response: &R,
    ) {
        match encode_reply(
            self.vsn,
            msg.join_ref.as_ref(),
            msg.msg_ref.as_ref(),
            &msg.topic,
            status,
            response,
        ) {
            Ok(frame) => self.send(frame).await,
            Err(e) => tracing::error!(cause = %e, "reply could not be encoded"),
        }
    }

    /// Pushes a channel event: `[join_ref, ref, topic, event, payload]`.
    pub(crate) async fn push<P: Serialize + ?Sized>(
        &self,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        event: &str,
        payload: &P,
    ) {
        match encode_text(self.vsn, join_ref, msg_ref, topic, event, payload) {
            Ok(frame) => self.send(frame).await,
            Err(e) => tracing::error!(cause = %e, "push could not be encoded"),
        }
    }

    /// Leaves every channel (the connection is going away).
    pub fn close_all(&mut self) {
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for t in topics {
            self.drop_channel(&t);
        }
        if std::mem::take(&mut self.counted_user) {
            self.shared.limits.remove_user();
        }
    }
}

/// A `system` message payload, as upstream's `push_system_message` builds it.
pub(crate) fn system_payload(
    extension: &str,
    status: &str,
    message: &str,
    channel: &str,
) -> serde_json::Value {
    json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": channel,
    })
}

/// Whether the fields every message carries are within the binary format's bounds
/// (the topic is checked at join: a long one is refused with a reason).
fn fields_within_bounds(msg: &Message) -> bool {
    let ref_ok = |r: &Option<Ref>| match r {
        Some(Ref::Str(s)) => s.len() <= MAX_FIELD_BYTES,
        _ => true,
    };
    msg.event.len() <= MAX_FIELD_BYTES && ref_ok(&msg.join_ref) && ref_ok(&msg.msg_ref)
}

/// Bounded label set for the events metric.
fn event_label(event: &str) -> &'static str {
    match event {
        "heartbeat" => "heartbeat",
        "phx_join" => "phx_join",
        "phx_leave" => "phx_leave",
        "broadcast" => "broadcast",
        "presence" => "presence",
        "access_token" => "access_token",
        _ => "other",
    }
}
