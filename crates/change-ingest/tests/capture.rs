//! Capture everywhere a write can happen, with values that do not depend on the
//! writer's session: partitioned tables, replicated writes, TRUNCATE, schema changes,
//! large rows. Real PostgreSQL (one embedded cluster for this binary, a fresh
//! database per test).

mod common;

use std::time::Duration;

use change_ingest::{Change, IngestError, IngestEvent, Op};
use common::{migrated_db, old_record, record, Feed};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn ops(changes: &[Change]) -> Vec<Op> {
    changes.iter().map(|c| c.op).collect()
}

fn columns(change: &Change) -> Vec<&str> {
    change
        .table
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect()
}

#[tokio::test]
async fn partitioned_table_reports_the_root_for_every_path() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table m (id int, k int, v text, primary key (id, k, v)) partition by range (k);
         create table m_low partition of m for values from (0) to (10);
         create table m_high partition of m for values from (10) to (100) partition by list (v);
         create table m_high_a partition of m_high for values in ('a');
         create table m_high_b partition of m_high for values in ('b');",
    )
    .await
    .unwrap();
    // A partition cannot be enabled on its own: its root reports its changes.
    let err = change_ingest::enable_table(&c, "m_low").await.unwrap_err();
    assert!(
        matches!(&err, IngestError::NotEligible { reason, .. } if reason.contains("partition of")),
        "{err}"
    );
    let info = change_ingest::enable_table(&c, "m").await.unwrap();
    assert_eq!(info.primary_key, vec!["id", "k", "v"]);
    let mut feed = Feed::start(&url, |_| {}).await;

    c.batch_execute(
        "insert into m values (1, 1, 'a'), (2, 20, 'a');   -- through the root
         insert into m_low values (3, 2, 'x');              -- straight into a partition
         insert into m_high_b values (4, 30, 'b');          -- into a sub-partition
         update m set k = k + 10, v = 'a' where id = 1;     -- moves between partitions
         update m_high_b set v = 'b' where id = 4;
         delete from m_low where id = 3;",
    )
    .await
    .unwrap();
    let changes = feed.changes(7, T).await;
    assert_eq!(
        ops(&changes),
        [
            Op::Insert,
            Op::Insert,
            Op::Insert,
            Op::Insert,
            Op::Update,
            Op::Update,
            Op::Delete
        ]
    );
    assert!(
        changes.iter().all(|c| c.table.table == "m"),
        "root reported"
    );
    assert_eq!(record(&changes[4]), json!({"id": 1, "k": 11, "v": "a"}));
    assert_eq!(old_record(&changes[4]), json!({"id": 1, "k": 1, "v": "a"}));
    assert_eq!(old_record(&changes[6])["id"], json!(3));

    // A partition created later gets triggers from the maintenance task; until then
    // writes through the root are captured anyway.
    c.batch_execute("create table m_mid partition of m for values from (100) to (200)")
        .await
        .unwrap();
    let installed = async {
        loop {
            let n: i64 = c
                .query_one(
                    "select count(*) from pg_trigger where tgrelid = 'm_mid'::regclass and tgenabled = 'A'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, installed)
        .await
        .expect("triggers on the new partition");
    c.batch_execute("insert into m_mid values (5, 150, 'z')")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(changes[0].table.table, "m");
    assert_eq!(record(&changes[0])["id"], json!(5));

    // TRUNCATE of the root fires on every partition: one change.
    c.batch_execute("truncate m; insert into m values (6, 1, 'a')")
        .await
        .unwrap();
    let changes = feed.changes(2, T).await;
    assert_eq!(ops(&changes), [Op::Truncate, Op::Insert]);
    assert_eq!(changes[0].table.table, "m");
    assert!(changes[0].record.is_none() && changes[0].old_record.is_none());
}

#[tokio::test]
async fn publication_listing_partitions_enables_the_root() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create table p (id int, k int, primary key (id, k)) partition by list (k);
         create table p1 partition of p for values in (1);
         create table p2 partition of p for values in (2);",
    )
    .await
    .unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    // Published after `Live`: a sync before it would send `TablesChanged` among the
    // start-up events `Feed::start` skips.
    c.batch_execute("create publication supabase_realtime for table p")
        .await
        .unwrap();
    feed.wait_for(
        T,
        |e| matches!(e, IngestEvent::TablesChanged(t) if t.iter().any(|t| t.table == "p")),
    )
    .await
    .expect("p enabled by the publication");
    c.batch_execute("insert into p1 values (1, 1); insert into p values (2, 2)")
        .await
        .unwrap();
    let changes = feed.changes(2, T).await;
    assert!(changes.iter().all(|c| c.table.table == "p"));
}

#[tokio::test]
async fn replicated_writes_and_truncate_are_captured() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table r (id int primary key, v text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "r").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    // What a logical-replication apply worker (or pglogical, or a restore that skips
    // triggers) runs under: ENABLE ALWAYS triggers still fire.
    c.batch_execute(
        "set session_replication_role = replica;
         insert into r values (1, 'replicated');
         update r set v = 'again' where id = 1;
         set session_replication_role = origin;
         begin; insert into r values (2, 'before'); truncate r; insert into r values (3, 'after'); commit;",
    )
    .await
    .unwrap();
    let changes = feed.changes(5, T).await;
    assert_eq!(
        ops(&changes),
        [Op::Insert, Op::Update, Op::Insert, Op::Truncate, Op::Insert]
    );
    assert_eq!(record(&changes[0])["v"], json!("replicated"));
    assert_eq!(record(&changes[4])["id"], json!(3));
    // One transaction, one commit timestamp.
    assert_eq!(changes[2].commit_timestamp, changes[4].commit_timestamp);
    assert_eq!(changes[3].commit_timestamp, changes[4].commit_timestamp);
}

#[tokio::test]
async fn values_do_not_depend_on_the_writers_session() {
    let (url, c) = migrated_db().await;
    c.batch_execute(
        "create type mood as enum ('sad', 'happy');
         create table v (id int primary key, b bytea, j jsonb, js json, ts timestamptz, t timestamp,
                         d date, n numeric, f float8, arr int[], tarr timestamptz[], e mood,
                         iv interval, r tstzrange, m money);",
    )
    .await
    .unwrap();
    change_ingest::enable_table(&c, "v").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    let insert = |id: i32| {
        format!(
            "insert into v values ({id}, '\\x0102030405', '{{\"b\": [1, 2], \"a\": null}}', '{{\"k\":1}}',
               '2025-11-03 09:32:55+00', '2025-11-03 09:32:55', '2025-11-03', 9.50, 0.1,
               '{{1,2}}', '{{\"2025-11-03 09:32:55+00\"}}', 'happy', '1 day 2 hours',
               '[2025-11-03 09:00+00, 2025-11-03 10:00+00)', 12.5)"
        )
    };
    c.batch_execute(&insert(1)).await.unwrap();
    c.batch_execute(&format!(
        "set timezone = 'Asia/Kathmandu'; set datestyle = 'SQL, DMY';
         set intervalstyle = 'iso_8601'; set extra_float_digits = -3; set bytea_output = 'escape';
         {}",
        insert(2)
    ))
    .await
    .unwrap();
    let changes = feed.changes(2, T).await;
    let text = |c: &Change| String::from_utf8(c.record.as_ref().unwrap().to_vec()).unwrap();
    let expected = |id: i32| {
        format!(
            "{{\"id\":{id},\"b\":\"0102030405\",\"j\":{{\"a\": null, \"b\": [1, 2]}},\"js\":{{\"k\":1}},\
             \"ts\":\"2025-11-03T09:32:55+00:00\",\"t\":\"2025-11-03T09:32:55\",\"d\":\"2025-11-03\",\
             \"n\":9.50,\"f\":0.1,\"arr\":[1,2],\"tarr\":[\"2025-11-03T09:32:55+00:00\"],\"e\":\"happy\",\
             \"iv\":\"1 day 02:00:00\",\"r\":\"[\\\"2025-11-03 09:00:00+00\\\",\\\"2025-11-03 10:00:00+00\\\")\",\
             \"m\":\"$12.50\"}}"
        )
    };
    assert_eq!(text(&changes[0]), expected(1));
    assert_eq!(text(&changes[1]), expected(2));
    assert_eq!(changes[0].commit_timestamp.len(), 24);
}

#[tokio::test]
async fn columns_follow_schema_changes_and_drops_are_reported() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table s (id int primary key, a text, b text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "s").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    // Several shapes within a few milliseconds: each change carries its own columns,
    // whatever the listener's view of the catalog is when it reads them.
    c.batch_execute(
        "insert into s values (1, 'a', 'b');
         alter table s add column c int;
         insert into s values (2, 'a', 'b', 3);
         alter table s drop column a;
         insert into s values (3, 'b', 3);
         alter table s rename column b to bee;
         insert into s values (4, 'b', 4);",
    )
    .await
    .unwrap();
    let changes = feed.changes(4, T).await;
    let shapes: Vec<Vec<&str>> = changes.iter().map(columns).collect();
    assert_eq!(
        shapes,
        vec![
            vec!["id", "a", "b"],
            vec!["id", "a", "b", "c"],
            vec!["id", "b", "c"],
            vec!["id", "bee", "c"],
        ]
    );
    let c_type = changes[1].table.columns[3].type_name.as_str();
    assert_eq!(c_type, "int4");

    // A renamed table keeps its oid (routing follows it); a dropped one is reported
    // after its last changes.
    let oid = changes[0].table.oid;
    c.batch_execute("alter table s rename to s2; insert into s2 values (5, 'x', 5)")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(changes[0].table.oid, oid);
    c.batch_execute("insert into s2 values (6, 'x', 6); drop table s2")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0])["id"], json!(6));
    let dropped = feed
        .wait_for(T, |e| matches!(e, IngestEvent::TableDropped(_)))
        .await
        .expect("drop reported");
    let IngestEvent::TableDropped(table) = dropped else {
        unreachable!()
    };
    // Named as the feed last knew it: a rename alone (same columns) is picked up by
    // the next tables refresh (every second), which may come after the drop.
    assert_eq!(table.oid, oid);
    assert!(["s", "s2"].contains(&table.table.as_str()), "{table:?}");
}

#[tokio::test]
async fn rows_above_the_render_threshold_still_arrive_whole() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table big (id int primary key, body text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "big").await.unwrap();
    let mut feed = Feed::start(&url, |cfg| cfg.max_record_bytes = 4 * 1024 * 1024).await;
    // 600 KB: rendered by the guarded path (stored size > 512 KiB), fits easily.
    c.batch_execute(
        "insert into big values (1, repeat('x', 600000));
         update big set body = body || 'y';",
    )
    .await
    .unwrap();
    let changes = feed.changes(2, T).await;
    assert_eq!(record(&changes[0])["body"].as_str().unwrap().len(), 600_000);
    assert_eq!(record(&changes[1])["body"].as_str().unwrap().len(), 600_001);
    assert_eq!(
        old_record(&changes[1])["body"].as_str().unwrap().len(),
        600_000
    );
    assert!(changes.iter().all(|c| c.oversized_columns.is_empty()));
}

/// A row whose JSON would pass PostgreSQL's 1 GB limit (hex doubles bytea): the plain
/// table takes it, the writer must not fail, and the change arrives as a key-only
/// `Error 413`. Needs ~3 GB of memory on the database server; run explicitly:
/// `cargo test -p change-ingest --test capture -- --ignored gigabyte`.
#[tokio::test]
#[ignore = "needs ~3 GB of server memory and ~30 s"]
async fn gigabyte_escaping_row_becomes_a_key_only_413() {
    let (url, c) = migrated_db().await;
    c.batch_execute("create table huge (id int primary key, b bytea)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "huge").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;
    c.batch_execute(
        "insert into huge values (1, convert_to(repeat('a', 540 * 1024 * 1024), 'UTF8'));
         insert into huge values (2, '\\x01');",
    )
    .await
    .expect("the writer is not failed by the capture");
    let changes = feed.changes(2, Duration::from_secs(300)).await;
    assert_eq!(record(&changes[0]), json!({"id": 1}));
    assert_eq!(changes[0].oversized_columns, vec!["b"]);
    assert_eq!(record(&changes[1]), json!({"id": 2, "b": "01"}));
}
