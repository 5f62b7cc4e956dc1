//! State shared by every connection and REST handler of one gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::changes::Changes;
use crate::config::Config;
use crate::limits::GatewayLimits;
use crate::metrics::Handles;
use crate::registry::{Fanout, Registry};

/// Everything a connection or request handler needs, behind one `Arc`.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// Topic → subscribers.
    pub registry: Registry,
    /// Delivery and lag accounting.
    pub fanout: Fanout,
    /// Postgres Changes routing (idle when no database is configured).
    pub changes: Changes,
    /// JWT verification.
    pub auth: Auth,
    /// Gateway-wide rate limiters and the user count.
    pub limits: GatewayLimits,
    /// Caps concurrent WebSocket connections (`MAX_CONNECTIONS`).
    pub connection_permits: Arc<Semaphore>,
    /// Cancelled on shutdown; every connection holds a child token.
    pub shutdown: CancellationToken,
    /// The Prometheus recorder's handle, when `main` installed one (`GET /metrics`).
    pub prometheus: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle>,
    /// Tracks connection tasks, so shutdown can wait for upgraded sockets
    /// (hyper's graceful shutdown does not see them).
    pub tasks: TaskTracker,
    ids: AtomicU64,
}

impl Shared {
    /// Builds the shared state from a config.
    pub fn new(config: Config) -> Arc<Self> {
        let config = Arc::new(config);
        let metrics = Handles::new();
        Arc::new(Shared {
            registry: Registry::new(),
            fanout: Fanout {
                metrics,
                policy: config.lag_policy,
            },
            changes: Changes::default(),
            auth: Auth::new(config.jwt_secret.as_deref()),
            limits: GatewayLimits::new(&config),
            connection_permits: Arc::new(Semaphore::new(config.max_connections)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            prometheus: std::sync::OnceLock::new(),
            ids: AtomicU64::new(1),
            config,
        })
    }

    /// A fresh id for a connection or a channel join.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}
