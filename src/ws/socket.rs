//! The WebSocket transport of an accepted connection (RFC 6455, server
//! side): frames parsed straight from the TCP socket and written straight
//! to it, by the connection's own task.
//!
//! An idle connection holds no buffer. Bytes read are kept only while a
//! frame is incomplete; bytes to send are copied only when the kernel's
//! send queue cannot take them at once. An event's frame is encoded once
//! per node (see [`Event::ws_frame`](crate::event::Event::ws_frame), and
//! [`protocol::ws_frame`](crate::protocol::ws_frame) for how a frame is written) and
//! written from those shared bytes to every subscriber.

use std::io;
use std::time::Duration;

use actix_http::ws::{CloseReason, OpCode, Parser, ProtocolError};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Room reserved for each read from the socket.
const READ_CHUNK: usize = 4096;

/// The RSV1, RSV2 and RSV3 bits of a frame's first byte.
const RSV_BITS: u8 = 0x70;

/// How long a closed connection waits for the client to close its side, so
/// that unread client bytes do not turn the last frames into a reset (the
/// HTTP server uses the same for its connections).
pub const LINGER: Duration = Duration::from_secs(1);

/// A complete message from the client; fragments are joined.
#[derive(Debug)]
pub enum Message {
    /// Valid UTF-8, checked.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    Close(Option<CloseReason>),
}

/// Why reading from the client failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("message larger than the limit")]
    TooBig,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<ProtocolError> for WsError {
    fn from(e: ProtocolError) -> WsError {
        match e {
            ProtocolError::Overflow => WsError::TooBig,
            ProtocolError::Io(e) => WsError::Io(e),
            other => WsError::Protocol(other.to_string()),
        }
    }
}

/// One WebSocket connection's socket and the bytes in flight on it.
pub struct Socket {
    io: TcpStream,
    /// Read but not yet parsed; empty, without allocation, between frames.
    read_buf: BytesMut,
    /// The first fragments of a message whose last has not arrived.
    partial: Option<(OpCode, BytesMut)>,
    /// Accepted for sending but not yet taken by the kernel.
    write_buf: BytesMut,
    /// Largest message (and frame) taken from the client.
    max_message: usize,
}

impl Socket {
    /// Takes over a connection whose handshake was parsed; `read` holds
    /// bytes the client sent after it, `write` the response not yet sent.
    pub fn new(io: TcpStream, read: BytesMut, write: BytesMut, max_message: usize) -> Socket {
        // Frames are written whole, one write each: do not let Nagle hold
        // one back until the previous is acknowledged.
        let _ = io.set_nodelay(true);
        Socket {
            io,
            read_buf: compact(read),
            partial: None,
            write_buf: write,
            max_message,
        }
    }

    /// The next complete message; `None` once the client closed the TCP
    /// connection. Cancel-safe: what was read stays for the next call.
    pub async fn recv(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            if let Some(message) = self.parse()? {
                return Ok(Some(message));
            }
            // Room is made only once there is something to read: a
            // connection waiting here holds no buffer.
            self.io.readable().await?;
            self.read_buf.reserve(READ_CHUNK);
            match self.io.try_read_buf(&mut self.read_buf) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            // RFC 6455 §5.2: RSV1-3 must be 0 unless an extension defines
            // them, and Herald negotiates none (actix's parser ignores them).
            if self.read_buf.first().is_some_and(|b| b & RSV_BITS != 0) {
                return Err(WsError::Protocol(
                    "reserved bits set, but no extension was negotiated".into(),
                ));
            }
            let Some((fin, op, data)) = Parser::parse(&mut self.read_buf, true, self.max_message)?
            else {
                // A frame announced longer than the limit is refused as soon
                // as its header is in, not buffered to its announced length.
                if announced_len(&self.read_buf).is_some_and(|n| n > self.max_message as u64) {
                    return Err(WsError::TooBig);
                }
                self.read_buf = compact(std::mem::take(&mut self.read_buf));
                return Ok(None);
            };
            let data = data.unwrap_or_default();
            if !fin && matches!(op, OpCode::Ping | OpCode::Pong | OpCode::Close) {
                // RFC 6455 §5.5: control frames are never fragmented.
                return Err(WsError::Protocol("fragmented control frame".into()));
            }
            match op {
                OpCode::Ping => return Ok(Some(Message::Ping(data.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong)),
                OpCode::Close => {
                    let reason = Parser::try_parse_close_payload(&data)?;
                    return Ok(Some(Message::Close(reason)));
                }
                OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                    return Err(WsError::Protocol(
                        "a new message began before the last one ended".into(),
                    ));
                }
                OpCode::Text | OpCode::Binary if fin => return complete(op, data).map(Some),
                OpCode::Text | OpCode::Binary => self.partial = Some((op, data)),
                OpCode::Continue => {
                    let Some((_, joined)) = self.partial.as_mut() else {
                        return Err(WsError::Protocol("continuation of no message".into()));
                    };
                    if joined.len() + data.len() > self.max_message {
                        return Err(WsError::TooBig);
                    }
                    joined.extend_from_slice(&data);
                    if fin {
                        let (op, joined) = self.partial.take().expect("checked above");
                        return complete(op, joined).map(Some);
                    }
                }
                OpCode::Bad => return Err(WsError::Protocol("unknown opcode".into())),
            }
        }
    }

    /// Writes what the kernel takes of `frames` (whole frames, one or more)
    /// now and queues the rest, without waiting; [`flush`](Self::flush)
    /// sends what was queued, ahead of anything queued later.
    pub fn queue(&mut self, frames: &[u8]) -> io::Result<()> {
        if !self.write_buf.is_empty() {
            self.write_buf.extend_from_slice(frames);
            return Ok(());
        }
        match self.io.try_write(frames) {
            Ok(n) => self.write_buf.extend_from_slice(&frames[n..]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.write_buf.extend_from_slice(frames)
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Whether everything queued went out.
    pub fn is_flushed(&self) -> bool {
        self.write_buf.is_empty()
    }

    /// Writes everything queued; waits only while the kernel's send queue is
    /// full. Cancel-safe: what is not written yet stays queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.write_buf.is_empty() {
            self.io.writable().await?;
            match self.io.try_write(&self.write_buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.write_buf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.write_buf = compact(std::mem::take(&mut self.write_buf));
        Ok(())
    }

    /// Sends what is queued, then the close frame, and ends the connection.
    pub async fn close(mut self, reason: Option<CloseReason>) {
        let mut close = BytesMut::new();
        Parser::write_close(&mut close, reason, false);
        if self.queue(&close).is_ok() {
            self.end().await;
        }
    }

    /// Sends what is queued and ends the connection: our side first (FIN),
    /// then, briefly, reading and dropping whatever the client still sends
    /// until it closes too.
    pub async fn end(mut self) {
        if self.flush().await.is_err() || self.io.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 512];
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                if self.io.readable().await.is_err() {
                    return;
                }
                match self.io.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .await;
    }
}

/// The payload length a frame's header announces, once its length bytes
/// are in.
fn announced_len(buf: &[u8]) -> Option<u64> {
    let extended = match *buf.get(1)? & 0x7f {
        126 => 2,
        127 => 8,
        n => return Some(u64::from(n)),
    };
    let bytes = buf.get(2..2 + extended)?;
    Some(bytes.iter().fold(0, |len, &b| len << 8 | u64::from(b)))
}

fn complete(op: OpCode, data: BytesMut) -> Result<Message, WsError> {
    if op == OpCode::Text {
        std::str::from_utf8(&data).map_err(|_| WsError::InvalidUtf8)?;
        Ok(Message::Text(data.freeze()))
    } else {
        Ok(Message::Binary(data.freeze()))
    }
}

/// `buf`, or a buffer without allocation when it is empty: an idle
/// connection keeps no read or write buffer.
fn compact(buf: BytesMut) -> BytesMut {
    if buf.is_empty() { BytesMut::new() } else { buf }
}
