//! Shutdown in phases: drain, close, wait, with one deadline.
//!
//! 1. The first SIGTERM/Ctrl-C begins the drain ([`Health::begin_drain`](crate::health::Health::begin_drain)):
//!    `/readyz` answers 503 at once and new WebSocket upgrades get 503, so a
//!    load balancer (nginx `proxy_next_upstream http_503`, a Kubernetes
//!    readiness probe) sends new clients elsewhere. Existing sockets keep
//!    working, REST requests are still served.
//! 2. After `DRAIN_DELAY_MS` (or at once on a second signal) the shutdown token
//!    is cancelled: the accept loop stops and every socket is closed with 1001,
//!    so realtime-js reconnects — through the load balancer, to another replica.
//! 3. [`crate::server::serve`] waits for connection tasks until
//!    `SHUTDOWN_GRACE_MS` after the first signal; `main` then stops ingest.

use std::future::Future;

use crate::state::Shared;

/// Waits for the first signal, drains, then cancels the shutdown token.
pub async fn on_signal(shared: &Shared) {
    wait_for_signal().await;
    drain(shared, wait_for_signal()).await;
}

/// Begins the drain and cancels the shutdown token after `DRAIN_DELAY_MS`, or
/// as soon as `skip` completes (a second signal).
pub async fn drain(shared: &Shared, skip: impl Future<Output = ()>) {
    if !shared.health.begin_drain() {
        return;
    }
    let delay = shared.config.drain_delay();
    tracing::info!(
        drain_delay_ms = delay.as_millis() as u64,
        connections = shared.connection_count(),
        "draining: /readyz fails and new upgrades get 503; sockets close after the drain delay"
    );
    // Arms: the drain delay, or a second signal that cuts it short.
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = skip => tracing::info!("second signal: closing sockets now"),
    }
    tracing::info!(
        connections = shared.connection_count(),
        "closing sockets (1001)"
    );
    shared.shutdown.cancel();
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                // Arms: Ctrl-C, or SIGTERM.
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
