//! State shared by every connection and REST handler of one gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::changes::Changes;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::flow::Flow;
use crate::health::Health;
use crate::limits::GatewayLimits;
use crate::metrics::Handles;
use crate::ops::Ops;
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
    /// Token verification; the claims connections and channels act with.
    pub auth: Auth,
    /// Gateway-wide rate limiters and the user count.
    pub limits: GatewayLimits,
    /// Connections for private-channel policy checks and replays (set when a
    /// database is configured).
    pub authz: std::sync::OnceLock<change_ingest::realtime::Pool>,
    /// This replica's node id and, with `NATS_URL`, the cross-replica bus.
    pub cluster: Cluster,
    /// Caps concurrent WebSocket connections (`MAX_CONNECTIONS`).
    pub connection_permits: Arc<Semaphore>,
    /// Cancelled on shutdown; every connection holds a child token.
    pub shutdown: CancellationToken,
    /// The Prometheus recorder's handle, when `main` installed one (`GET /metrics`).
    pub prometheus: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle>,
    /// Tracks connection tasks, so shutdown can wait for upgraded sockets
    /// (hyper's graceful shutdown does not see them).
    pub tasks: TaskTracker,
    /// Uptime, drain state, readiness hooks.
    pub health: Health,
    /// Event log, connection registry, feed progress (the admin APIs).
    pub ops: Ops,
    ids: AtomicU64,
}

impl Shared {
    /// Builds the shared state: the verifier from the config's auth settings
    /// (fetching a JWKS URL once), then [`Shared::new`].
    pub async fn from_config(config: Config) -> Result<Arc<Self>, String> {
        let auth = Auth::new(config.auth_settings()).await?;
        Ok(Self::new(config, auth))
    }

    /// Builds the shared state of a single replica (no cluster bus) from a
    /// config and a verifier.
    pub fn new(config: Config, auth: Auth) -> Arc<Self> {
        Self::with_cluster(config, auth, Cluster::local())
    }

    /// Builds the shared state with a given cluster (see `Cluster::replicated`);
    /// call `Cluster::start` once it is built.
    pub fn with_cluster(config: Config, auth: Auth, cluster: Cluster) -> Arc<Self> {
        let config = Arc::new(config);
        let metrics = Handles::new();
        Arc::new(Shared {
            registry: Registry::new(),
            fanout: Fanout::new(
                metrics.clone(),
                config.lag_policy,
                Arc::new(Flow::new(
                    config.changes_buffer_bytes,
                    config.changes_lag_grace(),
                    metrics,
                    config.lag_policy,
                )),
            ),
            changes: Changes::default(),
            auth,
            limits: GatewayLimits::new(&config),
            authz: std::sync::OnceLock::new(),
            cluster,
            connection_permits: Arc::new(Semaphore::new(config.max_connections)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            health: Health::default(),
            ops: Ops::new(config.event_log_capacity),
            prometheus: std::sync::OnceLock::new(),
            ids: AtomicU64::new(1),
            config,
        })
    }

    /// Open WebSocket connections (each holds one permit).
    pub fn connection_count(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connection_permits.available_permits())
    }

    /// A fresh id for a connection or a channel join.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}
