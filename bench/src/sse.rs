//! The harness's Server-Sent Events reader: one `GET` with
//! `Accept: text/event-stream` over a raw `TcpStream`, the chunked body
//! decoded in place, one message (up to its blank line) at a time.
//!
//! As lean as the WebSocket client in `wire`, for the same reason: the
//! load generator shares the machine with the node it measures.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::tcp;

/// Initial receive buffer per stream; grows only for a larger message.
const BUFFER: usize = 2048;
/// The largest message the harness accepts.
const MAX_MESSAGE: usize = 1 << 20;

/// One open event stream.
pub struct Sse {
    stream: TcpStream,
    /// Raw bytes read, from `raw_start`.
    raw: Vec<u8>,
    raw_start: usize,
    /// Decoded body bytes; messages are taken from `body_start`.
    body: Vec<u8>,
    body_start: usize,
    /// Bytes left in the chunk being decoded.
    chunk_left: usize,
    /// The CRLF after a chunk's data is still to skip.
    chunk_tail: bool,
    /// The last chunk was read: the response is over.
    ended: bool,
}

impl Sse {
    /// Sends `GET path` to `addr` and reads the response head, which must
    /// be a 200 with a chunked body.
    pub async fn open(addr: SocketAddr, source: Option<IpAddr>, path: &str) -> io::Result<Sse> {
        let mut stream = tcp(addr, source).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut sse = Sse {
            stream,
            raw: Vec::with_capacity(BUFFER),
            raw_start: 0,
            body: Vec::with_capacity(BUFFER),
            body_start: 0,
            chunk_left: 0,
            chunk_tail: false,
            ended: false,
        };
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&sse.raw, b"\r\n\r\n") {
                break at + 4;
            }
            if sse.raw.len() > 16 * 1024 {
                return Err(io::Error::other("response headers too large"));
            }
            sse.read_more().await?;
        };
        let head = String::from_utf8_lossy(&sse.raw[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") || !head.contains("transfer-encoding: chunked") {
            let line = head.lines().next().unwrap_or_default().to_owned();
            return Err(io::Error::other(format!("stream refused: {line}")));
        }
        sse.raw_start = head_end;
        Ok(sse)
    }

    /// The next message, without its blank line (comments included: a
    /// heartbeat is a message of one comment line).
    pub async fn next_message(&mut self) -> io::Result<&[u8]> {
        loop {
            let pending = &self.body[self.body_start..];
            if let Some(at) = memchr::memmem::find(pending, b"\n\n") {
                let start = self.body_start;
                self.body_start += at + 2;
                return Ok(&self.body[start..start + at]);
            }
            if pending.len() > MAX_MESSAGE {
                return Err(io::Error::other("message too large"));
            }
            if !self.decode() {
                self.read_more().await?;
            }
        }
    }

    /// Moves what the raw buffer holds of the body into `body`; whether it
    /// moved anything.
    fn decode(&mut self) -> bool {
        // Keep the buffers small: drop what was consumed.
        if self.body_start > 0 {
            self.body.drain(..self.body_start);
            self.body_start = 0;
        }
        let mut moved = false;
        loop {
            let raw = &self.raw[self.raw_start..];
            if self.chunk_left > 0 {
                let n = raw.len().min(self.chunk_left);
                if n == 0 {
                    break;
                }
                self.body.extend_from_slice(&raw[..n]);
                self.raw_start += n;
                self.chunk_left -= n;
                self.chunk_tail = self.chunk_left == 0;
                moved = true;
                continue;
            }
            if self.chunk_tail {
                if raw.len() < 2 {
                    break;
                }
                self.raw_start += 2;
                self.chunk_tail = false;
                continue;
            }
            let Some(line_end) = memchr::memmem::find(raw, b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&raw[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
            self.raw_start += line_end + 2;
            match size {
                // The last chunk, or a line that is no chunk size: the body
                // is over; the next read reports the end.
                Some(0) | None => {
                    self.ended = true;
                    break;
                }
                Some(size) => self.chunk_left = size,
            }
        }
        moved
    }

    async fn read_more(&mut self) -> io::Result<()> {
        if self.raw_start > 0 {
            self.raw.drain(..self.raw_start);
            self.raw_start = 0;
        }
        if self.ended {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let len = self.raw.len();
        self.raw.resize(len + BUFFER, 0);
        let n = self.stream.read(&mut self.raw[len..]).await?;
        self.raw.truncate(len + n);
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}
