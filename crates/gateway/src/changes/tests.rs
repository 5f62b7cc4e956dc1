//! Router tests in memory: real index, real encoding, channels as plain queues.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

use change_ingest::{Change, IngestEvent, Op, TableInfo};
use phoenix_channel::Vsn;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{BindingRequest, Changes, Status};
use crate::registry::{ChannelHandle, Fanout, Outbound};

fn channel(id: u64, topic: &str) -> (Arc<ChannelHandle>, mpsc::Receiver<Outbound>) {
    let (tx, rx) = mpsc::channel(64);
    let conn = Arc::new(crate::registry::ConnHandle::new(id, tx));
    let chan = Arc::new(ChannelHandle {
        id,
        vsn: Vsn::V2,
        join_ref: None,
        topic: topic.to_owned(),
        conn,
        dropped: AtomicU64::new(0),
        dead: AtomicBool::new(false),
        reported: AtomicBool::new(false),
        slot: AtomicUsize::new(0),
    });
    (chan, rx)
}

fn frames(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Outbound::Text(b)) = rx.try_recv() {
        out.push(serde_json::from_slice(&b).unwrap());
    }
    out
}

fn fanout() -> Fanout {
    Fanout {
        metrics: crate::metrics::Handles::new(),
        policy: crate::config::LagPolicy::Error,
    }
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
fn live_router(fanout: &Fanout, table: &Arc<TableInfo>) -> Changes {
    let changes = Changes::default();
    changes.index.write().status = Status::Connecting;
    changes.apply(fanout, IngestEvent::TablesChanged(vec![Arc::clone(table)]));
    changes.apply(fanout, IngestEvent::Live);
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

#[test]
fn unsubscribed_channels_stop_receiving_and_leave_no_index_entries() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table);
    let (a, mut rx_a) = channel(1, "realtime:a");
    let (b, mut rx_b) = channel(2, "realtime:b");
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
    changes.apply(&fanout, insert(&table, 1));
    let got_a = frames(&mut rx_a);
    assert_eq!(
        got_a.len(),
        1,
        "one frame for both of a's bindings: {got_a:?}"
    );
    assert_eq!(got_a[0][4]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(frames(&mut rx_b).len(), 1);

    changes.unsubscribe(bind_a);
    changes.apply(&fanout, insert(&table, 2));
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

#[test]
fn each_binding_gets_its_own_select() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table);
    let (a, mut rx) = channel(1, "realtime:a");
    let only_a = req(json!({"event": "*", "schema": "public", "table": "orders", "select": ["a"]}));
    let only_b =
        req(json!({"event": "INSERT", "schema": "public", "table": "orders", "select": ["b"]}));
    let all = req(json!({"event": "*", "schema": "public", "table": "orders"}));
    let (id_a, id_b, id_all) = (only_a.id, only_b.id, all.id);
    let _bind = changes.subscribe(&fanout, &a, vec![only_a, only_b, all], false, anon());
    frames(&mut rx);
    changes.apply(&fanout, insert(&table, 1));
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

#[test]
fn a_channel_is_confirmed_once_its_pending_binding_resolves() {
    let fanout = fanout();
    let table = orders();
    let changes = live_router(&fanout, &table);
    let (a, mut rx) = channel(1, "realtime:a");
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
    changes.apply(
        &fanout,
        IngestEvent::TablesChanged(vec![Arc::clone(&table), later]),
    );
    let got = frames(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][4]["status"], "ok");
    assert!(changes.index.read().unconfirmed_is_empty());
}

fn anon() -> Arc<crate::auth::Claims> {
    Arc::new(crate::auth::Claims::for_role("anon"))
}
