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

use crate::channel::Session;
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
    vsn: Vsn,
    token: Option<String>,
    _permit: OwnedSemaphorePermit,
) {
    let id = shared.next_id();
    shared.fanout.metrics.connections.increment(1.0);
    let end = run(upgraded, &shared, id, vsn, token).await;
    shared.fanout.metrics.connections.decrement(1.0);
    match &end {
        ConnEnd::Protocol(e) => tracing::debug!(conn_id = id, error = %e, "connection closed"),
        other => tracing::debug!(conn_id = id, end = ?other, "connection closed"),
    }
}

async fn run(
    upgraded: Upgraded,
    shared: &Arc<Shared>,
    id: u64,
    vsn: Vsn,
    token: Option<String>,
) -> ConnEnd {
    let config = &shared.config;
    let (read, write) = split(upgraded);
    let (tx, rx) = mpsc::channel(config.client_backlog);
    let conn = Arc::new(ConnHandle::new(id, tx));
    let stop = shared.shutdown.child_token();
    let settings = WriterSettings {
        vsn,
        policy: config.lag_policy,
        write_timeout: config.write_timeout(),
    };
    let writer_conn = Arc::clone(&conn);
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        let end = writer::run(write, rx, writer_conn, settings).await;
        // A writer that stops first failed or stalled: the reader must stop
        // too, or a client that never reads keeps publishing.
        writer_stop.cancel();
        end
    });

    let mut session = Session::new(Arc::clone(shared), Arc::clone(&conn), vsn, token);
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
    // Break the channel → connection reference cycle of a pending lag report.
    conn.lagged.lock().clear();
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
            tracing::debug!(conn_id = id, cause = %e, "socket write failed")
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
    // When the socket last had no channel (now: it has none yet).
    let mut empty_since = Some(Instant::now());
    loop {
        let now = Instant::now();
        let idle_at = now + idle;
        let deadline = empty_since.map_or(idle_at, |t| idle_at.min(t + no_channel));
        // Arms: shutdown (or the writer gone), or the next message before the
        // deadline. The reader is cancel-safe, and both arms end the connection anyway.
        let incoming = tokio::select! {
            biased;
            _ = stop.cancelled() => return ConnEnd::Shutdown,
            r = tokio::time::timeout_at(deadline, reader.next()) => match r {
                Err(_) if deadline < idle_at => return ConnEnd::NoChannels,
                Err(_) => return ConnEnd::Idle,
                Ok(Err(e)) => return classify(e),
                Ok(Ok(incoming)) => incoming,
            },
        };
        let size = incoming.len();
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
