//! `flood`: what one flooding client costs everybody else (issue 10).
//!
//! Well-behaved clients — R rooms × S subscribers, one channel per
//! connection (1,000 by default), a publisher per 100 rooms at a steady rate —
//! measure their delivery latency in three phases of equal length: before,
//! during and after a flood. The flooder is one socket pushing broadcasts to
//! its own topic as fast as the socket takes them, with a few readers on that
//! topic so what gets through is fanned out; when the gateway closes its
//! channel ("Too many messages per second") it rejoins at once, and when the
//! gateway disconnects it (join rate) it reconnects — the most a client can
//! abuse the defaults. The gateway runs with its default limits.
//!
//! Headline: the bystanders' p99 during the flood ÷ their p99 without it
//! (the mean of the phases before and after, which brackets drift on a
//! shared machine). Goal: ≤ 1.5. Loss among the bystanders is reported too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proto::{self, Vsn};
use crate::report::Report;
use crate::rooms::{
    drain, member, room_topic, run_publishers, send_text, Pub, MAX_FRAME, ROOMS_PER_PUBLISHER,
};
use crate::stats::{inc, Stats};
use crate::workloads::{Env, Lat};
use crate::ws::{self, op, Endpoint, MaskGen, ReadBuf};

const FLOOD_TOPIC: &str = "flood";
const FLOOD_JOIN_REF: &str = "f1";

/// Flags of `flood`.
#[derive(Debug, Clone)]
pub struct FloodOpts {
    /// Bystander rooms.
    pub rooms: usize,
    /// Subscribers per room (one connection each).
    pub per_room: usize,
    /// Messages per second per room.
    pub rate: f64,
    /// Seconds per phase.
    pub secs: f64,
    /// Readers on the flooded topic.
    pub flood_readers: usize,
}

/// What the flooder did and what got through.
#[derive(Debug, Default)]
struct FloodStats {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    rejoins: AtomicU64,
    reconnects: AtomicU64,
    limit_closes: AtomicU64,
    delivered_to_readers: AtomicU64,
}

/// One phase's bystander figures.
#[derive(Debug, Clone, Serialize)]
struct Phase {
    label: &'static str,
    step: u32,
    sent: u64,
    expected: u64,
    delivered: u64,
    lost: u64,
    latency: Lat,
}

/// The flooding client: pushes pre-encoded broadcasts as fast as its socket
/// takes them; rejoins when its channel is closed, reconnects when dropped.
async fn flooder(ep: Endpoint, pad: usize, fs: Arc<FloodStats>, stop: CancellationToken) {
    // One batch of frames, encoded once (masks may repeat: the server does not care).
    let mut masks = MaskGen::new(0xF100D);
    let mut batch = Vec::new();
    let payload = format!(r#"{{"pad":"{}"}}"#, "f".repeat(pad));
    let mut text = String::new();
    for i in 0..64u64 {
        text.clear();
        proto::broadcast_text_v2(&mut text, FLOOD_TOPIC, FLOOD_JOIN_REF, i, &payload);
        ws::encode_frame(
            &mut batch,
            op::TEXT,
            text.as_bytes(),
            Some(masks.next_key()),
        );
    }
    let join = proto::join_text(Vsn::V2, FLOOD_TOPIC, FLOOD_JOIN_REF);
    let mut first = true;
    while !stop.is_cancelled() {
        if !first {
            inc(&fs.reconnects);
        }
        first = false;
        let Ok((stream, _)) = ws::connect(&ep, None, None, Duration::from_secs(10)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut rd, mut wr) = stream.into_split();
        let rejoin = Arc::new(AtomicBool::new(true));
        let conn_done = CancellationToken::new();
        // The reader: notices the channel being closed.
        let reader = {
            let (rejoin, done, fs, stop) = (
                Arc::clone(&rejoin),
                conn_done.clone(),
                Arc::clone(&fs),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut buf = ReadBuf::new(64 * 1024);
                loop {
                    let n = tokio::select! {
                        _ = stop.cancelled() => break,
                        r = buf.read_from(&mut rd) => r,
                    };
                    if !matches!(n, Ok(n) if n > 0) {
                        break;
                    }
                    let mut pos = 0;
                    while let Ok(Some(f)) = ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME) {
                        let frame = &buf.data[pos + f.start..pos + f.end];
                        pos += f.end;
                        if f.opcode == op::CLOSE {
                            done.cancel();
                        }
                        if let Some(c) = proto::parse_control(frame) {
                            if c.event == "phx_close" {
                                inc(&fs.limit_closes);
                                rejoin.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    buf.consume(pos);
                }
                done.cancel();
            })
        };
        let mut jmask = MaskGen::new(0x1010);
        loop {
            if stop.is_cancelled() || conn_done.is_cancelled() {
                break;
            }
            if rejoin.swap(false, Ordering::Relaxed) {
                let mut out = Vec::new();
                ws::encode_frame(&mut out, op::TEXT, join.as_bytes(), Some(jmask.next_key()));
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                inc(&fs.rejoins);
            }
            let wrote = tokio::select! {
                _ = stop.cancelled() => break,
                _ = conn_done.cancelled() => break,
                r = wr.write_all(&batch) => r,
            };
            if wrote.is_err() {
                break;
            }
            fs.frames_sent.fetch_add(64, Ordering::Relaxed);
            fs.bytes_sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        conn_done.cancel();
        reader.abort();
    }
}

/// A reader on the flooded topic: counts what got through.
async fn flood_reader(ep: Endpoint, id: u32, fs: Arc<FloodStats>, stop: CancellationToken) {
    let Ok((mut stream, mut buf)) = ws::connect(&ep, None, None, Duration::from_secs(30)).await
    else {
        return;
    };
    let mut masks = MaskGen::new(id);
    let join = proto::join_text(Vsn::V2, FLOOD_TOPIC, "r1");
    if send_text(&mut stream, &mut masks, &join).await.is_err() {
        return;
    }
    let mut hb = tokio::time::interval(Duration::from_secs(25));
    hb.tick().await;
    let mut hb_ref = 1;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hb.tick() => {
                hb_ref += 1;
                if send_text(&mut stream, &mut masks, &proto::heartbeat_text(Vsn::V2, hb_ref)).await.is_err() {
                    return;
                }
            }
            r = buf.read_from(&mut stream) => {
                if !matches!(r, Ok(n) if n > 0) {
                    return;
                }
                let mut pos = 0;
                let mut n = 0;
                while let Ok(Some(f)) = ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME) {
                    let frame = &buf.data[pos + f.start..pos + f.end];
                    pos += f.end;
                    if memchr::memmem::find(frame, b"\"broadcast\"").is_some() {
                        n += 1;
                    }
                }
                fs.delivered_to_readers.fetch_add(n, Ordering::Relaxed);
                buf.consume(pos);
            }
        }
    }
}

/// `flood`.
pub async fn flood(env: &Env, o: FloodOpts) -> anyhow::Result<Report> {
    // The limits are what is measured: the gateway runs with its defaults
    // (plus any --gateway-env).
    let target = env.gateway_with(&[]).await?;
    let ep = target.endpoint(Vsn::V2, env.c.apikey.as_deref());
    let conns = o.rooms * o.per_room;
    env.mon.phase(format!(
        "flood: connecting {conns} bystanders ({} rooms × {})",
        o.rooms, o.per_room
    ));
    let stats = Arc::new(Stats::new());
    env.mon.watch(vec![Arc::clone(&stats)], target.pid);
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(env.c.connect_concurrency.max(1)));
    let mut handles = Vec::with_capacity(conns);
    for j in 0..conns {
        handles.push(tokio::spawn(member(
            j,
            ep.clone(),
            vec![j % o.rooms],
            Arc::clone(&stats),
            Arc::clone(&gate),
            stop.clone(),
        )));
    }
    let t0 = Instant::now();
    while Stats::get(&stats.joined) + Stats::get(&stats.join_errors) < conns as u64
        && t0.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joined = Stats::get(&stats.joined);
    anyhow::ensure!(
        joined > 0,
        "no bystander joined: {:?}",
        stats.samples().first()
    );
    let pad = proto::pad_for(&room_topic(o.rooms), env.c.msg_bytes).saturating_sub(8);
    let mut pubs = Vec::new();
    for chunk in (0..o.rooms).collect::<Vec<_>>().chunks(ROOMS_PER_PUBLISHER) {
        pubs.push(Pub::connect(&ep, chunk.to_vec(), pad, stop.clone()).await?);
    }
    let fs = Arc::new(FloodStats::default());
    for i in 0..o.flood_readers {
        tokio::spawn(flood_reader(
            ep.clone(),
            0xEAD0 + i as u32,
            Arc::clone(&fs),
            stop.clone(),
        ));
    }
    let hold = Duration::from_secs_f64(o.secs);
    let mut phases = Vec::new();
    let mut flood_secs = 0.0;
    for (step, label) in [(1u32, "before"), (2, "flood"), (3, "after")] {
        env.mon.phase(format!(
            "flood: {label} ({} msgs/s per room, {:.0} deliveries/s offered)",
            o.rate,
            o.rate * conns as f64
        ));
        let flood_stop = CancellationToken::new();
        let flood = (label == "flood").then(|| {
            tokio::spawn(flooder(
                ep.clone(),
                env.c.msg_bytes,
                Arc::clone(&fs),
                flood_stop.clone(),
            ))
        });
        let t_start = Instant::now();
        let sent = run_publishers(&mut pubs, o.rate, hold, step)
            .await
            .context("bystander publisher")?;
        if let Some(f) = flood {
            flood_secs = t_start.elapsed().as_secs_f64();
            flood_stop.cancel();
            let _ = f.await;
        }
        let expected = sent * o.per_room as u64 * joined / conns as u64;
        drain(&stats, step, expected).await;
        let acc = stats.step(step);
        let latency = Lat::of(&acc);
        let p = Phase {
            label,
            step,
            sent,
            expected,
            delivered: acc.delivered,
            lost: expected.saturating_sub(acc.delivered),
            latency,
        };
        env.mon.note(format!(
            "flood {label}: delivered {}/{} (lost {}), p50 {:.1} ms, p99 {:.1} ms",
            p.delivered, p.expected, p.lost, latency.p50, latency.p99
        ));
        phases.push(p);
    }
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    let rss = target.rss();
    target.stop().await;

    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let quiet_p99 = (phases[0].latency.p99 + phases[2].latency.p99) / 2.0;
    let ratio = phases[1].latency.p99 / quiet_p99;
    let mut r = Report::new("flood", env);
    for p in &phases {
        r.row(
            &format!("bystanders {}: p50 / p99 (ms)", p.label),
            format!("{:.1} / {:.1}", p.latency.p50, p.latency.p99),
        );
        r.row(
            &format!("bystanders {}: delivered / expected", p.label),
            format!("{} / {} (lost {})", p.delivered, p.expected, p.lost),
        );
    }
    r.row(
        "p99 during the flood ÷ without (mean of before, after)",
        format!("{ratio:.2} (goal ≤ 1.5)"),
    );
    let frames = get(&fs.frames_sent);
    r.row(
        "flooder",
        format!(
            "{frames} frames ({:.0}/s, {:.1} MB/s) in {flood_secs:.1} s; {} channel closes, {} rejoins, {} reconnects",
            frames as f64 / flood_secs.max(1e-9),
            get(&fs.bytes_sent) as f64 / flood_secs.max(1e-9) / 1e6,
            get(&fs.limit_closes),
            get(&fs.rejoins),
            get(&fs.reconnects),
        ),
    );
    r.row(
        "flood messages that reached its readers",
        format!(
            "{} deliveries to {} readers",
            get(&fs.delivered_to_readers),
            o.flood_readers
        ),
    );
    r.row(
        "shape",
        format!(
            "{} rooms × {} subscribers ({conns} connections, {joined} joined), {} msgs/s per room, {} s per phase, default limits",
            o.rooms, o.per_room, o.rate, o.secs
        ),
    );
    r.results = json!({
        "rooms": o.rooms, "per_room": o.per_room, "rate": o.rate, "secs": o.secs,
        "phases": phases, "ratio": ratio, "gateway_rss_bytes": rss,
        "flooder": {
            "frames_sent": frames, "bytes_sent": get(&fs.bytes_sent), "secs": flood_secs,
            "limit_closes": get(&fs.limit_closes), "rejoins": get(&fs.rejoins),
            "reconnects": get(&fs.reconnects), "delivered_to_readers": get(&fs.delivered_to_readers),
        },
    });
    Ok(r)
}
