//! Router tests in memory: real index, real encoding, channels as plain queues.

use std::sync::Arc;
use std::time::Duration;

use change_ingest::{Change, IngestEvent, Op, TableInfo};
use phoenix_channel::Vsn;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{BindingRequest, Changes, Status};
use crate::flow::Flow;
use crate::registry::{ChannelHandle, ConnHandle, Fanout, Outbound};

/// What one channel's connection received: its backlog and its paced queue.
struct Inbox {
    rx: mpsc::Receiver<Outbound>,
    conn: Arc<ConnHandle>,
    flow: Arc<Flow>,
}

fn channel(fanout: &Fanout, id: u64, topic: &str) -> (Arc<ChannelHandle>, Inbox) {
    let (tx, rx) = mpsc::channel(64);
    let conn = Arc::new(ConnHandle::new(id, tx));
    let chan = Arc::new(ChannelHandle::new(
        id,
        Vsn::V2,
        None,
        topic.to_owned(),
        Arc::clone(&conn),
    ));
    let flow = Arc::clone(&fanout.flow);
    (chan, Inbox { rx, conn, flow })
}

/// Text frames received, backlog first (system messages), then change frames.
fn frames(inbox: &mut Inbox) -> Vec<Value> {
    let mut queued = Vec::new();
    while let Ok(frame) = inbox.rx.try_recv() {
        queued.push(frame);
    }
    while !inbox.conn.paced.is_empty() {
        inbox.flow.take(&inbox.conn, &mut queued);
    }
    queued
        .into_iter()
        .filter_map(|f| match f {
            Outbound::Text(b) => Some(serde_json::from_slice(&b).unwrap()),
            _ => None,
        })
        .collect()
}

fn fanout() -> Fanout {
    let metrics = crate::metrics::Handles::new();
    let policy = crate::config::LagPolicy::Error;
    let flow = Flow::new(1 << 20, Duration::from_secs(5), metrics.clone(), policy);
    Fanout::new(metrics, policy, Arc::new(flow))
}

fn req(v: Value) -> BindingRequest {
    BindingRequest::from_raw(v.as_object().cloned().unwrap())
}

fn orders() -> Arc<TableInfo> {
    let col = |name: &str, type_name: &str| change_ingest::Column {
        name: name.into(),
        type_name: type_name.into(),
    };
    Arc::new(TableInfo {
        oid: 1,
        schema: "public".into(),
        table: "orders".into(),
        columns: vec![col("id", "int8"), col("a", "text"), col("b", "text")],
        primary_key: vec!["id".into()],
        rls_enabled: false,
    })
}

/// A live router with `public.orders` enabled.
async fn live_router(fanout: &Fanout, table: &Arc<TableInfo>) -> Changes {
    let changes = Changes::default();
    changes.index.write().status = Status::Connecting;
    changes
        .apply(fanout, IngestEvent::TablesChanged(vec![Arc::clone(table)]))
        .await;
    changes.apply(fanout, IngestEvent::Live).await;
    changes
}

fn insert(table: &Arc<TableInfo>, id: i64) -> IngestEvent {
    IngestEvent::Changes(vec![Change {
        position: change_ingest::ChangePosition { txid: 1, seq: id },
        table: Arc::clone(table),
        op: Op::Insert,
        commit_timestamp: "2026-11-22T00:00:00.000Z".into(),
        record: Some(bytes::Bytes::from(format!(
            "{{\"id\":{id},\"a\":\"x\",\"b\":\"y\"}}"
        ))),
        old_record: None,
        oversized_columns: Vec::new(),
    }])
}

#[tokio::test]
async fn unsubscribed_channels_stop_receiving_and_leave_no_index_entries() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table).await;
    let (a, mut rx_a) = channel(&fanout, 1, "realtime:a");
    let (b, mut rx_b) = channel(&fanout, 2, "realtime:b");
    let bind_a = changes.subscribe(
        &fanout,
        &a,
        vec![
            req(json!({"event": "*", "schema": "public", "table": "orders"})),
            req(json!({"event": "*", "schema": "*"})),
        ],
        false,
        anon(),
    );
    let _bind_b = changes.subscribe(
        &fanout,
        &b,
        vec![req(
            json!({"event": "INSERT", "schema": "public", "table": "orders"}),
        )],
        false,
        anon(),
    );
    assert_eq!(
        frames(&mut rx_a)[0][4]["message"],
        "Subscribed to PostgreSQL"
    );
    assert_eq!(
        frames(&mut rx_b)[0][4]["message"],
        "Subscribed to PostgreSQL"
    );
    changes.apply(&fanout, insert(&table, 1)).await;
    let got_a = frames(&mut rx_a);
    assert_eq!(
        got_a.len(),
        1,
        "one frame for both of a's bindings: {got_a:?}"
    );
    assert_eq!(got_a[0][4]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(frames(&mut rx_b).len(), 1);

    changes.unsubscribe(bind_a);
    changes.apply(&fanout, insert(&table, 2)).await;
    assert!(frames(&mut rx_a).is_empty(), "a left: no more changes");
    assert_eq!(frames(&mut rx_b).len(), 1, "b is unaffected");
    let idx = changes.index.read();
    assert!(idx.wildcard.is_empty());
    assert_eq!(
        idx.table_group("public", "orders").unwrap().entries.len(),
        1
    );
    assert!(!idx.channels.contains_key(&1));
}

#[tokio::test]
async fn each_binding_gets_its_own_select() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table).await;
    let (a, mut rx) = channel(&fanout, 1, "realtime:a");
    let only_a = req(json!({"event": "*", "schema": "public", "table": "orders", "select": ["a"]}));
    let only_b =
        req(json!({"event": "INSERT", "schema": "public", "table": "orders", "select": ["b"]}));
    let all = req(json!({"event": "*", "schema": "public", "table": "orders"}));
    let (id_a, id_b, id_all) = (only_a.id, only_b.id, all.id);
    let _bind = changes.subscribe(&fanout, &a, vec![only_a, only_b, all], false, anon());
    frames(&mut rx);
    changes.apply(&fanout, insert(&table, 1)).await;
    let got = frames(&mut rx);
    assert_eq!(got.len(), 3, "one frame per column list: {got:?}");
    let by_id = |id: u32| {
        got.iter()
            .find(|f| f[4]["ids"] == json!([id]))
            .map(|f| f[4]["data"]["record"].clone())
            .unwrap()
    };
    assert_eq!(by_id(id_a), json!({"id": 1, "a": "x"}));
    assert_eq!(by_id(id_b), json!({"id": 1, "b": "y"}));
    assert_eq!(by_id(id_all), json!({"id": 1, "a": "x", "b": "y"}));
}

#[tokio::test]
async fn a_channel_is_confirmed_once_its_pending_binding_resolves() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table).await;
    let (a, mut rx) = channel(&fanout, 1, "realtime:a");
    let _bind = changes.subscribe(
        &fanout,
        &a,
        vec![
            req(json!({"event": "*", "schema": "public", "table": "orders"})),
            req(json!({"event": "*", "schema": "public", "table": "later"})),
        ],
        false,
        anon(),
    );
    assert!(frames(&mut rx).is_empty(), "waits for the pending table");
    let later = Arc::new(TableInfo {
        table: "later".into(),
        oid: 2,
        ..(*table).clone()
    });
    changes
        .apply(
            &fanout,
            IngestEvent::TablesChanged(vec![Arc::clone(&table), later]),
        )
        .await;
    let got = frames(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][4]["status"], "ok");
    assert!(changes.index.read().unconfirmed_is_empty());
}

fn anon() -> Arc<crate::auth::Claims> {
    Arc::new(crate::auth::Claims::for_role("anon"))
}
