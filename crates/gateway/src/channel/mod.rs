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
}

impl Session {
    /// Creates the session of a new connection.
    pub fn new(shared: Arc<Shared>, conn: Arc<ConnHandle>, vsn: Vsn, conn_auth: ConnAuth) -> Self {
        Session {
            shared,
            conn,
            vsn,
            conn_auth,
            channels: HashMap::new(),
            delayed: VecDeque::new(),
            next_recheck: None,
        }
    }

    /// Handles one decoded client message.
    pub async fn handle(&mut self, msg: Message) {
        metrics::counter!(crate::metrics::CHANNEL_EVENTS, "event" => event_label(&msg.event))
            .increment(1);
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
                match msg.event.as_str() {
                    "broadcast" => self.broadcast(msg).await,
                    "presence" => self.presence(msg).await,
                    "access_token" => self.access_token(msg).await,
                    other => {
                        tracing::debug!(event = other, "unknown event ignored");
                    }
                }
            }
        }
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
    }
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
