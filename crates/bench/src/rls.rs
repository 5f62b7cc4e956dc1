//! `rls`: Postgres Changes under row level security, against the same
//! deliveries without RLS, in one run.
//!
//! - Subscribers: `U` users (role `authenticated`, `sub` = their uuid, a
//!   `team` claim; teams of `T`) and `A` anon, **each with its own JWT**
//!   (signed here, verified by the gateway started with `API_JWT_SECRET`),
//!   all on one topic with one INSERT binding on `public.bench_rls`.
//! - Rows: writers insert `(writer, seq)`; generated columns give each row
//!   `team = k % (U/T)` and `user_id = uuid(k % U)` with `k = seq·W + writer`,
//!   so who may see a row is known without reading it back.
//! - Policies, each measured twice:
//!   - **team** `team = (auth.jwt()->>'team')::int` (each row has T readers);
//!   - **owner** `user_id = auth.uid()` (one reader per row);
//!   - **off**: RLS disabled, and each user's binding carries the equivalent
//!     `eq` filter (anon: a filter nothing matches), so the same rows reach
//!     the same subscribers and the ratio is the cost of authorization alone.
//! - Ramp: rows/s on a ladder; a step passes with 0 leaked (a row delivered
//!   to someone who may not see it), 0 lost, 0 duplicated, p95 ≤ the limit
//!   and ≥ 90% of the offered rate committed. Headline per policy: the best
//!   passing step's deliveries/s with RLS, and its ratio to the best without.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::pg::{
    drain, gateway_for_with, lat_of, write_step, writers, Db, JoinSpec, LatMs, Rec, SubStats, Subs,
    WStep, Writer,
};
use crate::proto::Vsn;
use crate::report::{Plot, Report};
use crate::stats::new_hist;
use crate::sys;
use crate::target::Target;
use crate::workloads::Env;

const TABLE: &str = "bench_rls";
const TOPIC: &str = "bench-rls";
/// HS256 secret the started gateway verifies with (a throwaway, like the database).
const SECRET: &str = "realtime-bench-rls-secret-with-at-least-32-characters";

/// Flags of `rls`.
#[derive(Debug, Clone)]
pub struct RlsOpts {
    /// `--database-url`.
    pub database_url: Option<String>,
    /// Distinct users.
    pub users: usize,
    /// Anon subscribers.
    pub anon: usize,
    /// Users per team.
    pub team_size: usize,
    /// Writer connections.
    pub writers: u32,
    /// Seconds per step.
    pub step_secs: f64,
    /// Team ramp, rows/s.
    pub team_ramp: Vec<f64>,
    /// Owner ramp, rows/s.
    pub owner_ramp: Vec<f64>,
    /// Step fails above this p95 (ms).
    pub p95_limit_ms: f64,
    /// Policies to measure (`team`, `owner`).
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Team,
    Owner,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Team => "team",
            Policy::Owner => "owner",
        }
    }
}

/// The shape of the run (fixed at table creation: the generated columns use it).
#[derive(Debug, Clone, Copy)]
struct Shape {
    users: usize,
    anon: usize,
    team_size: usize,
    writers: u32,
}

impl Shape {
    fn teams(&self) -> usize {
        (self.users / self.team_size).max(1)
    }
    fn k(&self, writer: u32, seq: u64) -> u64 {
        seq * u64::from(self.writers) + u64::from(writer)
    }
    /// Which group of readers a row belongs to (team or user index).
    fn group_of_row(&self, p: Policy, writer: u32, seq: u64) -> usize {
        let k = self.k(writer, seq);
        match p {
            Policy::Team => (k % self.teams() as u64) as usize,
            Policy::Owner => (k % self.users as u64) as usize,
        }
    }
    /// Subscriber `i`'s group, `None` for anon.
    fn group_of_sub(&self, p: Policy, i: usize) -> Option<usize> {
        (i < self.users).then(|| match p {
            Policy::Team => (i / self.team_size).min(self.teams() - 1),
            Policy::Owner => i,
        })
    }
    fn groups(&self, p: Policy) -> usize {
        match p {
            Policy::Team => self.teams(),
            Policy::Owner => self.users,
        }
    }
}

fn uuid_of(u: usize) -> String {
    format!("00000000-0000-4000-8000-{u:012}")
}

fn sign(claims: serde_json::Value) -> anyhow::Result<String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .context("signing a JWT")
}

/// One JWT per subscriber: users first, then anon.
fn tokens(s: &Shape) -> anyhow::Result<Vec<String>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(s.users + s.anon);
    for u in 0..s.users {
        out.push(sign(json!({
            "role": "authenticated", "aud": "authenticated", "sub": uuid_of(u),
            "team": ((u / s.team_size).min(s.teams() - 1)).to_string(),
            "iat": now, "exp": now + 86_400, "jti": format!("u{u}"),
        }))?);
    }
    for a in 0..s.anon {
        out.push(sign(json!({
            "role": "anon", "iss": "realtime-bench", "iat": now, "exp": now + 86_400,
            "jti": format!("a{a}"),
        }))?);
    }
    Ok(out)
}

/// The join of subscriber `i`: no filter under RLS, the equivalent `eq` filter without.
fn join_spec(t: &Target, s: &Shape, p: Policy, rls: bool, i: usize, token: &str) -> JoinSpec {
    let filter = (!rls).then(|| match (p, s.group_of_sub(p, i)) {
        (Policy::Team, Some(g)) => format!("team=eq.{g}"),
        (Policy::Team, None) => "team=eq.-1".to_owned(),
        (Policy::Owner, Some(u)) => format!("user_id=eq.{}", uuid_of(u)),
        (Policy::Owner, None) => "user_id=eq.ffffffff-ffff-4fff-8fff-ffffffffffff".to_owned(),
    });
    let f = filter
        .map(|f| format!(r#","filter":"{f}""#))
        .unwrap_or_default();
    JoinSpec {
        ep: t.endpoint(Vsn::V2, Some(token)),
        vsn: Vsn::V2,
        join: format!(
            r#"["1","1","realtime:{TOPIC}","phx_join",{{"config":{{"broadcast":{{"self":false,"ack":false}},"presence":{{"key":"","enabled":false}},"postgres_changes":[{{"event":"INSERT","schema":"public","table":"{TABLE}"{f}}}],"private":false}},"access_token":"{token}"}}]"#
        ),
    }
}

async fn setup(db: &Db, s: &Shape) -> anyhow::Result<()> {
    let c = db.connect().await?;
    change_ingest::migrate(&c)
        .await
        .map_err(|e| anyhow::anyhow!("migrating: {e}"))?;
    c.batch_execute(change_ingest::authz::SUPABASE_ROLES_SQL)
        .await
        .context("creating Supabase's API roles")?;
    let (w, teams, users) = (s.writers, s.teams(), s.users);
    c.batch_execute(&format!(
        "drop table if exists public.{TABLE};
         create table public.{TABLE} (
           id bigserial primary key, writer int not null, seq bigint not null, t bigint not null,
           pad text not null,
           team int generated always as (((seq * {w} + writer) % {teams})::int) stored,
           user_id uuid generated always as (('00000000-0000-4000-8000-'
             || lpad(((seq * {w} + writer) % {users})::text, 12, '0'))::uuid) stored);"
    ))
    .await
    .context("creating the table")?;
    change_ingest::enable_table(&c, &format!("public.{TABLE}"))
        .await
        .map_err(|e| anyhow::anyhow!("enabling {TABLE}: {e}"))?;
    Ok(())
}

/// Sets the table up for one phase: RLS with the policy, or no RLS.
async fn configure(db: &Db, p: Policy, rls: bool) -> anyhow::Result<()> {
    let c = db.connect().await?;
    let policy = match p {
        Policy::Team => "team = (auth.jwt() ->> 'team')::int",
        Policy::Owner => "user_id = auth.uid()",
    };
    let sql = if rls {
        format!(
            "drop policy if exists bench on public.{TABLE};
             create policy bench on public.{TABLE} for select to authenticated using ({policy});
             alter table public.{TABLE} enable row level security;"
        )
    } else {
        format!(
            "drop policy if exists bench on public.{TABLE};
             alter table public.{TABLE} disable row level security;"
        )
    };
    c.batch_execute(&sql)
        .await
        .context("configuring the phase")?;
    Ok(())
}

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RlsStep {
    /// `team` or `owner`.
    pub policy: String,
    /// Whether RLS was on (else eq filters).
    pub rls: bool,
    /// Offered rows/s.
    pub offered_rows: f64,
    /// Rows committed per second.
    pub committed_per_sec: f64,
    /// Rows committed.
    pub rows: u64,
    /// Deliveries expected (rows × readers).
    pub expected: u64,
    /// First arrivals of expected rows.
    pub delivered: u64,
    /// Deliveries/s (delivered ÷ step seconds).
    pub deliveries_per_sec: f64,
    /// Expected but not received.
    pub lost: u64,
    /// Received by a subscriber that may not see the row.
    pub leaked: u64,
    /// Second arrivals.
    pub dups: u64,
    /// Anon deliveries (all leaks).
    pub anon_received: u64,
    /// Commit-return → receive.
    pub latency: LatMs,
    /// Gateway CPU, cores.
    pub gateway_cpu: Option<f64>,
    /// This tool's CPU, cores.
    pub bench_cpu: Option<f64>,
    /// Postgres CPU (all its processes), cores, when known.
    pub postgres_cpu: Option<f64>,
    /// Seconds waited for stragglers.
    pub drain_secs: f64,
    /// Writer errors.
    pub writer_errors: u64,
    /// Passed.
    pub pass: bool,
    /// Why not.
    pub why: String,
}

/// Joins one step's deliveries with what each subscriber may see.
fn analyze(
    s: &Shape,
    p: Policy,
    recs: &[Vec<Rec>],
    steps: &[WStep],
) -> (RlsStep, hdrhistogram::Histogram<u64>) {
    let mut per_group = vec![0u64; s.groups(p)];
    for (w, st) in steps.iter().enumerate() {
        for i in 0..st.rows.len() as u64 {
            per_group[s.group_of_row(p, w as u32, st.first + i)] += 1;
        }
    }
    let mut hist = new_hist();
    let (mut expected, mut delivered, mut leaked, mut dups, mut anon) = (0, 0, 0, 0, 0);
    for (i, rs) in recs.iter().enumerate() {
        let g = s.group_of_sub(p, i);
        let exp = g.map_or(0, |g| per_group[g]);
        expected += exp;
        let mut seen: HashSet<(u32, u64)> = HashSet::with_capacity(exp as usize);
        for r in rs {
            let Some(ws) = steps.get(r.writer as usize) else {
                continue;
            };
            if r.seq < ws.first || r.seq >= ws.first + ws.rows.len() as u64 {
                continue; // another step's row
            }
            if g != Some(s.group_of_row(p, r.writer, r.seq)) {
                leaked += 1;
                anon += u64::from(g.is_none());
                continue;
            }
            if !seen.insert((r.writer, r.seq)) {
                dups += 1;
                continue;
            }
            delivered += 1;
            let c = ws.rows[(r.seq - ws.first) as usize].1;
            let _ = hist.record((r.recv_ns.saturating_sub(c) / 1000).max(1));
        }
    }
    let rows: u64 = steps.iter().map(|s| s.rows.len() as u64).sum();
    let step = RlsStep {
        policy: p.name().into(),
        rls: false,
        offered_rows: 0.0,
        committed_per_sec: 0.0,
        rows,
        expected,
        delivered,
        deliveries_per_sec: 0.0,
        lost: expected.saturating_sub(delivered),
        leaked,
        dups,
        anon_received: anon,
        latency: lat_of(&hist),
        gateway_cpu: None,
        bench_cpu: None,
        postgres_cpu: None,
        drain_secs: 0.0,
        writer_errors: steps.iter().map(|s| s.errors).sum(),
        pass: false,
        why: String::new(),
    };
    (step, hist)
}

/// CPU seconds of every process whose command line starts with `postgres`.
fn postgres_cpu_secs() -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let exe = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if exe.ends_with(b"postgres") || exe.starts_with(b"postgres:") {
            if let Some(c) = sys::cpu_secs(pid) {
                total += c;
                any = true;
            }
        }
    }
    any.then_some(total)
}

#[allow(clippy::too_many_arguments)]
async fn rls_step(
    env: &Env,
    t: &Target,
    s: &Shape,
    subs: &Subs,
    ws: Vec<Writer>,
    p: Policy,
    rls: bool,
    rate: f64,
    secs: f64,
    p95_limit_ms: f64,
) -> (Vec<Writer>, RlsStep) {
    env.mon.phase(format!(
        "rls {} {}: {rate:.0} rows/s for {secs:.0} s",
        p.name(),
        if rls { "RLS" } else { "off (eq filters)" }
    ));
    let _ = subs.take();
    let base = SubStats::get(&subs.st.received);
    let me = std::process::id();
    let cpu0 = (
        t.pid.and_then(sys::cpu_secs),
        sys::cpu_secs(me),
        postgres_cpu_secs(),
    );
    let (ws, steps, wall) =
        write_step(ws, rate, Duration::from_secs_f64(secs), None, 16, false).await;
    let cpu1 = (
        t.pid.and_then(sys::cpu_secs),
        sys::cpu_secs(me),
        postgres_cpu_secs(),
    );
    let readers = match p {
        Policy::Team => s.team_size as u64,
        Policy::Owner => 1,
    };
    let rows: u64 = steps.iter().map(|s| s.rows.len() as u64).sum();
    let max_drain = Duration::from_secs_f64(if env.c.quick { 3.0 } else { 10.0 });
    let drain_secs = drain(
        &subs.st,
        base,
        rows * readers,
        Duration::from_millis(1500),
        max_drain,
    )
    .await;
    let recs = subs.take();
    let (mut step, _) = analyze(s, p, &recs, &steps);
    let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a) / wall),
        _ => None,
    };
    step.rls = rls;
    step.offered_rows = rate;
    step.committed_per_sec = rows as f64 / secs;
    step.deliveries_per_sec = step.delivered as f64 / secs;
    step.gateway_cpu = cpu(cpu0.0, cpu1.0);
    step.bench_cpu = cpu(cpu0.1, cpu1.1);
    step.postgres_cpu = cpu(cpu0.2, cpu1.2);
    step.drain_secs = drain_secs;
    let mut why = Vec::new();
    if step.leaked > 0 {
        why.push(format!(
            "{} leaked ({} to anon)",
            step.leaked, step.anon_received
        ));
    }
    if step.lost > 0 {
        why.push(format!("{} lost", step.lost));
    }
    if step.dups > 0 {
        why.push(format!("{} duplicated", step.dups));
    }
    if step.latency.p95.is_nan() || step.latency.p95 > p95_limit_ms {
        why.push(format!(
            "p95 {:.1} ms > {p95_limit_ms} ms",
            step.latency.p95
        ));
    }
    if step.committed_per_sec < rate * 0.9 {
        why.push(format!(
            "writers committed only {:.0}/s of {rate:.0}/s offered",
            step.committed_per_sec
        ));
    }
    if step.writer_errors > 0 {
        why.push(format!("{} writer errors", step.writer_errors));
    }
    step.pass = why.is_empty();
    step.why = why.join("; ");
    if let Some(e) = steps.iter().find_map(|s| s.first_error.clone()) {
        env.mon.note(format!("writer error: {e}"));
    }
    env.mon.note(step_line(&step));
    (ws, step)
}

fn step_line(s: &RlsStep) -> String {
    let f = |x: Option<f64>| x.map(|c| format!("{c:.2}")).unwrap_or_else(|| "n/a".into());
    format!(
        "{} {} {:.0} rows/s: committed {:.0}/s, {:.0} deliveries/s, {}/{} delivered, lost {}, leaked {} (anon {}), dups {}, p50 {:.1} / p95 {:.1} / p99 {:.1} ms, CPU gw {} pg {} bench {} → {}",
        s.policy,
        if s.rls { "RLS" } else { "off" },
        s.offered_rows,
        s.committed_per_sec,
        s.deliveries_per_sec,
        s.delivered,
        s.expected,
        s.lost,
        s.leaked,
        s.anon_received,
        s.dups,
        s.latency.p50,
        s.latency.p95,
        s.latency.p99,
        f(s.gateway_cpu),
        f(s.postgres_cpu),
        f(s.bench_cpu),
        if s.pass { "pass".to_owned() } else { format!("FAIL: {}", s.why) }
    )
}

/// `rls`: see the module docs.
pub async fn rls(env: &Env, o: RlsOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("rls", env);
    let db = Db::open(env, o.database_url.as_deref(), false).await?;
    let res = rls_inner(env, &o, &db, &mut r).await;
    db.close().await;
    res?;
    Ok(r)
}

async fn rls_inner(env: &Env, o: &RlsOpts, db: &Db, r: &mut Report) -> anyhow::Result<()> {
    let shape = Shape {
        users: o.users.max(1),
        anon: o.anon,
        team_size: o.team_size.clamp(1, o.users.max(1)),
        writers: o.writers.max(1),
    };
    let policies: Vec<Policy> = o
        .policies
        .iter()
        .map(|p| match p.as_str() {
            "team" => Ok(Policy::Team),
            "owner" => Ok(Policy::Owner),
            x => Err(anyhow::anyhow!("unknown policy {x:?} (team, owner)")),
        })
        .collect::<Result<_, _>>()?;
    env.mon.phase("rls: creating the table and the tokens");
    setup(db, &shape).await?;
    let jwts = tokens(&shape)?;
    let t = gateway_for_with(env, db, &[("API_JWT_SECRET".into(), SECRET.into())]).await?;
    r.target = format!("{}; {}", t.label, db.label);
    let n = shape.users + shape.anon;
    let (fit, capped) = env.capacity(&t, Some(n), 0);
    if fit < n {
        bail!("only {fit} of {n} subscribers fit ({capped})");
    }
    r.capped_by = Some(capped);
    let mut ws = writers(db, TABLE, shape.writers).await?;
    let mut all: Vec<RlsStep> = Vec::new();
    let mut samples = Vec::new();
    let mut phases = Vec::new();
    for &p in &policies {
        let ramp = match p {
            Policy::Team => &o.team_ramp,
            Policy::Owner => &o.owner_ramp,
        };
        // Off first, then RLS: the same rows reach the same subscribers.
        for rls in [false, true] {
            configure(db, p, rls).await?;
            // The gateway re-reads grants and policies within a second.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            env.mon.phase(format!(
                "rls {} {}: connecting {n} subscribers, each with its own JWT",
                p.name(),
                if rls { "RLS" } else { "off" }
            ));
            let specs = (0..n)
                .map(|i| join_spec(&t, &shape, p, rls, i, &jwts[i]))
                .collect();
            let started = Instant::now();
            let subs = Subs::connect_specs(env, specs, n as u64, false).await?;
            let joined = SubStats::get(&subs.st.joined);
            let subscribed = SubStats::get(&subs.st.subscribed);
            if subscribed < n as u64 {
                let s = subs.samples();
                subs.close().await;
                bail!("only {subscribed} of {n} subscribers got \"Subscribed to PostgreSQL\"; samples: {s:?}");
            }
            let mut best: Option<RlsStep> = None;
            for &rate in ramp {
                let (w, step) = rls_step(
                    env,
                    &t,
                    &shape,
                    &subs,
                    ws,
                    p,
                    rls,
                    rate,
                    o.step_secs,
                    o.p95_limit_ms,
                )
                .await;
                ws = w;
                let pass = step.pass;
                if pass {
                    best = Some(step.clone());
                }
                all.push(step);
                if !pass {
                    break;
                }
            }
            let sys_errors = SubStats::get(&subs.st.system_errors);
            let dropped = SubStats::get(&subs.st.dropped);
            samples.extend(
                subs.samples()
                    .into_iter()
                    .map(|s| format!("{} {}: {s}", p.name(), if rls { "RLS" } else { "off" })),
            );
            subs.close().await;
            phases.push(json!({
                "policy": p.name(), "rls": rls, "joined": joined, "subscribed": subscribed,
                "join_secs": started.elapsed().as_secs_f64(), "system_errors": sys_errors,
                "dropped": dropped, "best": best,
            }));
        }
    }
    drop(ws);
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    t.stop().await;

    r.row(
        "subscribers",
        format!(
            "{} users (role authenticated, teams of {}) + {} anon, each with its own HS256 JWT verified by the gateway; one INSERT binding each on public.{TABLE}",
            shape.users, shape.team_size, shape.anon
        ),
    );
    r.row(
        "writers",
        format!(
            "{} tokio-postgres connections, single-row autocommit INSERTs",
            shape.writers
        ),
    );
    for s in &all {
        r.row(
            &format!(
                "{} {} {:.0} rows/s",
                s.policy,
                if s.rls { "RLS" } else { "off" },
                s.offered_rows
            ),
            step_line(s),
        );
    }
    let best_of = |p: Policy, rls: bool| {
        all.iter()
            .filter(|s| s.policy == p.name() && s.rls == rls && s.pass)
            .max_by(|a, b| a.deliveries_per_sec.total_cmp(&b.deliveries_per_sec))
    };
    let mut headline = serde_json::Map::new();
    for &p in &policies {
        let (on, off) = (best_of(p, true), best_of(p, false));
        let ratio = match (on, off) {
            (Some(a), Some(b)) if b.deliveries_per_sec > 0.0 => {
                Some(a.deliveries_per_sec / b.deliveries_per_sec)
            }
            _ => None,
        };
        let leaked: u64 = all
            .iter()
            .filter(|s| s.policy == p.name())
            .map(|s| s.leaked)
            .sum();
        let capped = |rls: bool| {
            let last = all
                .iter()
                .rev()
                .find(|s| s.policy == p.name() && s.rls == rls);
            match last {
                Some(s) if s.pass => {
                    " (every step passed: the ramp ended, not the gateway)".to_owned()
                }
                Some(s) => format!(" (next step failed: {})", s.why),
                None => String::new(),
            }
        };
        let line = |s: Option<&RlsStep>| {
            s.map(|s| {
                format!(
                    "{:.0} deliveries/s ({:.0} rows/s), p95 {:.1} ms",
                    s.deliveries_per_sec, s.committed_per_sec, s.latency.p95
                )
            })
            .unwrap_or_else(|| "no step passed".into())
        };
        r.row(
            &format!("{} policy, RLS", p.name()),
            format!("{}{}", line(on), capped(true)),
        );
        r.row(
            &format!("{} policy, off + eq filters", p.name()),
            format!("{}{}", line(off), capped(false)),
        );
        r.row(
            &format!("{} ratio RLS ÷ off", p.name()),
            format!(
                "{} (goal ≥ 0.5); leaked over every step: {leaked}",
                ratio
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "n/a".into())
            ),
        );
        headline.insert(
            p.name().into(),
            json!({"rls": on, "off": off, "ratio": ratio, "leaked_total": leaked}),
        );
    }
    r.notes.push(
        "latency = subscriber holding the whole frame − the writer's single-row INSERT (autocommit) returning, both CLOCK_MONOTONIC".into(),
    );
    r.notes.push(format!(
        "load average at end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    ));
    r.samples = samples;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for &p in &policies {
        for rls in [false, true] {
            series.push((
                format!("{} {} p95", p.name(), if rls { "RLS" } else { "off" }),
                all.iter()
                    .filter(|s| s.policy == p.name() && s.rls == rls)
                    .map(|s| (s.deliveries_per_sec, s.latency.p95))
                    .collect(),
            ));
        }
    }
    r.plot = Some(Plot::Xy {
        x_desc: "authorized deliveries/s".into(),
        y_desc: "commit-return → receive p95, ms (log)".into(),
        log_y: true,
        series,
    });
    let leaked: u64 = all.iter().map(|s| s.leaked).sum();
    if env.c.quick && leaked > 0 {
        // A leak is a correctness failure, not a figure: the smoke run fails on it.
        bail!("{leaked} rows reached subscribers who may not see them");
    }
    r.results = json!({
        "users": shape.users, "anon": shape.anon, "team_size": shape.team_size,
        "writers": shape.writers, "step_secs": o.step_secs, "p95_limit_ms": o.p95_limit_ms,
        "headline": headline, "phases": phases, "steps": all,
    });
    Ok(())
}
