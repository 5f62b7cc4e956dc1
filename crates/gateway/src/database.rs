//! Connecting the gateway to PostgreSQL: migrate, start ingest, route changes.

use std::sync::Arc;
use std::time::Duration;

use change_ingest::{IngestConfig, IngestError};
use tokio::task::JoinHandle;

use crate::state::Shared;

/// The ingest settings derived from the gateway config.
pub fn ingest_config(shared: &Shared, url: &str) -> IngestConfig {
    let c = &shared.config;
    let mut ic = IngestConfig::new(url);
    ic.max_record_bytes = c.max_record_bytes;
    ic.retention = Duration::from_secs(c.change_retention_secs);
    ic.publication = Some(c.publication.clone()).filter(|p| !p.is_empty());
    ic
}

/// Applies migrations, attaches a query connection, and spawns the ingest
/// task plus the router that feeds its changes to channels. Both stop on shutdown.
pub async fn attach(shared: &Arc<Shared>, url: &str) -> Result<JoinHandle<()>, IngestError> {
    let client = change_ingest::connect(url).await?;
    change_ingest::migrate(&client).await?;
    // Rows of the log from before this moment are not "behind" for the status API.
    if let Ok(txid) = change_ingest::status::next_txid(&client).await {
        let max = &shared.ops.feed.max_txid;
        max.fetch_max(txid.saturating_sub(1), std::sync::atomic::Ordering::Relaxed);
    }
    shared.changes.attach_database(url, client);
    let (rx, ingest) =
        change_ingest::spawn_ingest(ingest_config(shared, url), shared.shutdown.clone());
    let shared2 = Arc::clone(shared);
    Ok(tokio::spawn(async move {
        let ops = &shared2.ops;
        shared2
            .changes
            .run(&shared2.fanout, rx, |e| ops.observe_ingest(e))
            .await;
        let _ = ingest.await;
    }))
}
