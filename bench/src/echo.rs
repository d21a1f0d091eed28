//! The floor: a do-nothing server with Herald's publish route and WebSocket
//! path, run as its own process (`herald-bench echo`). A POSTed body is
//! written straight to every WebSocket as `{"op":"event","data":BODY}`. No
//! auth, no routing, no encoding: what remains of a latency measured through
//! it is loopback TCP, scheduling and the harness itself.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Subscribers = Arc<Mutex<Vec<OwnedWriteHalf>>>;

/// Serves until killed.
pub fn run(bind: SocketAddr) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(bind).await?;
        let subscribers = Subscribers::default();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(serve(stream, subscribers.clone()));
        }
    })
}

async fn serve(stream: TcpStream, subscribers: Subscribers) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if read.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        if head.starts_with("GET /ws") {
            write
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                )
                .await?;
            subscribers.lock().await.push(write);
            // What the client sends is read and ignored.
            let mut sink = [0u8; 1024];
            while read.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        if head.starts_with("GET ") {
            write
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .await?;
            buf.drain(..head_end);
            continue;
        }
        let length = crate::http::content_length(&head).unwrap_or(0);
        while buf.len() < head_end + length {
            if read.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body = &buf[head_end..head_end + length];
        let mut payload = br#"{"op":"event","data":"#.to_vec();
        payload.extend_from_slice(body);
        payload.push(b'}');
        let mut frame = Vec::with_capacity(payload.len() + 4);
        frame.push(0x81);
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        for subscriber in subscribers.lock().await.iter_mut() {
            let _ = subscriber.write_all(&frame).await;
        }
        write
            .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
            .await?;
        buf.drain(..head_end + length);
    }
}
