//! Postgres restarts mid-stream: nothing committed is lost or duplicated.
//! Own binary: it restarts its own cluster.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use change_ingest::embedded::EmbeddedPostgres;
use change_ingest::{IngestConfig, IngestEvent};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn postgres_restart_mid_stream_loses_nothing() {
    let pg = EmbeddedPostgres::start().await.unwrap();
    let url = pg.url().to_owned();
    let c = change_ingest::connect(&url).await.unwrap();
    change_ingest::migrate(&c).await.unwrap();
    c.batch_execute("create table r (id int primary key)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "r").await.unwrap();
    drop(c);

    let cancel = CancellationToken::new();
    let (mut rx, _task) = change_ingest::spawn_ingest(IngestConfig::new(&url), cancel.clone());
    loop {
        match rx.recv().await.unwrap() {
            IngestEvent::Live => break,
            _ => continue,
        }
    }

    // A writer that reconnects after the restart; some inserts fail, and one may
    // even commit without its client knowing: the table is the ground truth. It
    // writes at least MIN_ROWS and keeps going until the restart is done, and the
    // restart waits for its first rows, so the restart always lands mid-stream
    // however fast or slow the machine is.
    const MIN_ROWS: i32 = 3000;
    let written = Arc::new(AtomicI32::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = url.clone();
        let (written, restarted) = (Arc::clone(&written), Arc::clone(&restarted));
        tokio::spawn(async move {
            let mut client = None;
            let mut id = 0i32;
            while id < MIN_ROWS || !restarted.load(Ordering::Relaxed) {
                // Retried until it succeeds; the bound only catches a database that never comes back.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                loop {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "insert {id} kept failing"
                    );
                    if client.is_none() {
                        client = change_ingest::connect(&url).await.ok();
                    }
                    let Some(c) = client.as_ref() else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    match c
                        .execute("insert into r values ($1) on conflict do nothing", &[&id])
                        .await
                    {
                        Ok(_) => break,
                        Err(_) => {
                            client = None;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                id += 1;
                written.store(id, Ordering::Relaxed);
            }
            id
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::Relaxed) < MIN_ROWS / 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // At most MIN_ROWS / 10 written so far, at least MIN_ROWS in all: mid-stream.
    pg.restart().await.unwrap();
    restarted.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();

    let c = change_ingest::connect(&url).await.unwrap();
    let rows = c.query("select id from r", &[]).await.unwrap();
    let expected: BTreeSet<i64> = rows.iter().map(|r| r.get::<_, i32>(0) as i64).collect();
    assert_eq!(expected.len(), total as usize);

    let mut seen = Vec::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < expected.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(IngestEvent::Changes(batch))) => {
                for change in batch {
                    let v: serde_json::Value =
                        serde_json::from_slice(change.record.as_ref().unwrap()).unwrap();
                    seen.push(v["id"].as_i64().unwrap());
                }
            }
            Ok(Some(other)) => {
                events.push(format!("{other:?}").chars().take(20).collect::<String>())
            }
            _ => panic!(
                "got {} of {} changes; events {events:?}",
                seen.len(),
                expected.len()
            ),
        }
    }
    assert!(
        events.iter().any(|e| e.starts_with("Disconnected")),
        "{events:?}"
    );
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "duplicates delivered");
    assert_eq!(unique, expected);
    // One writer, sequential transactions: delivered in order.
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    cancel.cancel();
}
