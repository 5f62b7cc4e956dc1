//! Router tests in memory: real index, real encoding, channels as plain queues.

use std::sync::Arc;
use std::time::Duration;

use change_ingest::authz::{Catalog, RowRule, TableAccess};
use change_ingest::{Change, IngestEvent, Op, TableInfo};
use phoenix_channel::Vsn;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::authorize::Authz;
use super::{BindingRequest, Changes, ChannelBindings, Status};
use crate::auth::Claims;
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

/// What `role` may read of `table`: everything, or all but `hidden`, with `rule`.
fn access(table: &TableInfo, role: &str, hidden: &[&str], rule: RowRule) -> TableAccess {
    let selectable: Vec<String> = table
        .columns
        .iter()
        .map(|c| c.name.clone())
        .filter(|c| !hidden.contains(&c.as_str()))
        .collect();
    TableAccess {
        table_oid: table.oid,
        table_name: format!("{}.{}", table.schema, table.table),
        role: role.into(),
        all_selectable: selectable.len() == table.columns.len(),
        selectable,
        primary_key: table.primary_key.clone(),
        rls_enabled: table.rls_enabled,
        rule,
    }
}

/// A router without a database: the catalog is set by hand.
struct Router {
    changes: Changes,
    authz: Authz,
    fanout: Fanout,
}

impl Router {
    /// Live, with these tables enabled and `anon` reading all of them.
    async fn live(tables: &[&Arc<TableInfo>]) -> Router {
        let mut r = Router {
            changes: Changes::default(),
            authz: Authz::new(None),
            fanout: fanout(),
        };
        r.changes.index.write().status = Status::Connecting;
        let mut catalog = Catalog::default();
        catalog.add_role("anon");
        for t in tables {
            catalog.add_access(access(t, "anon", &[], RowRule::All));
        }
        r.set_catalog(catalog);
        r.apply(IngestEvent::TablesChanged(
            tables.iter().map(|t| Arc::clone(t)).collect(),
        ))
        .await;
        r.apply(IngestEvent::Live).await;
        r
    }

    fn set_catalog(&self, catalog: Catalog) {
        self.changes
            .install_catalog(&self.fanout, Arc::new(catalog));
    }

    async fn apply(&mut self, e: IngestEvent) {
        self.changes.apply(&self.fanout, e, &mut self.authz).await;
    }

    fn subscribe(
        &self,
        chan: &Arc<ChannelHandle>,
        reqs: Vec<BindingRequest>,
        claims: Claims,
    ) -> ChannelBindings {
        self.changes
            .subscribe(&self.fanout, chan, reqs, false, Arc::new(claims))
    }
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
    let table = orders();
    let mut r = Router::live(&[&table]).await;
    let (a, mut rx_a) = channel(&r.fanout, 1, "realtime:a");
    let (b, mut rx_b) = channel(&r.fanout, 2, "realtime:b");
    let bind_a = r.subscribe(
        &a,
        vec![
            req(json!({"event": "*", "schema": "public", "table": "orders"})),
            req(json!({"event": "*", "schema": "*"})),
        ],
        anon(),
    );
    let _bind_b = r.subscribe(
        &b,
        vec![req(
            json!({"event": "INSERT", "schema": "public", "table": "orders"}),
        )],
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
    r.apply(insert(&table, 1)).await;
    let got_a = frames(&mut rx_a);
    assert_eq!(
        got_a.len(),
        1,
        "one frame for both of a's bindings: {got_a:?}"
    );
    assert_eq!(got_a[0][4]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(frames(&mut rx_b).len(), 1);

    r.changes.unsubscribe(bind_a);
    r.apply(insert(&table, 2)).await;
    assert!(frames(&mut rx_a).is_empty(), "a left: no more changes");
    assert_eq!(frames(&mut rx_b).len(), 1, "b is unaffected");
    let idx = r.changes.index.read();
    assert!(idx.wildcard.is_empty());
    assert_eq!(
        idx.table_group("public", "orders").unwrap().entries.len(),
        1
    );
    assert!(!idx.channels.contains_key(&1));
}

#[tokio::test]
async fn each_binding_gets_its_own_select() {
    let table = orders();
    let mut r = Router::live(&[&table]).await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let only_a = req(json!({"event": "*", "schema": "public", "table": "orders", "select": ["a"]}));
    let only_b =
        req(json!({"event": "INSERT", "schema": "public", "table": "orders", "select": ["b"]}));
    let all = req(json!({"event": "*", "schema": "public", "table": "orders"}));
    let (id_a, id_b, id_all) = (only_a.id, only_b.id, all.id);
    let _bind = r.subscribe(&a, vec![only_a, only_b, all], anon());
    frames(&mut rx);
    r.apply(insert(&table, 1)).await;
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
    let table = orders();
    let mut r = Router::live(&[&table]).await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let _bind = r.subscribe(
        &a,
        vec![
            req(json!({"event": "*", "schema": "public", "table": "orders"})),
            req(json!({"event": "*", "schema": "public", "table": "later"})),
        ],
        anon(),
    );
    assert!(frames(&mut rx).is_empty(), "waits for the pending table");
    let later = Arc::new(TableInfo {
        table: "later".into(),
        oid: 2,
        ..(*table).clone()
    });
    let mut catalog = Catalog::default();
    catalog.add_role("anon");
    catalog.add_access(access(&table, "anon", &[], RowRule::All));
    catalog.add_access(access(&later, "anon", &[], RowRule::All));
    r.set_catalog(catalog);
    r.apply(IngestEvent::TablesChanged(vec![Arc::clone(&table), later]))
        .await;
    let got = frames(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][4]["status"], "ok");
    assert!(r.changes.index.read().unconfirmed_is_empty());
}

fn anon() -> Claims {
    Claims::for_role("anon")
}

fn claims(role: &str, sub: &str) -> Claims {
    Claims::from_payload(
        json!({"role": role, "sub": sub, "exp": 4_000_000_000u64})
            .as_object()
            .cloned()
            .unwrap(),
    )
    .unwrap()
}

/// `orders` with RLS on, for a router whose catalog has these roles' accesses.
async fn router_with(table: &Arc<TableInfo>, accesses: Vec<TableAccess>) -> Router {
    let mut r = Router::live(&[table]).await;
    let mut catalog = Catalog::default();
    for a in accesses {
        catalog.add_role(&a.role.clone());
        catalog.add_access(a);
    }
    r.set_catalog(catalog);
    r.apply(IngestEvent::Live).await;
    r
}

fn events(rx: &mut Inbox) -> (Vec<Value>, Vec<Value>) {
    frames(rx)
        .into_iter()
        .partition(|f| f[3] == "postgres_changes")
}

#[tokio::test]
async fn columns_a_role_cannot_read_are_left_out_and_cannot_be_filtered_on() {
    let table = orders();
    let r = &mut router_with(
        &table,
        vec![access(&table, "limited", &["b"], RowRule::All)],
    )
    .await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let all = req(json!({"event": "*", "schema": "public", "table": "orders"}));
    let by_b =
        req(json!({"event": "*", "schema": "public", "table": "orders", "filter": "b=eq.y"}));
    let sel_b = req(json!({"event": "*", "schema": "public", "table": "orders", "select": ["b"]}));
    let _bind = r.subscribe(&a, vec![all, by_b, sel_b], claims("limited", "u1"));
    let (_, system) = events(&mut rx);
    let messages: Vec<&str> = system
        .iter()
        .map(|f| f[4]["message"].as_str().unwrap())
        .collect();
    assert!(
        messages[0].ends_with("Exception: invalid column for filter b"),
        "{messages:?}"
    );
    assert!(
        messages[1].ends_with("Exception: invalid column for select b"),
        "{messages:?}"
    );
    assert_eq!(messages[2], "Subscribed to PostgreSQL");
    r.apply(insert(&table, 1)).await;
    let (got, _) = events(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][4]["data"]["record"], json!({"id": 1, "a": "x"}));
    let cols: Vec<&str> = got[0][4]["data"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["id", "a"]);
}

#[tokio::test]
async fn primary_key_rules_and_roles_that_see_nothing() {
    let table = orders();
    let mut rls = (*table).clone();
    rls.table = "nopk".into();
    rls.oid = 2;
    rls.rls_enabled = true;
    rls.primary_key.clear();
    let nopk = Arc::new(rls);
    let mut r = Router::live(&[&table, &nopk]).await;
    let mut catalog = Catalog::default();
    for role in ["keyless", "blind", "anon"] {
        catalog.add_role(role);
    }
    catalog.add_access(access(&table, "keyless", &["id"], RowRule::All));
    catalog.add_access(access(&table, "blind", &[], RowRule::Nothing));
    catalog.add_access(access(&nopk, "anon", &[], RowRule::All));
    r.set_catalog(catalog);
    let on = |t: &str| req(json!({"event": "*", "schema": "public", "table": t}));
    let (k, mut rx_k) = channel(&r.fanout, 1, "realtime:k");
    let (b, mut rx_b) = channel(&r.fanout, 2, "realtime:b");
    let (n, mut rx_n) = channel(&r.fanout, 3, "realtime:n");
    let _k = r.subscribe(&k, vec![on("orders")], claims("keyless", "u"));
    let _b = r.subscribe(&b, vec![on("orders")], claims("blind", "u"));
    let _n = r.subscribe(&n, vec![on("nopk")], claims("anon", "u"));
    for rx in [&mut rx_k, &mut rx_b, &mut rx_n] {
        frames(rx);
    }
    r.apply(insert(&table, 1)).await;
    r.apply(insert(&nopk, 2)).await;
    let (got, _) = events(&mut rx_k);
    assert_eq!(
        got[0][4]["data"]["errors"],
        json!(["Error 401: Unauthorized"])
    );
    assert_eq!(got[0][4]["data"]["record"], json!({}));
    assert!(
        events(&mut rx_b).0.is_empty(),
        "no permissive policy: nothing"
    );
    let (got, _) = events(&mut rx_n);
    assert_eq!(
        got[0][4]["data"]["errors"],
        json!(["Error 400: Bad Request, no primary key"])
    );
}

#[tokio::test]
async fn unknown_roles_wait_then_are_refused() {
    let table = orders();
    let r = Router::live(&[&table]).await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let _bind = r.subscribe(
        &a,
        vec![req(
            json!({"event": "*", "schema": "public", "table": "orders"}),
        )],
        claims("ghost", "u"),
    );
    assert!(
        frames(&mut rx).is_empty(),
        "waits: the role may be created a moment later"
    );
    r.changes.expire_pending(
        &r.fanout,
        tokio::time::Instant::now() + super::PENDING_GRACE,
    );
    let got = frames(&mut rx);
    assert!(
        got[0][4]["message"]
            .as_str()
            .unwrap()
            .ends_with("Exception: role \"ghost\" does not exist"),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_token_refresh_acts_as_the_new_claims_from_the_next_change_on() {
    let table = orders();
    let r = &mut router_with(
        &table,
        vec![
            access(&table, "wide", &[], RowRule::All),
            access(&table, "narrow", &["b"], RowRule::All),
        ],
    )
    .await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let all = req(json!({"event": "*", "schema": "public", "table": "orders"}));
    let by_b =
        req(json!({"event": "*", "schema": "public", "table": "orders", "filter": "b=eq.y"}));
    let (id_all, id_b) = (all.id, by_b.id);
    let _bind = r.subscribe(&a, vec![all, by_b], claims("wide", "u1"));
    frames(&mut rx);
    r.apply(insert(&table, 1)).await;
    let (got, _) = events(&mut rx);
    assert_eq!(got[0][4]["ids"], json!([id_all, id_b]));
    assert_eq!(got[0][4]["data"]["record"]["b"], "y");

    r.changes.update_claims(1, Arc::new(claims("narrow", "u1")));
    r.apply(insert(&table, 2)).await;
    let (got, _) = events(&mut rx);
    assert_eq!(got[0][4]["ids"], json!([id_all]), "the filter on b is gone");
    assert_eq!(got[0][4]["data"]["record"], json!({"id": 2, "a": "x"}));
    r.changes
        .expire_pending(&r.fanout, tokio::time::Instant::now());
    let (_, system) = events(&mut rx);
    assert!(system[0][4]["message"]
        .as_str()
        .unwrap()
        .ends_with("invalid column for filter b"));
}

#[tokio::test]
async fn a_renamed_table_routes_by_oid_and_a_dropped_one_keeps_its_bindings_until_reported() {
    let table = orders();
    let mut r = Router::live(&[&table]).await;
    let (a, mut rx) = channel(&r.fanout, 1, "realtime:a");
    let _bind = r.subscribe(
        &a,
        vec![req(
            json!({"event": "INSERT", "schema": "public", "table": "orders"}),
        )],
        anon(),
    );
    assert_eq!(frames(&mut rx)[0][4]["message"], "Subscribed to PostgreSQL");
    // Renamed and altered since the last `TablesChanged`: ingest reads the
    // change with the new description (same oid, new name).
    let renamed = Arc::new(TableInfo {
        table: "orders_renamed".into(),
        ..(*table).clone()
    });
    r.apply(insert(&renamed, 1)).await;
    let got = frames(&mut rx);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0][4]["data"]["table"], "orders_renamed");

    // A catalog refresh that no longer has the table (just dropped) refuses
    // nothing: the channel is told by the drop report.
    let mut catalog = Catalog::default();
    catalog.add_role("anon");
    r.set_catalog(catalog);
    assert!(frames(&mut rx).is_empty());
    r.apply(IngestEvent::TableDropped(Arc::clone(&table))).await;
    let got = frames(&mut rx);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0][4]["message"],
        "Table public.orders was dropped: no more changes will arrive for it"
    );
}
