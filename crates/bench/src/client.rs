//! Benchmark clients: subscribers (readers) and the publisher.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ns;
use crate::proto::{self, Vsn};
use crate::stats::{inc, Stats};
use crate::ws::{self, op, Endpoint, MaskGen, ReadBuf};

/// Largest frame a client accepts.
const MAX_FRAME: usize = 8 << 20;

/// What every subscriber shares.
#[derive(Debug, Clone)]
pub struct ClientCfg {
    /// Server endpoint.
    pub ep: Endpoint,
    /// Serializer.
    pub vsn: Vsn,
    /// Topic name without `realtime:`.
    pub topic: String,
    /// Source addresses to spread connections over (empty = let the kernel pick).
    pub sources: Vec<IpAddr>,
    /// Connections per source address.
    pub per_source: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// How long connect + upgrade + join may take.
    pub join_timeout: Duration,
    /// Sequence numbers wrap at this modulus (ceiling frames); 0 = never.
    pub seq_mod: u64,
    /// `SO_RCVBUF` for slow readers (small, so the server's backlog is reached).
    pub slow_rcvbuf: Option<u32>,
}

impl ClientCfg {
    /// Source address for connection `id`.
    pub fn source_for(&self, id: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        let idx = id / self.per_source.max(1);
        // The first block keeps the kernel's choice (no bind), like any client.
        if idx == 0 {
            return None;
        }
        self.sources.get(idx).copied()
    }
}

/// The loopback source addresses 127.0.0.1, 127.0.0.2, … (`n` of them).
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect()
}

/// Signals a run sends to its readers.
#[derive(Debug, Clone, Default)]
pub struct Ctl {
    /// End of the run: readers close their sockets.
    pub shutdown: CancellationToken,
    /// Slow readers stop reading.
    pub pause: CancellationToken,
    /// Slow readers read again.
    pub resume: CancellationToken,
}

/// Loss/duplicate tracking of one reader.
#[derive(Debug, Clone, Copy, Default)]
struct SeqTrack {
    next: u64,
}

impl SeqTrack {
    /// Returns `Some(gap)` for a first arrival, `None` for a duplicate/out-of-order one.
    fn see(&mut self, seq: u64, modulus: u64) -> Option<u64> {
        if modulus == 0 {
            if seq >= self.next {
                let gap = seq - self.next;
                self.next = seq + 1;
                Some(gap)
            } else {
                None
            }
        } else {
            let gap = (seq + modulus - self.next % modulus) % modulus;
            self.next = (seq + 1) % modulus;
            Some(gap)
        }
    }
}

/// Result of processing buffered frames.
enum Flow {
    Continue,
    Closed(String),
}

/// One subscriber's connection.
struct Reader {
    id: usize,
    stream: TcpStream,
    buf: ReadBuf,
    frag: Vec<u8>,
    frag_op: u8,
    masks: MaskGen,
    track: SeqTrack,
    hb_ref: u64,
    joins: u64,
    out: Vec<u8>,
}

impl Reader {
    async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.out.clear();
        let key = self.masks.next_key();
        ws::encode_frame(&mut self.out, op::TEXT, text.as_bytes(), Some(key));
        self.stream.write_all(&self.out).await
    }

    async fn heartbeat(&mut self, cfg: &ClientCfg, stats: &Stats) -> std::io::Result<()> {
        self.hb_ref += 1;
        let text = proto::heartbeat_text(cfg.vsn, self.hb_ref);
        inc(&stats.hb_sent);
        self.send_text(&text).await
    }

    /// Processes every complete frame in the buffer.
    async fn process(&mut self, cfg: &ClientCfg, stats: &Stats, now: u64) -> anyhow::Result<Flow> {
        let mut pos = 0;
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let mut flow = Flow::Continue;
        let mut rejoin = false;
        {
            let mut shard = None;
            while let Some(f) = ws::parse_frame(&self.buf.data[pos..self.buf.filled], MAX_FRAME)? {
                let start = pos + f.start;
                let end = pos + f.end;
                pos = end;
                match f.opcode {
                    op::TEXT | op::BINARY | op::CONT => {
                        let whole: &[u8] = if f.opcode != op::CONT && f.fin {
                            &self.buf.data[start..end]
                        } else {
                            if f.opcode != op::CONT {
                                self.frag.clear();
                                self.frag_op = f.opcode;
                            }
                            self.frag.extend_from_slice(&self.buf.data[start..end]);
                            if !f.fin {
                                continue;
                            }
                            &self.frag
                        };
                        if let Some(st) = proto::find_stamp(whole) {
                            let sh = shard.get_or_insert_with(|| stats.shard(self.id));
                            match self.track.see(st.seq, cfg.seq_mod) {
                                Some(gap) => {
                                    let lat =
                                        (st.t_ns != 0).then(|| now.saturating_sub(st.t_ns) / 1000);
                                    sh.delivered(st.step, lat, gap, whole.len());
                                }
                                None => sh.duplicate(st.step),
                            }
                        } else if control(
                            whole,
                            stats,
                            f.opcode == op::BINARY || self.frag_op == op::BINARY,
                        ) {
                            rejoin = true;
                        }
                    }
                    op::PING => {
                        let mut p = Vec::new();
                        ws::encode_frame(
                            &mut p,
                            op::PONG,
                            &self.buf.data[start..end],
                            Some(self.masks.next_key()),
                        );
                        pongs.push(p);
                    }
                    op::PONG => {}
                    op::CLOSE => {
                        let body = &self.buf.data[start..end];
                        let code =
                            (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                        let reason = String::from_utf8_lossy(body.get(2..).unwrap_or(&[]));
                        flow = Flow::Closed(format!("close frame code={code:?} reason={reason:?}"));
                        break;
                    }
                    other => bail!("unexpected opcode {other}"),
                }
            }
        }
        self.buf.consume(pos);
        for p in pongs {
            self.stream.write_all(&p).await?;
        }
        if rejoin {
            self.joins += 1;
            let jref = format!("j{}", self.joins);
            self.send_text(&proto::join_text(cfg.vsn, &cfg.topic, &jref))
                .await?;
        }
        Ok(flow)
    }
}

/// Handles a frame that is not a benchmark message; returns true when the
/// channel was errored by the server and should be rejoined (as realtime-js
/// does after `phx_error`).
fn control(frame: &[u8], stats: &Stats, binary: bool) -> bool {
    if binary {
        inc(&stats.other_frames);
        stats.sample(format!(
            "binary frame without seq: {:?}",
            &frame[..frame.len().min(64)]
        ));
        return false;
    }
    let Some(c) = proto::parse_control(frame) else {
        inc(&stats.other_frames);
        stats.sample(format!("undecodable frame: {}", proto::excerpt(frame)));
        return false;
    };
    match c.event.as_str() {
        "phx_reply" if c.topic == "phoenix" => {
            if c.status() == Some("ok") {
                inc(&stats.hb_replies);
            } else {
                inc(&stats.other_frames);
                stats.sample(format!("heartbeat reply not ok: {}", proto::excerpt(frame)));
            }
        }
        "phx_reply" if c.msg_ref.as_deref().is_some_and(|r| r.starts_with('j')) => {
            if c.status() == Some("ok") {
                inc(&stats.rejoined);
            } else {
                inc(&stats.other_frames);
                stats.sample(format!("rejoin refused: {}", proto::excerpt(frame)));
            }
        }
        "phx_error" => {
            inc(&stats.phx_errors);
            stats.sample(format!("phx_error: {}", proto::excerpt(frame)));
            return true;
        }
        "phx_close" => {
            // As realtime-js: a close for the current join ends the channel (no
            // rejoin), and the close the server sends for the join a rejoin
            // replaced carries a stale ref and is ignored. Rejoining here would
            // loop: rejoin → close of the old join → rejoin → …
            inc(&stats.phx_closes);
            stats.sample(format!("phx_close: {}", proto::excerpt(frame)));
        }
        "system" => {
            inc(&stats.system_msgs);
            stats.sample(format!("system: {}", proto::excerpt(frame)));
        }
        // presence_state etc. should not arrive with presence disabled.
        _ => {
            inc(&stats.other_frames);
            stats.sample(format!("unexpected frame: {}", proto::excerpt(frame)));
        }
    }
    false
}

/// Connects, upgrades and joins; returns the reader once the join reply is ok.
async fn connect_and_join(
    id: usize,
    cfg: &ClientCfg,
    slow: bool,
) -> Result<Reader, (bool, String)> {
    let rcvbuf = if slow { cfg.slow_rcvbuf } else { None };
    let (stream, buf) = ws::connect(&cfg.ep, cfg.source_for(id), rcvbuf, cfg.join_timeout)
        .await
        .map_err(|e| (false, format!("{e:#}")))?;
    let mut r = Reader {
        id,
        stream,
        buf,
        frag: Vec::new(),
        frag_op: 0,
        masks: MaskGen::new(id as u32 ^ 0x9E37_79B9),
        track: SeqTrack::default(),
        hb_ref: 1,
        joins: 0,
        out: Vec::with_capacity(256),
    };
    let join = proto::join_text(cfg.vsn, &cfg.topic, "1");
    r.send_text(&join)
        .await
        .map_err(|e| (true, format!("sending join: {e}")))?;
    let deadline = tokio::time::Instant::now() + cfg.join_timeout;
    loop {
        // Look for the join reply among buffered frames.
        let mut pos = 0;
        let mut reply = None;
        while let Some(f) = ws::parse_frame(&r.buf.data[pos..r.buf.filled], MAX_FRAME)
            .map_err(|e| (true, format!("{e:#}")))?
        {
            let frame = &r.buf.data[pos + f.start..pos + f.end];
            pos += f.end;
            if f.opcode == op::CLOSE {
                return Err((
                    true,
                    "server closed the socket before the join reply".into(),
                ));
            }
            if f.opcode != op::TEXT {
                continue;
            }
            if let Some(c) = proto::parse_control(frame) {
                if c.event == "phx_reply" && c.msg_ref.as_deref() == Some("1") {
                    reply = Some((c.status().map(str::to_owned), proto::excerpt(frame)));
                    break;
                }
            }
        }
        r.buf.consume(pos);
        if let Some((status, text)) = reply {
            if status.as_deref() == Some("ok") {
                return Ok(r);
            }
            return Err((true, format!("join refused: {text}")));
        }
        let n = tokio::time::timeout_at(deadline, r.buf.read_from(&mut r.stream))
            .await
            .map_err(|_| (true, "join reply timed out".to_owned()))?
            .map_err(|e| (true, format!("reading join reply: {e}")))?;
        if n == 0 {
            return Err((true, "EOF before the join reply".into()));
        }
    }
}

/// Runs one subscriber until `ctl.shutdown`.
pub async fn subscriber(
    id: usize,
    cfg: Arc<ClientCfg>,
    stats: Arc<Stats>,
    ctl: Ctl,
    gate: Arc<Semaphore>,
    slow: bool,
) {
    let permit = tokio::select! {
        p = gate.acquire_owned() => p.ok(),
        _ = ctl.shutdown.cancelled() => return,
    };
    let t0 = Instant::now();
    let mut r = match connect_and_join(id, &cfg, slow).await {
        Ok(r) => r,
        Err((joined_tcp, e)) => {
            inc(if joined_tcp {
                &stats.join_errors
            } else {
                &stats.connect_errors
            });
            stats.sample(format!("client {id}: {e}"));
            return;
        }
    };
    stats.record_join(t0.elapsed().as_micros() as u64);
    inc(&stats.joined);
    drop(permit);

    let hb = tokio::time::sleep(cfg.heartbeat);
    tokio::pin!(hb);
    // 0 = reading, 1 = paused (slow consumer), 2 = resumed.
    let mut phase = 0u8;
    loop {
        tokio::select! {
            biased;
            _ = ctl.shutdown.cancelled() => break,
            _ = ctl.pause.cancelled(), if slow && phase == 0 => phase = 1,
            _ = ctl.resume.cancelled(), if phase == 1 => phase = 2,
            _ = &mut hb => {
                hb.as_mut().reset(tokio::time::Instant::now() + cfg.heartbeat);
                if let Err(e) = r.heartbeat(&cfg, &stats).await {
                    inc(&stats.dropped);
                    stats.sample(format!("client {id}: heartbeat write failed: {e}"));
                    return;
                }
            }
            res = r.buf.read_from(&mut r.stream), if phase != 1 => {
                let now = now_ns();
                let n = match res {
                    Ok(n) => n,
                    Err(e) => {
                        inc(&stats.dropped);
                        stats.sample(format!("client {id}: read error: {e}"));
                        return;
                    }
                };
                if n == 0 {
                    inc(&stats.dropped);
                    stats.sample(format!("client {id}: server closed the connection (EOF)"));
                    return;
                }
                match r.process(&cfg, &stats, now).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Closed(why)) => {
                        inc(&stats.dropped);
                        stats.sample(format!("client {id}: {why}"));
                        return;
                    }
                    Err(e) => {
                        inc(&stats.dropped);
                        stats.sample(format!("client {id}: {e:#}"));
                        return;
                    }
                }
            }
        }
    }
}

/// Spawns `n` subscribers with ids `first..first+n`; `slow(id)` marks slow ones.
#[allow(clippy::too_many_arguments)]
pub fn spawn_subscribers(
    first: usize,
    n: usize,
    cfg: &Arc<ClientCfg>,
    stats_fast: &Arc<Stats>,
    stats_slow: &Arc<Stats>,
    ctl: &Ctl,
    gate: &Arc<Semaphore>,
    slow: impl Fn(usize) -> bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    (first..first + n)
        .map(|id| {
            let is_slow = slow(id);
            let stats = if is_slow { stats_slow } else { stats_fast };
            tokio::spawn(subscriber(
                id,
                Arc::clone(cfg),
                Arc::clone(stats),
                ctl.clone(),
                Arc::clone(gate),
                is_slow,
            ))
        })
        .collect()
}

/// What one publishing step sent.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sent {
    /// First sequence number of the step.
    pub first_seq: u64,
    /// Messages sent.
    pub count: u64,
    /// Seconds spent sending.
    pub secs: f64,
}

impl Sent {
    /// Achieved messages per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.count as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// The publisher: a V2 client joined to the topic, pushing JSON broadcasts.
#[derive(Debug)]
pub struct Publisher {
    writer: Arc<AsyncMutex<OwnedWriteHalf>>,
    topic: String,
    pad: usize,
    seq: u64,
    next_ref: u64,
    masks: MaskGen,
    /// Frames the publisher's socket received (replies, errors).
    pub stats: Arc<Stats>,
    stop: CancellationToken,
}

impl Publisher {
    /// Connects and joins (always V2, as realtime-js).
    pub async fn connect(
        ep: &Endpoint,
        topic: &str,
        frame_bytes: usize,
        heartbeat: Duration,
        stop: CancellationToken,
    ) -> anyhow::Result<Publisher> {
        let cfg = ClientCfg {
            ep: ep.clone(),
            vsn: Vsn::V2,
            topic: topic.to_owned(),
            sources: Vec::new(),
            per_source: usize::MAX,
            heartbeat,
            join_timeout: Duration::from_secs(30),
            seq_mod: 0,
            slow_rcvbuf: None,
        };
        let r = connect_and_join(usize::MAX, &cfg, false)
            .await
            .map_err(|(_, e)| anyhow::anyhow!(e))
            .context("publisher connect/join")?;
        let Reader {
            stream, mut buf, ..
        } = r;
        let (mut rd, wr) = stream.into_split();
        let writer = Arc::new(AsyncMutex::new(wr));
        let stats = Arc::new(Stats::new());
        // Drain what the server sends the publisher (heartbeat replies, errors).
        {
            let stats = Arc::clone(&stats);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let mut pos = 0;
                    while let Ok(Some(f)) = ws::parse_frame(&buf.data[pos..buf.filled], MAX_FRAME) {
                        let frame = &buf.data[pos + f.start..pos + f.end];
                        pos += f.end;
                        if f.opcode == op::TEXT {
                            if proto::find_stamp(frame).is_some() {
                                inc(&stats.other_frames);
                                stats.sample(
                                    "publisher received its own broadcast (self:false)".into(),
                                );
                            } else {
                                let _ = control(frame, &stats, false);
                            }
                        } else if f.opcode == op::CLOSE {
                            inc(&stats.dropped);
                            stats.sample("publisher: server sent a close frame".into());
                        }
                    }
                    buf.consume(pos);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = buf.read_from(&mut rd) => match r {
                            Ok(0) | Err(_) => {
                                if !stop.is_cancelled() {
                                    inc(&stats.dropped);
                                    stats.sample("publisher: connection closed by the server".into());
                                }
                                break;
                            }
                            Ok(_) => {}
                        }
                    }
                }
            });
        }
        // Heartbeats.
        {
            let writer = Arc::clone(&writer);
            let stats = Arc::clone(&stats);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut masks = MaskGen::new(0xDEAD_BEEF);
                let mut r = 1_000_000_000u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(heartbeat) => {}
                    }
                    r += 1;
                    let mut out = Vec::new();
                    ws::encode_frame(
                        &mut out,
                        op::TEXT,
                        proto::heartbeat_text(Vsn::V2, r).as_bytes(),
                        Some(masks.next_key()),
                    );
                    inc(&stats.hb_sent);
                    if writer.lock().await.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Publisher {
            writer,
            topic: topic.to_owned(),
            pad: proto::pad_for(topic, frame_bytes),
            seq: 0,
            next_ref: 2,
            masks: MaskGen::new(0x1234_5678),
            stats,
            stop,
        })
    }

    /// Sends at `rate` msgs/s for `dur`, tagging messages with `step`.
    pub async fn run(&mut self, rate: f64, dur: Duration, step: u32) -> anyhow::Result<Sent> {
        let first_seq = self.seq;
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut inner = String::with_capacity(512);
        let mut text = String::with_capacity(512);
        let max_burst = ((rate * 0.05) as u64).max(1);
        loop {
            tick.tick().await;
            let el = start.elapsed();
            if el >= dur || self.stop.is_cancelled() {
                break;
            }
            let due = (rate * el.as_secs_f64()) as u64 + 1;
            let sent = self.seq - first_seq;
            let n = due.saturating_sub(sent).min(max_burst);
            if n == 0 {
                continue;
            }
            out.clear();
            let t = now_ns();
            for _ in 0..n {
                inner.clear();
                text.clear();
                proto::bench_payload(&mut inner, self.seq, t, step, self.pad);
                proto::broadcast_text_v2(&mut text, &self.topic, "1", self.next_ref, &inner);
                ws::encode_frame(
                    &mut out,
                    op::TEXT,
                    text.as_bytes(),
                    Some(self.masks.next_key()),
                );
                self.seq += 1;
                self.next_ref += 1;
            }
            self.writer
                .lock()
                .await
                .write_all(&out)
                .await
                .context("publisher write")?;
        }
        Ok(Sent {
            first_seq,
            count: self.seq - first_seq,
            secs: start
                .elapsed()
                .as_secs_f64()
                .min(dur.as_secs_f64())
                .max(1e-9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert_eq!(t.see(0, 0), Some(0));
        assert_eq!(t.see(1, 0), Some(0));
        assert_eq!(t.see(4, 0), Some(2));
        assert_eq!(t.see(3, 0), None);
        let mut t = SeqTrack::default();
        assert_eq!(t.see(0, 4), Some(0));
        assert_eq!(t.see(3, 4), Some(2));
        assert_eq!(t.see(0, 4), Some(0));
    }
}
