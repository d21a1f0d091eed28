//! The WebSocket transport of an accepted connection (RFC 6455, server
//! side): frames parsed straight from the TCP socket, and the end of the
//! connection. Frames go out through the connection's
//! [`Outlet`](crate::mailbox::Outlet), the one queue the delivery pipeline
//! writes to as well.
//!
//! An idle connection holds no buffer. Bytes read are kept only while a
//! frame is incomplete; bytes to send are kept only when the kernel's send
//! queue cannot take them at once. An event's frame is encoded once per
//! node (see [`Event::ws_frame`](crate::event::Event::ws_frame), and
//! [`protocol::ws_frame`](crate::protocol::ws_frame) for how a frame is
//! written) and written from those shared bytes to every subscriber.

use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use actix_http::ws::{CloseReason, OpCode, Parser, ProtocolError};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::LimitSettings;
use crate::mailbox::Outlet;
use crate::rate::TokenBucket;

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
    /// Frames past a budget that holds whatever they carry: fragments of
    /// one message, control frames per second. Names the setting.
    #[error("frames over {0}")]
    OverBudget(&'static str),
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

/// What a client's frames may cost, whatever they carry: a message that
/// never completes, or control frames that are no message at all, would
/// otherwise be parsed without end.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Largest message (and frame) taken from the client.
    pub max_message: usize,
    /// Frames one message may come in (`limits.max_fragments`).
    pub max_fragments: usize,
    /// Pings and pongs per second, also the burst
    /// (`limits.control_frame_rate`).
    pub control_rate: u32,
}

impl Budget {
    /// The budget `limits` sets, for messages of at most `max_message`.
    pub fn new(limits: &LimitSettings, max_message: usize) -> Budget {
        Budget {
            max_message,
            max_fragments: limits.max_fragments,
            control_rate: limits.control_frame_rate,
        }
    }
}

/// One WebSocket connection's socket, and the bytes read from it.
pub struct Socket {
    io: Arc<TcpStream>,
    /// Read but not yet parsed; empty, without allocation, between frames.
    read_buf: BytesMut,
    /// The first fragments of a message whose last has not arrived, and how
    /// many frames it came in so far.
    partial: Option<(OpCode, BytesMut, usize)>,
    budget: Budget,
    /// Control frames the client may still send.
    control: TokenBucket,
}

impl Socket {
    /// Takes over a connection whose handshake was answered; `read` holds
    /// bytes the client sent after it.
    pub fn new(io: TcpStream, read: BytesMut, budget: Budget) -> Socket {
        // Frames are written whole, one write each: do not let Nagle hold
        // one back until the previous is acknowledged.
        let _ = io.set_nodelay(true);
        Socket {
            io: Arc::new(io),
            read_buf: compact(read),
            partial: None,
            control: TokenBucket::new(budget.control_rate),
            budget,
        }
    }

    /// The socket, for the connection's [`Outlet`] to write to.
    pub fn wire(&self) -> Arc<TcpStream> {
        Arc::clone(&self.io)
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
            let Some((fin, op, data)) =
                Parser::parse(&mut self.read_buf, true, self.budget.max_message)?
            else {
                // A frame announced longer than the limit is refused as soon
                // as its header is in, not buffered to its announced length.
                if announced_len(&self.read_buf).is_some_and(|n| n > self.budget.max_message as u64)
                {
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
            if matches!(op, OpCode::Ping | OpCode::Pong) && !self.control.try_take() {
                return Err(WsError::OverBudget("limits.control_frame_rate"));
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
                OpCode::Text | OpCode::Binary => self.partial = Some((op, data, 1)),
                OpCode::Continue => {
                    let Some((_, joined, frames)) = self.partial.as_mut() else {
                        return Err(WsError::Protocol("continuation of no message".into()));
                    };
                    if joined.len() + data.len() > self.budget.max_message {
                        return Err(WsError::TooBig);
                    }
                    *frames += 1;
                    if *frames > self.budget.max_fragments {
                        return Err(WsError::OverBudget("limits.max_fragments"));
                    }
                    joined.extend_from_slice(&data);
                    if fin {
                        let (op, joined, _) = self.partial.take().expect("checked above");
                        return complete(op, joined).map(Some);
                    }
                }
                OpCode::Bad => return Err(WsError::Protocol("unknown opcode".into())),
            }
        }
    }

    /// Sends what `outlet` holds, then the close frame, and ends the
    /// connection.
    pub async fn close(self, outlet: &Outlet, reason: Option<CloseReason>) {
        let mut close = BytesMut::new();
        Parser::write_close(&mut close, reason, false);
        if outlet.write(close.freeze()).is_ok() && outlet.flush_all().await.is_ok() {
            linger(&self.io).await;
        }
    }
}

/// Answers a handshake that was refused with `response`, and ends the
/// connection.
pub async fn refuse(mut io: TcpStream, response: &[u8]) {
    if io.write_all(response).await.is_ok() {
        linger(&io).await;
    }
}

/// Ends a connection whose last bytes were written: our side first (FIN),
/// then, briefly, reading and dropping whatever the client still sends
/// until it closes too.
async fn linger(io: &TcpStream) {
    if socket2::SockRef::from(io)
        .shutdown(Shutdown::Write)
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            if io.readable().await.is_err() {
                return;
            }
            match io.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
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
