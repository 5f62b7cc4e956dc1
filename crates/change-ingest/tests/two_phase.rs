//! Two-phase commit on enabled tables: PREPARE TRANSACTION works (the capture never
//! sends NOTIFY when it is possible), changes arrive after COMMIT PREPARED and never
//! after ROLLBACK PREPARED, and an old prepared transaction holding retention back is
//! reported. Own binary: its cluster has `max_prepared_transactions > 0`.

mod common;

use std::time::Duration;

use change_ingest::embedded::{EmbeddedOptions, EmbeddedPostgres};
use change_ingest::Op;
use common::{record, Feed};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn prepared_transactions_commit_and_deliver() {
    let pg = EmbeddedPostgres::start_with(EmbeddedOptions {
        settings: vec![("max_prepared_transactions".into(), "10".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let url = pg.url().to_owned();
    let c = change_ingest::connect(&url).await.unwrap();
    change_ingest::migrate(&c).await.unwrap();
    c.batch_execute("create table p (id int primary key, v text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "p").await.unwrap();
    let mut feed = Feed::start(&url, |_| {}).await;

    c.batch_execute(
        "begin; insert into p values (1, 'prepared'); update p set v = 'still prepared' where id = 1;
         prepare transaction 'one';
         begin; insert into p values (2, 'discarded'); prepare transaction 'two';
         insert into p values (3, 'autocommit');",
    )
    .await
    .expect("PREPARE TRANSACTION on an enabled table");
    // The autocommit row arrives while the prepared ones stay invisible.
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0])["id"], json!(3));

    // (COMMIT/ROLLBACK PREPARED cannot share a query string with other statements.)
    for sql in [
        "commit prepared 'one'",
        "rollback prepared 'two'",
        "truncate p",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let changes = feed.changes(3, T).await;
    let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Truncate]);
    assert_eq!(record(&changes[1]), json!({"id": 1, "v": "still prepared"}));
    assert_eq!(changes[0].commit_timestamp, changes[1].commit_timestamp);
    // TRUNCATE inside a prepared transaction works too.
    c.batch_execute(
        "begin; insert into p values (4, 'x'); truncate p; prepare transaction 'three'",
    )
    .await
    .unwrap();
    c.batch_execute("commit prepared 'three'").await.unwrap();
    let changes = feed.changes(2, T).await;
    assert_eq!(changes[1].op, Op::Truncate);

    // A prepared transaction left open holds retention back, and says so.
    // One-second slots, so retention is due within seconds.
    c.batch_execute(
        "create or replace function realtime_gateway.slot_width() returns integer
         language sql immutable parallel safe as $$ select 1 $$",
    )
    .await
    .unwrap();
    // New sessions from here on: `c` may still run capture plans built with the old
    // (immutable, so possibly folded) width.
    let writer = change_ingest::connect(&url).await.unwrap();
    writer
        .batch_execute(
            "begin; insert into p values (5, 'forgotten'); prepare transaction 'forgotten'",
        )
        .await
        .unwrap();
    writer
        .batch_execute("insert into p values (6, 'later')")
        .await
        .unwrap();
    let report = async {
        loop {
            let r = change_ingest::maintenance::prune(&c, Duration::from_secs(1))
                .await
                .unwrap();
            if r.pinned_xmin.is_some() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let report = tokio::time::timeout(T, report).await.expect("pin reported");
    assert!(report.pinned_since.is_some());
    c.batch_execute("rollback prepared 'forgotten'")
        .await
        .unwrap();
    let pruned = async {
        loop {
            let r = change_ingest::maintenance::prune(&c, Duration::from_secs(1))
                .await
                .unwrap();
            if r.truncated > 0 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let report = tokio::time::timeout(T, pruned)
        .await
        .expect("pruned once unpinned");
    assert!(report.pinned_xmin.is_none(), "{report:?}");
}
