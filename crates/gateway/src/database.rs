//! Connecting the gateway to PostgreSQL: migrate, start ingest, route changes.

use std::sync::Arc;
use std::time::Duration;

use change_ingest::realtime::{self, Pool};
use change_ingest::{IngestConfig, IngestError, IngestEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// The ingest settings derived from the gateway config.
pub fn ingest_config(shared: &Shared, url: &str) -> IngestConfig {
    let c = &shared.config;
    let mut ic = IngestConfig::new(url);
    ic.max_record_bytes = c.max_record_bytes;
    ic.retention = Duration::from_secs(c.change_retention_secs);
    ic.publication = Some(c.publication.clone()).filter(|p| !p.is_empty());
    // Flow control reads ahead within CHANGES_BUFFER_BYTES; two batches in the
    // channel keep reading and routing overlapped without holding more rows in
    // memory (each batch ≤ 1000 rows / 16 MiB).
    ic.channel_capacity = 2;
    ic
}

/// Applies migrations, attaches a query connection, and spawns the ingest
/// task plus the router that feeds its changes to channels. Both stop on shutdown.
pub async fn attach(shared: &Arc<Shared>, url: &str) -> Result<JoinHandle<()>, IngestError> {
    let client = change_ingest::connect(url).await?;
    change_ingest::migrate(&client).await?;
    // Before ingest starts: today's partition exists and `realtime.send` is captured.
    maintain_messages(shared, &client).await;
    // Rows of the log from before this moment are not "behind" for the status API.
    if let Ok(txid) = change_ingest::status::next_txid(&client).await {
        let max = &shared.ops.feed.max_txid;
        max.fetch_max(txid.saturating_sub(1), std::sync::atomic::Ordering::Relaxed);
    }
    shared.changes.attach_database(url, client);
    let _ = shared.authz.set(Pool::new(
        url,
        shared.config.authz_pool_size,
        Duration::from_secs(5),
    ));
    tokio::spawn(maintenance(Arc::clone(shared), url.to_owned()));
    let (rx, ingest) =
        change_ingest::spawn_ingest(ingest_config(shared, url), shared.shutdown.clone());
    // Flow control's watchdog: cuts clients that stall with changes queued.
    let flow = Arc::clone(&shared.fanout.flow);
    let cancel = shared.shutdown.clone();
    tokio::spawn(async move { flow.watch(cancel).await });
    let rx = split_db_broadcasts(Arc::clone(shared), rx);
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

/// Attaches: the first attempt before returning (so a reachable database is
/// migrated and attached before the gateway serves), then, if the database is
/// unreachable, in the background with back-off (1 s doubling to 30 s) until it
/// answers or shutdown. Meanwhile Broadcast and Presence serve, and Postgres
/// Changes bindings wait (the feed is "connecting") instead of being refused.
/// The handle ends with the router.
pub async fn attach_with_retry(shared: &Arc<Shared>, url: String) -> JoinHandle<()> {
    shared.changes.expect_database();
    let first = attach(shared, &url).await;
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut attempt = first;
        let mut delay = Duration::from_secs(1);
        loop {
            match attempt {
                Ok(router) => {
                    let _ = router.await;
                    return;
                }
                Err(e) => tracing::warn!(
                    cause = %e,
                    retry_in_secs = delay.as_secs(),
                    "PostgreSQL not reachable: Broadcast and Presence keep serving, Postgres Changes wait"
                ),
            }
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
            attempt = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return,
                attempt = attach(&shared, &url) => attempt,
            };
        }
    })
}

/// Creates upcoming `realtime.messages` partitions, drops expired ones
/// (`MESSAGES_RETENTION_DAYS`), keeps its capture on. Failures are logged.
async fn maintain_messages(shared: &Shared, client: &tokio_postgres::Client) {
    let days = shared.config.messages_retention_days;
    match change_ingest::realtime::maintain_messages(client, days).await {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::info!(?dropped, "dropped expired realtime.messages partitions")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(cause = %e, "realtime.messages maintenance failed"),
    }
}

/// Hourly [`maintain_messages`] on a connection of its own, until shutdown.
async fn maintenance(shared: Arc<Shared>, url: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        // Arms: shutdown, or the next hour.
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match change_ingest::connect(&url).await {
            Ok(client) => maintain_messages(&shared, &client).await,
            Err(e) => tracing::warn!(cause = %e, "realtime.messages maintenance: no connection"),
        }
    }
}

/// Takes the captured `realtime.messages` rows out of the ingest feed and
/// delivers them as broadcasts (to local subscribers only); everything else
/// goes on to the Postgres Changes router. `realtime.messages` is never a
/// Postgres Changes table: its rows are private-channel data.
fn split_db_broadcasts(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<IngestEvent>,
) -> mpsc::Receiver<IngestEvent> {
    // One batch: the read-ahead is bounded by flow control's budget, and
    // every batch held here is up to 1000 rows / 16 MiB more in memory.
    let (tx, out) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let event = match event {
                IngestEvent::Changes(batch) if batch.iter().any(realtime::is_messages_change) => {
                    let (messages, rest): (Vec<_>, Vec<_>) =
                        batch.into_iter().partition(realtime::is_messages_change);
                    let parsed: Vec<_> = messages
                        .iter()
                        .filter_map(realtime::parse_message)
                        .collect();
                    crate::db_broadcast::deliver(&shared, &parsed).await;
                    if rest.is_empty() {
                        continue;
                    }
                    IngestEvent::Changes(rest)
                }
                IngestEvent::TablesChanged(mut tables) => {
                    tables.retain(|t| !(t.schema == "realtime" && t.table == "messages"));
                    IngestEvent::TablesChanged(tables)
                }
                other => other,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    out
}
