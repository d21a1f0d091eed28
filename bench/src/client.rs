//! What a subscriber and a publisher do, per system: open a WebSocket,
//! subscribe to a topic, recognise an event and read its two measured
//! fields, and publish over HTTP.
//!
//! Every event the harness publishes carries `{"i":SEQ,"t":NANOS}`: its
//! sequence number and its scheduled send time in nanoseconds since the
//! run's start, so the receiver reads latency and order from the frame
//! without parsing the rest of it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Instant;

use crate::nodes::{System, secret};
use crate::sse::Sse;
use crate::wire::{Ws, field};

/// The run's time origin, shared by publishers and subscribers.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

pub fn now_nanos() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// A token granting subscribe and publish on `bench.>`, valid for a day.
pub fn token() -> String {
    sign(&serde_json::json!({
        "sub": "bench",
        "exp": in_a_day(),
        "topics": ["bench.>"],
        "publish": ["bench.>"],
    }))
}

/// A token for `sub`, a distinct user, on `bench.>` (presence counts
/// users, not connections).
pub fn member_token(sub: &str) -> String {
    sign(&serde_json::json!({
        "sub": sub,
        "exp": in_a_day(),
        "topics": ["bench.>"],
    }))
}

fn in_a_day() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 86_400
}

fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret().as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// How a Herald subscriber receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    /// A Server-Sent Events stream of its one topic.
    Sse,
}

/// A connected, authenticated subscriber.
pub struct Subscriber {
    conn: Conn,
    system: System,
}

enum Conn {
    Ws(Ws),
    /// An SSE subscriber opens its stream when it subscribes: the topic is
    /// in the request.
    SseToOpen {
        addr: SocketAddr,
        source: Option<IpAddr>,
        token: String,
    },
    Sse(Sse),
}

/// One received event: its sequence number, the offset the system gave it
/// (none from the echo floor) and its latency in microseconds.
pub struct Received {
    pub seq: u64,
    pub offset: Option<u64>,
    pub latency_us: u64,
}

impl Subscriber {
    pub async fn connect(
        system: System,
        transport: Transport,
        addr: SocketAddr,
        source: Option<IpAddr>,
        token: &str,
    ) -> io::Result<Subscriber> {
        if system == System::Herald && transport == Transport::Sse {
            let conn = Conn::SseToOpen {
                addr,
                source,
                token: token.to_owned(),
            };
            return Ok(Subscriber { conn, system });
        }
        let ws = match system {
            System::Herald => {
                let path = format!("/ws?token={token}");
                Ws::connect(addr, source, &path, Some("herald.json")).await?
            }
            System::Echo => Ws::connect(addr, source, "/ws", None).await?,
            System::SocketIo => {
                let path = "/socket.io/?EIO=4&transport=websocket";
                let mut ws = Ws::connect(addr, source, path, None).await?;
                // Engine.IO open packet, then the Socket.IO CONNECT.
                expect_prefix(ws.next_data().await?, b"0{")?;
                ws.send_text(&format!(r#"40{{"token":"{token}"}}"#)).await?;
                expect_prefix(ws.next_data().await?, b"40")?;
                ws
            }
        };
        Ok(Subscriber {
            conn: Conn::Ws(ws),
            system,
        })
    }

    fn ws(&mut self) -> &mut Ws {
        match &mut self.conn {
            Conn::Ws(ws) => ws,
            _ => unreachable!("only Herald subscribes over SSE"),
        }
    }

    /// The next frame's or message's bytes.
    async fn next_data(&mut self) -> io::Result<&[u8]> {
        match &mut self.conn {
            Conn::Ws(ws) => ws.next_data().await,
            Conn::Sse(sse) => sse.next_message().await,
            Conn::SseToOpen { .. } => Err(io::Error::other("the stream is not open yet")),
        }
    }

    /// Ends the connection.
    pub async fn close(self) {
        if let Conn::Ws(ws) = self.conn {
            ws.close().await;
        }
    }

    /// Subscribes to `topic` and waits for the acknowledgement.
    pub async fn subscribe(&mut self, topic: &str) -> io::Result<()> {
        if let Conn::SseToOpen {
            addr,
            source,
            token,
        } = &self.conn
        {
            let path = format!("/api/v1/topics/{topic}/events?token={token}");
            let mut sse = Sse::open(*addr, *source, &path).await?;
            let opening = sse.next_message().await?;
            if memchr::memmem::find(opening, br#""op":"subscribed""#).is_none() {
                return Err(refused(opening));
            }
            self.conn = Conn::Sse(sse);
            return Ok(());
        }
        match self.system {
            System::Herald => {
                let op = format!(r#"{{"op":"subscribe","id":1,"topic":"{topic}"}}"#);
                self.ws().send_text(&op).await?;
                let reply = self.ws().next_data().await?;
                if memchr::memmem::find(reply, br#""op":"subscribed""#).is_none() {
                    return Err(refused(reply));
                }
            }
            System::SocketIo => {
                self.ws()
                    .send_text(&format!(r#"420["subscribe","{topic}"]"#))
                    .await?;
                loop {
                    let reply = self.ws().next_data().await?;
                    if reply == b"2" {
                        self.ws().send_text("3").await?;
                        continue;
                    }
                    if reply != b"430[true]" {
                        return Err(refused(reply));
                    }
                    break;
                }
            }
            System::Echo => {}
        }
        Ok(())
    }

    /// The next event; other frames are skipped (and Engine.IO pings
    /// answered).
    pub async fn next_event(&mut self) -> io::Result<Received> {
        loop {
            let system = self.system;
            let frame = self.next_data().await?;
            if let (Some(seq), Some(sent)) = (field(frame, br#""i":"#), field(frame, br#""t":"#)) {
                let latency_us = now_nanos().saturating_sub(sent) / 1000;
                let offset = field(frame, br#""offset":"#);
                return Ok(Received {
                    seq,
                    offset,
                    latency_us,
                });
            }
            if system == System::SocketIo && frame == b"2" {
                self.ws().send_text("3").await?;
            }
        }
    }

    /// Keeps the connection alive (answering pings) until it closes.
    pub async fn idle(&mut self) -> io::Result<()> {
        loop {
            let system = self.system;
            let frame = self.next_data().await?;
            if system == System::SocketIo && frame == b"2" {
                self.ws().send_text("3").await?;
            }
        }
    }
}

fn expect_prefix(frame: &[u8], prefix: &[u8]) -> io::Result<()> {
    if frame.starts_with(prefix) {
        Ok(())
    } else {
        Err(refused(frame))
    }
}

fn refused(frame: &[u8]) -> io::Error {
    let shown = &frame[..frame.len().min(200)];
    io::Error::other(format!(
        "unexpected frame: {}",
        String::from_utf8_lossy(shown)
    ))
}

/// The HTTP path every system publishes on.
pub fn publish_path(topic: &str) -> String {
    format!("/api/v1/topics/{topic}/events")
}

/// The body of event `seq` scheduled at `nanos`.
pub fn event_body(seq: u64, nanos: u64) -> Vec<u8> {
    format!(r#"{{"i":{seq},"t":{nanos}}}"#).into_bytes()
}
