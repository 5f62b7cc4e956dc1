//! Private channels (Realtime Authorization): the policies on
//! `realtime.messages`, evaluated under the channel's claims by
//! `change_ingest::realtime`, cached per channel.
//!
//! - Read (broadcast, presence when enabled) at join; a join that may read
//!   neither is refused. Re-evaluated on every valid `access_token`: losing a
//!   read right closes the channel.
//! - Write, lazily at the first broadcast / track, then cached until the next
//!   token refresh. Denied broadcasts are dropped; denied tracks get an error reply.
//! - What the channel may read is mirrored in its handle's `reads` bits, which
//!   every publisher checks (socket, REST and database broadcasts, presence diffs).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use change_ingest::authz::claims::AsClaims;
use change_ingest::realtime::{Extension, ReadPolicies};

use super::Session;
use crate::auth::Claims;
use crate::error::JoinError;
use crate::registry::{ChannelHandle, READ_BROADCAST, READ_PRESENCE};
use crate::state::Shared;

/// A policy check that takes longer than this fails (the reader waits for it).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A private channel's evaluated policies.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Policies {
    pub(crate) read: ReadPolicies,
    pub(crate) write_broadcast: Option<bool>,
    pub(crate) write_presence: Option<bool>,
}

impl Policies {
    /// The handle's `reads` bits.
    fn read_bits(&self) -> u8 {
        let mut bits = 0;
        if self.read.broadcast {
            bits |= READ_BROADCAST;
        }
        if self.read.presence == Some(true) {
            bits |= READ_PRESENCE;
        }
        bits
    }

    /// Applies the read rights to the channel's handle.
    pub(crate) fn apply(&self, chan: &ChannelHandle) {
        chan.reads.store(self.read_bits(), Ordering::Relaxed);
    }
}

/// The Postgres settings for a set of claims (`json` is `claims.to_json()`).
fn as_claims<'a>(claims: &'a Claims, json: &'a str) -> AsClaims<'a> {
    AsClaims {
        role: &claims.role,
        claims_json: json,
        sub: claims.sub.as_deref(),
    }
}

/// Evaluates the read policies of `subtopic` for `claims`.
pub(crate) async fn read_policies(
    shared: &Shared,
    subtopic: &str,
    claims: &Claims,
    presence: bool,
) -> Result<ReadPolicies, JoinError> {
    let pool = shared.authz.get().ok_or(JoinError::Database)?;
    let check = async {
        let mut client = pool.get().await?;
        let json = claims.to_json();
        change_ingest::realtime::read_policies(
            &mut client,
            subtopic,
            as_claims(claims, &json),
            presence,
        )
        .await
    };
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => {
            // Upstream: an RLS error (unknown role, failing policy) is "unauthorized".
            crate::error::report(
                "RlsPolicyError",
                crate::error::Fault::Database,
                &e.to_string(),
            );
            if e.sqlstate().is_some() {
                Ok(ReadPolicies::default())
            } else {
                Err(JoinError::Database)
            }
        }
        Err(_) => Err(JoinError::Database),
    }
}

/// Whether `claims` may write `extension` messages on `subtopic` (errors: no).
pub(crate) async fn may_write(
    shared: &Shared,
    subtopic: &str,
    claims: &Claims,
    extension: Extension,
) -> bool {
    let Some(pool) = shared.authz.get() else {
        return false;
    };
    let check = async {
        let mut client = pool.get().await?;
        let json = claims.to_json();
        change_ingest::realtime::may_write(
            &mut client,
            subtopic,
            as_claims(claims, &json),
            extension,
        )
        .await
    };
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(allowed)) => allowed,
        Ok(Err(e)) => {
            crate::error::report(
                "RlsPolicyError",
                crate::error::Fault::Database,
                &e.to_string(),
            );
            false
        }
        Err(_) => false,
    }
}

impl Session {
    /// The channel's right to write `extension`, checked once and cached.
    /// Public channels may always write.
    pub(super) async fn channel_may_write(&mut self, topic: &str, extension: Extension) -> bool {
        let Some(joined) = self.channels.get(topic) else {
            return false;
        };
        let Some(policies) = joined.policies else {
            return true;
        };
        let cached = match extension {
            Extension::Broadcast => policies.write_broadcast,
            Extension::Presence => policies.write_presence,
        };
        if let Some(allowed) = cached {
            return allowed;
        }
        let claims = Arc::clone(&joined.claims);
        let subtopic = joined.handle.subtopic().to_owned();
        let allowed = may_write(&self.shared, &subtopic, &claims, extension).await;
        if let Some(p) = self
            .channels
            .get_mut(topic)
            .and_then(|j| j.policies.as_mut())
        {
            match extension {
                Extension::Broadcast => p.write_broadcast = Some(allowed),
                Extension::Presence => p.write_presence = Some(allowed),
            }
        }
        allowed
    }

    /// After a token refresh: re-evaluates a private channel's read policies
    /// with the new claims. `Err` (the channel must close) when a read right
    /// it had is gone.
    pub(super) async fn refresh_policies(&mut self, topic: &str) -> Result<(), String> {
        let Some(joined) = self.channels.get(topic) else {
            return Ok(());
        };
        let Some(old) = joined.policies else {
            return Ok(());
        };
        let subtopic = joined.handle.subtopic().to_owned();
        let claims = Arc::clone(&joined.claims);
        let read = read_policies(
            &self.shared,
            &subtopic,
            &claims,
            old.read.presence.is_some(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let revoked = (old.read.broadcast && !read.broadcast)
            || (old.read.presence == Some(true) && read.presence != Some(true));
        if revoked {
            return Err(format!(
                "You no longer have permission to read from this Channel topic: {subtopic}"
            ));
        }
        if let Some(joined) = self.channels.get_mut(topic) {
            let policies = Policies {
                read,
                write_broadcast: None,
                write_presence: None,
            };
            policies.apply(&joined.handle);
            joined.policies = Some(policies);
        }
        Ok(())
    }
}

/// REST: whether `claims` may broadcast to the private `subtopic`.
pub async fn may_write_broadcast(shared: &Shared, subtopic: &str, claims: &Claims) -> bool {
    may_write(shared, subtopic, claims, Extension::Broadcast).await
}
