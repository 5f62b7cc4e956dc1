//! `rooms`: R rooms × S subscribers with a publisher per room, on one replica
//! and across several joined over NATS.
//!
//! - Memberships: room `r`'s subscribers are memberships `r + R·s` (s < S);
//!   client connection `j` holds memberships `j·k .. j·k+k` (`k` channels per
//!   connection, default the smallest that fits this process's open-files
//!   limit), so a room's S subscribers are S distinct connections.
//! - Publishers: one connection per 100 rooms (realtime's channel limit per
//!   socket), joined to each, sending `{"r","seq","t","s","pad"}` round-robin
//!   at the per-room rate. Per-room sequence numbers give loss and
//!   duplicate/out-of-order counts per membership.
//! - Replicas: client `j` and publisher `p` connect to target `j % G` / `p % G + 1`
//!   (G targets), so most subscriber/publisher pairs cross replicas.
//! - Ramp: per-room rate on the 1-2-5 ladder; a step passes with p99 ≤ the limit,
//!   nothing lost and ≥ 90% of the rate sent. The headline is deliveries/s of
//!   the best passing step; with `--replicas N` (no `--gateway-url`) the tool
//!   starts nats-server and measures one replica, then N, in one run, and
//!   reports the ratio.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ns;
use crate::proto::{self, Vsn};
use crate::report::Report;
use crate::stats::{inc, Stats};
use crate::target::Target;
use crate::workloads::{next_125, Env, Lat};
use crate::ws::{self, op, Endpoint, MaskGen, ReadBuf};

pub(crate) const MAX_FRAME: usize = 8 << 20;
/// Channels per publisher socket (realtime's default per-client limit).
pub(crate) const ROOMS_PER_PUBLISHER: usize = 100;

/// Flags of `rooms`.
#[derive(Debug, Clone)]
pub struct RoomsOpts {
    /// Rooms.
    pub rooms: usize,
    /// Subscribers per room.
    pub per_room: usize,
    /// Channels per subscriber connection (None: smallest that fits).
    pub channels_per_client: Option<usize>,
    /// Seconds per step.
    pub step_secs: f64,
    /// p99 limit (ms).
    pub p99_limit_ms: f64,
    /// First per-room rate (msgs/s).
    pub start_rate: f64,
    /// Highest per-room rate tried.
    pub max_rate: f64,
    /// Replicas of the clustered phase (without --gateway-url).
    pub replicas: usize,
    /// Targets given with --gateway-url (repeatable): measure only those.
    pub urls: Vec<String>,
    /// Hold one rate instead of ramping (Supabase's shape: 2 msg/s per channel).
    pub hold_rate: Option<f64>,
}

pub(crate) fn room_topic(r: usize) -> String {
    format!("rooms-{r}")
}

/// `"r":N` in a frame.
fn find_room(frame: &[u8]) -> Option<u32> {
    let at = memchr::memmem::find(frame, b"\"r\":")? + 4;
    let mut v: u32 = 0;
    let mut i = at;
    while i < frame.len() && frame[i].is_ascii_digit() {
        v = v.wrapping_mul(10).wrapping_add(u32::from(frame[i] - b'0'));
        i += 1;
    }
    (i > at).then_some(v)
}

/// Sends a masked text frame.
pub(crate) async fn send_text(
    stream: &mut TcpStream,
    masks: &mut MaskGen,
    text: &str,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(text.len() + 14);
    ws::encode_frame(&mut out, op::TEXT, text.as_bytes(), Some(masks.next_key()));
    stream.write_all(&out).await
}

/// Connects and joins every room in `rooms`; returns once all replies are ok.
async fn connect_join(
    ep: &Endpoint,
    rooms: &[usize],
    seed: u32,
) -> anyhow::Result<(TcpStream, ReadBuf, MaskGen)> {
    let (mut stream, mut buf) = ws::connect(ep, None, None, Duration::from_secs(30)).await?;
    let mut masks = MaskGen::new(seed);
    for &r in rooms {
        send_text(
            &mut stream,
            &mut masks,
            &proto::join_text(Vsn::V2, &room_topic(r), &format!("j{r}")),
        )
        .await?;
    }
    let mut pending = rooms.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pending > 0 {
        let mut pos = 0;
        while let Some(f) = ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME)? {
            let frame = &buf.data[pos + f.start..pos + f.end];
            pos += f.end;
            if f.opcode == op::CLOSE {
                bail!("server closed the socket while joining");
            }
            if let Some(c) = proto::parse_control(frame) {
                if c.event == "phx_reply"
                    && c.msg_ref.as_deref().is_some_and(|r| r.starts_with('j'))
                {
                    if c.status() != Some("ok") {
                        bail!("join refused: {}", proto::excerpt(frame));
                    }
                    pending -= 1;
                }
            }
        }
        buf.consume(pos);
        if pending == 0 {
            break;
        }
        let n = tokio::time::timeout_at(deadline, buf.read_from(&mut stream))
            .await
            .context("join replies timed out")??;
        if n == 0 {
            bail!("EOF while joining");
        }
    }
    Ok((stream, buf, masks))
}

/// One subscriber connection holding several room memberships.
pub(crate) async fn member(
    id: usize,
    ep: Endpoint,
    rooms: Vec<usize>,
    stats: Arc<Stats>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let permit = gate.acquire_owned().await.ok();
    let (mut stream, mut buf, mut masks) = match connect_join(&ep, &rooms, id as u32).await {
        Ok(x) => x,
        Err(e) => {
            inc(&stats.join_errors);
            stats.sample(format!("client {id}: {e:#}"));
            return;
        }
    };
    inc(&stats.joined);
    drop(permit);
    let mut next: HashMap<u32, u64> = rooms.iter().map(|&r| (r as u32, 0)).collect();
    let mut hb = tokio::time::interval(Duration::from_secs(25));
    hb.tick().await;
    let mut hb_ref = 1u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = hb.tick() => {
                hb_ref += 1;
                if send_text(&mut stream, &mut masks, &proto::heartbeat_text(Vsn::V2, hb_ref)).await.is_err() {
                    inc(&stats.dropped);
                    return;
                }
            }
            res = buf.read_from(&mut stream) => {
                let now = now_ns();
                if !matches!(res, Ok(n) if n > 0) {
                    inc(&stats.dropped);
                    stats.sample(format!("client {id}: connection closed"));
                    return;
                }
                let mut pos = 0;
                let mut shard = None;
                while let Ok(Some(f)) = ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME) {
                    let frame = &buf.data[pos + f.start..pos + f.end];
                    pos += f.end;
                    if f.opcode == op::CLOSE {
                        inc(&stats.dropped);
                        return;
                    }
                    let (Some(st), Some(room)) = (proto::find_stamp(frame), find_room(frame)) else {
                        continue;
                    };
                    let sh = shard.get_or_insert_with(|| stats.shard(id));
                    let Some(n) = next.get_mut(&room) else {
                        inc(&stats.other_frames);
                        continue;
                    };
                    if st.seq >= *n {
                        let gap = st.seq - *n;
                        *n = st.seq + 1;
                        sh.delivered(st.step, Some(now.saturating_sub(st.t_ns) / 1000), gap, frame.len());
                    } else {
                        sh.duplicate(st.step);
                    }
                }
                drop(shard);
                buf.consume(pos);
            }
        }
    }
}

/// A publisher socket joined to up to 100 rooms.
pub(crate) struct Pub {
    stream: tokio::net::tcp::OwnedWriteHalf,
    rooms: Vec<usize>,
    seq: Vec<u64>,
    masks: MaskGen,
    pad: usize,
    next_ref: u64,
}

impl Pub {
    pub(crate) async fn connect(
        ep: &Endpoint,
        rooms: Vec<usize>,
        pad: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Pub> {
        let (stream, _buf, masks) = connect_join(ep, &rooms, 0xABCD).await?;
        let (mut rd, wr) = stream.into_split();
        // Drain whatever the server sends the publisher.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio::io::AsyncReadExt::read(&mut rd, &mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                }
            }
        });
        Ok(Pub {
            stream: wr,
            seq: vec![0; rooms.len()],
            rooms,
            masks,
            pad,
            next_ref: 10,
        })
    }

    /// Sends `rate` msgs/s to each of its rooms for `dur`; returns messages sent.
    pub(crate) async fn run(&mut self, rate: f64, dur: Duration, step: u32) -> anyhow::Result<u64> {
        let start = Instant::now();
        let total_rate = rate * self.rooms.len() as f64;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (mut sent, mut i) = (0u64, 0usize);
        let (mut out, mut inner, mut text) = (Vec::new(), String::new(), String::new());
        loop {
            tick.tick().await;
            let el = start.elapsed();
            if el >= dur {
                break;
            }
            let due = (total_rate * el.as_secs_f64()) as u64 + 1;
            let n = due.saturating_sub(sent).min((total_rate * 0.05) as u64 + 1);
            out.clear();
            let t = now_ns();
            for _ in 0..n {
                let r = self.rooms[i];
                inner.clear();
                text.clear();
                inner.push_str(&format!("{{\"r\":{r},"));
                proto::bench_payload(&mut text, self.seq[i], t, step, self.pad);
                inner.push_str(&text[1..]);
                text.clear();
                proto::broadcast_text_v2(
                    &mut text,
                    &room_topic(r),
                    &format!("j{r}"),
                    self.next_ref,
                    &inner,
                );
                ws::encode_frame(
                    &mut out,
                    op::TEXT,
                    text.as_bytes(),
                    Some(self.masks.next_key()),
                );
                self.seq[i] += 1;
                self.next_ref += 1;
                sent += 1;
                i = (i + 1) % self.rooms.len();
            }
            self.stream
                .write_all(&out)
                .await
                .context("publisher write")?;
        }
        Ok(sent)
    }
}

/// Runs every publisher at `rate` msgs/s per room for `hold` (concurrently);
/// returns the messages sent.
pub(crate) async fn run_publishers(
    pubs: &mut Vec<Pub>,
    rate: f64,
    hold: Duration,
    step: u32,
) -> anyhow::Result<u64> {
    let runs: Vec<_> = pubs
        .drain(..)
        .map(|mut p| {
            tokio::spawn(async move {
                let r = p.run(rate, hold, step).await;
                (p, r)
            })
        })
        .collect();
    let mut sent = 0;
    for h in runs {
        let (p, r) = h.await?;
        sent += r?;
        pubs.push(p);
    }
    Ok(sent)
}

/// Waits until `expected` deliveries of `step` arrived, 10 s passed, or 1 s
/// passed without progress.
pub(crate) async fn drain(stats: &Stats, step: u32, expected: u64) {
    let d0 = Instant::now();
    let mut last = (Instant::now(), 0);
    loop {
        let d = stats.step(step).delivered;
        if d >= expected || d0.elapsed() > Duration::from_secs(10) {
            break;
        }
        if d != last.1 {
            last = (Instant::now(), d);
        } else if last.0.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One ramp step of one phase.
#[derive(Debug, Clone, Serialize)]
struct Step {
    step: u32,
    rate_per_room: f64,
    sent: u64,
    sent_rate: f64,
    expected: u64,
    delivered: u64,
    lost: u64,
    dups: u64,
    deliveries_per_sec: f64,
    latency: Lat,
    pass: bool,
}

/// One phase: G targets, the memberships connected, a ramp.
#[derive(Debug, Clone, Serialize)]
struct Phase {
    label: String,
    targets: usize,
    connections: usize,
    channels_per_client: usize,
    publishers: usize,
    joined: u64,
    steps: Vec<Step>,
    best_deliveries_per_sec: f64,
}

async fn run_phase(
    env: &Env,
    o: &RoomsOpts,
    targets: &[Target],
    label: &str,
    k: usize,
    first_step: u32,
) -> anyhow::Result<Phase> {
    let g = targets.len();
    let eps: Vec<Endpoint> = targets
        .iter()
        .map(|t| t.endpoint(Vsn::V2, env.c.apikey.as_deref()))
        .collect();
    let memberships = o.rooms * o.per_room;
    let conns = memberships.div_ceil(k);
    env.mon.phase(format!(
        "{label}: connecting {conns} clients × {k} channels ({} rooms × {})",
        o.rooms, o.per_room
    ));
    let stats = Arc::new(Stats::new());
    env.mon.watch(vec![Arc::clone(&stats)], targets[0].pid);
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(env.c.connect_concurrency.max(1)));
    let mut handles = Vec::with_capacity(conns);
    for j in 0..conns {
        let rooms: Vec<usize> = (j * k..((j + 1) * k).min(memberships))
            .map(|i| i % o.rooms)
            .collect();
        handles.push(tokio::spawn(member(
            j,
            eps[j % g].clone(),
            rooms,
            Arc::clone(&stats),
            Arc::clone(&gate),
            stop.clone(),
        )));
    }
    let t0 = Instant::now();
    while Stats::get(&stats.joined) + Stats::get(&stats.join_errors) < conns as u64
        && t0.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joined = Stats::get(&stats.joined);
    if joined < conns as u64 {
        env.mon.note(format!(
            "{label}: {joined}/{conns} clients joined; first error: {:?}",
            stats.samples().first()
        ));
    }
    let pad = proto::pad_for(&room_topic(o.rooms), env.c.msg_bytes).saturating_sub(8);
    let mut pubs = Vec::new();
    for (p, chunk) in (0..o.rooms)
        .collect::<Vec<_>>()
        .chunks(ROOMS_PER_PUBLISHER)
        .enumerate()
    {
        pubs.push(Pub::connect(&eps[(p + 1) % g], chunk.to_vec(), pad, stop.clone()).await?);
    }
    let hold = Duration::from_secs_f64(o.step_secs);
    let mut steps = Vec::new();
    let mut rate = o.hold_rate.unwrap_or(o.start_rate);
    let mut step = first_step;
    loop {
        env.mon.phase(format!(
            "{label} step {step}: {rate} msgs/s per room = {:.0} deliveries/s offered",
            rate * memberships as f64
        ));
        let t_start = Instant::now();
        let sent = run_publishers(&mut pubs, rate, hold, step).await?;
        let secs = t_start.elapsed().as_secs_f64().min(o.step_secs).max(1e-9);
        let expected = sent * o.per_room as u64 * joined / conns as u64;
        drain(&stats, step, expected).await;
        let acc = stats.step(step);
        let lat = Lat::of(&acc);
        let lost = expected.saturating_sub(acc.delivered);
        let sent_rate = sent as f64 / secs / o.rooms as f64;
        let pass = lat.p99 <= o.p99_limit_ms && lost == 0 && sent_rate >= 0.9 * rate;
        let s = Step {
            step,
            rate_per_room: rate,
            sent,
            sent_rate,
            expected,
            delivered: acc.delivered,
            lost,
            dups: acc.dups,
            deliveries_per_sec: acc.delivered as f64 / secs,
            latency: lat,
            pass,
        };
        env.mon.note(format!(
            "{label} step {step}: {rate} msgs/s/room, delivered {}/{} (lost {lost}, dups {}), {:.0} deliveries/s, p50 {:.1} p99 {:.1} ms → {}",
            s.delivered, s.expected, s.dups, s.deliveries_per_sec, lat.p50, lat.p99, if pass { "pass" } else { "FAIL" }
        ));
        steps.push(s);
        step += 1;
        if !pass || o.hold_rate.is_some() || env.c.quick {
            break;
        }
        rate = next_125(rate);
        if rate > o.max_rate {
            break;
        }
    }
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    let best = steps
        .iter()
        .filter(|s| s.pass)
        .map(|s| s.deliveries_per_sec)
        .fold(0.0, f64::max);
    Ok(Phase {
        label: label.to_owned(),
        targets: g,
        connections: conns,
        channels_per_client: k,
        publishers: o.rooms.div_ceil(ROOMS_PER_PUBLISHER),
        joined,
        steps,
        best_deliveries_per_sec: best,
    })
}

/// Starts nats-server on a free loopback port (killed on drop).
async fn start_nats(env: &Env) -> anyhow::Result<(tokio::process::Child, String)> {
    let bin = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "nats-server",
    ]
    .into_iter()
    .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
    .unwrap_or("nats-server");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(env.log_dir.join(format!("{}.nats.log", env.stem)))?;
    let child = tokio::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin} (apt-get install nats-server)"))?;
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("nats-server did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, format!("nats://127.0.0.1:{port}")))
}

/// `rooms`.
pub async fn rooms(env: &Env, o: RoomsOpts) -> anyhow::Result<Report> {
    let memberships = o.rooms * o.per_room;
    let publishers = o.rooms.div_ceil(ROOMS_PER_PUBLISHER);
    // This process holds every connection: pick k so they fit.
    let budget = (env.fd.soft as usize).saturating_sub(200 + publishers);
    let k = o
        .channels_per_client
        .unwrap_or_else(|| memberships.div_ceil(budget.max(1)).max(1))
        .min(o.rooms)
        .min(100);
    let mut r = Report::new("rooms", env);
    let mut phases = Vec::new();
    // Steps are numbered on across phases (the stats are keyed by step; small numbers keep them small).
    let mut step_base = 1u32;
    let mut next_step = |phases: &Vec<Phase>| {
        if let Some(last) = phases.last().and_then(|p| p.steps.last()) {
            step_base = last.step + 1;
        }
        step_base
    };
    if !o.urls.is_empty() {
        let mut targets = Vec::new();
        for u in &o.urls {
            targets.push(Target::external(u, None).await?);
        }
        phases.push(
            run_phase(
                env,
                &o,
                &targets,
                &format!("{} target(s)", targets.len()),
                k,
                next_step(&phases),
            )
            .await?,
        );
    } else {
        let single = env.gateway().await?;
        phases.push(
            run_phase(
                env,
                &o,
                std::slice::from_ref(&single),
                "1 replica",
                k,
                next_step(&phases),
            )
            .await?,
        );
        single.stop().await;
        if o.replicas > 1 {
            let (_nats, url) = start_nats(env).await?;
            let mut targets = Vec::new();
            for i in 0..o.replicas {
                let nats = [("NATS_URL".to_owned(), url.clone())];
                targets.push(
                    env.gateway_logged(&nats, &format!("replica-{}", i + 1))
                        .await?,
                );
            }
            // Let the replicas hear each other before clients come.
            tokio::time::sleep(Duration::from_secs(2)).await;
            phases.push(
                run_phase(
                    env,
                    &o,
                    &targets,
                    &format!("{} replicas over NATS", o.replicas),
                    k,
                    next_step(&phases),
                )
                .await?,
            );
            for t in targets {
                t.stop().await;
            }
        }
    }
    for p in &phases {
        r.row(
            &format!(
                "{}: best deliveries/s (p99 ≤ {} ms, 0 lost)",
                p.label, o.p99_limit_ms
            ),
            format!("{:.0}", p.best_deliveries_per_sec),
        );
        if let Some(s) = p.steps.iter().rfind(|s| s.pass).or(p.steps.first()) {
            r.row(
                &format!("{}: at that step", p.label),
                format!(
                    "{} msgs/s per room, p50 {:.1} ms, p99 {:.1} ms",
                    s.rate_per_room, s.latency.p50, s.latency.p99
                ),
            );
        }
    }
    let ratio = (phases.len() == 2 && phases[0].best_deliveries_per_sec > 0.0)
        .then(|| phases[1].best_deliveries_per_sec / phases[0].best_deliveries_per_sec);
    if let Some(x) = ratio {
        r.row("cross-replica ÷ single", format!("{x:.2}"));
    }
    r.row("shape", format!("{} rooms × {} subscribers, {k} channels per client connection, {publishers} publisher sockets", o.rooms, o.per_room));
    r.results = json!({ "rooms": o.rooms, "per_room": o.per_room, "channels_per_client": k, "phases": phases, "ratio": ratio });
    Ok(r)
}
