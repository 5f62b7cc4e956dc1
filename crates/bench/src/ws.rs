//! A minimal WebSocket client (RFC 6455) over a plain `TcpStream`.
//!
//! The load generator holds tens of thousands of these, so it is kept cheap:
//! a hand-written upgrade request, a fixed `Sec-WebSocket-Key` (its accept
//! value is a constant to compare against), frames parsed in place from one
//! reusable buffer per connection, and client frames written with a mask.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The sample key of RFC 6455 §1.3 and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Where to connect and what to ask for.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Server address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request target, e.g. `/socket/websocket?vsn=2.0.0`.
    pub path: String,
}

/// Opens a TCP connection (bound to `source` when given) and upgrades it.
/// Returns the stream and a read buffer holding any bytes read past the head.
pub async fn connect(
    ep: &Endpoint,
    source: Option<IpAddr>,
    rcvbuf: Option<u32>,
    timeout: Duration,
) -> anyhow::Result<(TcpStream, ReadBuf)> {
    tokio::time::timeout(timeout, connect_inner(ep, source, rcvbuf))
        .await
        .map_err(|_| anyhow::anyhow!("connect/upgrade timed out after {timeout:?}"))?
}

async fn connect_inner(
    ep: &Endpoint,
    source: Option<IpAddr>,
    rcvbuf: Option<u32>,
) -> anyhow::Result<(TcpStream, ReadBuf)> {
    let sock = if ep.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = rcvbuf {
        // Before connect, so the advertised window scale follows it.
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    let mut stream = sock.connect(ep.addr).await.context("TCP connect")?;
    stream.set_nodelay(true)?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ep.path, ep.host
    );
    stream.write_all(req.as_bytes()).await?;
    // Read the response head; bytes after the blank line (frames the
    // server sent right away) are kept for the frame reader.
    let mut buf = ReadBuf::new(4096);
    let head_len = loop {
        let n = buf.read_from(&mut stream).await?;
        if n == 0 {
            bail!("connection closed during the upgrade");
        }
        if let Some(i) = memchr::memmem::find(&buf.data[..buf.filled], b"\r\n\r\n") {
            break i + 4;
        }
        if buf.filled > 16 * 1024 {
            bail!("upgrade response head too long");
        }
    };
    let head = buf.data[..head_len].to_vec();
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or("");
    if !status.contains(" 101") {
        // Read a bit of the body for the error message.
        let _ = tokio::time::timeout(Duration::from_millis(200), buf.read_from(&mut stream)).await;
        let body =
            String::from_utf8_lossy(&buf.data[head_len.min(buf.filled)..buf.filled]).into_owned();
        bail!("upgrade refused: {status} {}", body.trim());
    }
    let accept_ok = text.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("sec-websocket-accept:") && l.contains(&ACCEPT.to_ascii_lowercase())
    });
    if !accept_ok {
        bail!("bad Sec-WebSocket-Accept in: {status}");
    }
    buf.consume(head_len);
    Ok((stream, buf))
}

/// Frame opcodes used here.
pub mod op {
    /// Continuation.
    pub const CONT: u8 = 0x0;
    /// Text.
    pub const TEXT: u8 = 0x1;
    /// Binary.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Appends one frame (FIN set) to `out`, masked when `mask` is given.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= 0xFFFF {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            for (i, b) in out[start..].iter_mut().enumerate() {
                *b ^= key[i & 3];
            }
        }
        None => out.extend_from_slice(payload),
    }
}

/// A cheap mask-key generator (xorshift); masks need not be secret here.
#[derive(Debug, Clone)]
pub struct MaskGen(u32);

impl MaskGen {
    /// Seeds the generator (a zero seed is replaced).
    pub fn new(seed: u32) -> Self {
        MaskGen(seed | 1)
    }
    /// Next 4-byte key.
    pub fn next_key(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x.to_le_bytes()
    }
}

/// One parsed frame header: where the payload lies within the buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Payload start offset in the buffer.
    pub start: usize,
    /// Payload end offset.
    pub end: usize,
    /// Mask key if the frame was masked (client → server frames).
    pub mask: Option<[u8; 4]>,
}

/// Parses the frame at the start of `buf`; `Ok(None)` when incomplete.
pub fn parse_frame(buf: &[u8], max_len: usize) -> anyhow::Result<Option<FrameRef>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let len7 = (buf[1] & 0x7F) as usize;
    let (len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n, 2),
    };
    if len > max_len {
        bail!("frame of {len} bytes exceeds the {max_len}-byte limit");
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let k = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(k)
    } else {
        None
    };
    if buf.len() < pos + len {
        return Ok(None);
    }
    Ok(Some(FrameRef {
        fin,
        opcode,
        start: pos,
        end: pos + len,
        mask,
    }))
}

/// Unmasks a payload in place.
pub fn unmask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A growable read buffer: bytes `[0, filled)` are unread input.
#[derive(Debug)]
pub struct ReadBuf {
    /// Storage.
    pub data: Vec<u8>,
    /// Bytes of input held.
    pub filled: usize,
}

impl ReadBuf {
    /// A buffer of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        ReadBuf {
            data: vec![0; cap],
            filled: 0,
        }
    }
    /// Drops the first `n` bytes (consumed frames), moving the rest to the front.
    pub fn consume(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.data.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
    /// Makes sure at least `want` free bytes follow the input.
    pub fn reserve(&mut self, want: usize) {
        if self.data.len() - self.filled < want {
            let new_len = (self.filled + want).next_power_of_two();
            self.data.resize(new_len, 0);
        }
    }
    /// Reads once from `r` into the free space; returns bytes read (0 = EOF).
    pub async fn read_from<R: AsyncReadExt + Unpin>(
        &mut self,
        r: &mut R,
    ) -> std::io::Result<usize> {
        if self.filled == self.data.len() {
            self.reserve(self.data.len());
        }
        let n = r.read(&mut self.data[self.filled..]).await?;
        self.filled += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut buf = Vec::new();
                encode_frame(&mut buf, op::TEXT, &payload, mask);
                assert!(
                    parse_frame(&buf[..buf.len() - 1], 1 << 20)
                        .unwrap()
                        .is_none()
                        || len == 0
                );
                let f = parse_frame(&buf, 1 << 20).unwrap().unwrap();
                assert_eq!(f.opcode, op::TEXT);
                assert!(f.fin);
                assert_eq!(f.end, buf.len());
                let mut p = buf[f.start..f.end].to_vec();
                if let Some(k) = f.mask {
                    unmask(&mut p, k);
                }
                assert_eq!(p, payload);
            }
        }
    }
}
