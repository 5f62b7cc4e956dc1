//! Limits: the rate limiters and the bounds every client input is held to.
//!
//! Rates are enforced with GCRA (the "virtual scheduling" form of a token
//! bucket): one atomic word per limiter, no timer task, O(1) per check.
//! Per-socket limiters live in the socket's session; gateway-wide ones in
//! [`GatewayLimits`] (shared). Which limit acts on whom, and with which
//! message, is listed in README.md ("Limits").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::Config;

/// Longest topic, event name, `ref` or `join_ref`, in bytes: the binary frame
/// format carries each in a `u8` length, and realtime-js throws above it.
pub const MAX_FIELD_BYTES: usize = 255;

/// A rate limit: `per_second` on average, with bursts of up to `burst`.
///
/// GCRA: `tat` is the theoretical arrival time of the next unit (nanoseconds
/// since `base`); a request for `n` units is admitted when moving `tat` by
/// `n` intervals keeps it within `burst` intervals of now.
#[derive(Debug)]
pub struct Rate {
    base: Instant,
    interval_ns: u64,
    tolerance_ns: u64,
    tat: AtomicU64,
}

impl Rate {
    /// A limiter for `per_second` (at least 1) with bursts of `burst` (at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval_ns = 1_000_000_000 / u64::from(per_second.max(1));
        Rate {
            base: Instant::now(),
            interval_ns: interval_ns.max(1),
            tolerance_ns: interval_ns.max(1).saturating_mul(u64::from(burst.max(1))),
            tat: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `n` units if the limit allows it now; otherwise takes nothing.
    pub fn try_acquire(&self, n: u32) -> bool {
        let now = self.now_ns();
        let cost = self.interval_ns.saturating_mul(u64::from(n));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            if next - now > self.tolerance_ns {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Whether a request for one unit would be refused right now (takes nothing).
    pub fn exhausted(&self) -> bool {
        let now = self.now_ns();
        let tat = self.tat.load(Ordering::Relaxed);
        tat.max(now).saturating_add(self.interval_ns) - now > self.tolerance_ns
    }
}

/// Upstream's per-channel presence limit: at most `max_calls` in a window that
/// starts with the first call after the previous window ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct PresenceWindow {
    count: u32,
    reset_at: Option<Instant>,
}

impl PresenceWindow {
    /// Counts a call; `false` when it is over the limit.
    pub fn allow(&mut self, max_calls: u32, window: Duration) -> bool {
        let now = Instant::now();
        match self.reset_at {
            Some(reset_at) if now <= reset_at => {
                if self.count >= max_calls {
                    return false;
                }
                self.count += 1;
            }
            _ => {
                self.count = 1;
                self.reset_at = Some(now + window);
            }
        }
        true
    }
}

/// Gateway-wide limiters and counters, shared by every socket and REST handler.
#[derive(Debug)]
pub struct GatewayLimits {
    /// `TENANT_MAX_JOINS_PER_SECOND`.
    pub joins: Rate,
    /// `TENANT_MAX_EVENTS_PER_SECOND` (socket and REST messages).
    pub events: Rate,
    /// Sockets with at least one joined channel (`TENANT_MAX_CONCURRENT_USERS`).
    pub users: AtomicUsize,
    /// Open sockets per verified `sub` claim (`MAX_CONNECTIONS_PER_USER`).
    pub user_connections: Arc<UserConnections>,
}

impl GatewayLimits {
    /// The limiters a config asks for.
    pub fn new(config: &Config) -> Self {
        GatewayLimits {
            joins: Rate::new(
                config.tenant_max_joins_per_second,
                config.tenant_max_joins_per_second,
            ),
            events: Rate::new(
                config.tenant_max_events_per_second,
                config.tenant_max_events_per_second,
            ),
            users: AtomicUsize::new(0),
            user_connections: Arc::default(),
        }
    }

    /// Counts a socket as a user if there is room (its first join).
    pub fn add_user(&self, max: usize) -> bool {
        self.users
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Forgets a counted user (its socket closed).
    pub fn remove_user(&self) {
        self.users.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open WebSocket connections per user (the token's `sub` claim). An entry
/// exists only while its count is above zero, so memory follows the open
/// connections, not every user ever seen.
#[derive(Debug, Default)]
pub struct UserConnections {
    counts: DashMap<Arc<str>, usize>,
}

impl UserConnections {
    /// Counts one more connection for `sub` if it has fewer than `max` open;
    /// the count is released when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, sub: &str, max: usize) -> Option<UserConnection> {
        let sub: Arc<str> = Arc::from(sub);
        match self.counts.entry(Arc::clone(&sub)) {
            Entry::Occupied(mut e) => {
                if *e.get() >= max {
                    return None;
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                if max == 0 {
                    return None;
                }
                e.insert(1);
            }
        }
        Some(UserConnection {
            counts: Arc::clone(self),
            sub,
        })
    }

    /// Connections open for `sub`.
    pub fn count(&self, sub: &str) -> usize {
        self.counts.get(sub).map_or(0, |n| *n)
    }

    /// Users with at least one connection open.
    pub fn users(&self) -> usize {
        self.counts.len()
    }
}

/// One counted connection of a user; dropping it releases the count (once,
/// however the connection ends), removing the user's entry at zero.
#[derive(Debug)]
pub struct UserConnection {
    counts: Arc<UserConnections>,
    sub: Arc<str>,
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        if let Entry::Occupied(mut e) = self.counts.counts.entry(Arc::clone(&self.sub)) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_allows_bursts_then_the_average() {
        let r = Rate::new(10, 5);
        for _ in 0..5 {
            assert!(r.try_acquire(1));
        }
        assert!(!r.try_acquire(1), "burst of 5 used up");
        assert!(r.exhausted());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!r.exhausted());
        assert!(r.try_acquire(1), "one more after one interval");
        assert!(!r.try_acquire(1));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!r.try_acquire(6), "never more than the burst at once");
        assert!(r.try_acquire(5));
    }

    #[tokio::test(start_paused = true)]
    async fn presence_window_is_upstreams() {
        let mut w = PresenceWindow::default();
        let window = Duration::from_secs(30);
        for _ in 0..5 {
            assert!(w.allow(5, window));
        }
        assert!(!w.allow(5, window));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!w.allow(5, window), "still the same window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(w.allow(5, window), "a new window");
    }

    #[test]
    fn users_are_capped() {
        let config = crate::config::parse_from(["gw", "--tenant-max-concurrent-users", "2"]);
        let l = GatewayLimits::new(&config);
        assert!(l.add_user(2) && l.add_user(2));
        assert!(!l.add_user(2));
        l.remove_user();
        assert!(l.add_user(2));
    }

    #[test]
    fn connections_per_user_are_capped_released_and_forgotten_at_zero() {
        let c = Arc::new(UserConnections::default());
        let a1 = c.acquire("a", 2).expect("first");
        let a2 = c.acquire("a", 2).expect("second");
        assert!(c.acquire("a", 2).is_none(), "third refused");
        assert_eq!(c.count("a"), 2, "a refusal takes nothing");
        let b = c.acquire("b", 2).expect("another user is not affected");
        assert_eq!(c.users(), 2);
        drop(a1);
        assert_eq!(c.count("a"), 1);
        let a3 = c.acquire("a", 2).expect("a released place is reusable");
        drop(a2);
        drop(a3);
        assert_eq!(c.count("a"), 0);
        assert_eq!(c.users(), 1, "the entry is removed at zero");
        drop(b);
        assert_eq!(c.users(), 0);
        assert!(c.acquire("z", 0).is_none(), "a limit of 0 admits nobody");
        assert_eq!(c.users(), 0, "a refused user leaves no entry");
    }
}
