//! Reading client WebSocket frames (RFC 6455 §5), with a buffer sized to the traffic.
//!
//! fastwebsockets performs the handshake; this reader replaces its read half
//! because that one allocates a fixed 8 KiB buffer per socket (more than our
//! whole per-connection budget) and is not cancel-safe. Here the buffer starts
//! empty, grows to the message being read, and is released after large
//! messages; all state lives in the struct, so [`FrameReader::next`] can be
//! cancelled at any `.await` without losing bytes.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Initial read size; most client frames (heartbeats, joins) fit.
const MIN_READ: usize = 512;
/// A buffer larger than this is dropped once empty.
const KEEP: usize = 4096;

/// A complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text message (fragments reassembled). Not UTF-8 validated: the JSON decoder rejects bad text.
    Text(BytesMut),
    /// A binary message (fragments reassembled).
    Binary(BytesMut),
    /// A ping; the payload must be echoed in a pong.
    Ping(Bytes),
    /// The peer's close frame payload (code + reason, possibly empty).
    Close(Bytes),
}

impl Incoming {
    /// Payload length in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Incoming::Text(b) | Incoming::Binary(b) => b.len(),
            Incoming::Ping(b) | Incoming::Close(b) => b.len(),
        }
    }
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the TCP connection.
    Eof,
    /// A message larger than the limit; `unread` payload bytes are still in flight.
    TooLarge {
        /// Payload bytes of the offending frame not yet read.
        unread: u64,
    },
    /// The peer broke the protocol.
    Protocol(&'static str),
    /// The socket failed.
    Io(io::Error),
}

/// Reads frames from one socket.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
    /// A fragmented message in progress: (is text, bytes so far).
    partial: Option<(bool, BytesMut)>,
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, ReadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let (len_bytes, payload_len) = match b1 & 0x7f {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (2, u64::from(u16::from_be_bytes([b[0], b[1]])))
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (8, u64::from_be_bytes(a))
        }
        n => (0, u64::from(n)),
    };
    let header_len = 2 + len_bytes + 4;
    let Some(m) = buf.get(2 + len_bytes..header_len) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        mask: [m[0], m[1], m[2], m[3]],
        header_len,
        payload_len,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    // Word at a time; the tail byte by byte.
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader accepting messages of at most `max` bytes.
    pub(crate) fn new(io: R, max: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            max,
            partial: None,
        }
    }

    /// The next message or control frame. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            if let Some(msg) = self.parse()? {
                if self.buf.is_empty() && self.buf.capacity() > KEEP {
                    self.buf = BytesMut::new();
                }
                return Ok(msg);
            }
            let want = match parse_header(&self.buf)? {
                Some(h) => (h.header_len as u64 + h.payload_len) as usize - self.buf.len(),
                None => 14,
            };
            self.buf.reserve(want.max(MIN_READ));
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => return Err(ReadError::Eof),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Parses buffered frames until a message or control frame is complete.
    fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(h) = parse_header(&self.buf)? else {
                return Ok(None);
            };
            let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len()) as u64;
            let is_control = h.opcode & 0x08 != 0;
            if is_control && (!h.fin || h.payload_len > 125) {
                return Err(ReadError::Protocol("invalid control frame"));
            }
            if !is_control && so_far + h.payload_len > self.max as u64 {
                let buffered = (self.buf.len() - h.header_len.min(self.buf.len())) as u64;
                return Err(ReadError::TooLarge {
                    unread: h.payload_len.saturating_sub(buffered),
                });
            }
            let total = h.header_len + h.payload_len as usize;
            if self.buf.len() < total {
                return Ok(None);
            }
            self.buf.advance(h.header_len);
            let mut payload = self.buf.split_to(h.payload_len as usize);
            unmask(&mut payload, h.mask);
            match (h.opcode, self.partial.take()) {
                (0x8, partial) => {
                    self.partial = partial;
                    if payload.len() == 1 {
                        return Err(ReadError::Protocol("invalid close frame"));
                    }
                    return Ok(Some(Incoming::Close(payload.freeze())));
                }
                (0x9, partial) => {
                    self.partial = partial;
                    return Ok(Some(Incoming::Ping(payload.freeze())));
                }
                (0xA, partial) => self.partial = partial,
                (0x1 | 0x2, Some(_)) => {
                    return Err(ReadError::Protocol("new message inside a fragmented one"))
                }
                (0x1 | 0x2, None) => {
                    let text = h.opcode == 0x1;
                    if !h.fin {
                        self.partial = Some((text, payload));
                        continue;
                    }
                    return Ok(Some(if text {
                        Incoming::Text(payload)
                    } else {
                        Incoming::Binary(payload)
                    }));
                }
                (0x0, Some((text, mut acc))) => {
                    acc.extend_from_slice(&payload);
                    if !h.fin {
                        self.partial = Some((text, acc));
                        continue;
                    }
                    return Ok(Some(if text {
                        Incoming::Text(acc)
                    } else {
                        Incoming::Binary(acc)
                    }));
                }
                (0x0, None) => {
                    return Err(ReadError::Protocol("continuation without a first frame"))
                }
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
    }

    /// Reads and discards up to `n` bytes (after an oversized frame, so that
    /// closing the socket does not reset it before the peer sees our close frame).
    pub(crate) async fn discard(&mut self, mut n: u64) {
        self.buf = BytesMut::new();
        let mut scratch = vec![0u8; 16 * 1024];
        while n > 0 {
            match self.io.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(k) => n = n.saturating_sub(k as u64),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n <= 0xffff => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Incoming, String>> {
        let mut r = FrameReader::new(std::io::Cursor::new(bytes), max);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(m) => out.push(Ok(m)),
                Err(ReadError::Eof) => return out,
                Err(e) => {
                    out.push(Err(format!("{e:?}")));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn messages_fragments_and_control_frames() {
        let big = vec![b'x'; 70_000];
        let mut bytes = frame(true, 1, b"hello");
        bytes.extend(frame(false, 2, b"ab"));
        bytes.extend(frame(true, 9, b"ping")); // control frames may interleave
        bytes.extend(frame(true, 0, b"cd"));
        bytes.extend(frame(true, 1, &big));
        bytes.extend(frame(true, 8, &[0x03, 0xe8]));
        let got = read_all(bytes, 100_000).await;
        assert_eq!(got[0], Ok(Incoming::Text(BytesMut::from(&b"hello"[..]))));
        assert_eq!(got[1], Ok(Incoming::Ping(Bytes::from_static(b"ping"))));
        assert_eq!(got[2], Ok(Incoming::Binary(BytesMut::from(&b"abcd"[..]))));
        assert_eq!(got[3], Ok(Incoming::Text(BytesMut::from(&big[..]))));
        assert_eq!(
            got[4],
            Ok(Incoming::Close(Bytes::from_static(&[0x03, 0xe8])))
        );
    }

    #[tokio::test]
    async fn limits_and_violations() {
        let got = read_all(frame(true, 1, &[b'x'; 2000]), 1000).await;
        assert!(got[0].as_ref().unwrap_err().starts_with("TooLarge"));
        let mut frag = frame(false, 1, &[b'x'; 600]);
        frag.extend(frame(true, 0, &[b'x'; 600]));
        assert!(read_all(frag, 1000).await[0]
            .as_ref()
            .unwrap_err()
            .starts_with("TooLarge"));
        let mut unmasked = frame(true, 1, b"hi");
        unmasked[1] &= 0x7f;
        assert!(read_all(unmasked, 1000).await[0].is_err());
        assert!(read_all(frame(true, 0, b"x"), 1000).await[0].is_err());
        assert!(read_all(frame(false, 9, b"x"), 1000).await[0].is_err());
        assert!(read_all(frame(true, 3, b"x"), 1000).await[0].is_err());
        let mut rsv = frame(true, 1, b"x");
        rsv[0] |= 0x40;
        assert!(read_all(rsv, 1000).await[0].is_err());
    }

    #[tokio::test]
    async fn byte_at_a_time() {
        // A reader that yields one byte per read exercises every partial-header path.
        struct Trickle(std::io::Cursor<Vec<u8>>);
        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                let mut one = [0u8; 1];
                let n = std::io::Read::read(&mut self.0, &mut one)?;
                buf.put_slice(&one[..n]);
                std::task::Poll::Ready(Ok(()))
            }
        }
        let mut bytes = frame(true, 1, &[b'y'; 300]);
        bytes.extend(frame(true, 2, b"z"));
        let mut r = FrameReader::new(Trickle(std::io::Cursor::new(bytes)), 1000);
        assert_eq!(
            r.next().await.unwrap(),
            Incoming::Text(BytesMut::from(&[b'y'; 300][..]))
        );
        assert_eq!(
            r.next().await.unwrap(),
            Incoming::Binary(BytesMut::from(&b"z"[..]))
        );
        assert!(matches!(r.next().await, Err(ReadError::Eof)));
    }
}
