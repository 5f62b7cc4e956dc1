//! Test support: one throwaway cluster per test binary, a fresh database per test.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use change_ingest::embedded::EmbeddedPostgres;
use change_ingest::{Change, IngestConfig, IngestEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

static CLUSTER: OnceLock<EmbeddedPostgres> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The shared cluster, started on first use (the embedded watchdog stops it
/// when the test process exits).
pub fn cluster() -> &'static EmbeddedPostgres {
    CLUSTER.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(EmbeddedPostgres::start())
                .expect("start embedded postgres")
        })
        .join()
        .expect("cluster thread")
    })
}

/// Creates a fresh database (not migrated) and returns its URL.
pub async fn fresh_db() -> String {
    let pg = cluster();
    let admin = change_ingest::connect(pg.url()).await.expect("connect");
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    admin
        .batch_execute(&format!("create database {name}"))
        .await
        .expect("create database");
    pg.database_url(&name)
}

/// A fresh, migrated database and a client on it.
pub async fn migrated_db() -> (String, tokio_postgres::Client) {
    let url = fresh_db().await;
    let client = change_ingest::connect(&url).await.expect("connect");
    change_ingest::migrate(&client).await.expect("migrate");
    (url, client)
}

/// A running ingest task.
pub struct Feed {
    pub rx: mpsc::Receiver<IngestEvent>,
    pub cancel: CancellationToken,
    pub batch_rows: usize,
    pub max_batch_seen: usize,
    pub events: Vec<String>,
}

impl Feed {
    /// Starts ingesting `url` and waits until it is live.
    pub async fn start(url: &str, tweak: impl FnOnce(&mut IngestConfig)) -> Feed {
        let mut config = IngestConfig::new(url);
        config.publication_sync_interval = Duration::from_millis(200);
        tweak(&mut config);
        let cancel = CancellationToken::new();
        let batch_rows = config.batch_rows;
        let (rx, _handle) = change_ingest::spawn_ingest(config, cancel.clone());
        let mut feed = Feed {
            rx,
            cancel,
            batch_rows,
            max_batch_seen: 0,
            events: Vec::new(),
        };
        feed.wait_for(Duration::from_secs(20), |e| matches!(e, IngestEvent::Live))
            .await
            .expect("ingest did not become live");
        feed
    }

    /// Next event, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<IngestEvent> {
        let event = tokio::time::timeout(timeout, self.rx.recv()).await.ok()??;
        let kind = match &event {
            IngestEvent::Changes(c) => {
                self.max_batch_seen = self.max_batch_seen.max(c.len());
                assert!(c.len() <= self.batch_rows, "batch of {} rows", c.len());
                "changes"
            }
            IngestEvent::Live => "live",
            IngestEvent::Disconnected => "disconnected",
            IngestEvent::Gap { .. } => "gap",
            IngestEvent::TablesChanged(_) => "tables",
            IngestEvent::TableDropped(_) => "dropped",
        };
        self.events.push(kind.to_owned());
        Some(event)
    }

    /// Skips events until one matches (returned), or `None` after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&IngestEvent) -> bool,
    ) -> Option<IngestEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next(left).await?;
            if pred(&event) {
                return Some(event);
            }
        }
    }

    /// Collects changes until `n` arrived (panics after `timeout`).
    pub async fn changes(&mut self, n: usize, timeout: Duration) -> Vec<Change> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(IngestEvent::Changes(c)) => out.extend(c),
                Some(_) => {}
                None => panic!("got {} of {n} changes; events {:?}", out.len(), self.tail()),
            }
        }
        out
    }

    fn tail(&self) -> Vec<String> {
        self.events.iter().rev().take(20).rev().cloned().collect()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The record as a JSON value.
pub fn record(change: &Change) -> serde_json::Value {
    serde_json::from_slice(change.record.as_ref().expect("record")).expect("json")
}

/// The old record as a JSON value.
pub fn old_record(change: &Change) -> serde_json::Value {
    serde_json::from_slice(change.old_record.as_ref().expect("old_record")).expect("json")
}

/// Terminates this database's listener connection(s); returns how many.
pub async fn kill_listener(client: &tokio_postgres::Client) -> i64 {
    let row = client
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
             where application_name = $1 and datname = current_database()",
            &[&change_ingest::LISTENER_APPLICATION_NAME],
        )
        .await
        .expect("terminate");
    row.get(0)
}
