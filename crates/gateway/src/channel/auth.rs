//! What a channel's token decides, after the join: `access_token` refreshes,
//! the periodic re-check (every 5 minutes and at `exp`), and join errors held
//! back by `CHANNEL_ERROR_BACKOFF_MS`.
//!
//! Nothing here blocks the connection's reader: the re-check and the delayed
//! replies are deadlines the reader's loop waits on beside the next frame
//! ([`Session::next_wakeup`], [`Session::on_timer`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use phoenix_channel::{Message, Payload};
use tokio::time::Instant;

use super::Session;
use crate::auth::{recheck_in, AuthError, Claims};

/// Join error replies one connection may have waiting; past this a refused
/// join is not answered at all (the client times out and backs off itself).
const MAX_DELAYED: usize = 256;

impl Session {
    /// The token and claims a join acts with: its `access_token` (an `sb_…`
    /// key falls back to the connection's, as Realtime does), else the
    /// connection's apikey.
    pub(super) async fn join_claims(
        &self,
        access_token: Option<&str>,
    ) -> Result<(Option<Arc<str>>, Arc<Claims>), AuthError> {
        match access_token.filter(|t| !crate::auth::is_api_key(t)) {
            Some(t) => {
                let claims = self.shared.auth.claims(Some(t)).await?;
                Ok((Some(Arc::from(t)), claims))
            }
            None => {
                let ca = &self.conn_auth;
                // Verified at the upgrade; only the clock can have changed since.
                if self.shared.auth.enabled() {
                    if let Some(exp) = ca.claims.exp {
                        let now = crate::auth::now_secs();
                        if exp <= now {
                            return Err(AuthError::Expired(now.saturating_sub(exp)));
                        }
                    }
                }
                Ok((ca.token.clone(), Arc::clone(&ca.claims)))
            }
        }
    }

    /// When the reader loop must call [`Session::on_timer`] next.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let delayed = self.delayed.front().map(|(at, _)| *at);
        match (delayed, self.next_recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Recomputes the earliest channel re-check.
    pub(super) fn update_next_recheck(&mut self) {
        self.next_recheck = self.channels.values().map(|j| j.recheck_at).min();
    }

    /// Sends due join errors, re-checks channels whose time has come.
    pub(crate) async fn on_timer(&mut self) {
        let now = Instant::now();
        while self.delayed.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, frame)) = self.delayed.pop_front() {
                self.send(frame).await;
            }
        }
        if self.next_recheck.is_some_and(|at| at <= now) {
            let due: Vec<String> = self
                .channels
                .iter()
                .filter(|(_, j)| j.recheck_at <= now)
                .map(|(t, _)| t.clone())
                .collect();
            for topic in due {
                self.recheck(&topic).await;
            }
            self.update_next_recheck();
        }
    }

    /// Re-verifies a channel's token (expiry, key rotation); closes the
    /// channel with Realtime's message when it no longer verifies.
    async fn recheck(&mut self, topic: &str) {
        let Some(joined) = self.channels.get_mut(topic) else {
            return;
        };
        if !self.shared.auth.enabled() {
            joined.recheck_at = Instant::now() + Duration::from_secs(300);
            return;
        }
        let result = match joined.token.clone() {
            Some(token) => self.shared.auth.verify(&token).await.map(drop),
            None => Err(AuthError::Missing),
        };
        match result {
            Ok(()) => {
                if let Some(joined) = self.channels.get_mut(topic) {
                    joined.recheck_at = Instant::now() + recheck_in(&joined.claims);
                }
            }
            Err(e) => self.auth_failed(topic, &e).await,
        }
    }

    /// `access_token`: no reply on success (as Supabase does). A valid new
    /// token replaces the channel's claims (Postgres Changes bindings get them
    /// too); an invalid one closes the channel: `system` error, then
    /// `phx_close`, and realtime-js does not rejoin.
    pub(super) async fn access_token(&mut self, msg: Message) {
        let Payload::Json(payload) = &msg.payload else {
            return;
        };
        let Some(token) = payload.get("access_token").and_then(|t| t.as_str()) else {
            return;
        };
        let Some(joined) = self.channels.get(&msg.topic) else {
            return;
        };
        if crate::auth::is_api_key(token) || joined.token.as_deref() == Some(token) {
            return;
        }
        match self.shared.auth.claims(Some(token)).await {
            Ok(claims) => {
                let Some(joined) = self.channels.get_mut(&msg.topic) else {
                    return;
                };
                joined.token = Some(Arc::from(token));
                joined.recheck_at = Instant::now() + recheck_in(&claims);
                if joined.bindings.is_some() {
                    let id = joined.handle.id;
                    self.shared.changes.update_claims(id, Arc::clone(&claims));
                }
                joined.claims = claims;
                self.update_next_recheck();
                // Private channels: the new claims may read less (or more).
                if let Err(message) = self.refresh_policies(&msg.topic).await {
                    crate::error::report("Unauthorized", crate::error::Fault::Client, &message);
                    self.shutdown(&msg.topic, &message).await;
                }
            }
            Err(e) => self.auth_failed(&msg.topic, &e).await,
        }
    }

    /// Closes a channel whose token failed.
    async fn auth_failed(&mut self, topic: &str, e: &AuthError) {
        crate::error::report(e.code(), crate::error::Fault::Client, &e.to_string());
        self.shutdown(topic, &e.to_string()).await;
        self.update_next_recheck();
    }

    /// Queues a join error reply to go out after `CHANNEL_ERROR_BACKOFF_MS`.
    pub(super) async fn delay_reply(&mut self, frame: Bytes) {
        let backoff = Duration::from_millis(self.shared.config.channel_error_backoff_ms);
        if backoff.is_zero() {
            self.send(frame).await;
        } else if self.delayed.len() < MAX_DELAYED {
            self.delayed.push_back((Instant::now() + backoff, frame));
        }
    }
}
