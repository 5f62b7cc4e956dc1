//! The workloads: `ceiling`, `broadcast`, `idle`, `slow-consumers` (the Postgres
//! ones, `changes`, `writer-cost`, `large-rows`, live in `pg.rs`).
//!
//! Each returns a [`Report`]; `main` prints and saves it. Postgres workloads
//! (`changes`, `writer-cost`, `large-rows`) plug in the same way: a function
//! taking [`Env`] and returning a `Report`, with a `Target` that also starts
//! a database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::client::{self, ClientCfg, Ctl, Publisher};
use crate::monitor::Monitor;
use crate::proto::Vsn;
use crate::report::{mib, Report};
use crate::stats::{Stats, StepAcc};
use crate::sys::{self, FdLimit};
use crate::target::Target;
use crate::Common;

/// Shared by all workloads.
#[derive(Debug)]
pub struct Env {
    /// Common flags.
    pub c: Common,
    /// File-descriptor limits after raising.
    pub fd: FdLimit,
    /// Progress display.
    pub mon: Arc<Monitor>,
    /// Where the gateway log goes.
    pub log_dir: std::path::PathBuf,
    /// Stem of the output files.
    pub stem: String,
    /// `SO_RCVBUF` of slow readers (slow-consumers).
    pub slow_rcvbuf: Option<u32>,
}

impl Env {
    /// Starts the gateway (or attaches to `--gateway-url`) for a throughput
    /// workload: its one publisher socket is trusted, so the per-client and
    /// gateway-wide event rates are raised (they would cap the publisher, not
    /// measure the fan-out). `flood` measures the limits at their defaults. An
    /// external gateway (`--gateway-url`) needs the same settings to compare.
    pub async fn gateway(&self) -> anyhow::Result<Target> {
        let raised = [
            ("CLIENT_MAX_EVENTS_PER_SECOND", "1000000000"),
            ("TENANT_MAX_EVENTS_PER_SECOND", "1000000000"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        self.gateway_with(&raised).await
    }

    /// Starts the gateway with `extra` environment (before `--gateway-env`,
    /// which overrides it), or attaches to `--gateway-url`.
    pub async fn gateway_with(&self, extra: &[(String, String)]) -> anyhow::Result<Target> {
        self.gateway_logged(extra, "gateway").await
    }

    /// [`Env::gateway_with`], logging to `<stem>.<log_name>.log` (one file per replica).
    pub async fn gateway_logged(
        &self,
        extra: &[(String, String)],
        log_name: &str,
    ) -> anyhow::Result<Target> {
        if let Some(url) = self.c.gateway_url.first() {
            return Target::external(url, self.c.gateway_pid).await;
        }
        let bin = self
            .c
            .gateway_bin
            .clone()
            .unwrap_or_else(crate::target::default_gateway_bin);
        let env: Vec<(String, String)> = extra
            .iter()
            .cloned()
            .chain(self.c.gateway_env.iter().filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            }))
            .collect();
        let log = self.log_dir.join(format!("{}.{log_name}.log", self.stem));
        let mut t = Target::spawn_gateway(&bin, &log, &env).await?;
        if self.c.gateway_pid.is_some() {
            t.pid = self.c.gateway_pid;
        }
        Ok(t)
    }

    fn client_cfg(&self, t: &Target, vsn: Vsn, seq_mod: u64, n: usize) -> ClientCfg {
        let ports = sys::ephemeral_ports() as usize;
        let per_source = 50_000.min(ports.saturating_sub(1_000)).max(1_000);
        let loopback = t.addr.ip().is_loopback();
        let sources = if loopback && n > per_source {
            client::loopback_sources(n / per_source + 1)
        } else {
            Vec::new()
        };
        ClientCfg {
            ep: t.endpoint(vsn, self.c.apikey.as_deref()),
            vsn,
            topic: self.c.topic.clone(),
            sources,
            per_source,
            heartbeat: Duration::from_secs(self.c.heartbeat_secs),
            join_timeout: Duration::from_secs(30),
            seq_mod,
            slow_rcvbuf: self.slow_rcvbuf,
        }
    }

    /// How many client connections fit, and what capped it.
    pub fn capacity(
        &self,
        t: &Target,
        want: Option<usize>,
        default_headroom: usize,
    ) -> (usize, String) {
        // This process: clients + publisher + a few files/listeners.
        let ours = (self.fd.soft as usize).saturating_sub(64 + 2);
        let theirs = t
            .pid
            .and_then(sys::nofile_of)
            .map(|n| (n as usize).saturating_sub(64));
        let mut reason = format!(
            "RLIMIT_NOFILE: this process soft={} hard={} (raised from {})",
            self.fd.soft, self.fd.hard, self.fd.soft_before
        );
        let mut cap = ours;
        if let Some(g) = theirs {
            reason.push_str(&format!("; server process limit {}", g + 64));
            cap = cap.min(g);
        }
        match want {
            Some(w) if w <= cap => (w, format!("requested {w}; fits ({reason})")),
            Some(w) => (
                cap,
                format!("requested {w}, capped at {cap} by the file-descriptor limit ({reason})"),
            ),
            None => {
                let n = cap.saturating_sub(default_headroom).max(1);
                (
                    n,
                    format!("default: as many as fit the file-descriptor limit less {default_headroom} headroom = {n} ({reason})"),
                )
            }
        }
    }
}

/// Readers connected to one target.
#[derive(Debug)]
pub struct Readers {
    /// Signals.
    pub ctl: Ctl,
    /// Stats of normal readers.
    pub fast: Arc<Stats>,
    /// Stats of slow readers (slow-consumers only).
    pub slow: Arc<Stats>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Joined clients.
    pub joined: u64,
    /// Seconds from the first connect to the last join.
    pub ramp_secs: f64,
    /// (seconds, joined, server RSS bytes) samples during the ramp.
    pub ramp_series: Vec<(f64, u64, Option<u64>)>,
}

impl Readers {
    /// Connects `n` readers and waits until each joined or failed.
    pub async fn connect(
        env: &Env,
        t: &Target,
        n: usize,
        seq_mod: u64,
        slow: impl Fn(usize) -> bool,
    ) -> anyhow::Result<Readers> {
        let cfg = Arc::new(env.client_cfg(t, env.c.vsn, seq_mod, n));
        let ctl = Ctl::default();
        let fast = Arc::new(Stats::new());
        let slowst = Arc::new(Stats::new());
        env.mon
            .watch(vec![Arc::clone(&fast), Arc::clone(&slowst)], t.pid);
        let gate = Arc::new(Semaphore::new(env.c.connect_concurrency.max(1)));
        let start = Instant::now();
        let handles = client::spawn_subscribers(0, n, &cfg, &fast, &slowst, &ctl, &gate, slow);
        let mut series = Vec::new();
        let done = |s: &Stats| {
            Stats::get(&s.joined) + Stats::get(&s.connect_errors) + Stats::get(&s.join_errors)
        };
        let mut last_progress = (Instant::now(), 0u64);
        loop {
            let d = done(&fast) + done(&slowst);
            let joined = Stats::get(&fast.joined) + Stats::get(&slowst.joined);
            series.push((start.elapsed().as_secs_f64(), joined, t.rss()));
            if d >= n as u64 {
                break;
            }
            if d != last_progress.1 {
                last_progress = (Instant::now(), d);
            } else if last_progress.0.elapsed() > Duration::from_secs(60) {
                env.mon.note(format!(
                    "connect ramp stalled at {d}/{n} for 60 s; going on"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ramp_secs = start.elapsed().as_secs_f64();
        let joined = Stats::get(&fast.joined) + Stats::get(&slowst.joined);
        let errs = Stats::get(&fast.connect_errors)
            + Stats::get(&fast.join_errors)
            + Stats::get(&slowst.connect_errors)
            + Stats::get(&slowst.join_errors);
        if errs > 0 {
            env.mon.note(format!(
                "{errs} of {n} clients failed to connect/join; first: {:?}",
                fast.samples().first()
            ));
        }
        Ok(Readers {
            ctl,
            fast,
            slow: slowst,
            handles,
            joined,
            ramp_secs,
            ramp_series: series,
        })
    }

    /// Readers still connected.
    pub fn alive(&self) -> u64 {
        self.joined - Stats::get(&self.fast.dropped) - Stats::get(&self.slow.dropped)
    }

    /// Closes every reader.
    pub async fn close(self) {
        self.ctl.shutdown.cancel();
        for h in self.handles {
            let _ = h.await;
        }
    }
}

pub(crate) fn pct(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Lat {
    /// Samples.
    pub n: u64,
    /// p50 ms.
    pub p50: f64,
    /// p95 ms.
    pub p95: f64,
    /// p99 ms.
    pub p99: f64,
    /// max ms.
    pub max: f64,
}

impl Lat {
    pub(crate) fn of(acc: &StepAcc) -> Lat {
        Lat {
            n: acc.hist.len(),
            p50: pct(&acc.hist, 0.50),
            p95: pct(&acc.hist, 0.95),
            p99: pct(&acc.hist, 0.99),
            max: if acc.hist.is_empty() {
                f64::NAN
            } else {
                acc.hist.max() as f64 / 1000.0
            },
        }
    }
}

/// The ceiling probe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    /// Readers joined.
    pub readers: u64,
    /// Frames per write syscall.
    pub batch: u64,
    /// Measured window in seconds.
    pub window_secs: f64,
    /// Frames delivered per second, all readers.
    pub deliveries_per_sec: f64,
    /// Payload MiB/s.
    pub mib_per_sec: f64,
    /// Gaps seen (should be 0).
    pub gaps: u64,
    /// Readers that dropped.
    pub dropped: u64,
    /// Ceiling server RSS at the end.
    pub server_rss_bytes: Option<u64>,
}

/// Runs the ceiling probe on `n` readers for `secs`.
pub async fn ceiling_probe(
    env: &Env,
    n: usize,
    secs: f64,
    batch: u64,
) -> anyhow::Result<CeilingResult> {
    env.mon.phase(format!(
        "ceiling: starting the reference server, connecting {n} readers"
    ));
    let log = env.log_dir.join(format!("{}.ceiling.log", env.stem));
    let t = Target::spawn_ceiling(&log, env.c.msg_bytes, &env.c.topic).await?;
    let readers = Readers::connect(env, &t, n, crate::ceiling::POOL, |_| false).await?;
    if readers.joined == 0 {
        bail!(
            "ceiling: no reader joined; first error: {:?}",
            readers.fast.samples().first()
        );
    }
    env.mon.phase(format!(
        "ceiling: blasting {secs:.1} s, {batch} frames per write"
    ));
    let ms = (secs * 1000.0) as u64;
    let (st, body) = t.http_get(&format!("/blast?ms={ms}&batch={batch}")).await?;
    if st != 200 {
        bail!("ceiling /blast answered {st}: {body}");
    }
    let t0 = Instant::now();
    // Measure from 20% into the blast to 95% of it.
    let from = Duration::from_secs_f64(secs * 0.2);
    let to = Duration::from_secs_f64(secs * 0.95);
    tokio::time::sleep(from).await;
    let (d0, b0) = readers.fast.delivered();
    let t_a = t0.elapsed();
    tokio::time::sleep(to.saturating_sub(t0.elapsed())).await;
    let (d1, b1) = readers.fast.delivered();
    let window = (t0.elapsed() - t_a).as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(secs * 0.05 + 0.3)).await;
    let (gaps, _) = readers.fast.gaps_dups();
    let res = CeilingResult {
        readers: readers.joined,
        batch,
        window_secs: window,
        deliveries_per_sec: (d1 - d0) as f64 / window,
        mib_per_sec: (b1 - b0) as f64 / window / 1048576.0,
        gaps,
        dropped: Stats::get(&readers.fast.dropped),
        server_rss_bytes: t.rss(),
    };
    if d1 == 0 {
        bail!(
            "ceiling: no frame delivered; samples: {:?}",
            readers.fast.samples()
        );
    }
    readers.close().await;
    t.stop().await;
    env.mon.note(format!(
        "ceiling: {:.0} deliveries/s ({:.1} MiB/s) on {} readers",
        res.deliveries_per_sec, res.mib_per_sec, res.readers
    ));
    Ok(res)
}

/// `ceiling` alone.
pub async fn ceiling(
    env: &Env,
    subscribers: Option<usize>,
    secs: Option<f64>,
    batch: u64,
) -> anyhow::Result<Report> {
    let n = subscribers.unwrap_or(if env.c.quick { 500 } else { 10_000 });
    let n = n.min((env.fd.soft as usize).saturating_sub(100));
    let secs = secs.unwrap_or(if env.c.quick { 2.0 } else { 5.0 });
    let res = ceiling_probe(env, n, secs, batch).await?;
    let mut r = Report::new("ceiling", env);
    r.row("readers", res.readers.to_string());
    r.row("frames per write", res.batch.to_string());
    r.row("deliveries/s", format!("{:.0}", res.deliveries_per_sec));
    r.row("MiB/s", format!("{:.1}", res.mib_per_sec));
    r.row("gaps", res.gaps.to_string());
    r.row("readers dropped", res.dropped.to_string());
    r.results = json!({ "ceiling": res });
    Ok(r)
}

/// One ramp step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Step number (the `s` tag).
    pub step: u32,
    /// Why it ran: "ramp", "refine", "80%".
    pub kind: &'static str,
    /// Offered msgs/s.
    pub offered_rate: f64,
    /// Achieved msgs/s.
    pub sent_rate: f64,
    /// Messages sent.
    pub sent: u64,
    /// Readers alive at the end of the step.
    pub readers: u64,
    /// Offered deliveries/s (sent rate × readers).
    pub offered_deliveries_per_sec: f64,
    /// Deliveries counted for this step.
    pub delivered: u64,
    /// Deliveries expected (sent × readers).
    pub expected: u64,
    /// expected − delivered after draining.
    pub lost: u64,
    /// Gaps in seq seen by readers.
    pub gaps: u64,
    /// Duplicates / out-of-order arrivals.
    pub dups: u64,
    /// Latency.
    pub latency: Lat,
    /// Seconds waited after sending for stragglers.
    pub drain_secs: f64,
    /// Server RSS at the end of the step.
    pub server_rss_bytes: Option<u64>,
    /// Server CPU use while sending, in cores (1.0 = one core busy).
    pub server_cpu: Option<f64>,
    /// This tool's CPU use while sending, in cores.
    pub bench_cpu: Option<f64>,
    /// Passed (p99 within the limit, nothing lost, rate achieved).
    pub pass: bool,
}

async fn drain(
    readers: &Readers,
    stats: &[&Arc<Stats>],
    step: u32,
    expected: u64,
    max: Duration,
) -> (StepAcc, f64) {
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        let delivered: u64 = stats.iter().map(|s| s.step(step).delivered).sum();
        if delivered >= expected || t0.elapsed() >= max {
            break;
        }
        if delivered != last.1 {
            last = (Instant::now(), delivered);
        } else if last.0.elapsed() > Duration::from_millis(1000) {
            break;
        }
        let _ = readers;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acc = stats[0].step(step);
    for s in &stats[1..] {
        let o = s.step(step);
        let _ = acc.hist.add(&o.hist);
        acc.delivered += o.delivered;
        acc.gaps += o.gaps;
        acc.dups += o.dups;
    }
    (acc, t0.elapsed().as_secs_f64())
}

/// Next rate on the 1-2-5 ladder above `r`.
pub(crate) fn next_125(r: f64) -> f64 {
    let mut d = 10f64.powf(r.log10().floor());
    loop {
        for m in [1.0, 2.0, 5.0] {
            if m * d > r * 1.0001 {
                return m * d;
            }
        }
        d *= 10.0;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    env: &Env,
    t: &Target,
    readers: &Readers,
    publ: &mut Publisher,
    step: u32,
    kind: &'static str,
    rate: f64,
    hold: Duration,
    p99_limit_ms: f64,
) -> anyhow::Result<Step> {
    env.mon.phase(format!(
        "step {step} ({kind}): {rate:.0} msgs/s × {} readers = {:.0} deliveries/s offered",
        readers.alive(),
        rate * readers.alive() as f64
    ));
    let me = std::process::id();
    let cpu0 = (
        t.pid.and_then(sys::cpu_secs),
        sys::cpu_secs(me),
        Instant::now(),
    );
    let sent = publ.run(rate, hold, step).await?;
    let wall = cpu0.2.elapsed().as_secs_f64();
    let server_cpu = match (cpu0.0, t.pid.and_then(sys::cpu_secs)) {
        (Some(a), Some(b)) => Some((b - a) / wall),
        _ => None,
    };
    let bench_cpu = match (cpu0.1, sys::cpu_secs(me)) {
        (Some(a), Some(b)) => Some((b - a) / wall),
        _ => None,
    };
    let alive = readers.alive();
    let expected = sent.count * alive;
    let max_drain = if env.c.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let (acc, drain_secs) = drain(readers, &[&readers.fast], step, expected, max_drain).await;
    let lat = Lat::of(&acc);
    let lost = expected.saturating_sub(acc.delivered);
    let pass = lat.p99 <= p99_limit_ms && lost == 0 && sent.rate() >= 0.9 * rate;
    let s = Step {
        step,
        kind,
        offered_rate: rate,
        sent_rate: sent.rate(),
        sent: sent.count,
        readers: alive,
        offered_deliveries_per_sec: sent.rate() * alive as f64,
        delivered: acc.delivered,
        expected,
        lost,
        gaps: acc.gaps,
        dups: acc.dups,
        latency: lat,
        drain_secs,
        server_rss_bytes: t.rss(),
        server_cpu,
        bench_cpu,
        pass,
    };
    env.mon.note(format!(
        "step {step}: sent {:.0}/s, delivered {}/{} (lost {}, dups {}), p50 {:.1} ms p99 {:.1} ms max {:.1} ms, CPU server {:.2} bench {:.2} cores → {}",
        s.sent_rate,
        s.delivered,
        s.expected,
        s.lost,
        s.dups,
        lat.p50,
        lat.p99,
        lat.max,
        server_cpu.unwrap_or(f64::NAN),
        bench_cpu.unwrap_or(f64::NAN),
        if pass { "pass" } else { "FAIL" }
    ));
    Ok(s)
}

/// `broadcast`: ramp until p99 > limit or loss; ceiling on the same readers first.
#[allow(clippy::too_many_arguments)]
pub async fn broadcast(
    env: &Env,
    subscribers: Option<usize>,
    step_secs: Option<f64>,
    p99_limit_ms: f64,
    start_rate: Option<f64>,
    max_rate: f64,
    no_ceiling: bool,
    ceiling_batch: u64,
) -> anyhow::Result<Report> {
    let quick = env.c.quick;
    let want = subscribers.unwrap_or(if quick { 500 } else { 10_000 });
    let hold = Duration::from_secs_f64(step_secs.unwrap_or(if quick { 1.0 } else { 5.0 }));
    let mut r = Report::new("broadcast", env);

    let t = env.gateway().await?;
    let (n, capped) = env.capacity(&t, Some(want), 0);
    r.capped_by = Some(capped);
    r.target = t.label.clone();

    let ceiling = if no_ceiling {
        None
    } else {
        Some(ceiling_probe(env, n, if quick { 2.0 } else { 5.0 }, ceiling_batch).await?)
    };

    env.mon
        .phase(format!("broadcast: connecting {n} readers to the gateway"));
    let rss0 = t.rss();
    let drops0 = sys::listen_drops();
    let readers = Readers::connect(env, &t, n, 0, |_| false).await?;
    if readers.joined == 0 {
        bail!(
            "no subscriber joined the gateway; samples: {:?}",
            readers.fast.samples()
        );
    }
    let joins_per_sec = readers.joined as f64 / readers.ramp_secs.max(1e-9);
    let listen_overflows = match (drops0, sys::listen_drops()) {
        (Some(a), Some(b)) => b.0.saturating_sub(a.0),
        _ => 0,
    };
    if listen_overflows > 0 {
        r.notes.push(format!(
            "{listen_overflows} SYNs were dropped on a full accept queue while the readers connected"
        ));
    }
    let stop = readers.ctl.shutdown.clone();
    let mut publ = Publisher::connect(
        &t.endpoint(Vsn::V2, env.c.apikey.as_deref()),
        &env.c.topic,
        env.c.msg_bytes,
        Duration::from_secs(env.c.heartbeat_secs),
        stop,
    )
    .await?;
    // Let the joins settle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let s = readers.alive().max(1) as f64;
    let mut rate = start_rate.unwrap_or_else(|| next_125((20_000.0 / s).max(1.0) * 0.999));
    let max_steps = if quick { 8 } else { 24 };
    let mut steps: Vec<Step> = Vec::new();
    let mut best: Option<Step> = None;
    let mut fail_rate: Option<f64> = None;
    let mut step_no = 0u32;
    while steps.len() < max_steps && rate <= max_rate {
        let st = run_step(
            env,
            &t,
            &readers,
            &mut publ,
            step_no,
            "ramp",
            rate,
            hold,
            p99_limit_ms,
        )
        .await?;
        step_no += 1;
        let pass = st.pass;
        if pass {
            best = Some(st.clone());
        }
        steps.push(st);
        if !pass {
            fail_rate = Some(rate);
            break;
        }
        rate = next_125(rate);
    }
    // Refine between the last pass and the first failure.
    if !quick {
        for _ in 0..2 {
            let (Some(b), Some(f)) = (&best, fail_rate) else {
                break;
            };
            let mid = (b.offered_rate * f).sqrt();
            if mid / b.offered_rate < 1.08 {
                break;
            }
            let st = run_step(
                env,
                &t,
                &readers,
                &mut publ,
                step_no,
                "refine",
                mid,
                hold,
                p99_limit_ms,
            )
            .await?;
            step_no += 1;
            if st.pass {
                best = Some(st.clone());
            } else {
                fail_rate = Some(mid);
            }
            steps.push(st);
        }
    }
    let at80 = match &best {
        Some(b) => Some(
            run_step(
                env,
                &t,
                &readers,
                &mut publ,
                step_no,
                "80%",
                b.offered_rate * 0.8,
                hold,
                p99_limit_ms,
            )
            .await?,
        ),
        None => None,
    };
    let total_delivered = readers.fast.delivered().0;
    let (gaps, dups) = readers.fast.gaps_dups();
    let dropped = Stats::get(&readers.fast.dropped);
    let readers_fast = Arc::clone(&readers.fast);
    let samples = readers.fast.samples();
    let pub_samples = publ.stats.samples();
    let rss1 = t.rss();
    let mut t = t;
    let exited = t.exited();
    let joined = readers.joined;
    readers.close().await;
    drop(publ);
    let log_tail = t.log_tail(15);
    t.stop().await;
    if total_delivered == 0 {
        bail!("no message was delivered to any subscriber; samples: {samples:?} publisher: {pub_samples:?}; gateway log:\n{log_tail}");
    }

    let max_dps = best.as_ref().map(|b| b.offered_deliveries_per_sec);
    let ratio = match (max_dps, &ceiling) {
        (Some(m), Some(c)) if c.deliveries_per_sec > 0.0 => Some(m / c.deliveries_per_sec),
        _ => None,
    };
    r.row(
        "subscribers joined",
        format!("{joined} (join ramp {joins_per_sec:.0} joins/s)"),
    );
    r.row("vsn", env.c.vsn.param().to_owned());
    r.row(
        "step hold",
        format!("{:.1} s, p99 limit {p99_limit_ms} ms", hold.as_secs_f64()),
    );
    match &best {
        Some(b) => r.row(
            "max sustained",
            format!(
                "{:.0} deliveries/s ({:.1} msgs/s × {})",
                b.offered_deliveries_per_sec, b.sent_rate, b.readers
            ),
        ),
        None => r.row(
            "max sustained",
            "none: the first step already failed".to_owned(),
        ),
    }
    if let Some(c) = &ceiling {
        r.row(
            "ceiling",
            format!(
                "{:.0} deliveries/s ({} frames/write)",
                c.deliveries_per_sec, c.batch
            ),
        );
    }
    if let Some(x) = ratio {
        r.row("broadcast ÷ ceiling", format!("{x:.3} (goal ≥ 0.5)"));
    }
    if let Some(a) = &at80 {
        r.row(
            "at 80% of max",
            format!(
                "p50 {:.1} ms, p99 {:.1} ms (goal p99 < 50 ms), lost {}",
                a.latency.p50, a.latency.p99, a.lost
            ),
        );
    }
    r.row(
        "losses (gaps) / dups",
        format!("{gaps} / {dups} over the whole run"),
    );
    r.row("subscribers dropped", dropped.to_string());
    r.row(
        "channel errors",
        format!(
            "{} phx_error, {} phx_close, {} system messages; {} rejoined",
            Stats::get(&readers_fast.phx_errors),
            Stats::get(&readers_fast.phx_closes),
            Stats::get(&readers_fast.system_msgs),
            Stats::get(&readers_fast.rejoined)
        ),
    );
    r.row(
        "gateway RSS",
        format!("{} before readers, {} at end", mib(rss0), mib(rss1)),
    );
    if let Some(e) = exited {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    r.step_table = steps.iter().chain(at80.iter()).cloned().collect();
    r.samples = samples
        .into_iter()
        .chain(pub_samples.into_iter().map(|s| format!("publisher: {s}")))
        .collect();
    r.results = json!({
        "subscribers": joined,
        "joins_per_sec": joins_per_sec,
        "max_sustained_deliveries_per_sec": max_dps,
        "max_sustained_msgs_per_sec": best.as_ref().map(|b| b.sent_rate),
        "ceiling": ceiling,
        "ratio_to_ceiling": ratio,
        "at_80_percent": at80,
        "steps": steps,
        "gaps_total": gaps,
        "dups_total": dups,
        "subscribers_dropped": dropped,
        "gateway_rss_before_bytes": rss0,
        "gateway_rss_end_bytes": rss1,
    });
    r.plot = Some(crate::report::Plot::Latency {
        steps: r.step_table.clone(),
        ceiling: ceiling.as_ref().map(|c| c.deliveries_per_sec),
    });
    Ok(r)
}

/// `idle`: C joined clients heartbeating; RSS per connection and joins/s.
pub async fn idle(
    env: &Env,
    clients: Option<usize>,
    hold_secs: Option<f64>,
) -> anyhow::Result<Report> {
    let quick = env.c.quick;
    let mut r = Report::new("idle", env);
    let t = env.gateway().await?;
    r.target = t.label.clone();
    let (mut n, mut capped) = env.capacity(&t, clients, 1_000);
    if quick && clients.is_none() {
        n = n.min(2_000);
        capped = format!("--quick: 2,000 clients ({capped})");
    }
    r.capped_by = Some(capped.clone());
    env.mon.note(format!("clients: {capped}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = t.rss();
    let self0 = sys::self_rss_bytes();
    let drops0 = sys::listen_drops();
    env.mon
        .phase(format!("idle: connecting and joining {n} clients"));
    let readers = Readers::connect(env, &t, n, 0, |_| false).await?;
    if readers.joined == 0 {
        bail!("no client joined; samples: {:?}", readers.fast.samples());
    }
    let joins_per_sec = readers.joined as f64 / readers.ramp_secs.max(1e-9);
    // Peak 1-second window.
    let mut peak = 0.0f64;
    for (i, a) in readers.ramp_series.iter().enumerate() {
        if let Some(b) = readers.ramp_series[i..].iter().find(|b| b.0 - a.0 >= 1.0) {
            peak = peak.max((b.1 - a.1) as f64 / (b.0 - a.0));
        }
    }
    let hold = hold_secs.unwrap_or(if quick { 3.0 } else { 30.0 });
    env.mon.phase(format!(
        "idle: holding {} clients for {hold:.0} s (heartbeat every {} s)",
        readers.joined, env.c.heartbeat_secs
    ));
    let mut series: Vec<(f64, f64)> = readers
        .ramp_series
        .iter()
        .filter_map(|(_, j, rss)| rss.map(|b| (*j as f64, b as f64 / 1048576.0)))
        .collect();
    let mut time_series = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < hold {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(b) = t.rss() {
            time_series.push((t0.elapsed().as_secs_f64(), b));
            series.push((readers.alive() as f64, b as f64 / 1048576.0));
        }
    }
    let rss1 = t.rss();
    let self1 = sys::self_rss_bytes();
    let alive = readers.alive();
    let hb_sent = Stats::get(&readers.fast.hb_sent);
    let hb_ok = Stats::get(&readers.fast.hb_replies);
    let join_hist = readers.fast.join_hist();
    let listen_overflows = match (drops0, sys::listen_drops()) {
        (Some(a), Some(b)) => Some(b.0.saturating_sub(a.0)),
        _ => None,
    };
    let per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / readers.joined as f64),
        _ => None,
    };
    let self_per_conn = match (self0, self1) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / readers.joined as f64),
        _ => None,
    };
    let samples = readers.fast.samples();
    let dropped = Stats::get(&readers.fast.dropped);
    let errors = Stats::get(&readers.fast.connect_errors) + Stats::get(&readers.fast.join_errors);
    let ramp_secs = readers.ramp_secs;
    readers.close().await;
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    t.stop().await;

    r.row(
        "clients joined",
        format!(
            "{} of {n} ({errors} failed, {dropped} dropped later, {alive} alive at end)",
            n as u64 - errors
        ),
    );
    r.row("capped by", capped);
    r.row("join ramp", format!("{ramp_secs:.1} s → {joins_per_sec:.0} joins/s (peak 1 s window {peak:.0}/s; goal ≥ 20k)"));
    r.row(
        "connect+join latency",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            pct(&join_hist, 0.5),
            pct(&join_hist, 0.99)
        ),
    );
    if let Some(o) = listen_overflows {
        r.row(
            "listen queue overflows",
            format!("{o} SYNs dropped on a full accept queue (each costs that client a 1 s SYN retransmit)"),
        );
    }
    r.row(
        "gateway RSS",
        format!("{} before → {} after", mib(rss0), mib(rss1)),
    );
    r.row(
        "RSS per connection",
        per_conn
            .map(|b| format!("{:.2} KiB (goal ≤ 8 KiB)", b / 1024.0))
            .unwrap_or_else(|| "n/a (no pid)".into()),
    );
    r.row(
        "bench client RSS per connection",
        self_per_conn
            .map(|b| format!("{:.2} KiB (load generator, for context)", b / 1024.0))
            .unwrap_or_default(),
    );
    r.row("heartbeats", format!("{hb_sent} sent, {hb_ok} ok replies"));
    if hb_sent > hb_ok + hb_sent / 100 + 5 {
        r.notes
            .push(format!("{} heartbeats got no ok reply", hb_sent - hb_ok));
    }
    r.samples = samples;
    r.results = json!({
        "clients_requested": n,
        "clients_joined": n as u64 - errors,
        "clients_alive_at_end": alive,
        "join_errors": errors,
        "ramp_secs": ramp_secs,
        "joins_per_sec": joins_per_sec,
        "joins_per_sec_peak_1s": peak,
        "listen_overflows": listen_overflows,
        "join_latency_ms": {"p50": pct(&join_hist, 0.5), "p99": pct(&join_hist, 0.99), "max": pct(&join_hist, 1.0)},
        "gateway_rss_before_bytes": rss0,
        "gateway_rss_after_bytes": rss1,
        "rss_per_connection_bytes": per_conn,
        "bench_rss_per_connection_bytes": self_per_conn,
        "hold_secs": hold,
        "heartbeats_sent": hb_sent,
        "heartbeat_replies_ok": hb_ok,
        "rss_over_time": time_series,
    });
    r.plot = Some(crate::report::Plot::RssVsConnections { points: series });
    Ok(r)
}

/// `slow-consumers`: a clean run, then the same rate with a fraction of readers paused.
pub async fn slow_consumers(
    env: &Env,
    subscribers: Option<usize>,
    rate: Option<f64>,
    secs: Option<f64>,
    fraction: f64,
) -> anyhow::Result<Report> {
    let quick = env.c.quick;
    let mut r = Report::new("slow-consumers", env);
    let t = env.gateway().await?;
    r.target = t.label.clone();
    let want = subscribers.unwrap_or(if quick { 300 } else { 1_000 });
    let (n, capped) = env.capacity(&t, Some(want), 0);
    r.capped_by = Some(capped);
    let is_slow =
        move |id: usize| ((id + 1) as f64 * fraction).floor() > (id as f64 * fraction).floor();
    let n_slow = (0..n).filter(|&i| is_slow(i)).count();
    env.mon.phase(format!(
        "slow-consumers: connecting {n} readers ({n_slow} will stop reading)"
    ));
    let readers = Readers::connect(env, &t, n, 0, is_slow).await?;
    if readers.joined == 0 {
        bail!(
            "no subscriber joined; samples: {:?}",
            readers.fast.samples()
        );
    }
    let mut publ = Publisher::connect(
        &t.endpoint(Vsn::V2, env.c.apikey.as_deref()),
        &env.c.topic,
        env.c.msg_bytes,
        Duration::from_secs(env.c.heartbeat_secs),
        readers.ctl.shutdown.clone(),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target_dps = if quick { 60_000.0 } else { 100_000.0 };
    let rate = rate.unwrap_or_else(|| (target_dps / readers.joined as f64).max(1.0));
    let secs = secs.unwrap_or(if quick { 4.0 } else { 30.0 });
    let hold = Duration::from_secs_f64(secs);

    // RSS sampler for the whole run.
    let rss_series = Arc::new(std::sync::Mutex::new(Vec::<(f64, u64)>::new()));
    let sampler_t0 = Instant::now();
    let sampler = {
        let pid = t.pid;
        let series = Arc::clone(&rss_series);
        let stop = readers.ctl.shutdown.clone();
        tokio::spawn(async move {
            let t0 = sampler_t0;
            loop {
                if let Some(b) = pid.and_then(sys::rss_bytes) {
                    series
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((t0.elapsed().as_secs_f64(), b));
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    };
    let max_drain = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let fast_n = Stats::get(&readers.fast.joined);

    env.mon.phase(format!(
        "clean run: {rate:.1} msgs/s to {} readers for {secs:.0} s",
        readers.joined
    ));
    let sent0 = publ.run(rate, hold, 0).await?;
    let (clean_fast, _) = drain(
        &readers,
        &[&readers.fast],
        0,
        sent0.count * fast_n,
        max_drain,
    )
    .await;
    let (clean_slow, _) = drain(&readers, &[&readers.slow], 0, 0, Duration::ZERO).await;
    let clean = Lat::of(&clean_fast);
    env.mon.note(format!(
        "clean: fast readers p50 {:.1} ms p99 {:.1} ms",
        clean.p50, clean.p99
    ));

    let rss_pause = t.rss();
    let t_pause = Instant::now();
    readers.ctl.pause.cancel();
    env.mon.phase(format!(
        "slow run: {n_slow} readers stopped reading; {rate:.1} msgs/s for {secs:.0} s"
    ));
    let sent1 = publ.run(rate, hold, 1).await?;
    let (slow_fast, _) = drain(
        &readers,
        &[&readers.fast],
        1,
        sent1.count * fast_n,
        max_drain,
    )
    .await;
    let with_slow = Lat::of(&slow_fast);
    let rss_end_slow = t.rss();
    env.mon.note(format!(
        "with slow readers: fast p50 {:.1} ms p99 {:.1} ms",
        with_slow.p50, with_slow.p99
    ));

    // Let the slow ones read what reached them: lag notices, losses.
    env.mon.phase("slow readers resume reading (up to 5 s)");
    readers.ctl.resume.cancel();
    let slow_expected = sent1.count * Stats::get(&readers.slow.joined);
    let _ = drain(
        &readers,
        &[&readers.slow],
        1,
        slow_expected,
        Duration::from_secs(5),
    )
    .await;
    let slow_acc = readers.slow.step(1);
    let t_rel_pause = t_pause.duration_since(sampler_t0).as_secs_f64();
    let t_rel_resume = t_rel_pause + hold.as_secs_f64();
    let series: Vec<(f64, u64)> = rss_series.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let samples_fast = readers.fast.samples();
    let samples_slow = readers.slow.samples();
    let slow_stats = json!({
        "readers": Stats::get(&readers.slow.joined),
        "delivered_step1": slow_acc.delivered,
        "expected_step1": sent1.count * Stats::get(&readers.slow.joined),
        "gaps_step1": slow_acc.gaps,
        "phx_error": Stats::get(&readers.slow.phx_errors),
        "rejoined": Stats::get(&readers.slow.rejoined),
        "phx_close": Stats::get(&readers.slow.phx_closes),
        "system": Stats::get(&readers.slow.system_msgs),
        "dropped": Stats::get(&readers.slow.dropped),
    });
    let fast_dropped = Stats::get(&readers.fast.dropped);
    readers.close().await;
    let _ = sampler.await;
    drop(publ);
    let mut t = t;
    if let Some(e) = t.exited() {
        r.notes.push(format!("gateway exited during the run: {e}"));
    }
    t.stop().await;
    if clean_fast.delivered == 0 {
        bail!("no message delivered in the clean run; samples: {samples_fast:?}");
    }

    // RSS boundedness: growth over the last half of the slow phase.
    let slow_part: Vec<&(f64, u64)> = series
        .iter()
        .filter(|s| s.0 >= t_rel_pause && s.0 <= t_rel_resume)
        .collect();
    let half = slow_part.len() / 2;
    let (mid, last) = (
        slow_part.get(half).map(|s| s.1),
        slow_part.last().map(|s| s.1),
    );
    let peak = series.iter().map(|s| s.1).max();
    let ratio = with_slow.p99 / clean.p99;
    r.row(
        "readers",
        format!("{} ({} slow = {:.0}%)", n, n_slow, fraction * 100.0),
    );
    r.row(
        "rate",
        format!(
            "{rate:.1} msgs/s = {:.0} deliveries/s offered, {secs:.0} s per phase",
            rate * n as f64
        ),
    );
    r.row(
        "clean run (fast readers)",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, lost {}",
            clean.p50,
            clean.p99,
            (sent0.count * fast_n).saturating_sub(clean_fast.delivered)
        ),
    );
    r.row(
        "with slow readers (fast)",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, lost {}",
            with_slow.p50,
            with_slow.p99,
            (sent1.count * fast_n).saturating_sub(slow_fast.delivered)
        ),
    );
    r.row("p99 ratio", format!("{ratio:.2} (goal ≤ 2)"));
    r.row(
        "gateway RSS",
        format!(
            "{} when paused → {} after the slow phase; peak {}; last half of slow phase {} → {}",
            mib(rss_pause),
            mib(rss_end_slow),
            mib(peak),
            mib(mid),
            mib(last)
        ),
    );
    r.row("slow readers", slow_stats.to_string());
    r.row("fast readers dropped", fast_dropped.to_string());
    r.samples = samples_fast
        .into_iter()
        .chain(samples_slow.into_iter().map(|s| format!("slow: {s}")))
        .collect();
    r.results = json!({
        "readers": n,
        "slow_readers": n_slow,
        "rate_msgs_per_sec": rate,
        "phase_secs": secs,
        "clean": {"latency": clean, "delivered": clean_fast.delivered, "expected": sent0.count * fast_n, "slow_group_delivered": clean_slow.delivered},
        "with_slow": {"latency": with_slow, "delivered": slow_fast.delivered, "expected": sent1.count * fast_n},
        "p99_ratio": ratio,
        "slow_group": slow_stats,
        "fast_dropped": fast_dropped,
        "gateway_rss_at_pause_bytes": rss_pause,
        "gateway_rss_end_slow_bytes": rss_end_slow,
        "gateway_rss_peak_bytes": peak,
        "rss_over_time": series,
    });
    r.plot = Some(crate::report::Plot::RssOverTime {
        points: series
            .iter()
            .map(|(s, b)| (*s, *b as f64 / 1048576.0))
            .collect(),
        marker: Some(t_rel_pause),
    });
    Ok(r)
}
