//! PostgreSQL crashes and fails over mid-stream: every change the database still has
//! afterwards is delivered exactly once, and subscribers are told (a `Gap`) when changes
//! they already received were lost. Own binary: each test runs its own clusters.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use change_ingest::embedded::{EmbeddedOptions, EmbeddedPostgres};
use change_ingest::IngestEvent;
use common::{record, Feed};

const T: Duration = Duration::from_secs(60);

/// Inserts ids 0, 1, 2, … one per autocommit transaction until `stop`, reconnecting
/// and retrying the same id when the server goes away. `acked` is the next id to write.
fn writer(
    url: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicI32>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut id = 0i32;
        while !stop.load(Ordering::Relaxed) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = change_ingest::connect(&url).await.ok();
            }
            let Some(c) = client.as_ref() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match c
                .execute("insert into w values ($1) on conflict do nothing", &[&id])
                .await
            {
                Ok(_) => {
                    id += 1;
                    acked.store(id, Ordering::Relaxed);
                }
                Err(_) => {
                    client = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Everything the feed delivers: ids (in order, duplicates kept) and whether a gap came.
#[derive(Default)]
struct Seen {
    ids: Vec<i64>,
    gaps: Vec<String>,
}

impl Seen {
    fn take(&mut self, event: IngestEvent) {
        match event {
            IngestEvent::Changes(batch) => {
                for c in batch {
                    self.ids.push(record(&c)["id"].as_i64().unwrap());
                }
            }
            IngestEvent::Gap { message } => self.gaps.push(message),
            _ => {}
        }
    }

    async fn until(&mut self, feed: &mut Feed, mut done: impl FnMut(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + T;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match feed.next(left).await {
                Some(event) => self.take(event),
                None => panic!(
                    "feed stalled: {} delivered, gaps {:?}",
                    self.ids.len(),
                    self.gaps
                ),
            }
        }
    }
}

async fn table_ids(url: &str) -> BTreeSet<i64> {
    let c = change_ingest::connect(url).await.unwrap();
    let rows = c.query("select id from w", &[]).await.unwrap();
    rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).collect()
}

/// Every row the table has was delivered exactly once; delivered rows the table no
/// longer has (lost by the database) came with a gap report. Returns how many
/// delivered rows were lost.
fn check(seen: &Seen, table: &BTreeSet<i64>) -> usize {
    let mut count: HashMap<i64, usize> = HashMap::new();
    for id in &seen.ids {
        *count.entry(*id).or_default() += 1;
    }
    let dups: Vec<_> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    let missing: Vec<_> = table.iter().filter(|id| !count.contains_key(id)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let mut lost: Vec<i64> = count
        .keys()
        .filter(|id| !table.contains(id))
        .copied()
        .collect();
    lost.sort_unstable();
    if !lost.is_empty() {
        eprintln!("delivered, then lost by the database: {lost:?}");
    }
    let lost = lost.len();
    assert!(
        lost == 0 || !seen.gaps.is_empty(),
        "{lost} delivered rows were lost by the database but no gap was reported"
    );
    lost
}

async fn setup(url: &str) {
    let c = change_ingest::connect(url).await.unwrap();
    change_ingest::migrate(&c).await.unwrap();
    c.batch_execute("create table w (id int primary key)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "w").await.unwrap();
}

#[tokio::test]
async fn immediate_stop_with_async_commit_loses_nothing_silently() {
    // Asynchronous commit (the embedded default) and a WAL writer that flushes every
    // 10 s: an immediate stop loses the last seconds of acknowledged commits, and their
    // transaction ids are handed out again after recovery.
    let pg = EmbeddedPostgres::start_with(EmbeddedOptions {
        settings: vec![("wal_writer_delay".into(), "10s".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let url = pg.url().to_owned();
    setup(&url).await;
    let mut feed = Feed::start(&url, |_| {}).await;
    let mut seen = Seen::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI32::new(0));
    let w = writer(url.clone(), Arc::clone(&stop), Arc::clone(&acked));

    let mut lost_acknowledged = 0;
    let mut lost_delivered = 0;
    // Crash until one lands in the window this test is about (a delivered change
    // whose commit was not yet flushed): how often a crash hits it depends on the
    // machine's speed, so keep crashing rather than asserting it within 3 rounds.
    for round in 1..=30 {
        let before = seen.ids.len();
        seen.until(&mut feed, |s| s.ids.len() >= before + 300).await;
        pg.stop_immediate().await.unwrap();
        let crashed_at = i64::from(acked.load(Ordering::Relaxed));
        pg.start_again().await.unwrap();
        // Writes after recovery reuse the transaction ids of the lost ones.
        let resumed = acked.load(Ordering::Relaxed);
        while acked.load(Ordering::Relaxed) < resumed + 300 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let table = table_ids(&url).await;
        let acknowledged = acked.load(Ordering::Relaxed) as usize;
        seen.until(&mut feed, |s| table.iter().all(|id| s.ids.contains(id)))
            .await;
        lost_acknowledged = acknowledged.saturating_sub(table.len());
        // Rows written before the crash that the table no longer has (later ones may
        // have committed after `table` was read).
        lost_delivered = seen
            .ids
            .iter()
            .filter(|id| **id < crashed_at && !table.contains(id))
            .count();
        assert!(
            lost_delivered == 0 || !seen.gaps.is_empty(),
            "loss not reported"
        );
        eprintln!(
            "round {round}: {} acknowledged, {} in the table after recovery, {lost_delivered} \
             delivered then lost, gaps {:?}",
            acknowledged,
            table.len(),
            seen.gaps
        );
        if lost_delivered > 0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let table = table_ids(&url).await;
    seen.until(&mut feed, |s| table.iter().all(|id| s.ids.contains(id)))
        .await;
    check(&seen, &table);
    // Otherwise the crash never hit the window this test is about.
    assert!(
        lost_acknowledged > 0,
        "the crash lost no acknowledged commit"
    );
    assert!(
        lost_delivered > 0,
        "no delivered change was lost by the crash"
    );
    // Nothing more trails in.
    let extra = feed.next(Duration::from_millis(1000)).await;
    assert!(!matches!(extra, Some(IngestEvent::Changes(_))));
}

#[tokio::test]
async fn standby_promotion_delivers_what_the_new_primary_has() {
    let primary = EmbeddedPostgres::start().await.unwrap();
    setup(primary.url()).await;
    let standby = EmbeddedPostgres::standby_of(&primary, EmbeddedOptions::default())
        .await
        .unwrap();
    // Both hosts; libpq semantics: the first that accepts writes.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let mut feed = Feed::start(&url, |_| {}).await;
    let mut seen = Seen::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI32::new(0));
    let w = writer(url.clone(), Arc::clone(&stop), Arc::clone(&acked));
    seen.until(&mut feed, |s| s.ids.len() >= 300).await;

    primary.stop_immediate().await.unwrap();
    standby.promote().await.unwrap();
    let resumed = acked.load(Ordering::Relaxed);
    while acked.load(Ordering::Relaxed) < resumed + 300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let table = table_ids(standby.url()).await;
    seen.until(&mut feed, |s| table.iter().all(|id| s.ids.contains(id)))
        .await;
    let lost = check(&seen, &table);
    eprintln!(
        "{} in the new primary's table, {} delivered, {lost} delivered then lost, gaps {:?}",
        table.len(),
        seen.ids.len(),
        seen.gaps
    );
    assert!(
        seen.gaps.iter().any(|g| g.contains("failed over")),
        "a failover is always reported: {:?}",
        seen.gaps
    );
    let extra = feed.next(Duration::from_millis(1000)).await;
    assert!(!matches!(extra, Some(IngestEvent::Changes(_))));
}
