//! One WebSocket connection: a reader task and a writer task.
//!
//! fastwebsockets reads are not cancel-safe, so the reader owns the read half
//! and is only ever cancelled when the connection is closing anyway (idle
//! timeout, shutdown). It decodes frames and runs the [`Session`]; everything
//! the client must receive goes through the connection's bounded backlog to
//! the writer (see [`writer`]), including the pongs and close echoes the
//! library says we owe the peer.

mod frame;
pub(crate) mod writer;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use phoenix_channel::{decode_binary, decode_text, Vsn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::Instrument;

use crate::channel::{ConnAuth, Session};
use crate::ops::conns::{ConnMeta, DisconnectReason};
use crate::registry::{ConnHandle, Outbound};
use crate::state::Shared;
use frame::{FrameReader, Incoming, ReadError};
use writer::{close_payload, WriterSettings};

/// Why a connection ended (logged once by [`serve`]).
#[derive(Debug)]
pub enum ConnEnd {
    /// The client sent a close frame.
    ClientClosed,
    /// The peer went away without a close frame.
    Eof,
    /// No frame within the idle timeout.
    Idle,
    /// The gateway is shutting down.
    Shutdown,
    /// A message larger than `MAX_FRAME_SIZE`; `unread` bytes of it were still in flight.
    TooLarge {
        /// Payload bytes not read.
        unread: u64,
    },
    /// A WebSocket protocol violation.
    Protocol(String),
    /// The writer stopped (the socket failed, or a write stalled past `WRITE_TIMEOUT_MS`).
    WriterGone,
    /// No channel was joined for `NO_CHANNEL_TIMEOUT_IN_MS`.
    NoChannels,
    /// A join was refused by the join rate limit (upstream disconnects the socket).
    JoinRate,
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Splits an upgraded connection into owned halves (no lock between them when
/// it is a plain TCP stream, which it always is here).
fn split(upgraded: Upgraded) -> (BoxRead, BoxWrite) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (r, w) = parts.io.into_inner().into_split();
            if parts.read_buf.is_empty() {
                // The common case. Dropping `read_buf` also frees hyper's read
                // buffer, which it is a view of (kilobytes per idle socket).
                return (Box::new(r), Box::new(w));
            }
            // Bytes hyper read past the handshake belong to the first frame.
            let early = Bytes::copy_from_slice(&parts.read_buf);
            (Box::new(Cursor::new(early).chain(r)), Box::new(w))
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            (Box::new(r), Box::new(w))
        }
    }
}

/// Serves one upgraded socket until it ends; logs the outcome once.
pub async fn serve(
    upgraded: Upgraded,
    shared: Arc<Shared>,
    meta: ConnMeta,
    vsn: Vsn,
    auth: ConnAuth,
    _permit: OwnedSemaphorePermit,
) {
    let id = meta.id;
    shared.fanout.metrics.connections.increment(1.0);
    let end = run(upgraded, &shared, meta, vsn, auth).await;
    shared.fanout.metrics.connections.decrement(1.0);
    let (reason, detail) = match &end {
        ConnEnd::ClientClosed => (DisconnectReason::ClientClose, None),
        ConnEnd::Eof => (DisconnectReason::ClientGone, None),
        ConnEnd::Idle => (DisconnectReason::Idle, None),
        ConnEnd::Shutdown => (DisconnectReason::Shutdown, None),
        ConnEnd::TooLarge { .. } => (
            DisconnectReason::Limit,
            Some(format!(
                "message over MAX_FRAME_SIZE ({} bytes)",
                shared.config.max_frame_size
            )),
        ),
        ConnEnd::Protocol(e) => (DisconnectReason::ProtocolError, Some(e.clone())),
        // A stalled write is reported as `lag` by the ops registry.
        ConnEnd::WriterGone => (DisconnectReason::ClientGone, None),
        ConnEnd::NoChannels => (
            DisconnectReason::Idle,
            Some("no channel joined for NO_CHANNEL_TIMEOUT_IN_MS".to_owned()),
        ),
        ConnEnd::JoinRate => (
            DisconnectReason::Limit,
            Some("Too many joins per second".to_owned()),
        ),
    };
    let reason = shared.ops.conns.ended(id, reason, detail);
    match &end {
        ConnEnd::Protocol(e) => {
            tracing::debug!(error = %e, reason = reason.as_str(), "connection closed")
        }
        other => tracing::debug!(end = ?other, reason = reason.as_str(), "connection closed"),
    }
}

async fn run(
    upgraded: Upgraded,
    shared: &Arc<Shared>,
    meta: ConnMeta,
    vsn: Vsn,
    auth: ConnAuth,
) -> ConnEnd {
    let config = &shared.config;
    let (read, write) = split(upgraded);
    let (tx, rx) = mpsc::channel(config.client_backlog);
    let conn = Arc::new(ConnHandle::new(meta.id, tx));
    let (sub, role) = (auth.claims.sub.clone(), auth.claims.role.clone());
    shared
        .ops
        .conns
        .register(meta, sub, role, Arc::clone(&conn));
    let stop = shared.shutdown.child_token();
    let settings = WriterSettings {
        vsn,
        policy: config.lag_policy,
        write_timeout: config.write_timeout(),
        flow: Arc::clone(&shared.fanout.flow),
    };
    let writer_conn = Arc::clone(&conn);
    let writer_stop = stop.clone();
    let writer = async move {
        let end = writer::run(write, rx, writer_conn, settings).await;
        // A writer that stops first failed or stalled: the reader must stop
        // too, or a client that never reads keeps publishing.
        writer_stop.cancel();
        end
    };
    // In the connection's span, so the writer's lines name the connection too.
    let writer = tokio::spawn(writer.in_current_span());

    let mut session = Session::new(Arc::clone(shared), Arc::clone(&conn), vsn, auth);
    let mut reader = FrameReader::new(read, config.max_frame_size);
    let mut end = read_loop(&mut reader, &mut session, shared, &stop).await;
    if matches!(end, ConnEnd::Shutdown) && writer.is_finished() && !shared.shutdown.is_cancelled() {
        end = ConnEnd::WriterGone;
    }
    session.close_all();
    drop(session);

    // Tell the peer why, after what is already queued; unless it closed first
    // (its echo is already queued) or is gone.
    let close = match &end {
        ConnEnd::Idle => Some(close_payload(1000, "idle timeout")),
        ConnEnd::TooLarge { .. } => Some(close_payload(1009, "message too big")),
        ConnEnd::Protocol(_) => Some(close_payload(1002, "protocol error")),
        // 1001: realtime-js reconnects (ideally to another replica).
        ConnEnd::Shutdown => Some(close_payload(1001, "server shutting down")),
        // The peer is gone: the frame only tells the writer to stop (the
        // writer holds the connection handle, so its backlog never closes by itself).
        ConnEnd::Eof => Some(close_payload(1000, "")),
        ConnEnd::NoChannels => Some(close_payload(1000, "no channel joined")),
        // As upstream's `disconnect` broadcast (Phoenix closes with 1001).
        ConnEnd::JoinRate => Some(close_payload(1001, "Too many joins per second")),
        ConnEnd::ClientClosed | ConnEnd::WriterGone => None,
    };
    // Break the channel → connection reference cycles of a pending lag report
    // and of queued change frames (whose budget goes back to the others).
    conn.lagged.lock().clear();
    shared.fanout.flow.forget(&conn);
    if let Some(payload) = close {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            conn.tx.send(Outbound::Close(payload)),
        )
        .await;
    }
    drop(conn);
    // The writer ends after the close frame (or when its socket fails).
    let mut writer = writer;
    // Read (and drop) what the peer is still sending, bounded, so the kernel
    // does not reset the socket before the peer reads our close frame: the rest
    // of an oversized frame, or the frames behind a refused join.
    let unread = match end {
        ConnEnd::TooLarge { unread } => Some(unread),
        ConnEnd::JoinRate => Some(u64::MAX),
        _ => None,
    };
    if let Some(unread) = unread {
        let bound = unread.min(2 * config.max_frame_size as u64);
        let _ = tokio::time::timeout(Duration::from_secs(2), reader.discard(bound)).await;
    }
    match tokio::time::timeout(config.write_timeout(), &mut writer).await {
        Ok(Ok(writer::WriterEnd::Io(e))) => {
            tracing::debug!(cause = %e, "socket write failed")
        }
        Ok(_) => {}
        Err(_) => writer.abort(),
    }
    end
}

/// Reads messages until the connection ends.
async fn read_loop(
    reader: &mut FrameReader<BoxRead>,
    session: &mut Session,
    shared: &Shared,
    stop: &tokio_util::sync::CancellationToken,
) -> ConnEnd {
    let idle = shared.config.idle_timeout();
    let no_channel = Duration::from_millis(shared.config.no_channel_timeout_in_ms);
    let mut idle_at = Instant::now() + idle;
    // When the socket last had no channel (now: it has none yet).
    let mut empty_since = Some(Instant::now());
    loop {
        let no_channel_at = empty_since.map(|t| t + no_channel);
        let wake = [session.next_wakeup(), no_channel_at]
            .into_iter()
            .flatten()
            .fold(idle_at, Instant::min);
        // Arms: shutdown (or the writer gone), the next message, or a deadline:
        // the idle timeout, no channel for too long, a channel's token check, a
        // delayed join error. The reader is cancel-safe, so a deadline does not
        // lose a partly read message.
        let incoming = tokio::select! {
            biased;
            _ = stop.cancelled() => return ConnEnd::Shutdown,
            r = reader.next() => match r {
                Err(e) => return classify(e),
                Ok(incoming) => incoming,
            },
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if now >= idle_at {
                    return ConnEnd::Idle;
                }
                if no_channel_at.is_some_and(|t| now >= t) {
                    return ConnEnd::NoChannels;
                }
                Box::pin(session.on_timer()).await;
                continue;
            }
        };
        idle_at = Instant::now() + idle;
        let size = incoming.len();
        session
            .conn
            .stats
            .frames_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let decoded = match incoming {
            Incoming::Text(mut payload) => decode_text(session.vsn, &mut payload),
            Incoming::Binary(payload) => decode_binary(&payload),
            Incoming::Ping(payload) => {
                if session.conn.tx.send(Outbound::Pong(payload)).await.is_err() {
                    return ConnEnd::Eof;
                }
                continue;
            }
            Incoming::Close(payload) => {
                // Echo the close (its status code only), then stop reading.
                let echo = payload.slice(..payload.len().min(2));
                let _ = session.conn.tx.send(Outbound::Close(echo)).await;
                return ConnEnd::ClientClosed;
            }
        };
        match decoded {
            // Boxed: the handler futures (join in particular) are large, and
            // keeping them out of this loop's state keeps every idle socket small.
            Ok(msg) => {
                Box::pin(session.handle(msg, size)).await;
                if session.must_disconnect() {
                    return ConnEnd::JoinRate;
                }
                empty_since = match (session.is_idle(), empty_since) {
                    (false, _) => None,
                    (true, None) => Some(Instant::now()),
                    (true, since) => since,
                };
            }
            Err(e) => {
                // Realtime logs MalformedWebSocketMessage and keeps the socket open.
                shared.fanout.metrics.malformed.increment(1);
                tracing::debug!(error = %e, "malformed message dropped");
            }
        }
    }
}

fn classify(e: ReadError) -> ConnEnd {
    match e {
        ReadError::TooLarge { unread } => ConnEnd::TooLarge { unread },
        ReadError::Eof => ConnEnd::Eof,
        ReadError::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => ConnEnd::Eof,
            _ => ConnEnd::Protocol(io.to_string()),
        },
        ReadError::Protocol(what) => ConnEnd::Protocol(what.to_owned()),
    }
}
