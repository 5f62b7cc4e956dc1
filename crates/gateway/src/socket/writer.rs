//! The writer task: drains a connection's backlog into the socket.
//!
//! Frames are encoded by publishers once and shared; here we only prepend the
//! 2–10 byte WebSocket header and copy many queued frames into one buffer, so
//! a burst costs one `write` syscall instead of one per frame. Server frames
//! are never masked, so the header is all we add.
//!
//! Two queues feed it: the bounded backlog (everything but Postgres Changes,
//! lossy) and the connection's paced queue of change frames (lossless, see
//! [`crate::flow`]). After the backlog's frames it takes up to 64 KiB of
//! change frames, and it stamps every write that makes progress: that is how
//! flow control tells a slow reader from a stalled one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use phoenix_channel::{encode_text, Vsn};
use serde_json::json;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::LagPolicy;
use crate::flow::Flow;
use crate::registry::{ChannelHandle, ConnHandle, Outbound};

/// Frames taken from the backlog at once.
const BATCH: usize = 256;
/// Bytes copied into one write (at least one frame, however large).
const WRITE_CHUNK: usize = 64 * 1024;
/// Buffers larger than these are not kept between bursts, so an idle socket
/// costs little memory after a busy spell.
const KEEP_BUFFER: usize = 4 * 1024;
const KEEP_BATCH: usize = 32;

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PONG: u8 = 0xA;

/// Appends one unmasked, final frame to `buf`.
pub(crate) fn put_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    buf.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// Appends a queued frame; returns whether it was a close (the writer stops after it).
fn put_outbound(buf: &mut Vec<u8>, frame: &Outbound) -> bool {
    match frame {
        Outbound::Text(b) => put_frame(buf, OP_TEXT, b),
        Outbound::Binary(b) => put_frame(buf, OP_BINARY, b),
        Outbound::Pong(b) => put_frame(buf, OP_PONG, b),
        Outbound::Close(b) => {
            put_frame(buf, OP_CLOSE, b);
            return true;
        }
        Outbound::Paced => {}
    }
    false
}

/// A close frame payload: status code and reason.
pub(crate) fn close_payload(code: u16, reason: &str) -> Bytes {
    let mut v = Vec::with_capacity(2 + reason.len());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(reason.as_bytes());
    Bytes::from(v)
}

/// Why the writer stopped.
#[derive(Debug)]
pub(crate) enum WriterEnd {
    /// A close frame was written.
    Closed,
    /// The backlog was closed (the connection is going away).
    Drained,
    /// The socket failed or stalled.
    Io(std::io::Error),
}

/// Settings the writer needs.
#[derive(Clone, Debug)]
pub(crate) struct WriterSettings {
    pub(crate) vsn: Vsn,
    pub(crate) policy: LagPolicy,
    pub(crate) write_timeout: Duration,
    /// Where the connection's paced change frames are accounted.
    pub(crate) flow: Arc<Flow>,
}

/// Runs until a close frame is written (the reader queues one for every
/// ending, shutdown included: 1001), the backlog closes, or the socket fails.
///
/// No `select!`: waiting is only `recv_many`, so a wake-up costs one queue
/// pop, not re-registering with a cancellation token and a `Notify`.
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut sock: W,
    mut rx: mpsc::Receiver<Outbound>,
    conn: Arc<ConnHandle>,
    settings: WriterSettings,
) -> WriterEnd {
    let mut batch: Vec<Outbound> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    // A lag notice waits until the frames queued before the drop are written
    // (in normal batches: the write buffer never holds the whole backlog).
    let mut notice_after: Option<usize> = None;
    loop {
        if batch.is_empty() {
            if conn.paced.is_empty() {
                if rx.recv_many(&mut batch, BATCH).await == 0 {
                    return WriterEnd::Drained;
                }
                if batch.len() < 8 {
                    // Adaptive batching: let the other runnable tasks (a fan-out in
                    // progress) go first, then take what arrived meanwhile. When the
                    // runtime is idle this returns at once; under load it turns many
                    // one-frame writes into fewer, larger ones.
                    tokio::task::yield_now().await;
                    take_ready(&mut rx, &mut batch);
                }
            } else {
                // Change frames are waiting: take what the backlog holds without waiting.
                take_ready(&mut rx, &mut batch);
            }
            settings.flow.take(&conn, &mut batch);
        }
        // Copy at most WRITE_CHUNK bytes per write; the rest of the batch waits
        // in place, so a writer blocked on a slow socket holds one chunk, not a batch.
        let mut closing = false;
        let mut taken = 0;
        for frame in &batch {
            if !buf.is_empty() && buf.len() >= WRITE_CHUNK {
                break;
            }
            taken += 1;
            if put_outbound(&mut buf, frame) {
                closing = true;
                break;
            }
        }
        let markers = batch[..taken]
            .iter()
            .filter(|f| matches!(f, Outbound::Paced))
            .count();
        batch.drain(..taken);
        conn.stats
            .frames_out
            .fetch_add((taken - markers) as u64, Ordering::Relaxed);
        notice_after = match notice_after {
            Some(left) => Some(left.saturating_sub(taken)),
            // Frames still queued were queued before the drop: they go first,
            // so the notice is the last thing the client sees of that channel.
            // (A later lag while one is pending joins that notice.)
            None if conn.lag_pending.swap(false, Ordering::Acquire) => Some(batch.len() + rx.len()),
            None => None,
        };
        if notice_after == Some(0) && !closing {
            conn.lag_pending.store(false, Ordering::Relaxed);
            report_lag(&conn, &settings, &mut buf);
            notice_after = None;
        }
        // Publishers that may wait (REST) watch how long a write is blocked.
        settings.flow.write_started(&conn);
        let written = write_progressing(&mut sock, &buf, &conn, &settings).await;
        settings.flow.write_done(&conn);
        if let Err(e) = written {
            return WriterEnd::Io(e);
        }
        // Keep the buffers while busy; release them when the socket goes quiet.
        let idle = batch.is_empty() && rx.is_empty() && conn.paced.is_empty();
        if idle && buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        } else {
            buf.clear();
        }
        if idle && batch.capacity() > KEEP_BATCH {
            batch = Vec::new();
        }
        if closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), sock.shutdown()).await;
            return WriterEnd::Closed;
        }
    }
}

/// Moves frames already in the backlog into `batch`, without waiting.
fn take_ready(rx: &mut mpsc::Receiver<Outbound>, batch: &mut Vec<Outbound>) {
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(frame) => batch.push(frame),
            Err(_) => break,
        }
    }
}

/// Writes all of `buf`, stamping flow-control progress after every write the
/// socket accepts. Fails when one write makes no progress for the write timeout.
async fn write_progressing<W: AsyncWrite + Unpin>(
    sock: &mut W,
    buf: &[u8],
    conn: &ConnHandle,
    settings: &WriterSettings,
) -> std::io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(settings.write_timeout, sock.write(&buf[written..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => {
                written += n;
                // Progress, and blocked from now on if at all (`Flow::writing_for`).
                settings.flow.progressed(conn);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                conn.stats.write_stalled.store(true, Ordering::Relaxed);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "socket write stalled",
                ));
            }
        }
    }
    Ok(())
}

/// Applies the lag policy to every channel that dropped frames since last time.
fn report_lag(conn: &ConnHandle, settings: &WriterSettings, buf: &mut Vec<u8>) {
    let lagged: Vec<Arc<ChannelHandle>> = std::mem::take(&mut *conn.lagged.lock());
    for chan in lagged {
        if settings.policy == LagPolicy::Error {
            chan.reported.store(true, Ordering::Relaxed);
        }
        let dropped = chan.dropped.swap(0, Ordering::Relaxed);
        tracing::warn!(
            topic = %chan.topic,
            dropped,
            policy = ?settings.policy,
            "client cannot keep up; frames dropped"
        );
        if settings.policy == LagPolicy::Skip {
            continue;
        }
        let notice = json!({
            "extension": "system",
            "status": "error",
            "message": format!(
                "{dropped} messages were dropped because the client could not keep up; rejoin and refetch"
            ),
            "channel": chan.subtopic(),
        });
        let jr = chan.join_ref.as_ref();
        if let Ok(f) = encode_text(settings.vsn, jr, None, &chan.topic, "system", &notice) {
            put_frame(buf, OP_TEXT, &f);
        }
        // ref = join_ref, or realtime-js ignores the phx_error.
        if let Ok(f) = encode_text(settings.vsn, jr, jr, &chan.topic, "phx_error", &json!({})) {
            put_frame(buf, OP_TEXT, &f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        let mut b = Vec::new();
        put_frame(&mut b, OP_TEXT, &[b'x'; 125]);
        assert_eq!(&b[..2], &[0x81, 125]);
        b.clear();
        put_frame(&mut b, OP_BINARY, &[0; 126]);
        assert_eq!(&b[..4], &[0x82, 126, 0, 126]);
        b.clear();
        put_frame(&mut b, OP_TEXT, &vec![0; 70_000]);
        assert_eq!(&b[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(b[2..10].try_into().unwrap()), 70_000);
        assert_eq!(b.len(), 10 + 70_000);
    }
}
