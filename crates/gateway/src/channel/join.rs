//! `phx_join` and `phx_leave`.
//!
//! Join runs Realtime's checks in order — topic, payload, limits (users, join
//! rates, channels), token — each returning a [`JoinError`] that carries
//! Realtime's code. A failed check is an error reply; nothing is subscribed.

use std::sync::Arc;

use phoenix_channel::{encode_reply, Message, Payload};
use serde_json::{json, Map, Value};

use super::private::{self, Policies};
use super::{Joined, Session};
use crate::auth::{recheck_in, Claims};
use crate::changes::{parse_legacy_topic, BindingRequest};
use crate::error::JoinError;
use crate::limits::{PresenceWindow, MAX_FIELD_BYTES};
use crate::registry::ChannelHandle;
use change_ingest::realtime::DbMessage;

/// The join payload's `config`, parsed leniently (unknown keys ignored, as Realtime does).
#[derive(Debug, Default)]
pub(crate) struct JoinConfig {
    /// Whether the payload had a `config` object (realtime-js always sends one).
    pub(crate) has_config: bool,
    pub(crate) broadcast_self: bool,
    pub(crate) broadcast_ack: bool,
    pub(crate) presence_enabled: bool,
    pub(crate) presence_key: Option<String>,
    pub(crate) private: bool,
    /// The raw `postgres_changes` entries (null entries dropped).
    pub(crate) postgres_changes: Vec<Map<String, Value>>,
    /// `access_token` (or `user_token`) from the payload.
    pub(crate) access_token: Option<String>,
    /// `config.broadcast.replay`, as sent.
    pub(crate) replay: Option<Value>,
}

/// Realtime's `FlexibleBoolean`: `true`/`false` or their case-insensitive strings.
fn flexible_bool(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

impl JoinConfig {
    pub(crate) fn parse(payload: &Value) -> JoinConfig {
        let token = ["access_token", "user_token"]
            .iter()
            .find_map(|k| payload.get(*k).and_then(Value::as_str))
            .map(str::to_owned);
        // Any `config` key makes it a realtime-js join (upstream's `new_api?`);
        // fields of the wrong type fall back to their defaults, as upstream's changeset.
        let Some(config) = payload.get("config") else {
            return JoinConfig {
                access_token: token,
                ..JoinConfig::default()
            };
        };
        let broadcast = config.get("broadcast");
        let presence = config.get("presence");
        let presence_key = match presence.and_then(|p| p.get("key")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let postgres_changes = config
            .get("postgres_changes")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(|e| e.as_object().cloned()).collect())
            .unwrap_or_default();
        JoinConfig {
            has_config: true,
            broadcast_self: flexible_bool(broadcast.and_then(|b| b.get("self"))),
            broadcast_ack: flexible_bool(broadcast.and_then(|b| b.get("ack"))),
            presence_enabled: flexible_bool(presence.and_then(|p| p.get("enabled"))),
            presence_key,
            private: flexible_bool(config.get("private")),
            postgres_changes,
            access_token: token,
            replay: broadcast.and_then(|b| b.get("replay")).cloned(),
        }
    }
}

/// What a join was admitted with.
struct Admitted {
    token: Option<Arc<str>>,
    claims: Arc<Claims>,
    /// `Some` for private channels.
    policies: Option<Policies>,
    /// Stored messages to send before live ones.
    replay: Vec<DbMessage>,
}

impl Session {
    pub(super) async fn join(&mut self, mut msg: Message) {
        let topic = msg.topic.clone();
        if !topic.starts_with("realtime:") {
            self.reply(&msg, "error", &json!({"reason": "unmatched topic"}))
                .await;
            return;
        }
        // A second join on a joined topic replaces the first.
        self.close_channel(&topic).await;
        let payload = match std::mem::replace(&mut msg.payload, Payload::Json(Value::Null)) {
            Payload::Json(v) => v,
            Payload::UserBroadcast(_) => Value::Null,
        };
        let config = JoinConfig::parse(&payload);
        let Admitted {
            token,
            claims,
            policies,
            replay,
        } = match self.check_join(&topic, &payload, &config).await {
            Ok(admitted) => admitted,
            Err(e) if matches!(e, JoinError::TooManyJoins) => {
                // Answered at once: the socket is closed right after, as upstream
                // disconnects it (its `disconnect` broadcast).
                e.report();
                self.reply(&msg, "error", &json!({"reason": e.reason()}))
                    .await;
                self.disconnect = true;
                return;
            }
            Err(e) => {
                e.report();
                // Held back (the reader keeps serving meanwhile), as Realtime does.
                match encode_reply(
                    self.vsn,
                    msg.join_ref.as_ref(),
                    msg.msg_ref.as_ref(),
                    &msg.topic,
                    "error",
                    &json!({"reason": e.reason()}),
                ) {
                    Ok(frame) => self.delay_reply(frame).await,
                    Err(e) => tracing::error!(cause = %e, "reply could not be encoded"),
                }
                return;
            }
        };
        if !self.counted_user {
            // Checked in `check_join`; a racing socket may have taken the last place.
            if !self
                .shared
                .limits
                .add_user(self.shared.config.tenant_max_concurrent_users)
            {
                let e = JoinError::TooManyUsers;
                e.report();
                self.reply(&msg, "error", &json!({"reason": e.reason()}))
                    .await;
                return;
            }
            self.counted_user = true;
        }

        // Postgres bindings: echoed index by index with ids (realtime-js matches them).
        let requests: Vec<BindingRequest> = if config.has_config {
            config
                .postgres_changes
                .into_iter()
                .map(BindingRequest::from_raw)
                .collect()
        } else {
            parse_legacy_topic(&topic).into_iter().collect()
        };
        let response = if config.has_config {
            let echoed: Vec<Value> = requests.iter().map(BindingRequest::echo).collect();
            json!({ "postgres_changes": echoed })
        } else {
            json!({})
        };
        let handle = Arc::new(ChannelHandle::new(
            self.shared.next_id(),
            self.vsn,
            msg.join_ref.clone(),
            topic.clone(),
            Arc::clone(&self.conn),
        ));
        if let Some(p) = &policies {
            p.apply(&handle);
        }
        if !replay.is_empty() {
            let _ = handle
                .replayed
                .set(replay.iter().map(|m| m.id.clone()).collect());
        }
        let (registered, created) = self
            .shared
            .registry
            .subscribe(config.private, Arc::clone(&handle));
        self.shared.fanout.metrics.joins.increment(1);
        self.shared.fanout.metrics.channels.increment(1.0);
        // With replicas: the first local subscriber subscribes the topic on the
        // bus; every join waits (bounded) until that is live and the peers'
        // presence merged, so "ok" means subscribed cluster-wide.
        if created {
            self.shared.cluster.attach(&self.shared, &registered);
        }
        self.shared.cluster.synced(&registered).await;
        self.reply(&msg, "ok", &response).await;
        // Stored messages right after the reply (as upstream), before anything
        // else this task queues; live ones already flow to the channel.
        for m in &replay {
            if let Some(frame) = crate::db_broadcast::replay_frame(self.vsn, &topic, m) {
                let _ = self.conn.tx.send(frame).await;
            }
        }

        if config.presence_enabled && policies.is_none_or(|p| p.read.presence == Some(true)) {
            let state = registered.presence.lock().state();
            self.push(
                msg.join_ref.as_ref(),
                None,
                &topic,
                "presence_state",
                &state,
            )
            .await;
        }

        self.shared.ops.conns.joined(
            self.conn.id,
            crate::ops::conns::ChannelInfo {
                topic: topic.clone(),
                private: config.private,
                presence: config.presence_enabled,
                postgres_changes: requests.len(),
            },
        );
        let bindings = if requests.is_empty() {
            None
        } else {
            Some(self.shared.changes.subscribe(
                &self.shared.fanout,
                &handle,
                requests,
                !config.has_config,
                Arc::clone(&claims),
            ))
        };

        let presence_key = config
            .presence_key
            .unwrap_or_else(|| uuid::Uuid::now_v1(&rand::random()).to_string());
        self.channels.insert(
            topic,
            Joined {
                handle,
                topic: registered,
                broadcast_self: config.broadcast_self,
                broadcast_ack: config.broadcast_ack,
                presence_key,
                bindings,
                recheck_at: tokio::time::Instant::now() + recheck_in(&claims),
                claims,
                token,
                presence_calls: PresenceWindow::default(),
                presence_bytes: 0,
                policies,
            },
        );
        self.update_next_recheck();
    }

    /// Realtime's join checks, in its order: payload, limits, token,
    /// private-channel read policies, replay. Returns what the channel is
    /// admitted with.
    async fn check_join(
        &self,
        topic: &str,
        payload: &Value,
        config: &JoinConfig,
    ) -> Result<Admitted, JoinError> {
        if topic == "realtime:" {
            return Err(JoinError::TopicNameRequired);
        }
        if topic.len() > MAX_FIELD_BYTES {
            return Err(JoinError::TopicNameTooLong);
        }
        if !payload.is_object() {
            return Err(JoinError::PayloadNotObject);
        }
        let max_bindings = self.shared.config.max_postgres_changes_per_join;
        if config.postgres_changes.len() > max_bindings {
            return Err(JoinError::TooManyBindings(max_bindings));
        }
        let limits = &self.shared.limits;
        if !self.counted_user
            && limits.users.load(std::sync::atomic::Ordering::Relaxed)
                >= self.shared.config.tenant_max_concurrent_users
        {
            return Err(JoinError::TooManyUsers);
        }
        // The socket's own rate first, so one client's join loop cannot use up
        // the gateway-wide budget.
        if !self.joins.try_acquire(1) || !limits.joins.try_acquire(1) {
            return Err(JoinError::TooManyJoins);
        }
        if self.channels.len() >= self.shared.config.max_channels_per_client() {
            return Err(JoinError::TooManyChannels);
        }
        let (token, claims) = self.join_claims(config.access_token.as_deref()).await?;
        let subtopic = &topic["realtime:".len()..];
        let policies = if config.private {
            let read =
                private::read_policies(&self.shared, subtopic, &claims, config.presence_enabled)
                    .await?;
            if !read.broadcast && read.presence != Some(true) {
                return Err(JoinError::Unauthorized(subtopic.to_owned()));
            }
            Some(Policies {
                read,
                ..Policies::default()
            })
        } else {
            None
        };
        let replay = match (&config.replay, &policies) {
            (None, _) => Vec::new(),
            (Some(_), Some(p)) if !p.read.broadcast => {
                return Err(JoinError::Unauthorized(subtopic.to_owned()))
            }
            (Some(_), None) => return Err(JoinError::ReplayPublic),
            (Some(params), Some(_)) => self.replay(subtopic, params).await?,
        };
        Ok(Admitted {
            token,
            claims,
            policies,
            replay,
        })
    }

    /// Stored messages for `config.broadcast.replay: {since, limit}` (since in
    /// unix milliseconds, default 0; limit clamped to 1..=25, default 25, as upstream).
    async fn replay(&self, subtopic: &str, params: &Value) -> Result<Vec<DbMessage>, JoinError> {
        let int = |k: &str, default: i64| match params.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_i64().ok_or(JoinError::ReplayParams),
        };
        if !params.is_object() {
            return Err(JoinError::ReplayParams);
        }
        let since = int("since", 0)?;
        let limit = int("limit", 25)?;
        let pool = self.shared.authz.get().ok_or(JoinError::Database)?;
        let query = async {
            let client = pool.get().await?;
            change_ingest::realtime::replay(&client, subtopic, since, limit).await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), query).await {
            Ok(Ok(messages)) => Ok(messages),
            Ok(Err(e)) => {
                crate::error::report(
                    "UnableToReplayMessages",
                    crate::error::Fault::Database,
                    &e.to_string(),
                );
                Err(JoinError::ReplayFailed)
            }
            Err(_) => Err(JoinError::ReplayFailed),
        }
    }

    pub(super) async fn leave(&mut self, msg: Message) {
        if let Some(joined) = self.channels.get(&msg.topic) {
            // A leave for an earlier join of this topic raced a server close: ignored, as Phoenix does.
            if msg.join_ref.is_some() && msg.join_ref != joined.handle.join_ref {
                tracing::debug!(topic = %msg.topic, "phx_leave with a stale join_ref ignored");
                return;
            }
        }
        self.reply(&msg, "ok", &json!({})).await;
        self.close_channel(&msg.topic).await;
    }

    /// Forgets a joined channel and tells the client with `phx_close`
    /// (ref = join_ref, or realtime-js ignores it). No-op if not joined.
    pub(crate) async fn close_channel(&mut self, topic: &str) {
        let Some(joined) = self.channels.get(topic) else {
            return;
        };
        let jr = joined.handle.join_ref.clone();
        self.drop_channel(topic);
        self.push(jr.as_ref(), jr.as_ref(), topic, "phx_close", &json!({}))
            .await;
    }

    /// Forgets a joined channel: registry, presence (leave diff), Postgres bindings.
    pub(crate) fn drop_channel(&mut self, topic: &str) {
        let Some(joined) = self.channels.remove(topic) else {
            return;
        };
        self.presence_bytes -= joined.presence_bytes;
        self.shared
            .registry
            .unsubscribe(&joined.topic, &joined.handle);
        super::presence::untrack(&self.shared, &joined.topic, joined.handle.id);
        if let Some(b) = joined.bindings {
            self.shared.changes.unsubscribe(b);
        }
        self.shared.fanout.metrics.channels.decrement(1.0);
        self.shared.ops.conns.left(self.conn.id, topic);
        if self.channels.is_empty() {
            self.next_recheck = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_realtime_js_join() {
        let v: Value = serde_json::from_str(
            r#"{"config":{"broadcast":{"self":true,"ack":"TRUE"},"presence":{"key":"u1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"messages","filter":"id=eq.1"},null,{"event":"*","schema":"public"}],"private":false},"access_token":"tok","version":"realtime-js/2.119.0"}"#,
        )
        .unwrap();
        let c = JoinConfig::parse(&v);
        assert!(c.has_config && c.broadcast_self && c.broadcast_ack && c.presence_enabled);
        assert_eq!(c.presence_key.as_deref(), Some("u1"));
        assert_eq!(c.postgres_changes.len(), 2);
        assert_eq!(c.access_token.as_deref(), Some("tok"));
        assert!(!c.private);
    }

    #[test]
    fn legacy_join_has_no_config() {
        let c = JoinConfig::parse(&json!({}));
        assert!(!c.has_config);
        let c = JoinConfig::parse(&json!({"config": {"presence": {"key": ""}}}));
        assert!(c.has_config);
        assert_eq!(c.presence_key, None);
        let c = JoinConfig::parse(&json!({"config": "x"}));
        assert!(c.has_config && !c.presence_enabled && c.postgres_changes.is_empty());
    }
}
