//! The `ceiling` server: the physical reference for `broadcast`.
//!
//! A minimal WebSocket server that accepts the same readers (upgrade, `ok` to
//! joins and heartbeats) and, on `GET /blast?ms=N&batch=K`, writes pre-encoded
//! broadcast frames to every socket as fast as the socket takes them, `K`
//! frames per `write` syscall. Frames are encoded once at start-up into one
//! contiguous buffer, so a batch is a slice of it: no encoding, no copy, no
//! allocation on the write path. Runs as a child process (`realtime-bench
//! ceiling-server`) so it has its own file-descriptor budget, like the gateway.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::clock::now_ns;
use crate::proto::{self, Vsn};
use crate::ws::{self, op, ReadBuf};

/// Frames in the pre-encoded pool; readers see `seq` wrap at this modulus.
pub const POOL: u64 = 4096;

/// Pre-encoded frames, back to back.
#[derive(Debug)]
struct Pool {
    bytes: Bytes,
    offsets: Vec<usize>,
}

impl Pool {
    fn new(vsn: Vsn, topic: &str, frame_bytes: usize) -> Pool {
        let pad = proto::pad_for(topic, frame_bytes);
        let mut bytes = Vec::new();
        let mut offsets = vec![0];
        let mut inner = String::new();
        for seq in 0..POOL {
            inner.clear();
            proto::bench_payload(&mut inner, seq, 0, 0, pad);
            let text = match vsn {
                Vsn::V2 => format!(
                    r#"[null,null,"realtime:{topic}","broadcast",{{"type":"broadcast","event":"b","payload":{inner}}}]"#
                ),
                Vsn::V1 => format!(
                    r#"{{"topic":"realtime:{topic}","event":"broadcast","payload":{{"type":"broadcast","event":"b","payload":{inner}}},"ref":null}}"#
                ),
            };
            ws::encode_frame(&mut bytes, op::TEXT, text.as_bytes(), None);
            offsets.push(bytes.len());
        }
        Pool {
            bytes: bytes.into(),
            offsets,
        }
    }

    /// Frames `seq .. seq+k` (not wrapping) as one slice, and the next seq.
    fn batch(&self, seq: u64, k: u64) -> (&[u8], u64) {
        let end = (seq + k).min(POOL);
        let s = &self.bytes[self.offsets[seq as usize]..self.offsets[end as usize]];
        (s, end % POOL)
    }
}

#[derive(Debug, Clone, Copy)]
struct Blast {
    until_ns: u64,
    batch: u64,
}

#[derive(Debug)]
struct State {
    v1: Pool,
    v2: Pool,
    blast: watch::Sender<Option<Blast>>,
}

/// Serves until killed.
pub async fn serve(port: u16, frame_bytes: usize, topic: String) -> anyhow::Result<()> {
    let (tx, _rx) = watch::channel(None);
    let state = Arc::new(State {
        v1: Pool::new(Vsn::V1, &topic, frame_bytes),
        v2: Pool::new(Vsn::V2, &topic, frame_bytes),
        blast: tx,
    });
    // An accept queue as deep as the kernel allows (somaxconn caps it): the
    // default of std/mio (128) overflows when thousands of readers connect.
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(([127, 0, 0, 1], port).into())
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let listener: TcpListener = sock.listen(65_535)?;
    eprintln!("ceiling-server listening on 127.0.0.1:{port}");
    loop {
        let (s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, Arc::clone(&state)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" => Ok(text(StatusCode::OK, "ok")),
        "/blast" => {
            let ms: u64 = query(&req, "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5000);
            let batch: u64 = query(&req, "batch")
                .and_then(|v| v.parse().ok())
                .unwrap_or(32);
            let _ = state.blast.send(Some(Blast {
                until_ns: now_ns() + ms * 1_000_000,
                batch: batch.clamp(1, POOL),
            }));
            Ok(text(StatusCode::OK, "blasting"))
        }
        p if p.ends_with("/websocket") => {
            let vsn = match query(&req, "vsn").as_deref() {
                Some(v) if v.starts_with('2') => Vsn::V2,
                _ => Vsn::V1,
            };
            let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(x) => x,
                Err(e) => return Ok(text(StatusCode::BAD_REQUEST, &e.to_string())),
            };
            tokio::spawn(async move {
                let Ok(ws) = fut.await else { return };
                let upgraded = ws.into_inner().into_inner();
                match upgraded.downcast::<TokioIo<TcpStream>>() {
                    Ok(parts) => conn(parts.io.into_inner(), parts.read_buf, vsn, state).await,
                    Err(_) => eprintln!("ceiling: could not recover the TCP stream"),
                }
            });
            Ok(resp.map(|_| Full::new(Bytes::new())))
        }
        _ => Ok(text(StatusCode::NOT_FOUND, "not found")),
    }
}

fn reply(vsn: Vsn, c: &proto::Control, response: &str) -> String {
    let q = |r: &Option<String>| match r {
        Some(s) => format!("\"{s}\""),
        None => "null".to_owned(),
    };
    match vsn {
        Vsn::V2 => format!(
            r#"[{},{},"{}","phx_reply",{{"status":"ok","response":{response}}}]"#,
            q(&c.join_ref),
            q(&c.msg_ref),
            c.topic
        ),
        Vsn::V1 => format!(
            r#"{{"topic":"{}","event":"phx_reply","payload":{{"status":"ok","response":{response}}},"ref":{}}}"#,
            c.topic,
            q(&c.msg_ref)
        ),
    }
}

async fn conn(mut s: TcpStream, pre: Bytes, vsn: Vsn, state: Arc<State>) {
    let mut buf = ReadBuf::new(4096);
    buf.reserve(pre.len());
    buf.data[..pre.len()].copy_from_slice(&pre);
    buf.filled = pre.len();
    let mut rx = state.blast.subscribe();
    let pool = match vsn {
        Vsn::V1 => &state.v1,
        Vsn::V2 => &state.v2,
    };
    let mut seq = 0u64;
    let mut out = Vec::new();
    loop {
        // Answer joins and heartbeats.
        let mut pos = 0;
        out.clear();
        loop {
            let f = match ws::parse_frame(&buf.data[pos..buf.filled], 1 << 20) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            let (start, end) = (pos + f.start, pos + f.end);
            pos = end;
            if let Some(k) = f.mask {
                ws::unmask(&mut buf.data[start..end], k);
            }
            match f.opcode {
                op::CLOSE => return,
                op::TEXT => {
                    if let Some(c) = proto::parse_control(&buf.data[start..end]) {
                        let resp = match c.event.as_str() {
                            "phx_join" => Some(r#"{"postgres_changes":[]}"#),
                            "heartbeat" | "phx_leave" => Some("{}"),
                            _ => None,
                        };
                        if let Some(r) = resp {
                            ws::encode_frame(
                                &mut out,
                                op::TEXT,
                                reply(vsn, &c, r).as_bytes(),
                                None,
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        buf.consume(pos);
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
        tokio::select! {
            r = buf.read_from(&mut s) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            c = rx.changed() => {
                if c.is_err() {
                    return;
                }
                let blast = *rx.borrow_and_update();
                if let Some(b) = blast {
                    while now_ns() < b.until_ns {
                        let (slice, next) = pool.batch(seq, b.batch);
                        if s.write_all(slice).await.is_err() {
                            return;
                        }
                        seq = next;
                    }
                }
            }
        }
    }
}
