//! Integration tests against a real PostgreSQL (one embedded cluster for this
//! binary, a fresh database per test).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use change_ingest::{IngestError, IngestEvent, Op};
use common::{kill_listener, migrated_db, old_record, record, Feed};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn migrations_are_idempotent_and_concurrent_safe() {
    let url = common::fresh_db().await;
    let a = change_ingest::connect(&url).await.unwrap();
    let b = change_ingest::connect(&url).await.unwrap();
    let (ra, rb) = tokio::join!(change_ingest::migrate(&a), change_ingest::migrate(&b));
    ra.unwrap();
    rb.unwrap();
    change_ingest::migrate(&a).await.unwrap();
    change_ingest::migrate(&a).await.unwrap();
    let rows = a
        .query(
            "select version from realtime_gateway.migrations order by 1",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        versions,
        (1..=change_ingest::SCHEMA_VERSION).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn enable_disable_list_and_errors() {
    let (_url, c) = migrated_db().await;
    c.batch_execute(
        "create table public.orders (id int primary key, total numeric);
         create table public.\"My Table\" (k text primary key);
         create schema \"Sales\";
         create table \"Sales\".items (a int, b int, primary key (b, a));
         create view public.v as select 1 as x;",
    )
    .await
    .unwrap();

    let info = change_ingest::enable_table(&c, "orders").await.unwrap();
    assert_eq!(
        (info.schema.as_str(), info.table.as_str()),
        ("public", "orders")
    );
    assert_eq!(info.primary_key, vec!["id"]);
    assert_eq!(info.columns[1].type_name, "numeric");
    assert!(!info.rls_enabled);
    let info = change_ingest::enable_table(&c, "\"My Table\"")
        .await
        .unwrap();
    assert_eq!(info.table, "My Table");
    let info = change_ingest::enable_table(&c, "\"Sales\".items")
        .await
        .unwrap();
    assert_eq!(info.primary_key, vec!["b", "a"]);
    // Enabling twice is fine.
    change_ingest::enable_table(&c, "public.orders")
        .await
        .unwrap();

    let err = change_ingest::enable_table(&c, "public.nope")
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::UnknownTable(_)));
    assert_eq!(err.to_string(), "relation \"public.nope\" does not exist");
    let err = change_ingest::enable_table(&c, "v").await.unwrap_err();
    assert!(matches!(err, IngestError::NotEligible { .. }), "{err}");
    let err = change_ingest::enable_table(&c, "realtime_gateway.change_log")
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::NotEligible { .. }), "{err}");
    assert!(matches!(
        change_ingest::enable_table(&c, "a.b.c").await.unwrap_err(),
        IngestError::InvalidTableName { .. }
    ));

    let list = change_ingest::list_tables(&c).await.unwrap();
    let flags: Vec<(String, String, bool)> = list
        .into_iter()
        .map(|t| (t.schema, t.table, t.enabled))
        .collect();
    assert_eq!(
        flags,
        vec![
            ("Sales".into(), "items".into(), true),
            ("public".into(), "My Table".into(), true),
            ("public".into(), "orders".into(), true),
        ]
    );

    assert!(change_ingest::disable_table(&c, "\"My Table\"")
        .await
        .unwrap());
    assert!(!change_ingest::disable_table(&c, "\"My Table\"")
        .await
        .unwrap());
    // The SQL API converges on the same state.
    c.batch_execute("select realtime_gateway.enable('public.\"My Table\"')")
        .await
        .unwrap();
    c.batch_execute("select realtime_gateway.disable('\"Sales\".items')")
        .await
        .unwrap();
    let rows = c
        .query(
            "select schema, \"table\", source from realtime_gateway.tables order by 1, 2",
            &[],
        )
        .await
        .unwrap();
    let view: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        view,
        vec![
            ("public".into(), "My Table".into(), "manual".into()),
            ("public".into(), "orders".into(), "manual".into()),
        ]
    );
    let triggers: i64 = c
        .query_one(
            "select count(*) from pg_trigger where tgname like 'realtime_gateway_capture_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Insert, update, delete and truncate on each of the two enabled tables.
    assert_eq!(triggers, 8);
}

#[tokio::test]
async fn insert_update_delete_arrive_with_json() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table orders (id int primary key, status text, total numeric, paid bool,
                              tags text[], meta jsonb, at timestamptz);
         create table nokey (a int, b text);",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "orders").await.unwrap();
    change_ingest::enable_table(&c, "nokey").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;

    c.batch_execute(
        "insert into orders values (1, 'new', 9.5, false, '{a,b}', '{\"k\": [1]}', '2025-01-02 03:04:05+00');
         update orders set status = 'paid', paid = true where id = 1;
         update orders set id = 2 where id = 1;
         delete from orders where id = 2;",
    )
    .await
    .unwrap();
    let changes = feed.changes(4, T).await;
    let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Update, Op::Delete]);
    let ins = record(&changes[0]);
    assert_eq!(ins["id"], json!(1));
    assert_eq!(ins["total"], json!(9.5));
    assert_eq!(ins["paid"], json!(false));
    assert_eq!(ins["tags"], json!(["a", "b"]));
    assert_eq!(ins["meta"], json!({"k": [1]}));
    assert!(ins["at"].as_str().unwrap().starts_with("2025-01-02"));
    assert!(changes[0].old_record.is_none());
    assert_eq!(record(&changes[1])["status"], json!("paid"));
    assert_eq!(old_record(&changes[1])["status"], json!("new"));
    // A primary-key update pairs the right old and new rows.
    assert_eq!(old_record(&changes[2])["id"], json!(1));
    assert_eq!(record(&changes[2])["id"], json!(2));
    assert!(changes[3].record.is_none());
    assert_eq!(old_record(&changes[3])["id"], json!(2));
    let table = &changes[0].table;
    assert_eq!(
        (table.schema.as_str(), table.table.as_str()),
        ("public", "orders")
    );
    assert_eq!(table.columns.len(), 7);
    assert_eq!(table.columns[4].type_name, "_text");
    let ts = &changes[0].commit_timestamp;
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with('Z'));
    let mut positions: Vec<_> = changes.iter().map(|c| c.position).collect();
    positions.dedup();
    assert_eq!(positions.len(), 4);

    // Multi-row update on a table without a key: old and new rows pair up.
    c.batch_execute(
        "insert into nokey select g, 'v' || g from generate_series(1, 50) g;
         update nokey set a = a + 1000, b = b || '!';",
    )
    .await
    .unwrap();
    let changes = feed.changes(100, T).await;
    for u in changes.iter().filter(|c| c.op == Op::Update) {
        let (new, old) = (record(u), old_record(u));
        assert_eq!(
            new["a"].as_i64().unwrap(),
            old["a"].as_i64().unwrap() + 1000
        );
        assert_eq!(
            new["b"].as_str().unwrap(),
            format!("{}!", old["b"].as_str().unwrap())
        );
    }
}

#[tokio::test]
async fn bulk_insert_arrives_complete_in_bounded_batches() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table bulk (id int primary key, v text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "bulk").await.unwrap();
    let mut feed = Feed::start(&url, |cfg| cfg.channel_capacity = 2).await;
    let started = std::time::Instant::now();
    c.batch_execute("insert into bulk select g, 'row ' || g from generate_series(1, 100000) g")
        .await
        .unwrap();
    let changes = feed.changes(100_000, Duration::from_secs(180)).await;
    let ids: Vec<i64> = changes
        .iter()
        .map(|c| record(c)["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=100_000).collect::<Vec<_>>());
    assert!(feed.max_batch_seen <= 1000);
    eprintln!("100k rows delivered in {:?}", started.elapsed());
    assert!(feed
        .next(Duration::from_millis(300))
        .await
        .is_none_or(|e| !matches!(e, IngestEvent::Changes(_))));
}

#[tokio::test]
async fn large_rows_intact_and_oversized_trimmed() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table big (id int primary key, small text, body text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "big").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    let body = "x".repeat(900 * 1024);
    c.execute("insert into big values (1, 's', $1)", &[&body])
        .await
        .unwrap();
    let huge = "y".repeat(2 * 1024 * 1024);
    c.execute("insert into big values (2, 's', $1)", &[&huge])
        .await
        .unwrap();
    let changes = feed.changes(2, T).await;
    let r = record(&changes[0]);
    assert_eq!(r["body"].as_str().unwrap().len(), body.len());
    assert!(changes[0].oversized_columns.is_empty());
    let r = record(&changes[1]);
    assert_eq!(r, json!({"id": 2, "small": "s"}));
    assert_eq!(changes[1].oversized_columns, vec!["body"]);
}

#[tokio::test]
async fn writer_never_fails_because_of_the_trigger() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table w (id serial primary key, o int, t text, b bytea, j json, n numeric, p point, r int4range)",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "w").await.unwrap();
    // No listener running at all, rows far above the 8000-byte NOTIFY limit,
    // odd types, a transaction with many statements and a savepoint rollback.
    c.batch_execute(
        "begin;
         insert into w (t) select repeat('z', 100000) from generate_series(1, 20);
         insert into w (b, j, n, p, r) values ('\\x00ff', '[1, {\"a\": null}]', 'NaN', '(1,2)', '[1,5)');
         savepoint s; insert into w (t) values ('rolled back'); rollback to s;
         update w set t = t || '!';
         delete from w where id < 5;
         commit;",
    )
    .await
    .unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    c.batch_execute("insert into w (t) values ('after')")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0])["t"], json!("after"));
    let logged: i64 = c
        .query_one("select count(*) from realtime_gateway.change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 21 + 21 + 4 + 1);
}

#[tokio::test]
async fn listener_killed_five_times_loses_nothing() {
    let (url, c) = migrated_db().await;
    // Columns named like the trigger's aliases (n, o, t, j, rn) must not confuse it.
    c.batch_execute(
        "create table k (writer int, n int, o int, t int, j int, rn int, primary key (writer, n))",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "k").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;

    // Writers keep writing until the fifth kill is done (and at least MIN_PER_WRITER
    // rows each), so the kills always land mid-stream however fast the machine is.
    const WRITERS: i64 = 4;
    const MIN_PER_WRITER: i64 = 2000;
    let kills_done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let url = url.clone();
        let kills_done = Arc::clone(&kills_done);
        writers.push(tokio::spawn(async move {
            let c = change_ingest::connect(&url).await.unwrap();
            let stmt = c.prepare("insert into k values ($1, $2)").await.unwrap();
            let mut n: i64 = 0;
            while n < MIN_PER_WRITER || !kills_done.load(Ordering::Relaxed) {
                c.execute(&stmt, &[&(w as i32), &(n as i32)]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let killer = {
        let url = url.clone();
        let kills_done = Arc::clone(&kills_done);
        tokio::spawn(async move {
            let c = change_ingest::connect(&url).await.unwrap();
            let mut kills = 0;
            while kills < 5 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                if kill_listener(&c).await > 0 {
                    kills += 1;
                }
            }
            kills_done.store(true, Ordering::Relaxed);
            kills
        })
    };
    // Keep reading while the killer works: a full feed channel would park the
    // listener, and a parked listener has no connection to kill.
    let mut changes = Vec::new();
    while !killer.is_finished() {
        if let Some(IngestEvent::Changes(c)) = feed.next(Duration::from_millis(100)).await {
            changes.extend(c);
        }
    }
    assert_eq!(killer.await.unwrap(), 5);
    let mut written: HashMap<i64, i64> = HashMap::new();
    for (w, handle) in writers.into_iter().enumerate() {
        written.insert(w as i64, handle.await.unwrap());
    }
    let total = written.values().sum::<i64>() as usize;
    assert!(changes.len() <= total, "more changes than rows written");
    let rest = feed
        .changes(total - changes.len(), Duration::from_secs(90))
        .await;
    changes.extend(rest);
    let mut next: HashMap<i64, i64> = HashMap::new();
    for change in &changes {
        let r = record(change);
        let (w, n) = (r["writer"].as_i64().unwrap(), r["n"].as_i64().unwrap());
        let expected = next.entry(w).or_insert(0);
        assert_eq!(n, *expected, "writer {w} out of order or duplicated");
        *expected += 1;
    }
    assert_eq!(next, written, "every row of every writer, once");
    // A kill that lands while a reconnect is still catching up ends a session that
    // never went live, which reports no second `Disconnected`: count at least one.
    let disconnects = feed.events.iter().filter(|e| *e == "disconnected").count();
    assert!(disconnects >= 1, "events: {:?}", feed.events.len());
    // Nothing more (no duplicates) trails in.
    let extra = feed.next(Duration::from_millis(1500)).await;
    assert!(!matches!(extra, Some(IngestEvent::Changes(_))));
}

#[tokio::test]
async fn conflicting_updates_arrive_in_commit_order() {
    // T2 gets the lower txid, then waits on T1's row lock and commits after it.
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table acct (id int primary key, v int); create table other (x int);
                     insert into acct values (1, 0);",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "acct").await.unwrap();
    let mut feed = Feed::start(&url, |cfg| cfg.poll_interval = Duration::from_secs(3600)).await;
    let t1 = change_ingest::connect(&url).await.unwrap();
    let t2 = change_ingest::connect(&url).await.unwrap();
    let t2_pid: i32 = t2
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Keep the listener from reading between the two commits: its reads start with `state`.
    c.batch_execute("begin; lock table realtime_gateway.state in access exclusive mode;")
        .await
        .unwrap();
    t2.batch_execute("begin; insert into other values (1);")
        .await
        .unwrap(); // t2 takes its txid first
    t1.batch_execute("begin; insert into other values (2); update acct set v = 1 where id = 1;")
        .await
        .unwrap();
    let t2_update = tokio::spawn(async move {
        t2.batch_execute("update acct set v = 2 where id = 1; commit;")
            .await
            .unwrap();
    });
    // T1 commits only once T2 waits on its row lock (seen from another session:
    // pg_stat_activity is a per-transaction snapshot).
    let probe = change_ingest::connect(&url).await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let waiting: Option<String> = probe
            .query_one(
                "select wait_event_type from pg_stat_activity where pid = $1",
                &[&t2_pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting.as_deref() == Some("Lock") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "T2 never waited on T1's row lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t1.batch_execute("commit").await.unwrap();
    t2_update.await.unwrap();
    c.batch_execute("commit").await.unwrap();
    let changes = feed.changes(2, T).await;
    assert!(
        changes[1].position.txid < changes[0].position.txid,
        "test setup: txids"
    );
    assert_eq!(record(&changes[0])["v"], json!(1));
    assert_eq!(record(&changes[1])["v"], json!(2));
}

#[tokio::test]
async fn publication_sync_enables_and_disables() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table pa (id int primary key); create table pb (id int primary key);
         create table pm (id int primary key);
         create publication supabase_realtime;",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "pm").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    let names = |e: &IngestEvent| match e {
        IngestEvent::TablesChanged(t) => {
            let mut n: Vec<String> = t.iter().map(|t| t.table.clone()).collect();
            n.sort();
            Some(n)
        }
        _ => None,
    };
    c.batch_execute("alter publication supabase_realtime add table pa, pm")
        .await
        .unwrap();
    // Picked up by the periodic sync (every 200 ms here); the bound is generous so
    // a loaded machine cannot fail it, while a sync that never runs still does.
    feed.wait_for(Duration::from_secs(20), |e| {
        names(e) == Some(vec!["pa".into(), "pm".into()])
    })
    .await
    .expect("pa enabled by the publication");
    c.batch_execute("insert into pa values (1)").await.unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(changes[0].table.table, "pa");

    c.batch_execute("alter publication supabase_realtime drop table pa, pm")
        .await
        .unwrap();
    feed.wait_for(Duration::from_secs(20), |e| {
        names(e) == Some(vec!["pm".into()])
    })
    .await
    .expect("pa disabled, manual pm kept");
    let listing = change_ingest::list_tables(&c).await.unwrap();
    let enabled: Vec<&str> = listing
        .iter()
        .filter(|t| t.enabled)
        .map(|t| t.table.as_str())
        .collect();
    assert_eq!(enabled, ["pm"]);
}

#[tokio::test]
async fn pruned_before_read_reports_a_gap() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table g (id int primary key)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "g").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    let db: String = c
        .query_one("select current_database()", &[])
        .await
        .unwrap()
        .get(0);
    // Keep the listener out while rows are written and pruned.
    let admin = change_ingest::connect(common::cluster().url())
        .await
        .unwrap();
    admin
        .batch_execute(&format!("alter database {db} allow_connections false"))
        .await
        .unwrap();
    assert!(
        kill_listener(&c).await >= 1,
        "the live listener was not found"
    );
    c.batch_execute("insert into g values (1), (2)")
        .await
        .unwrap();
    // What retention does to a slot once its writers have all finished: truncate it
    // and record the bound below which rows may be gone (the real schedule is tested
    // in `maintenance::retention_truncates_slots_nobody_can_need`).
    c.batch_execute(
        "truncate realtime_gateway.change_log;
         update realtime_gateway.state set pruned_below = pg_snapshot_xmax(pg_current_snapshot())",
    )
    .await
    .unwrap();
    admin
        .batch_execute(&format!("alter database {db} allow_connections true"))
        .await
        .unwrap();
    // The listener reconnects after its back-off (up to 10 s after repeated failures).
    let gap = feed
        .wait_for(Duration::from_secs(60), |e| {
            matches!(e, IngestEvent::Gap { .. })
        })
        .await
        .expect("gap reported");
    let IngestEvent::Gap { message } = gap else {
        unreachable!()
    };
    assert!(message.contains("retention"), "{message}");
    // Afterwards the feed continues normally.
    c.batch_execute("insert into g values (3)").await.unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0])["id"], json!(3));
}
