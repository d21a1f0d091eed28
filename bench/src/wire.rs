//! The harness's WebSocket client: a receive-mostly RFC 6455 client over a
//! raw `TcpStream`.
//!
//! A load generator that shares two cores with the nodes it measures must
//! spend as little as it can per delivery, so this client does only what the
//! scenarios need: one upgrade request, unfragmented frames read in place
//! from one small per-connection buffer (no allocation, no UTF-8 check, no
//! copy per frame), pongs to pings, and masked text frames out. The same
//! client talks to Herald and to Socket.IO (Engine.IO 4 over WebSocket), so
//! both pay the same client cost.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Initial receive buffer per connection; grows only for a larger frame.
const BUFFER: usize = 2048;
/// The largest frame the harness accepts.
const MAX_FRAME: usize = 1 << 20;

pub const TEXT: u8 = 0x1;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// One open WebSocket.
pub struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A frame as read: its opcode and its payload, borrowed from the buffer.
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Opens a TCP connection, from `source` when given (several loopback
/// source addresses get past the ephemeral-port limit of one).
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            no_port_at_bind(&socket)?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Lets the kernel pick the source port at `connect` (per destination)
/// rather than at `bind`, where finding a free port gets slow with
/// thousands bound: the harness, not the node, would set the accept rate.
fn no_port_at_bind(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Ws {
    /// Upgrades `GET path` on `addr` to a WebSocket, offering `protocol`.
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        protocol: Option<&str>,
    ) -> io::Result<Ws> {
        let mut stream = tcp(addr, source).await?;
        let protocol = protocol
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{protocol}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = Ws {
            stream,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
        };
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&ws.buf[..ws.end], b"\r\n\r\n") {
                break at + 4;
            }
            if ws.end == ws.buf.len() {
                return Err(io::Error::other("upgrade response headers too large"));
            }
            ws.fill().await?;
        };
        let head = &ws.buf[..head_end];
        if !head.starts_with(b"HTTP/1.1 101") {
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(io::Error::other(format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(line)
            )));
        }
        ws.start = head_end;
        Ok(ws)
    }

    /// Reads more bytes after `end`, compacting or growing the buffer first
    /// when it is full.
    async fn fill(&mut self) -> io::Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).min(MAX_FRAME + 14);
                if grown == self.buf.len() {
                    return Err(io::Error::other("frame too large"));
                }
                self.buf.resize(grown, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// The next data or close frame; pings are answered on the way.
    pub async fn next(&mut self) -> io::Result<Frame<'_>> {
        loop {
            let (opcode, header, len) = loop {
                if let Some(parsed) = parse_header(&self.buf[self.start..self.end])? {
                    break parsed;
                }
                self.fill().await?;
            };
            while self.end - self.start < header + len {
                if self.start > 0 && self.start + header + len > self.buf.len() {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                if header + len > self.buf.len() {
                    self.buf.resize(header + len, 0);
                }
                self.fill().await?;
            }
            let at = self.start + header;
            self.start = at + len;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if opcode == PING {
                let payload = self.buf[at..at + len].to_vec();
                self.send(PONG, &payload).await?;
                continue;
            }
            if opcode == PONG {
                continue;
            }
            // A frame consumed at the very end of the buffer was reset to
            // offset 0 above, but its bytes are still in place.
            return Ok(Frame {
                opcode,
                payload: &self.buf[at..at + len],
            });
        }
    }

    /// The next text or binary frame; a close frame is an error.
    pub async fn next_data(&mut self) -> io::Result<&[u8]> {
        let frame = self.next().await?;
        if frame.opcode == CLOSE {
            let code = frame
                .payload
                .get(..2)
                .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("closed by the server with {code}"),
            ));
        }
        Ok(frame.payload)
    }

    /// Sends one masked frame (mask key zero: the harness is no browser).
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(TEXT, text.as_bytes()).await
    }

    /// Sends a close frame and waits (briefly) for the server's.
    pub async fn close(mut self) {
        let _ = self.send(CLOSE, &1000u16.to_be_bytes()).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while let Ok(frame) = self.next().await {
                if frame.opcode == CLOSE {
                    break;
                }
            }
        })
        .await;
    }
}

/// Parses a server frame header: `(opcode, header length, payload length)`,
/// or `None` when more bytes are needed.
fn parse_header(bytes: &[u8]) -> io::Result<Option<(u8, usize, usize)>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    if bytes[0] & 0x80 == 0 || bytes[0] & 0x0F == 0 {
        return Err(io::Error::other("fragmented frames are not expected"));
    }
    if bytes[1] & 0x80 != 0 {
        return Err(io::Error::other("server frames must not be masked"));
    }
    let opcode = bytes[0] & 0x0F;
    let (header, len) = match bytes[1] & 0x7F {
        126 if bytes.len() >= 4 => (4, u16::from_be_bytes([bytes[2], bytes[3]]) as usize),
        127 if bytes.len() >= 10 => {
            let mut be = [0; 8];
            be.copy_from_slice(&bytes[2..10]);
            (10, u64::from_be_bytes(be) as usize)
        }
        126 | 127 => return Ok(None),
        n => (2, n as usize),
    };
    if len > MAX_FRAME {
        return Err(io::Error::other("frame too large"));
    }
    Ok(Some((opcode, header, len)))
}

/// The unsigned integer after the first `"key":` in `json`, read without
/// parsing the rest: `field(b"{\"i\":7}", b"\"i\":") == Some(7)`.
pub fn field(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(json, key)? + key.len();
    let digits = json[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for &d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_place() {
        let frame = br#"{"op":"event","topic":"t","offset":3,"ts":1,"data":{"i":42,"t":1234567}}"#;
        assert_eq!(field(frame, br#""i":"#), Some(42));
        assert_eq!(field(frame, br#""t":"#), Some(1234567));
        assert_eq!(field(frame, br#""x":"#), None);
        assert_eq!(field(br#"{"i":"#, br#""i":"#), None);
    }

    #[test]
    fn parses_headers_of_every_length() {
        assert_eq!(parse_header(&[0x81]).unwrap(), None);
        assert_eq!(parse_header(&[0x81, 5]).unwrap(), Some((TEXT, 2, 5)));
        assert_eq!(
            parse_header(&[0x82, 126, 1, 0]).unwrap(),
            Some((0x2, 4, 256))
        );
        assert_eq!(parse_header(&[0x81, 126, 1]).unwrap(), None);
        let mut long = vec![0x81, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(parse_header(&long).unwrap(), Some((TEXT, 10, 70_000)));
        assert!(parse_header(&[0x01, 1]).is_err(), "fragment");
        assert!(parse_header(&[0x81, 0x81]).is_err(), "masked");
    }
}
