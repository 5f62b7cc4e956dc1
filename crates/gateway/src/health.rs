//! Liveness, readiness and drain state, and the health endpoints.
//!
//! - `GET|HEAD /healthz` (and `/healthcheck`, `/api/ping`): the process serves HTTP. Never
//!   fails while the process runs, draining included, so a liveness probe
//!   never kills a replica that is shutting down cleanly.
//! - `GET|HEAD /readyz`: 200 when this replica should get new clients: it is
//!   not draining, its change feed is live (when a database is configured) and
//!   its cluster bus, when one is installed, says so; 503 otherwise. The body
//!   says which check failed.
//! - `GET|HEAD /api/tenants/<any>/health`: Supabase Realtime's tenant health, as
//!   Supabase's self-hosted compose probes it (`curl --head` with the anon key):
//!   with `API_JWT_SECRET` set it needs a valid `Authorization: Bearer` token
//!   (403 otherwise, as upstream), and answers 200 with
//!   `{"data": {"healthy", "db_connected", "connected_cluster", ...}}`.
//!
//! Drain (see [`crate::shutdown`]) sets [`Health::begin_drain`]; from then on
//! `/readyz` fails and the server refuses new WebSocket upgrades with 503.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use hyper::{Request, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::changes::FeedState;
use crate::rest::{json_response, Resp};
use crate::state::Shared;

/// What a readiness dependency (the cluster bus) reports.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Whether this dependency lets the replica take new clients.
    pub ok: bool,
    /// A short state for humans (`connected`, `reconnecting`, ...).
    pub state: String,
}

type ProbeFn = Box<dyn Fn() -> Probe + Send + Sync>;

/// Process start, drain state, and the readiness hooks of optional parts.
pub struct Health {
    started: Instant,
    started_at: SystemTime,
    /// When the drain began (set once, by the first signal).
    drain_started: OnceLock<Instant>,
    /// The cluster bus's readiness, when one is installed (issue 12 calls
    /// [`Health::set_cluster_bus_probe`] at startup).
    cluster_bus: OnceLock<ProbeFn>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("started_at", &self.started_at)
            .field("draining", &self.draining())
            .field("cluster_bus", &self.cluster_bus.get().is_some())
            .finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            started_at: SystemTime::now(),
            drain_started: OnceLock::new(),
            cluster_bus: OnceLock::new(),
        }
    }
}

/// The readiness verdict and what it is made of (the `/readyz` body).
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Whether new clients should be sent here.
    pub ready: bool,
    /// Always true when this answers: the listener accepted the probe.
    pub listening: bool,
    /// SIGTERM received: sockets close after `DRAIN_DELAY_MS`.
    pub draining: bool,
    /// The Postgres change feed.
    pub change_feed: FeedState,
    /// The cluster bus, when one is installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_bus: Option<Probe>,
}

impl Health {
    /// Time since the process started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Wall-clock start time.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// Starts the drain: `/readyz` fails and new upgrades get 503 from now on.
    /// Returns false if a drain had already begun.
    pub fn begin_drain(&self) -> bool {
        self.drain_started.set(Instant::now()).is_ok()
    }

    /// Whether a drain has begun.
    pub fn draining(&self) -> bool {
        self.drain_started.get().is_some()
    }

    /// The instant by which the process must be gone: drain start (or now,
    /// when shutdown came without a drain) plus `grace`.
    pub fn shutdown_deadline(&self, grace: Duration) -> Instant {
        self.drain_started
            .get()
            .copied()
            .unwrap_or_else(Instant::now)
            + grace
    }

    /// Installs the cluster bus's readiness probe (once; later calls are ignored).
    /// It is called on every `/readyz`, so it must be cheap and must not block.
    pub fn set_cluster_bus_probe(&self, probe: impl Fn() -> Probe + Send + Sync + 'static) {
        let _ = self.cluster_bus.set(Box::new(probe));
    }

    /// Evaluates readiness.
    pub fn readiness(&self, change_feed: FeedState) -> Readiness {
        let draining = self.draining();
        let cluster_bus = self.cluster_bus.get().map(|probe| probe());
        let ready = !draining
            && change_feed != FeedState::Connecting
            && cluster_bus.as_ref().is_none_or(|p| p.ok);
        Readiness {
            ready,
            listening: true,
            draining,
            change_feed,
            cluster_bus,
        }
    }
}

/// `/healthz`, `/healthcheck`, `/api/ping`: 200 while the process serves.
pub fn healthz() -> Resp {
    json_response(StatusCode::OK, &json!({"message": "Success"}))
}

/// `/readyz`: 200 when ready, else 503; the body lists every check.
pub fn readyz(shared: &Shared) -> Resp {
    let r = shared.health.readiness(shared.changes.feed_state());
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &json!(r))
}

/// `/api/tenants/<any>/health`: Supabase Realtime's tenant health.
pub async fn tenant_health<B>(shared: &Shared, req: &Request<B>, tenant: &str) -> Resp {
    if shared.auth.enabled() && crate::rest::bearer_claims(shared, req).await.is_err() {
        // Upstream's API auth answers 403 with an empty body.
        return crate::rest::empty(StatusCode::FORBIDDEN);
    }
    let feed = shared.changes.feed_state();
    let r = shared.health.readiness(feed);
    json_response(
        StatusCode::OK,
        &json!({"data": {
            "healthy": r.ready,
            "db_connected": feed == FeedState::Live,
            "connected_cluster": shared.connection_count(),
            "region": null,
            "node": null,
            "tenant": tenant,
            "draining": r.draining,
        }}),
    )
}

/// `realtime-gateway healthcheck`: one `GET <path>` to the gateway on this host
/// (`BIND_ADDR`, or loopback when it is a wildcard; `PORT`). `Ok` on 2xx.
///
/// Blocking std I/O on purpose: it runs as a short-lived process from a
/// container HEALTHCHECK or an exec probe, so the image needs no curl.
pub fn probe(config: &crate::config::Config, path: &str, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let host = match config.bind_addr {
        None => loopback,
        Some(ip) if ip.is_unspecified() && ip.is_ipv6() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        Some(ip) if ip.is_unspecified() => loopback,
        Some(ip) => ip,
    };
    let addr = std::net::SocketAddr::new(host, config.port);
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} {addr}{path}: {e}");
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| fail("cannot connect to", &e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| fail("cannot probe", &e))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| fail("cannot send to", &e))?;
    // The status line is all we need; bound what we read.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(fail("no answer from", &e)),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("{addr}{path} answered {code}")),
        None => Err(format!("{addr}{path}: not an HTTP answer: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_checks() {
        let h = Health::default();
        assert!(h.readiness(FeedState::NotConfigured).ready);
        assert!(h.readiness(FeedState::Live).ready);
        assert!(!h.readiness(FeedState::Connecting).ready);
        h.set_cluster_bus_probe(|| Probe {
            ok: false,
            state: "reconnecting".into(),
        });
        let r = h.readiness(FeedState::Live);
        assert!(!r.ready);
        assert_eq!(r.cluster_bus.unwrap().state, "reconnecting");
        assert!(h.begin_drain());
        assert!(!h.begin_drain(), "a drain begins once");
        assert!(h.draining());
    }

    #[test]
    fn draining_is_unready_whatever_else() {
        let h = Health::default();
        h.begin_drain();
        let r = h.readiness(FeedState::NotConfigured);
        assert!(!r.ready && r.draining && r.listening);
    }
}
