//! One WebSocket connection: a reader task and a writer task.
//!
//! fastwebsockets reads are not cancel-safe, so the reader owns the read half
//! and is only ever cancelled when the connection is closing anyway (idle
//! timeout, shutdown). It decodes frames and runs the [`Session`]; everything
//! the client must receive goes through the connection's bounded backlog to
//! the writer (see [`writer`]), including the pongs and close echoes the
//! library says we owe the peer.

pub(crate) mod writer;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{OpCode, Role, WebSocketError};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use phoenix_channel::{decode_binary, decode_text, Vsn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::channel::Session;
use crate::registry::{ConnHandle, Outbound};
use crate::state::Shared;
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
    /// A message larger than `MAX_FRAME_SIZE`.
    TooLarge,
    /// A WebSocket protocol violation.
    Protocol(String),
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
    let conn = Arc::new(ConnHandle {
        id,
        tx,
        lagged: Mutex::new(Vec::new()),
        lag_notify: Notify::new(),
    });
    let stop = shared.shutdown.child_token();
    let settings = WriterSettings {
        vsn,
        policy: config.lag_policy,
        write_timeout: config.write_timeout(),
    };
    let writer = tokio::spawn(writer::run(
        write,
        rx,
        Arc::clone(&conn),
        stop.clone(),
        settings,
    ));

    let mut session = Session::new(Arc::clone(shared), Arc::clone(&conn), vsn, token);
    let end = read_loop(read, &mut session, shared, &stop).await;
    session.close_all();
    drop(session);

    // Tell the peer why, unless it closed first (its echo is already queued)
    // or we are shutting down (the writer sends 1001 itself).
    let close = match &end {
        ConnEnd::Idle => Some(close_payload(1000, "idle timeout")),
        ConnEnd::TooLarge => Some(close_payload(1009, "message too big")),
        ConnEnd::Protocol(_) => Some(close_payload(1002, "protocol error")),
        ConnEnd::ClientClosed | ConnEnd::Eof | ConnEnd::Shutdown => None,
    };
    if let Some(payload) = close {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            conn.tx.send(Outbound::Close(payload)),
        )
        .await;
    }
    if matches!(end, ConnEnd::Eof) {
        stop.cancel();
    }
    drop(conn);
    // The writer ends after the close frame, when the backlog closes, or on `stop`.
    let mut writer = writer;
    match tokio::time::timeout(config.write_timeout(), &mut writer).await {
        Ok(Ok(writer::WriterEnd::Io(e))) => {
            tracing::debug!(conn_id = id, cause = %e, "socket write failed")
        }
        Ok(_) => {}
        Err(_) => writer.abort(),
    }
    end
}

/// Reads frames until the connection ends, reassembling fragmented messages
/// (bounded by `MAX_FRAME_SIZE` in total, not just per frame).
async fn read_loop(
    read: BoxRead,
    session: &mut Session,
    shared: &Shared,
    stop: &tokio_util::sync::CancellationToken,
) -> ConnEnd {
    let max = shared.config.max_frame_size;
    let idle = shared.config.idle_timeout();
    let (mut ws, _) = fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    ws.set_max_message_size(max);
    let tx = session.conn.tx.clone();
    // Frames the library says we owe the peer (pong, close echo) go to the writer.
    let mut owed = move |frame: fastwebsockets::Frame<'_>| {
        let data = Bytes::copy_from_slice(&frame.payload);
        let out = if frame.opcode == OpCode::Close {
            Outbound::Close(data)
        } else {
            Outbound::Pong(data)
        };
        let tx = tx.clone();
        async move { tx.send(out).await.map_err(|_| "connection writer is gone") }
    };
    let mut partial: Option<(OpCode, BytesMut)> = None;
    loop {
        // Arms: shutdown, or the next frame within the idle timeout. Dropping a
        // half-read frame is fine in both cases: the connection is closing.
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => return ConnEnd::Shutdown,
            r = tokio::time::timeout(idle, ws.read_frame(&mut owed)) => match r {
                Err(_) => return ConnEnd::Idle,
                // The frame was consumed whole; like Supabase (UTF-8 validation
                // off), treat it as a malformed message and keep the socket.
                Ok(Err(WebSocketError::InvalidUTF8)) => {
                    shared.fanout.metrics.malformed.increment(1);
                    continue;
                }
                Ok(Err(e)) => return classify(e),
                Ok(Ok(frame)) => frame,
            },
        };
        let (opcode, mut payload) = match frame.opcode {
            OpCode::Close => return ConnEnd::ClientClosed,
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Continuation => {
                let Some((op, mut buf)) = partial.take() else {
                    return ConnEnd::Protocol("continuation without a first frame".into());
                };
                if buf.len() + frame.payload.len() > max {
                    return ConnEnd::TooLarge;
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    partial = Some((op, buf));
                    continue;
                }
                (op, buf)
            }
            op @ (OpCode::Text | OpCode::Binary) => {
                if partial.is_some() {
                    return ConnEnd::Protocol("new message inside a fragmented one".into());
                }
                let buf = BytesMut::from(&frame.payload[..]);
                if !frame.fin {
                    partial = Some((op, buf));
                    continue;
                }
                (op, buf)
            }
        };
        let decoded = if opcode == OpCode::Text {
            decode_text(session.vsn, &mut payload)
        } else {
            decode_binary(&payload)
        };
        match decoded {
            Ok(msg) => {
                session.handle(msg).await;
            }
            Err(e) => {
                // Realtime logs MalformedWebSocketMessage and keeps the socket open.
                shared.fanout.metrics.malformed.increment(1);
                tracing::debug!(error = %e, "malformed message dropped");
            }
        }
    }
}

fn classify(e: WebSocketError) -> ConnEnd {
    match e {
        WebSocketError::FrameTooLarge => ConnEnd::TooLarge,
        WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed => ConnEnd::Eof,
        WebSocketError::IoError(ref io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            ConnEnd::Eof
        }
        WebSocketError::SendError(_) => ConnEnd::Eof,
        other => ConnEnd::Protocol(other.to_string()),
    }
}
