//! Lock safety and retention: enabling tables never stops delivery or queues writers
//! behind a long transaction, and old change-log slots are truncated once nothing can
//! still need them. Real PostgreSQL (one embedded cluster, a fresh database per test).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use change_ingest::IngestEvent;
use common::{migrated_db, record, Feed};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Inserts into `table` until `stop`, one autocommit row at a time; returns the count.
fn keep_writing(
    url: String,
    table: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let c = change_ingest::connect(&url).await.unwrap();
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            c.execute(&format!("insert into {table} (v) values ($1)"), &[&n])
                .await
                .unwrap();
            n += 1;
        }
        n
    })
}

fn enabled(e: &IngestEvent, table: &str) -> bool {
    matches!(e, IngestEvent::TablesChanged(t) if t.iter().any(|t| t.table == table))
}

/// Collects changes of `table` until `n` arrived.
async fn rows_of(feed: &mut Feed, table: &str, n: usize) -> Vec<i64> {
    let mut out = Vec::new();
    while out.len() < n {
        match feed.next(T).await {
            Some(IngestEvent::Changes(batch)) => out.extend(
                batch
                    .iter()
                    .filter(|c| c.table.table == table)
                    .map(|c| record(c)["v"].as_i64().unwrap()),
            ),
            Some(_) => {}
            None => panic!("{table}: got {} of {n}", out.len()),
        }
    }
    out
}

/// Starts the feed, then publishes `other` (after `Live`, so its `TablesChanged` is
/// not among the start-up events `Feed::start` skips) and waits until it is enabled.
async fn start_with_publication(url: &str, c: &tokio_postgres::Client) -> Feed {
    let mut feed = Feed::start(url, |_| {}).await;
    c.batch_execute("create publication supabase_realtime for table other")
        .await
        .unwrap();
    feed.wait_for(T, |e| enabled(e, "other"))
        .await
        .expect("other enabled through the publication");
    feed
}

#[tokio::test]
async fn long_reader_does_not_block_enabling_or_delivery() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table report (id serial primary key, v bigint);
         create table other (id serial primary key, v bigint);
         insert into report (v) values (0);",
    )
    .await
    .unwrap();
    let mut feed = start_with_publication(&url, &c).await;
    // A long report holds ACCESS SHARE on `report` for the whole test.
    let reader = change_ingest::connect(&url).await.unwrap();
    reader
        .batch_execute("begin; select count(*) from report")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(url.clone(), "other", Arc::clone(&stop));
    rows_of(&mut feed, "other", 50).await;

    c.batch_execute("alter publication supabase_realtime add table report")
        .await
        .unwrap();
    // Enabled while the report still runs (the capture triggers need only SHARE ROW
    // EXCLUSIVE, which readers never conflict with), and delivery goes on meanwhile.
    feed.wait_for(T, |e| enabled(e, "report"))
        .await
        .expect("report enabled while the reader holds its lock");
    rows_of(&mut feed, "other", 50).await;
    c.batch_execute("insert into report (v) values (42)")
        .await
        .unwrap();
    assert_eq!(rows_of(&mut feed, "report", 1).await, vec![42]);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    reader.batch_execute("commit").await.unwrap();
}

#[tokio::test]
async fn long_writer_delays_enabling_but_never_its_table_or_others() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table busy (id serial primary key, v bigint);
         create table other (id serial primary key, v bigint);",
    )
    .await
    .unwrap();
    let mut feed = start_with_publication(&url, &c).await;
    // An open write transaction on `busy`: CREATE TRIGGER must wait for it.
    let long = change_ingest::connect(&url).await.unwrap();
    long.batch_execute("begin; insert into busy (v) values (-1)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(url.clone(), "other", Arc::clone(&stop));
    c.batch_execute("alter publication supabase_realtime add table busy")
        .await
        .unwrap();
    // The sync tries every 200 ms and gives up each time after its lock_timeout:
    // other writers of `busy` wait at most that long behind it, never for the long
    // transaction, and `other` keeps delivering.
    let busy_writer = change_ingest::connect(&url).await.unwrap();
    busy_writer
        .batch_execute("set statement_timeout = '10s'")
        .await
        .unwrap();
    for v in 0..20i64 {
        busy_writer
            .execute("insert into busy (v) values ($1)", &[&v])
            .await
            .expect(
                "a writer of the table being enabled is never stuck behind the long transaction",
            );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows_of(&mut feed, "other", 100).await;
    let busy_enabled: bool = c
        .query_one(
            "select exists (select 1 from realtime_gateway.enabled_tables where table_oid = 'busy'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !busy_enabled,
        "enabled while the long transaction held its lock?"
    );
    long.batch_execute("commit").await.unwrap();
    feed.wait_for(T, |e| enabled(e, "busy"))
        .await
        .expect("busy enabled once the long transaction ended");
    c.batch_execute("insert into busy (v) values (99)")
        .await
        .unwrap();
    assert_eq!(rows_of(&mut feed, "busy", 1).await, vec![99]);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

#[tokio::test]
async fn retention_truncates_slots_nobody_can_need() {
    let (url, c) = migrated_db().await;
    // One-second slots (normally five minutes), so slots come due within seconds.
    c.batch_execute(
        "create or replace function realtime_gateway.slot_width() returns integer
         language sql immutable parallel safe as $$ select 1 $$;
         create table r (id serial primary key, v bigint);",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "r").await.unwrap();
    let writer = change_ingest::connect(&url).await.unwrap();
    writer
        .batch_execute("insert into r (v) select g from generate_series(1, 100) g")
        .await
        .unwrap();
    // An idle-in-transaction session that took a transaction id before the next rows
    // holds every slot written after it.
    let idle = change_ingest::connect(&url).await.unwrap();
    idle.batch_execute("begin; select pg_current_xact_id()")
        .await
        .unwrap();
    writer
        .batch_execute("insert into r (v) values (101)")
        .await
        .unwrap();
    let prune = || async {
        change_ingest::maintenance::prune(&c, Duration::from_secs(1))
            .await
            .unwrap()
    };
    let pinned = async {
        loop {
            let r = prune().await;
            if r.pinned_xmin.is_some() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let report = tokio::time::timeout(T, pinned).await.expect("pin reported");
    let logged: i64 = c
        .query_one("select count(*) from realtime_gateway.change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert!(logged >= 1, "the pinned slot still holds its rows");
    let holder = report.pinned_xmin.unwrap();
    idle.batch_execute("commit").await.unwrap();
    let emptied = async {
        loop {
            prune().await;
            let n: i64 = c
                .query_one("select count(*) from realtime_gateway.change_log", &[])
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(T, emptied)
        .await
        .expect("all slots pruned");
    let pruned_below: String = c
        .query_one("select pruned_below::text from realtime_gateway.state", &[])
        .await
        .unwrap()
        .get(0);
    assert!(pruned_below.parse::<u64>().unwrap() > holder);
    // The log keeps working afterwards.
    let mut feed = Feed::start(&url, |_| {}).await;
    writer
        .batch_execute("insert into r (v) values (102)")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0])["v"], json!(102));
}

#[tokio::test]
async fn messages_maintenance_never_waits_long_for_a_lock() {
    let (url, c) = migrated_db().await;
    // An expired daily partition that a long report is reading.
    c.batch_execute(
        "create table realtime.messages_2020_01_01 partition of realtime.messages
         for values from ('2020-01-01') to ('2020-01-02')",
    )
    .await
    .unwrap();
    let reader = change_ingest::connect(&url).await.unwrap();
    reader
        .batch_execute("begin; select count(*) from realtime.messages_2020_01_01")
        .await
        .unwrap();
    // The DROP gives up after its lock_timeout (the bound here only catches a hang).
    let run = change_ingest::realtime::maintain_messages(&c, 3);
    let err = tokio::time::timeout(T, run)
        .await
        .expect("maintenance waited for the reader")
        .unwrap_err();
    assert!(err.to_string().contains("lock timeout"), "{err}");
    // The session is left as it was, and the next run drops the partition.
    let timeout: String = c.query_one("show lock_timeout", &[]).await.unwrap().get(0);
    assert_eq!(timeout, "0");
    reader.batch_execute("commit").await.unwrap();
    let dropped = change_ingest::realtime::maintain_messages(&c, 3)
        .await
        .unwrap();
    assert_eq!(dropped, ["messages_2020_01_01"]);
}
