//! The writer-cost measurement (not a correctness test; run explicitly):
//! `cargo test --release -p change-ingest --test writer_cost -- --ignored --nocapture`.
//!
//! Durable commits, 16 pgbench clients of single-row INSERTs (`bench/*.sql`),
//! alternating in each round: plain table; enabled table with the ingest task
//! running (the headline: what an application pays with a gateway attached);
//! enabled table with no listener (the trigger alone).
//! `WRITER_COST_SECONDS` (default 10) and `WRITER_COST_ROUNDS` (default 3).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use change_ingest::embedded::{EmbeddedOptions, EmbeddedPostgres};
use change_ingest::{IngestConfig, IngestEvent};
use tokio_util::sync::CancellationToken;

fn pgbench(pg: &EmbeddedPostgres, script: &str, seconds: u32) -> f64 {
    let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench");
    let bin =
        std::env::var("PGBENCH").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".into());
    let out = Command::new(bin)
        .args([
            "-n",
            "-c",
            "16",
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(bench.join(script))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("tps line")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn writer_cost() {
    let pg = EmbeddedPostgres::start_with(EmbeddedOptions {
        durable: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = change_ingest::connect(pg.url()).await.unwrap();
    change_ingest::migrate(&c).await.unwrap();
    let setup =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/setup.sql"))
            .unwrap();
    c.batch_execute(&setup).await.unwrap();
    let seconds: u32 = env_or("WRITER_COST_SECONDS", 10);
    let rounds: usize = env_or("WRITER_COST_ROUNDS", 3);

    let (mut plain, mut with_listener, mut trigger_only) = (0.0, 0.0, 0.0);
    for round in 0..rounds {
        let p = tokio::task::block_in_place(|| pgbench(&pg, "insert_plain.sql", seconds));

        // Enabled, with the ingest task consuming everything.
        let cancel = CancellationToken::new();
        let (mut rx, task) =
            change_ingest::spawn_ingest(IngestConfig::new(pg.url()), cancel.clone());
        while !matches!(rx.recv().await, Some(IngestEvent::Live)) {}
        let delivered = Arc::new(AtomicUsize::new(0));
        let counter = delivered.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let IngestEvent::Changes(c) = ev {
                    counter.fetch_add(c.len(), Ordering::Relaxed);
                }
            }
        });
        let before: i64 = c
            .query_one("select count(*) from bench_enabled", &[])
            .await
            .unwrap()
            .get(0);
        let l = tokio::task::block_in_place(|| pgbench(&pg, "insert_enabled.sql", seconds));
        let after: i64 = c
            .query_one("select count(*) from bench_enabled", &[])
            .await
            .unwrap()
            .get(0);
        let wait = Instant::now();
        while ((delivered.load(Ordering::Relaxed)) as i64) < after - before
            && wait.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up = wait.elapsed();
        cancel.cancel();
        let _ = task.await;
        assert_eq!(delivered.load(Ordering::Relaxed) as i64, after - before);

        let t = tokio::task::block_in_place(|| pgbench(&pg, "insert_enabled.sql", seconds));
        eprintln!(
            "round {round}: plain {p:.0} tps | enabled+listener {l:.0} tps ({:.3}), caught up {caught_up:?} after | trigger only {t:.0} tps ({:.3})",
            l / p,
            t / p
        );
        plain += p;
        with_listener += l;
        trigger_only += t;
    }
    eprintln!(
        "writer-cost: plain {:.0} tps, enabled+listener {:.0} tps, trigger only {:.0} tps; ratio {:.3} (trigger only {:.3})",
        plain / rounds as f64,
        with_listener / rounds as f64,
        trigger_only / rounds as f64,
        with_listener / plain,
        trigger_only / plain
    );
}
