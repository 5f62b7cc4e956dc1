//! Postgres Changes workloads: `changes`, `writer-cost`, `large-rows`, and
//! the database, subscriber and writer plumbing `rls` shares with them.
//!
//! Each opens a database (`--database-url`, else a throwaway
//! `change_ingest::embedded` cluster), creates and enables its table, starts
//! the gateway with `DATABASE_URL` pointing at it (`EMBEDDED_POSTGRES=off`),
//! and drives tokio-postgres writers plus hand-written WebSocket subscribers.
//!
//! Latency is measured from the moment the writer's single-row autocommit
//! `INSERT` returned (COMMIT done, as the application sees it) to the moment a
//! subscriber holds the whole frame, both on `CLOCK_MONOTONIC`. Writers record
//! `(writer, seq) → commit-return ns` in memory; subscribers record
//! `(writer, seq, receive ns)`; the two are joined after each step, so a frame
//! that arrives before the writer task got its result (possible: the gateway
//! may be faster than the writer's wake-up) counts as 0 ms and is reported.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use change_ingest::embedded::{EmbeddedOptions, EmbeddedPostgres};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ns;
use crate::proto::{self, Vsn};
use crate::report::{mib, Plot, Report};
use crate::stats::new_hist;
use crate::sys;
use crate::target::Target;
use crate::workloads::{pct, Env};
use crate::ws::{self, op, Endpoint, MaskGen};

const MAX_FRAME: usize = 16 << 20;

// ---------------------------------------------------------------------------
// Database

/// The database under test.
#[derive(Debug)]
pub struct Db {
    /// Connection URL.
    pub url: String,
    /// What it is, for reports.
    pub label: String,
    emb: Option<EmbeddedPostgres>,
}

impl Db {
    /// `--database-url`, else a throwaway embedded cluster.
    pub async fn open(env: &Env, url: Option<&str>, durable: bool) -> anyhow::Result<Db> {
        if let Some(u) = url {
            return Ok(Db {
                url: u.to_owned(),
                label: format!("existing database {}", redact(u)),
                emb: None,
            });
        }
        env.mon.phase(format!(
            "starting a throwaway PostgreSQL ({})",
            if durable {
                "durable commits"
            } else {
                "fsync off"
            }
        ));
        let pg = EmbeddedPostgres::start_with(EmbeddedOptions {
            durable,
            max_connections: 200,
            ..Default::default()
        })
        .await
        .context("starting the embedded PostgreSQL")?;
        Ok(Db {
            url: pg.url().to_owned(),
            label: format!(
                "embedded PostgreSQL 127.0.0.1:{} ({})",
                pg.port(),
                if durable {
                    "durable: fsync, synchronous_commit, full_page_writes on"
                } else {
                    "non-durable: fsync off"
                }
            ),
            emb: Some(pg),
        })
    }

    /// Stops an embedded cluster.
    pub async fn close(mut self) {
        if let Some(pg) = self.emb.as_mut() {
            pg.stop().await;
        }
    }

    /// An admin connection.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        change_ingest::connect(&self.url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", redact(&self.url)))
    }

    /// Migrates, (re)creates `table` with the bench columns and enables it.
    pub async fn bench_table(&self, table: &str) -> anyhow::Result<()> {
        let c = self.connect().await?;
        change_ingest::migrate(&c)
            .await
            .map_err(|e| anyhow::anyhow!("migrating: {e}"))?;
        c.batch_execute(change_ingest::authz::SUPABASE_ROLES_SQL)
            .await
            .context("creating Supabase's API roles")?;
        c.batch_execute(&format!(
            "drop table if exists public.{table};
             create table public.{table} (id bigserial primary key, writer int not null,
               seq bigint not null, t bigint not null, pad text not null);"
        ))
        .await
        .with_context(|| format!("creating {table}"))?;
        change_ingest::enable_table(&c, &format!("public.{table}"))
            .await
            .map_err(|e| anyhow::anyhow!("enabling {table}: {e}"))?;
        Ok(())
    }
}

fn redact(url: &str) -> String {
    // postgres://user:password@host → postgres://user:***@host
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((u, _)) => format!("{}{u}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

pub(crate) async fn gateway_for(env: &Env, db: &Db) -> anyhow::Result<Target> {
    gateway_for_with(env, db, &[]).await
}

/// [`gateway_for`] with extra environment.
pub(crate) async fn gateway_for_with(
    env: &Env,
    db: &Db,
    extra: &[(String, String)],
) -> anyhow::Result<Target> {
    env.mon.phase("starting the gateway");
    let mut vars = vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("EMBEDDED_POSTGRES".into(), "off".into()),
    ];
    vars.extend_from_slice(extra);
    let t = env.gateway_with(&vars).await?;
    Ok(t)
}

// ---------------------------------------------------------------------------
// Subscribers

/// What a subscriber joined with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Binding {
    /// V2 config join, `postgres_changes:[{event:'*',schema:'public',table}]`.
    All,
    /// V2 config join with `filter: 'writer=eq.N'`.
    Eq(u32),
    /// V1 join on `realtime:*` without config (wscat style).
    Legacy,
}

impl Binding {
    fn label(self) -> &'static str {
        match self {
            Binding::All => "all-events (V2 config)",
            Binding::Eq(_) => "writer=eq.N (V2 config)",
            Binding::Legacy => "realtime:* (V1, no config)",
        }
    }
    fn matches(self, writer: u32) -> bool {
        match self {
            Binding::Eq(w) => w == writer,
            _ => true,
        }
    }
}

/// The binding mix: i % 3 → all-events, eq filter, `realtime:*`.
fn mix(i: usize, writers: u32) -> Binding {
    match i % 3 {
        0 => Binding::All,
        1 => Binding::Eq(((i / 3) as u32) % writers.max(1)),
        _ => Binding::Legacy,
    }
}

fn join_text(b: Binding, topic: &str, table: &str) -> (Vsn, String) {
    let pc = |filter: Option<String>| {
        let f = filter
            .map(|f| format!(r#","filter":"{f}""#))
            .unwrap_or_default();
        format!(
            r#"{{"config":{{"broadcast":{{"self":false,"ack":false}},"presence":{{"key":"","enabled":false}},"postgres_changes":[{{"event":"*","schema":"public","table":"{table}"{f}}}],"private":false}}}}"#
        )
    };
    match b {
        Binding::All => (
            Vsn::V2,
            format!(r#"["1","1","realtime:{topic}","phx_join",{}]"#, pc(None)),
        ),
        Binding::Eq(w) => (
            Vsn::V2,
            format!(
                r#"["1","1","realtime:{topic}","phx_join",{}]"#,
                pc(Some(format!("writer=eq.{w}")))
            ),
        ),
        Binding::Legacy => (
            Vsn::V1,
            r#"{"topic":"realtime:*","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#
                .to_owned(),
        ),
    }
}

/// Integrity facts of a delivered row (large-rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Check {
    /// Length of `pad` as delivered (None = left out).
    pad_len: Option<usize>,
    /// Hash of `pad` as delivered.
    pad_hash: u64,
    /// The event carried `Error 413: Payload Too Large`.
    too_large: bool,
    /// Bytes of the whole frame.
    frame_bytes: usize,
}

/// One delivered change.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rec {
    pub(crate) writer: u32,
    pub(crate) seq: u64,
    pub(crate) recv_ns: u64,
    check: Option<Check>,
}

/// One subscriber's deliveries, taken after each step.
#[derive(Debug, Default)]
struct SubBox {
    recs: Mutex<Vec<Rec>>,
}

/// Counters shared by all subscribers.
#[derive(Debug, Default)]
pub(crate) struct SubStats {
    pub(crate) joined: AtomicU64,
    pub(crate) join_failed: AtomicU64,
    pub(crate) subscribed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) system_errors: AtomicU64,
    pub(crate) received: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl SubStats {
    fn sample(&self, s: String) {
        let mut v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < 12 {
            v.push(s);
        }
    }
    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The number after `"key"` (Postgres' `json_object_agg` writes `"key" : 1`).
fn digits_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let mut at = memchr::memmem::find(frame, key)? + key.len();
    while at < frame.len() && matches!(frame[at], b' ' | b':') {
        at += 1;
    }
    let mut i = at;
    let mut v: u64 = 0;
    while i < frame.len() && frame[i].is_ascii_digit() {
        v = v.wrapping_mul(10).wrapping_add((frame[i] - b'0') as u64);
        i += 1;
    }
    (i > at).then_some(v)
}

fn find_key<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => {
            if let Some(x) = m.get(k) {
                return Some(x);
            }
            m.values().find_map(|x| find_key(x, k))
        }
        Value::Array(a) => a.iter().find_map(|x| find_key(x, k)),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct SubCfg {
    full: bool,
    heartbeat: Duration,
}

/// How one subscriber connects and what it sends to join.
#[derive(Debug, Clone)]
pub(crate) struct JoinSpec {
    pub(crate) ep: Endpoint,
    pub(crate) vsn: Vsn,
    /// The whole `phx_join` frame (ref and join_ref `"1"`).
    pub(crate) join: String,
}

/// Handles one complete text frame.
fn on_frame(frame: &[u8], now: u64, cfg: &SubCfg, bx: &SubBox, st: &SubStats, id: usize) {
    if let Some(at) = memchr::memmem::find(frame, b"\"record\":") {
        let rest = &frame[at..];
        if let (Some(w), Some(seq)) = (
            digits_after(rest, b"\"writer\""),
            digits_after(rest, b"\"seq\""),
        ) {
            let check = cfg.full.then(|| {
                let v: Value = serde_json::from_slice(frame).unwrap_or(Value::Null);
                let pad = find_key(&v, "record")
                    .and_then(|r| r.get("pad"))
                    .and_then(Value::as_str);
                Check {
                    pad_len: pad.map(str::len),
                    pad_hash: pad.map(|p| fnv(p.as_bytes())).unwrap_or(0),
                    too_large: memchr::memmem::find(frame, b"Error 413").is_some(),
                    frame_bytes: frame.len(),
                }
            });
            st.received.fetch_add(1, Ordering::Relaxed);
            bx.recs.lock().unwrap_or_else(|e| e.into_inner()).push(Rec {
                writer: w as u32,
                seq,
                recv_ns: now,
                check,
            });
            return;
        }
    }
    let Some(c) = proto::parse_control(frame) else {
        st.sample(format!(
            "client {id}: undecodable: {}",
            proto::excerpt(frame)
        ));
        return;
    };
    match c.event.as_str() {
        "phx_reply" if c.topic == "phoenix" => {}
        "phx_reply" if c.msg_ref.as_deref() == Some("1") => {
            if c.status() == Some("ok") {
                st.joined.fetch_add(1, Ordering::Relaxed);
                // Bindings the server refused come back as system errors.
            } else {
                st.join_failed.fetch_add(1, Ordering::Relaxed);
                st.sample(format!(
                    "client {id}: join refused: {}",
                    proto::excerpt(frame)
                ));
            }
        }
        "system" => {
            let text = String::from_utf8_lossy(frame);
            if text.contains("Subscribed to PostgreSQL") {
                st.subscribed.fetch_add(1, Ordering::Relaxed);
            } else {
                if text.contains("\"error\"") {
                    st.system_errors.fetch_add(1, Ordering::Relaxed);
                }
                st.sample(format!("client {id}: system: {}", proto::excerpt(frame)));
            }
        }
        "presence_state" | "presence_diff" => {}
        _ => st.sample(format!("client {id}: {}", proto::excerpt(frame))),
    }
}

async fn pg_subscriber(
    id: usize,
    spec: JoinSpec,
    cfg: Arc<SubCfg>,
    bx: Arc<SubBox>,
    st: Arc<SubStats>,
    stop: CancellationToken,
    gate: Arc<Semaphore>,
) {
    let JoinSpec { ep, vsn, join } = spec;
    let permit = gate.acquire_owned().await.ok();
    let (mut stream, mut buf) = match ws::connect(&ep, None, None, Duration::from_secs(30)).await {
        Ok(x) => x,
        Err(e) => {
            st.join_failed.fetch_add(1, Ordering::Relaxed);
            st.sample(format!("client {id}: connect: {e:#}"));
            return;
        }
    };
    drop(permit);
    let mut masks = MaskGen::new(id as u32 ^ 0x5bd1_e995);
    let mut out = Vec::with_capacity(512);
    ws::encode_frame(&mut out, op::TEXT, join.as_bytes(), Some(masks.next_key()));
    if let Err(e) = stream.write_all(&out).await {
        st.join_failed.fetch_add(1, Ordering::Relaxed);
        st.sample(format!("client {id}: sending join: {e}"));
        return;
    }
    let mut frag: Vec<u8> = Vec::new();
    let mut hb_ref = 1u64;
    let hb = tokio::time::sleep(cfg.heartbeat);
    tokio::pin!(hb);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = &mut hb => {
                hb.as_mut().reset(tokio::time::Instant::now() + cfg.heartbeat);
                hb_ref += 1;
                out.clear();
                let t = proto::heartbeat_text(vsn, hb_ref);
                ws::encode_frame(&mut out, op::TEXT, t.as_bytes(), Some(masks.next_key()));
                if stream.write_all(&out).await.is_err() {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            res = buf.read_from(&mut stream) => {
                let now = now_ns();
                match res {
                    Ok(0) | Err(_) => {
                        st.dropped.fetch_add(1, Ordering::Relaxed);
                        st.sample(format!("client {id}: connection lost: {res:?}"));
                        return;
                    }
                    Ok(_) => {}
                }
                let mut pos = 0;
                let mut pongs: Vec<Vec<u8>> = Vec::new();
                loop {
                    let f = match ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            st.dropped.fetch_add(1, Ordering::Relaxed);
                            st.sample(format!("client {id}: {e:#}"));
                            return;
                        }
                    };
                    let (s, e) = (pos + f.start, pos + f.end);
                    pos = e;
                    match f.opcode {
                        op::TEXT | op::BINARY | op::CONT => {
                            if f.opcode != op::CONT && f.fin {
                                on_frame(&buf.data[s..e], now, &cfg, &bx, &st, id);
                            } else {
                                if f.opcode != op::CONT {
                                    frag.clear();
                                }
                                frag.extend_from_slice(&buf.data[s..e]);
                                if f.fin {
                                    on_frame(&frag, now, &cfg, &bx, &st, id);
                                    frag.clear();
                                }
                            }
                        }
                        op::PING => {
                            let mut p = Vec::new();
                            ws::encode_frame(&mut p, op::PONG, &buf.data[s..e], Some(masks.next_key()));
                            pongs.push(p);
                        }
                        op::CLOSE => {
                            st.dropped.fetch_add(1, Ordering::Relaxed);
                            st.sample(format!("client {id}: close frame"));
                            return;
                        }
                        _ => {}
                    }
                }
                buf.consume(pos);
                if buf.filled == buf.data.len() {
                    // A large frame in progress: make room for it.
                    buf.reserve(buf.data.len());
                }
                for p in pongs {
                    if stream.write_all(&p).await.is_err() {
                        st.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    }
}

/// A set of subscribers.
#[derive(Debug)]
pub(crate) struct Subs {
    kinds: Vec<Binding>,
    boxes: Vec<Arc<SubBox>>,
    pub(crate) st: Arc<SubStats>,
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) join_secs: f64,
}

impl Subs {
    async fn connect(
        env: &Env,
        t: &Target,
        kinds: Vec<Binding>,
        table: &str,
        full: bool,
    ) -> anyhow::Result<Subs> {
        let (ep_v2, ep_v1) = (
            t.endpoint(Vsn::V2, env.c.apikey.as_deref()),
            t.endpoint(Vsn::V1, env.c.apikey.as_deref()),
        );
        let specs = kinds
            .iter()
            .map(|b| {
                let (vsn, join) = join_text(*b, &env.c.topic, table);
                let ep = if vsn == Vsn::V1 { &ep_v1 } else { &ep_v2 };
                JoinSpec {
                    ep: ep.clone(),
                    vsn,
                    join,
                }
            })
            .collect();
        let v2 = kinds.iter().filter(|b| **b != Binding::Legacy).count() as u64;
        let mut subs = Subs::connect_specs(env, specs, v2, full).await?;
        subs.kinds = kinds;
        Ok(subs)
    }

    /// Connects one subscriber per spec and waits until they joined and
    /// `confirmations` of them got "Subscribed to PostgreSQL".
    pub(crate) async fn connect_specs(
        env: &Env,
        specs: Vec<JoinSpec>,
        confirmations: u64,
        full: bool,
    ) -> anyhow::Result<Subs> {
        let cfg = Arc::new(SubCfg {
            full,
            heartbeat: Duration::from_secs(env.c.heartbeat_secs),
        });
        let st = Arc::new(SubStats::default());
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(env.c.connect_concurrency.max(1)));
        let boxes: Vec<Arc<SubBox>> = specs.iter().map(|_| Arc::default()).collect();
        let t0 = Instant::now();
        let n = specs.len() as u64;
        let handles = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                tokio::spawn(pg_subscriber(
                    i,
                    spec,
                    Arc::clone(&cfg),
                    Arc::clone(&boxes[i]),
                    Arc::clone(&st),
                    stop.clone(),
                    Arc::clone(&gate),
                ))
            })
            .collect();
        let v2 = confirmations;
        // Joined (or failed), then "Subscribed to PostgreSQL" on the V2 joins.
        let deadline = Instant::now() + Duration::from_secs(60);
        while SubStats::get(&st.joined) + SubStats::get(&st.join_failed) < n
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let joined = SubStats::get(&st.joined);
        let deadline = Instant::now() + Duration::from_secs(15);
        while SubStats::get(&st.subscribed) < v2.min(joined) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let join_secs = t0.elapsed().as_secs_f64();
        env.mon.note(format!(
            "{joined} of {n} subscribers joined, {} got \"Subscribed to PostgreSQL\" ({v2} V2 joins) in {join_secs:.1} s",
            SubStats::get(&st.subscribed)
        ));
        Ok(Subs {
            kinds: Vec::new(),
            boxes,
            st,
            stop,
            handles,
            join_secs,
        })
    }

    /// Each subscriber's deliveries since the last take.
    pub(crate) fn take(&self) -> Vec<Vec<Rec>> {
        self.boxes
            .iter()
            .map(|b| std::mem::take(&mut *b.recs.lock().unwrap_or_else(|e| e.into_inner())))
            .collect()
    }

    pub(crate) fn samples(&self) -> Vec<String> {
        self.st
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) async fn close(self) {
        self.stop.cancel();
        for h in self.handles {
            let _ = h.await;
        }
    }
}

// ---------------------------------------------------------------------------
// Writers

/// One writer connection.
#[derive(Debug)]
pub(crate) struct Writer {
    id: u32,
    client: tokio_postgres::Client,
    stmt: tokio_postgres::Statement,
    next_seq: u64,
}

/// What one writer did in a step: seqs `first..first+rows.len()`.
#[derive(Debug, Default, Clone)]
pub(crate) struct WStep {
    pub(crate) first: u64,
    /// (insert start ns, commit-return ns, pad hash, pad len) per row.
    pub(crate) rows: Vec<(u64, u64, u64, usize)>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

pub(crate) async fn writers(db: &Db, table: &str, n: u32) -> anyhow::Result<Vec<Writer>> {
    let mut v = Vec::new();
    for id in 0..n {
        let client = db.connect().await?;
        let stmt = client
            .prepare(&format!(
                "insert into public.{table} (writer, seq, t, pad) values ($1, $2, $3, $4)"
            ))
            .await
            .context("preparing the insert")?;
        v.push(Writer {
            id,
            client,
            stmt,
            next_seq: 0,
        });
    }
    Ok(v)
}

/// Pad text of a row: deterministic letters from (writer, seq), or `x`s.
fn make_pad(w: u32, seq: u64, len: usize, random: bool) -> String {
    if !random {
        return "x".repeat(len);
    }
    let mut x = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w as u64) << 40) | 1;
    let mut s = Vec::with_capacity(len);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(b'a' + (x % 26) as u8);
    }
    String::from_utf8(s).unwrap_or_default()
}

/// Runs every writer at `rate / writers` rows/s (0 = as fast as possible) for
/// `dur`, or until `max_rows` each. Returns the writers and what they did.
pub(crate) async fn write_step(
    ws: Vec<Writer>,
    rate: f64,
    dur: Duration,
    max_rows: Option<u64>,
    pad_len: usize,
    random_pad: bool,
) -> (Vec<Writer>, Vec<WStep>, f64) {
    let n = ws.len().max(1) as f64;
    let t0 = tokio::time::Instant::now();
    let end = t0 + dur;
    let started = Instant::now();
    let handles: Vec<_> = ws
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            tokio::spawn(async move {
                let interval = if rate > 0.0 {
                    Duration::from_secs_f64(n / rate)
                } else {
                    Duration::ZERO
                };
                let mut due = t0 + interval.mul_f64(i as f64 / n);
                let mut st = WStep {
                    first: w.next_seq,
                    ..WStep::default()
                };
                loop {
                    if max_rows.is_some_and(|m| st.rows.len() as u64 >= m) {
                        break;
                    }
                    if max_rows.is_none() && (due >= end || tokio::time::Instant::now() >= end) {
                        break;
                    }
                    if !interval.is_zero() {
                        tokio::time::sleep_until(due).await;
                        due += interval;
                    }
                    let seq = w.next_seq;
                    let pad = make_pad(w.id, seq, pad_len, random_pad);
                    let (h, l) = if random_pad {
                        (fnv(pad.as_bytes()), pad.len())
                    } else {
                        (0, pad.len())
                    };
                    let t = now_ns();
                    let res = w
                        .client
                        .execute(&w.stmt, &[&(w.id as i32), &(seq as i64), &(t as i64), &pad])
                        .await;
                    let c = now_ns();
                    match res {
                        Ok(_) => {
                            w.next_seq += 1;
                            st.rows.push((t, c, h, l));
                        }
                        Err(e) => {
                            st.errors += 1;
                            if st.first_error.is_none() {
                                st.first_error = Some(e.to_string());
                            }
                            if w.client.is_closed() {
                                break;
                            }
                            // Keep seqs dense: the failed seq is simply not used.
                        }
                    }
                }
                (w, st)
            })
        })
        .collect();
    let mut out_w = Vec::new();
    let mut out_s = Vec::new();
    for h in handles {
        if let Ok((w, s)) = h.await {
            out_w.push(w);
            out_s.push(s);
        }
    }
    out_w.sort_by_key(|w| w.id);
    // Steps are in writer-id order because writers were.
    (out_w, out_s, started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Analysis

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatMs {
    /// Samples.
    pub n: u64,
    /// p50.
    pub p50: f64,
    /// p95.
    pub p95: f64,
    /// p99.
    pub p99: f64,
    /// max.
    pub max: f64,
}

pub(crate) fn lat_of(h: &Histogram<u64>) -> LatMs {
    LatMs {
        n: h.len(),
        p50: pct(h, 0.5),
        p95: pct(h, 0.95),
        p99: pct(h, 0.99),
        max: if h.is_empty() {
            f64::NAN
        } else {
            h.max() as f64 / 1000.0
        },
    }
}

/// Deliveries of one binding kind in one step.
#[derive(Debug, Clone, Serialize, Default)]
pub struct KindAcc {
    /// Subscribers of this kind.
    pub subscribers: u64,
    /// Deliveries expected.
    pub expected: u64,
    /// First arrivals.
    pub delivered: u64,
    /// expected − delivered.
    pub lost: u64,
    /// Second arrivals of a (writer, seq).
    pub dups: u64,
    /// Subscribers that lost at least one change.
    pub subscribers_with_loss: u64,
}

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeStep {
    /// "supabase-shape", "warm-up", "ramp".
    pub kind: String,
    /// Offered changes/s.
    pub offered: f64,
    /// Rows committed per second (achieved).
    pub committed_per_sec: f64,
    /// Rows committed.
    pub rows: u64,
    /// Writer errors.
    pub writer_errors: u64,
    /// Subscribers.
    pub subscribers: u64,
    /// Deliveries/s (delivered ÷ step seconds).
    pub deliveries_per_sec: f64,
    /// All kinds.
    pub total: KindAcc,
    /// Per binding kind.
    pub by_binding: Vec<(String, KindAcc)>,
    /// Commit-return → receive.
    pub latency: LatMs,
    /// Insert start → receive (includes the INSERT round trip and commit).
    pub latency_from_insert_start: LatMs,
    /// Frames that arrived before the writer saw its COMMIT return (counted as 0 ms).
    pub arrived_before_commit_return: u64,
    /// Seconds waited after writing for stragglers.
    pub drain_secs: f64,
    /// Gateway CPU, cores.
    pub gateway_cpu: Option<f64>,
    /// This tool's CPU (writers + subscribers), cores.
    pub bench_cpu: Option<f64>,
    /// Gateway RSS at the end.
    pub gateway_rss_bytes: Option<u64>,
    /// Passed: nothing lost, p95 ≤ limit, ≥ 90% of the offered rate committed.
    pub pass: bool,
    /// Why it failed.
    pub why: String,
}

/// Waits until subscribers received `expected` frames (any), or no progress for
/// `idle`, or `max`.
pub(crate) async fn drain(
    st: &SubStats,
    base: u64,
    expected: u64,
    idle: Duration,
    max: Duration,
) -> f64 {
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        let got = SubStats::get(&st.received).saturating_sub(base);
        if got >= expected || t0.elapsed() >= max {
            break;
        }
        if got != last.1 {
            last = (Instant::now(), got);
        } else if last.0.elapsed() > idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed().as_secs_f64()
}

fn expected_for(b: Binding, steps: &[WStep]) -> u64 {
    steps
        .iter()
        .enumerate()
        .filter(|(w, _)| b.matches(*w as u32))
        .map(|(_, s)| s.rows.len() as u64)
        .sum()
}

/// Joins deliveries with commit times.
struct Joined {
    total: KindAcc,
    by: Vec<(Binding, KindAcc)>,
    hist: Histogram<u64>,
    hist_start: Histogram<u64>,
    early: u64,
}

fn join_step(kinds: &[Binding], recs: &[Vec<Rec>], steps: &[WStep]) -> Joined {
    let mut hist = new_hist();
    let mut hist_start = new_hist();
    let mut early = 0;
    let mut by: Vec<(Binding, KindAcc)> = Vec::new();
    let mut total = KindAcc::default();
    for (i, b) in kinds.iter().enumerate() {
        let key = match b {
            Binding::Eq(_) => Binding::Eq(0),
            x => *x,
        };
        let exp = expected_for(*b, steps);
        let mut seen: HashSet<(u32, u64)> = HashSet::with_capacity(exp as usize);
        let mut acc = KindAcc {
            subscribers: 1,
            expected: exp,
            ..KindAcc::default()
        };
        for r in recs.get(i).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(ws) = steps.get(r.writer as usize) else {
                continue;
            };
            if r.seq < ws.first || r.seq >= ws.first + ws.rows.len() as u64 {
                continue; // another step's row (late or early)
            }
            if !seen.insert((r.writer, r.seq)) {
                acc.dups += 1;
                continue;
            }
            acc.delivered += 1;
            let (t, c, _, _) = ws.rows[(r.seq - ws.first) as usize];
            if r.recv_ns < c {
                early += 1;
            }
            let _ = hist.record((r.recv_ns.saturating_sub(c) / 1000).max(1));
            let _ = hist_start.record((r.recv_ns.saturating_sub(t) / 1000).max(1));
        }
        acc.lost = acc.expected.saturating_sub(acc.delivered);
        acc.subscribers_with_loss = u64::from(acc.lost > 0);
        add(&mut total, &acc);
        match by.iter_mut().find(|(k, _)| *k == key) {
            Some((_, a)) => add(a, &acc),
            None => by.push((key, acc)),
        }
    }
    Joined {
        total,
        by,
        hist,
        hist_start,
        early,
    }
}

fn add(a: &mut KindAcc, b: &KindAcc) {
    a.subscribers += b.subscribers;
    a.expected += b.expected;
    a.delivered += b.delivered;
    a.lost += b.lost;
    a.dups += b.dups;
    a.subscribers_with_loss += b.subscribers_with_loss;
}

#[allow(clippy::too_many_arguments)]
async fn change_step(
    env: &Env,
    t: &Target,
    subs: &Subs,
    ws: Vec<Writer>,
    kind: &str,
    rate: f64,
    secs: f64,
    p95_limit_ms: f64,
    pad: usize,
) -> (Vec<Writer>, ChangeStep) {
    env.mon.phase(format!(
        "changes {kind}: {rate:.0} changes/s from {} writers to {} subscribers for {secs:.0} s",
        ws.len(),
        subs.kinds.len()
    ));
    let _ = subs.take();
    let base = SubStats::get(&subs.st.received);
    let me = std::process::id();
    let cpu0 = (t.pid.and_then(sys::cpu_secs), sys::cpu_secs(me));
    let (ws, steps, wall) =
        write_step(ws, rate, Duration::from_secs_f64(secs), None, pad, false).await;
    let cpu1 = (t.pid.and_then(sys::cpu_secs), sys::cpu_secs(me));
    let rows: u64 = steps.iter().map(|s| s.rows.len() as u64).sum();
    let expected: u64 = subs.kinds.iter().map(|b| expected_for(*b, &steps)).sum();
    let max_drain = Duration::from_secs_f64(if env.c.quick { 3.0 } else { 10.0 });
    let drain_secs = drain(
        &subs.st,
        base,
        expected,
        Duration::from_millis(1500),
        max_drain,
    )
    .await;
    let recs = subs.take();
    let j = join_step(&subs.kinds, &recs, &steps);
    let writer_errors: u64 = steps.iter().map(|s| s.errors).sum();
    let committed = rows as f64 / secs;
    let lat = lat_of(&j.hist);
    let mut why = Vec::new();
    if j.total.lost > 0 {
        why.push(format!("{} deliveries lost", j.total.lost));
    }
    if lat.p95.is_nan() || lat.p95 > p95_limit_ms {
        why.push(format!("p95 {:.1} ms > {p95_limit_ms} ms", lat.p95));
    }
    if committed < rate * 0.9 {
        why.push(format!(
            "writers committed only {committed:.0}/s of {rate:.0}/s offered"
        ));
    }
    if writer_errors > 0 {
        why.push(format!("{writer_errors} writer errors"));
    }
    let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a) / wall),
        _ => None,
    };
    let step = ChangeStep {
        kind: kind.to_owned(),
        offered: rate,
        committed_per_sec: committed,
        rows,
        writer_errors,
        subscribers: subs.kinds.len() as u64,
        deliveries_per_sec: j.total.delivered as f64 / secs,
        by_binding: j
            .by
            .iter()
            .map(|(b, a)| (b.label().to_owned(), a.clone()))
            .collect(),
        total: j.total,
        latency: lat,
        latency_from_insert_start: lat_of(&j.hist_start),
        arrived_before_commit_return: j.early,
        drain_secs,
        gateway_cpu: cpu(cpu0.0, cpu1.0),
        bench_cpu: cpu(cpu0.1, cpu1.1),
        gateway_rss_bytes: t.rss(),
        pass: why.is_empty(),
        why: why.join("; "),
    };
    if let Some(e) = steps.iter().find_map(|s| s.first_error.clone()) {
        env.mon.note(format!("writer error: {e}"));
    }
    env.mon.note(format!(
        "{kind} {rate:.0}/s: committed {committed:.0}/s, delivered {}/{} (lost {}, dups {}), p50 {:.1} p95 {:.1} p99 {:.1} ms → {}",
        step.total.delivered,
        step.total.expected,
        step.total.lost,
        step.total.dups,
        lat.p50,
        lat.p95,
        lat.p99,
        if step.pass { "pass".to_owned() } else { format!("FAIL ({})", step.why) }
    ));
    (ws, step)
}

fn step_line(s: &ChangeStep) -> String {
    let f = |x: Option<f64>| x.map(|c| format!("{c:.2}")).unwrap_or_else(|| "n/a".into());
    format!(
        "committed {:.0}/s ({} rows), {} subs, {:.0} deliveries/s, lost {} (subs with loss {}), dups {}, p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms, gw CPU {}, bench CPU {} → {}",
        s.committed_per_sec,
        s.rows,
        s.subscribers,
        s.deliveries_per_sec,
        s.total.lost,
        s.total.subscribers_with_loss,
        s.total.dups,
        s.latency.p50,
        s.latency.p95,
        s.latency.p99,
        s.latency.max,
        f(s.gateway_cpu),
        f(s.bench_cpu),
        if s.pass {
            "pass".to_owned()
        } else {
            format!("FAIL: {}", s.why)
        }
    )
}

// ---------------------------------------------------------------------------
// changes

/// Flags of `changes`.
#[derive(Debug, Clone)]
pub struct ChangesOpts {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// Subscribers at the Supabase shape.
    pub subscribers: Option<usize>,
    /// Rate at the Supabase shape.
    pub rate: f64,
    /// Seconds at the Supabase shape.
    pub hold_secs: Option<f64>,
    /// Writer connections.
    pub writers: u32,
    /// Subscribers during the ramp.
    pub ramp_subscribers: usize,
    /// Ramp rates.
    pub ramp: Option<Vec<f64>>,
    /// Seconds per ramp step.
    pub step_secs: Option<f64>,
    /// Ramp fails above this p95.
    pub p95_limit_ms: f64,
    /// `pad` bytes per row.
    pub pad: usize,
    /// Durable embedded cluster.
    pub durable: bool,
}

/// `changes`: commit → client latency at Supabase's shape, then a ramp.
pub async fn changes(env: &Env, o: ChangesOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("changes", env);
    let db = Db::open(env, o.database_url.as_deref(), o.durable).await?;
    let res = changes_inner(env, &o, &db, &mut r).await;
    db.close().await;
    res?;
    Ok(r)
}

async fn changes_inner(env: &Env, o: &ChangesOpts, db: &Db, r: &mut Report) -> anyhow::Result<()> {
    let quick = env.c.quick;
    let table = "bench_changes";
    db.bench_table(table).await?;
    let t = gateway_for(env, db).await?;
    r.target = format!("{}; {}", t.label, db.label);
    let mut ws = writers(db, table, o.writers).await?;
    let n = o.subscribers.unwrap_or(500);
    let hold = o.hold_secs.unwrap_or(if quick { 5.0 } else { 30.0 });
    let (n, capped) = env.capacity(&t, Some(n), 0);
    r.capped_by = Some(capped);

    // Phase 1: Supabase's shape.
    env.mon
        .phase(format!("changes: connecting {n} subscribers (binding mix)"));
    let kinds: Vec<Binding> = (0..n).map(|i| mix(i, o.writers)).collect();
    let subs = Subs::connect(env, &t, kinds, table, false).await?;
    let joined = SubStats::get(&subs.st.joined);
    if joined == 0 {
        let s = subs.samples();
        subs.close().await;
        bail!("no subscriber joined; samples: {s:?}");
    }
    let (w, warm) = change_step(env, &t, &subs, ws, "warm-up", o.rate, 2.0, 1e9, o.pad).await;
    ws = w;
    let (w, shape) = change_step(
        env,
        &t,
        &subs,
        ws,
        "supabase-shape",
        o.rate,
        hold,
        o.p95_limit_ms,
        o.pad,
    )
    .await;
    ws = w;
    let join_secs = subs.join_secs;
    let subscribed = SubStats::get(&subs.st.subscribed);
    let sys_err = SubStats::get(&subs.st.system_errors);
    let dropped1 = SubStats::get(&subs.st.dropped);
    let mut samples: Vec<String> = subs.samples();
    subs.close().await;
    if shape.total.delivered == 0 && warm.total.delivered == 0 {
        bail!("no change delivered; samples: {samples:?}");
    }

    // Phase 2: ramp with a few subscribers.
    let ramp_rates = o.ramp.clone().unwrap_or_else(|| {
        if quick {
            vec![1_000.0, 5_000.0]
        } else {
            vec![
                1_000.0, 2_000.0, 5_000.0, 10_000.0, 15_000.0, 20_000.0, 30_000.0, 50_000.0,
            ]
        }
    });
    let step_secs = o.step_secs.unwrap_or(if quick { 2.0 } else { 10.0 });
    let rk: Vec<Binding> = (0..o.ramp_subscribers).map(|i| mix(i, o.writers)).collect();
    env.mon
        .phase(format!("changes ramp: connecting {} subscribers", rk.len()));
    let subs = Subs::connect(env, &t, rk, table, false).await?;
    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    for rate in ramp_rates {
        let (w, s) = change_step(
            env,
            &t,
            &subs,
            ws,
            "ramp",
            rate,
            step_secs,
            o.p95_limit_ms,
            o.pad,
        )
        .await;
        ws = w;
        let pass = s.pass;
        if pass {
            best = Some(best.unwrap_or(0.0).max(s.committed_per_sec));
        }
        steps.push(s);
        if !pass {
            break;
        }
    }
    samples.extend(subs.samples().into_iter().map(|s| format!("ramp: {s}")));
    let dropped2 = SubStats::get(&subs.st.dropped);
    subs.close().await;
    drop(ws);
    // Change-log size, for context.
    let log_rows: Option<i64> = match db.connect().await {
        Ok(c) => c
            .query_one("select count(*) from realtime_gateway.change_log", &[])
            .await
            .ok()
            .map(|row| row.get(0)),
        Err(_) => None,
    };
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    t.stop().await;

    let by = |s: &ChangeStep| {
        s.by_binding
            .iter()
            .map(|(k, a)| {
                format!(
                    "{k}: {} subs, {}/{} delivered, lost {}, dups {}",
                    a.subscribers, a.delivered, a.expected, a.lost, a.dups
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    r.row(
        "subscribers",
        format!(
            "{joined} of {n} joined in {join_secs:.1} s; {subscribed} got \"Subscribed to PostgreSQL\"; {sys_err} system errors; {dropped1} dropped"
        ),
    );
    r.row(
        "writers",
        format!(
            "{} tokio-postgres connections, single-row autocommit INSERTs, pad {} B",
            o.writers, o.pad
        ),
    );
    r.row(
        &format!("shape {n} subs × {:.0}/s", o.rate),
        step_line(&shape),
    );
    r.row(
        "  commit-return → receive",
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} deliveries (goal p95 ≤ 10 ms; Supabase 184–238 ms)",
            shape.latency.p50, shape.latency.p95, shape.latency.p99, shape.latency.max, shape.latency.n
        ),
    );
    r.row(
        "  insert start → receive",
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms ({} frames arrived before the writer saw COMMIT return; counted as 0 ms)",
            shape.latency_from_insert_start.p50,
            shape.latency_from_insert_start.p95,
            shape.latency_from_insert_start.p99,
            shape.arrived_before_commit_return
        ),
    );
    r.row("  per binding", by(&shape));
    for s in &steps {
        r.row(&format!("ramp {:.0}/s", s.offered), step_line(s));
    }
    r.row(
        "max sustained, no loss",
        match best {
            Some(b) => format!(
                "{b:.0} changes/s committed and delivered to {} subscribers with no loss, p95 ≤ {} ms (goal ≥ 10k){}",
                o.ramp_subscribers,
                o.p95_limit_ms,
                if steps.last().is_some_and(|s| s.pass) {
                    " — every ramp step passed; the ramp ended, not the gateway"
                } else {
                    ""
                }
            ),
            None => "no ramp step passed".into(),
        },
    );
    if let Some(first_fail) = steps.iter().find(|s| !s.pass) {
        r.row(
            "first failing step",
            format!("{:.0}/s: {}", first_fail.offered, first_fail.why),
        );
    }
    r.row(
        "change_log rows at end",
        log_rows
            .map(|n| n.to_string())
            .unwrap_or_else(|| "n/a".into()),
    );
    if dropped2 > 0 {
        r.notes.push(format!(
            "{dropped2} ramp subscribers dropped their connection"
        ));
    }
    r.notes.push(
        "latency = subscriber holding the whole frame − the writer's single-row INSERT (autocommit) returning, both CLOCK_MONOTONIC; joined by (writer, seq) in process".into(),
    );
    r.notes.push(format!(
        "binding mix: i%3 = 0 all-events V2 config join, 1 `writer=eq.N` V2 (N = (i/3) mod {}), 2 V1 `realtime:*` without config",
        o.writers
    ));
    r.samples = samples;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![
        ("p50".into(), Vec::new()),
        ("p95".into(), Vec::new()),
        ("p99".into(), Vec::new()),
    ];
    for s in &steps {
        series[0].1.push((s.committed_per_sec, s.latency.p50));
        series[1].1.push((s.committed_per_sec, s.latency.p95));
        series[2].1.push((s.committed_per_sec, s.latency.p99));
    }
    series.push((
        format!("p95 at {n} subs × {:.0}/s", o.rate),
        vec![(shape.committed_per_sec, shape.latency.p95)],
    ));
    r.plot = Some(Plot::Xy {
        x_desc: format!(
            "changes/s committed (ramp: {} subscribers)",
            o.ramp_subscribers
        ),
        y_desc: "commit-return → receive, ms (log)".into(),
        log_y: true,
        series,
    });
    r.results = json!({
        "subscribers": n,
        "joined": joined,
        "writers": o.writers,
        "supabase_shape": shape,
        "warm_up": warm,
        "ramp": steps,
        "ramp_subscribers": o.ramp_subscribers,
        "max_sustained_changes_per_sec_no_loss": best,
        "p95_limit_ms": o.p95_limit_ms,
        "change_log_rows_at_end": log_rows,
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// writer-cost

/// Flags of `writer-cost`.
#[derive(Debug, Clone)]
pub struct WriterCostOpts {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// Rounds of (plain, enabled).
    pub rounds: Option<u32>,
    /// Seconds per phase.
    pub secs: Option<f64>,
    /// Client connections.
    pub clients: u32,
    /// Durable embedded cluster (default true).
    pub durable: bool,
}

async fn insert_load(db: &Db, table: &str, clients: u32, secs: f64) -> anyhow::Result<(u64, u64)> {
    let mut handles = Vec::new();
    for _ in 0..clients {
        let c = db.connect().await?;
        let stmt = c
            .prepare(&format!("insert into public.{table} (body) values ($1)"))
            .await?;
        handles.push(async move { (c, stmt) });
    }
    let mut conns = Vec::new();
    for h in handles {
        conns.push(h.await);
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, stmt)| {
            tokio::spawn(async move {
                let (mut ok, mut err) = (0u64, 0u64);
                while Instant::now() < end {
                    match c.execute(&stmt, &[&"writer-cost benchmark row"]).await {
                        Ok(_) => ok += 1,
                        Err(_) => err += 1,
                    }
                }
                (ok, err)
            })
        })
        .collect();
    let (mut ok, mut err) = (0, 0);
    for t in tasks {
        if let Ok((a, b)) = t.await {
            ok += a;
            err += b;
        }
    }
    Ok((ok, err))
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct CostRound {
    /// Round number.
    pub round: u32,
    /// Plain table tps.
    pub tps_plain: f64,
    /// Enabled table tps.
    pub tps_enabled: f64,
    /// enabled ÷ plain.
    pub ratio: f64,
    /// Errors.
    pub errors: u64,
}

/// `writer-cost`: enabled ÷ plain single-row INSERT tps, alternated.
pub async fn writer_cost(env: &Env, o: WriterCostOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("writer-cost", env);
    let db = Db::open(env, o.database_url.as_deref(), o.durable).await?;
    let res = writer_cost_inner(env, &o, &db, &mut r).await;
    db.close().await;
    res?;
    Ok(r)
}

async fn writer_cost_inner(
    env: &Env,
    o: &WriterCostOpts,
    db: &Db,
    r: &mut Report,
) -> anyhow::Result<()> {
    let quick = env.c.quick;
    let c = db.connect().await?;
    change_ingest::migrate(&c)
        .await
        .map_err(|e| anyhow::anyhow!("migrating: {e}"))?;
    c.batch_execute(
        "drop table if exists public.bench_plain, public.bench_enabled;
         create table public.bench_plain (id bigserial primary key, body text not null, created_at timestamptz not null default now());
         create table public.bench_enabled (id bigserial primary key, body text not null, created_at timestamptz not null default now());",
    )
    .await
    .context("creating bench_plain/bench_enabled")?;
    change_ingest::enable_table(&c, "public.bench_enabled")
        .await
        .map_err(|e| anyhow::anyhow!("enabling bench_enabled: {e}"))?;
    let t = gateway_for(env, db).await?;
    r.target = format!("{}; {}", t.label, db.label);
    // The listener must be live.
    let mut listener = 0i64;
    for _ in 0..50 {
        listener = c
            .query_one(
                "select count(*) from pg_stat_activity where application_name = $1",
                &[&change_ingest::LISTENER_APPLICATION_NAME],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(0);
        if listener > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let durable: String = c
        .query_one(
            "select current_setting('fsync') || '/' || current_setting('synchronous_commit')",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or_default();
    let rounds = o.rounds.unwrap_or(if quick { 2 } else { 4 });
    let secs = o.secs.unwrap_or(if quick { 4.0 } else { 10.0 });
    env.mon.phase("writer-cost: warm-up (2 × 1 s)");
    insert_load(db, "bench_plain", o.clients, 1.0).await?;
    insert_load(db, "bench_enabled", o.clients, 1.0).await?;
    let log0: i64 = c
        .query_one("select count(*) from realtime_gateway.change_log", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(0);
    let mut out = Vec::new();
    for i in 1..=rounds {
        env.mon
            .phase(format!("writer-cost round {i}/{rounds}: plain {secs:.0} s"));
        let (p, pe) = insert_load(db, "bench_plain", o.clients, secs).await?;
        env.mon.phase(format!(
            "writer-cost round {i}/{rounds}: enabled {secs:.0} s"
        ));
        let (e, ee) = insert_load(db, "bench_enabled", o.clients, secs).await?;
        let rd = CostRound {
            round: i,
            tps_plain: p as f64 / secs,
            tps_enabled: e as f64 / secs,
            ratio: if p > 0 { e as f64 / p as f64 } else { f64::NAN },
            errors: pe + ee,
        };
        env.mon.note(format!(
            "round {i}: plain {:.0} tps, enabled {:.0} tps, ratio {:.3}",
            rd.tps_plain, rd.tps_enabled, rd.ratio
        ));
        out.push(rd);
    }
    let log1: i64 = c
        .query_one("select count(*) from realtime_gateway.change_log", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(0);
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    let gw_rss = t.rss();
    t.stop().await;
    if out
        .iter()
        .all(|x| x.tps_plain == 0.0 && x.tps_enabled == 0.0)
    {
        bail!("no insert committed");
    }
    let mut ratios: Vec<f64> = out
        .iter()
        .map(|x| x.ratio)
        .filter(|x| x.is_finite())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = if ratios.is_empty() {
        f64::NAN
    } else if ratios.len() % 2 == 1 {
        ratios[ratios.len() / 2]
    } else {
        (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0
    };
    r.row(
        "load",
        format!(
            "{} tokio-postgres clients, single-row autocommit INSERT (prepared), {rounds} rounds × (plain {secs:.0} s, enabled {secs:.0} s)",
            o.clients
        ),
    );
    r.row(
        "database",
        format!("fsync/synchronous_commit = {durable}; gateway listener connections: {listener}"),
    );
    for x in &out {
        r.row(
            &format!("round {}", x.round),
            format!(
                "plain {:.0} tps, enabled {:.0} tps, ratio {:.3}{}",
                x.tps_plain,
                x.tps_enabled,
                x.ratio,
                if x.errors > 0 {
                    format!(" ({} errors)", x.errors)
                } else {
                    String::new()
                }
            ),
        );
    }
    r.row(
        "median ratio",
        format!("{median:.3} (goal ≥ 0.8; a per-row NOTIFY trigger gets ~0.12)"),
    );
    r.row(
        "change_log rows captured",
        format!("{} during the rounds", log1 - log0),
    );
    r.row("gateway RSS at end", mib(gw_rss));
    if listener == 0 {
        r.notes
            .push("no realtime_gateway_listener connection seen in pg_stat_activity".into());
    }
    r.plot = Some(Plot::Xy {
        x_desc: "round".into(),
        y_desc: "transactions/s".into(),
        log_y: false,
        series: vec![
            (
                "plain".into(),
                out.iter().map(|x| (x.round as f64, x.tps_plain)).collect(),
            ),
            (
                "enabled".into(),
                out.iter()
                    .map(|x| (x.round as f64, x.tps_enabled))
                    .collect(),
            ),
        ],
    });
    r.results = json!({
        "clients": o.clients,
        "secs_per_phase": secs,
        "rounds": out,
        "median_ratio": median,
        "durable": durable,
        "listener_connections": listener,
        "change_log_rows_captured": log1 - log0,
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// large-rows

/// Flags of `large-rows`.
#[derive(Debug, Clone)]
pub struct LargeRowsOpts {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// Row sizes (bytes of the text column).
    pub sizes: Vec<usize>,
    /// Seconds of paced inserts per size.
    pub secs: Option<f64>,
    /// Paced rate budget in MiB/s (rows/s = this ÷ size, at most 50/s).
    pub mib_per_sec: f64,
    /// Rows per writer in the unpaced burst.
    pub burst_mib: f64,
}

/// One size's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// Bytes of `pad`.
    pub size: usize,
    /// "paced" or "burst".
    pub phase: String,
    /// Offered rows/s (0 = unpaced).
    pub offered_rows_per_sec: f64,
    /// Rows committed.
    pub rows: u64,
    /// Rows delivered.
    pub delivered: u64,
    /// Delivered whole with the right length and hash.
    pub intact: u64,
    /// Delivered with `Error 413: Payload Too Large` and the column left out.
    pub too_large: u64,
    /// Delivered but wrong (neither intact nor a 413).
    pub corrupt: u64,
    /// Not delivered.
    pub lost: u64,
    /// Duplicates.
    pub dups: u64,
    /// Delivered rows/s: delivered ÷ (last receive − first insert start).
    pub rows_per_sec: f64,
    /// MiB/s of pad delivered.
    pub mib_per_sec: f64,
    /// Frame size seen (max).
    pub frame_bytes: usize,
    /// Commit-return → receive.
    pub latency: LatMs,
}

/// `large-rows`: 10 KB, 100 KB, 1 MiB rows delivered intact (or flagged 413).
pub async fn large_rows(env: &Env, o: LargeRowsOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("large-rows", env);
    let db = Db::open(env, o.database_url.as_deref(), false).await?;
    let res = large_inner(env, &o, &db, &mut r).await;
    db.close().await;
    res?;
    Ok(r)
}

async fn large_inner(env: &Env, o: &LargeRowsOpts, db: &Db, r: &mut Report) -> anyhow::Result<()> {
    let quick = env.c.quick;
    let table = "bench_large";
    db.bench_table(table).await?;
    let t = gateway_for(env, db).await?;
    r.target = format!("{}; {}", t.label, db.label);
    let max_record = env
        .c
        .gateway_env
        .iter()
        .find_map(|kv| kv.strip_prefix("MAX_RECORD_BYTES="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1 << 20);
    let subs = Subs::connect(env, &t, vec![Binding::All], table, true).await?;
    if SubStats::get(&subs.st.joined) == 0 {
        let s = subs.samples();
        subs.close().await;
        bail!("the subscriber did not join: {s:?}");
    }
    let mut ws = writers(db, table, 4).await?;
    let secs = o.secs.unwrap_or(if quick { 2.0 } else { 10.0 });
    let mut out = Vec::new();
    for &size in &o.sizes {
        // Paced, one writer.
        let rate = (o.mib_per_sec * 1048576.0 / size as f64).clamp(0.5, 50.0);
        let one = ws.split_off(1);
        let (w1, s) = large_phase(env, &subs, ws, size, "paced", rate, secs, None).await;
        ws = w1;
        ws.extend(one);
        out.push(s);
        // Burst: 4 writers, as fast as they go, ~burst_mib in total.
        let per = ((o.burst_mib * 1048576.0 / size as f64) / ws.len() as f64)
            .ceil()
            .max(2.0) as u64;
        let per = if quick { per.min(10) } else { per };
        let (w2, s) = large_phase(env, &subs, ws, size, "burst", 0.0, 0.0, Some(per)).await;
        ws = w2;
        out.push(s);
    }
    let samples = subs.samples();
    let dropped = SubStats::get(&subs.st.dropped);
    subs.close().await;
    drop(ws);
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    let rss = t.rss();
    t.stop().await;
    if out.iter().all(|s| s.delivered == 0) {
        bail!("no row delivered; samples: {samples:?}");
    }
    r.row(
        "setup",
        format!(
            "1 subscriber (V2, all events on public.{table}); rows with a text column of random letters; gateway MAX_RECORD_BYTES = {max_record} (rows whose JSON exceeds it arrive with errors [\"Error 413: Payload Too Large\", …] and the large column left out)"
        ),
    );
    for s in &out {
        let human = if s.size >= 1 << 20 {
            format!("{:.0} MiB", s.size as f64 / 1048576.0)
        } else {
            format!("{:.0} KB", s.size as f64 / 1000.0)
        };
        let offered = if s.offered_rows_per_sec > 0.0 {
            format!("{:.1} rows/s offered", s.offered_rows_per_sec)
        } else {
            "4 writers unpaced".into()
        };
        r.row(
            &format!("{human} {}", s.phase),
            format!(
                "{offered}: {} rows, delivered {} (intact {}, 413 {}, corrupt {}, lost {}, dups {}), {:.1} rows/s = {:.1} MiB/s, frame {} B, p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms",
                s.rows,
                s.delivered,
                s.intact,
                s.too_large,
                s.corrupt,
                s.lost,
                s.dups,
                s.rows_per_sec,
                s.mib_per_sec,
                s.frame_bytes,
                s.latency.p50,
                s.latency.p95,
                s.latency.p99,
                s.latency.max
            ),
        );
    }
    r.row("gateway RSS at end", mib(rss));
    if dropped > 0 {
        r.notes.push(format!(
            "the subscriber dropped its connection {dropped} time(s)"
        ));
    }
    r.samples = samples;
    let paced: Vec<&SizeResult> = out.iter().filter(|s| s.phase == "paced").collect();
    r.plot = Some(Plot::Xy {
        x_desc: "row size, KiB".into(),
        y_desc: "commit-return → receive, ms (log), paced".into(),
        log_y: true,
        series: vec![
            (
                "p50".into(),
                paced
                    .iter()
                    .map(|s| (s.size as f64 / 1024.0, s.latency.p50))
                    .collect(),
            ),
            (
                "p99".into(),
                paced
                    .iter()
                    .map(|s| (s.size as f64 / 1024.0, s.latency.p99))
                    .collect(),
            ),
        ],
    });
    r.results = json!({
        "max_record_bytes": max_record,
        "sizes": out,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn large_phase(
    env: &Env,
    subs: &Subs,
    ws: Vec<Writer>,
    size: usize,
    phase: &str,
    rate: f64,
    secs: f64,
    max_rows: Option<u64>,
) -> (Vec<Writer>, SizeResult) {
    env.mon.phase(format!(
        "large-rows {size} B {phase}: {} writer(s){}",
        ws.len(),
        if rate > 0.0 {
            format!(", {rate:.1} rows/s for {secs:.0} s")
        } else {
            format!(", {} rows each", max_rows.unwrap_or(0))
        }
    ));
    let _ = subs.take();
    let base = SubStats::get(&subs.st.received);
    let (ws, steps, _) = write_step(
        ws,
        rate,
        Duration::from_secs_f64(secs),
        max_rows,
        size,
        true,
    )
    .await;
    let rows: u64 = steps.iter().map(|s| s.rows.len() as u64).sum();
    let _ = drain(
        &subs.st,
        base,
        rows,
        Duration::from_secs(3),
        Duration::from_secs(if env.c.quick { 5 } else { 20 }),
    )
    .await;
    let recs = subs.take();
    let recs = recs.into_iter().next().unwrap_or_default();
    let mut seen = HashSet::new();
    let mut hist = new_hist();
    let (mut delivered, mut intact, mut too_large, mut corrupt, mut dups) = (0, 0, 0, 0, 0);
    let mut frame_bytes = 0;
    let mut last_recv = 0u64;
    let mut bytes = 0u64;
    for rec in &recs {
        let Some(wsx) = steps.get(rec.writer as usize) else {
            continue;
        };
        if rec.seq < wsx.first || rec.seq >= wsx.first + wsx.rows.len() as u64 {
            continue;
        }
        if !seen.insert((rec.writer, rec.seq)) {
            dups += 1;
            continue;
        }
        delivered += 1;
        let (_, c, h, l) = wsx.rows[(rec.seq - wsx.first) as usize];
        let _ = hist.record((rec.recv_ns.saturating_sub(c) / 1000).max(1));
        last_recv = last_recv.max(rec.recv_ns);
        if let Some(ck) = rec.check {
            frame_bytes = frame_bytes.max(ck.frame_bytes);
            if ck.pad_len == Some(l) && ck.pad_hash == h {
                intact += 1;
                bytes += l as u64;
            } else if ck.too_large && ck.pad_len.is_none() {
                too_large += 1;
            } else {
                corrupt += 1;
            }
        }
    }
    let first_start = steps
        .iter()
        .filter_map(|s| s.rows.first().map(|x| x.0))
        .min()
        .unwrap_or(0);
    let span = last_recv.saturating_sub(first_start) as f64 / 1e9;
    let rps = if span > 0.0 {
        delivered as f64 / span
    } else {
        0.0
    };
    let res = SizeResult {
        size,
        phase: phase.to_owned(),
        offered_rows_per_sec: rate,
        rows,
        delivered,
        intact,
        too_large,
        corrupt,
        lost: rows.saturating_sub(delivered),
        dups,
        rows_per_sec: rps,
        mib_per_sec: if span > 0.0 {
            bytes as f64 / span / 1048576.0
        } else {
            0.0
        },
        frame_bytes,
        latency: lat_of(&hist),
    };
    env.mon.note(format!(
        "{size} B {phase}: {rows} rows, delivered {delivered} (intact {intact}, 413 {too_large}, corrupt {corrupt}), {rps:.1} rows/s, p50 {:.1} ms p99 {:.1} ms",
        res.latency.p50, res.latency.p99
    ));
    (ws, res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_both_json_styles() {
        let compact = br#"{"record":{"id":1,"writer":3,"seq":42,"t":5,"pad":"x"}}"#;
        let pg = br#"{"record":{ "id" : 1, "writer" : 3, "seq" : 42, "t" : 5 }}"#;
        for f in [&compact[..], &pg[..]] {
            assert_eq!(digits_after(f, b"\"writer\""), Some(3));
            assert_eq!(digits_after(f, b"\"seq\""), Some(42));
        }
    }

    #[test]
    fn joins_are_valid_json() {
        for b in [Binding::All, Binding::Eq(7), Binding::Legacy] {
            let (_, text) = join_text(b, "bench", "bench_changes");
            let c = proto::parse_control(text.as_bytes()).expect("valid frame");
            assert_eq!(c.event, "phx_join");
            if b == Binding::Eq(7) {
                assert_eq!(
                    c.payload["config"]["postgres_changes"][0]["filter"],
                    "writer=eq.7"
                );
            }
        }
    }

    #[test]
    fn pads_are_deterministic() {
        let a = make_pad(1, 9, 1000, true);
        assert_eq!(a, make_pad(1, 9, 1000, true));
        assert_ne!(a, make_pad(1, 10, 1000, true));
        assert!(a.bytes().all(|b| b.is_ascii_lowercase()));
    }
}
