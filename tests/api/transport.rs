//! Herald's own WebSocket transport, at the byte level: fragments,
//! pipelined frames, oversized frames announced before they arrive, and
//! upgrades to other routes. Raw TCP where a WebSocket client library would
//! not send such bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::{TestNode, spawn_node, spawn_node_with, token};

const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn client() -> String {
    token("c", &[">"], &[">"])
}

/// A masked client frame (RFC 6455 §5.2).
fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 | opcode } else { opcode }];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A handshake request for `path`, written by hand.
fn handshake_request(node: &TestNode, path: &str) -> Vec<u8> {
    handshake_request_to(node.addr, path)
}

fn handshake_request_to(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Reads the HTTP response head; returns it and whatever followed it.
async fn read_head(tcp: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let n = tokio::time::timeout(READ_TIMEOUT, tcp.read(&mut chunk))
            .await
            .expect("a response within the timeout")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads the next unmasked server frame other than a ping: (opcode,
/// payload).
async fn read_frame(tcp: &mut (impl AsyncRead + Unpin), buffered: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        let (opcode, payload) = read_any_frame(tcp, buffered).await;
        if opcode != 0x9 {
            return (opcode, payload);
        }
    }
}

async fn read_any_frame(
    tcp: &mut (impl AsyncRead + Unpin),
    buffered: &mut Vec<u8>,
) -> (u8, Vec<u8>) {
    let mut chunk = [0u8; 4096];
    loop {
        if buffered.len() >= 2 {
            let (len, header) = match buffered[1] & 0x7f {
                126 if buffered.len() >= 4 => {
                    (u16::from_be_bytes([buffered[2], buffered[3]]) as usize, 4)
                }
                127 if buffered.len() >= 10 => (
                    u64::from_be_bytes(buffered[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buffered.len() >= header + len {
                assert_eq!(buffered[1] & 0x80, 0, "server frames are not masked");
                let opcode = buffered[0] & 0x0f;
                let payload = buffered[header..header + len].to_vec();
                buffered.drain(..header + len);
                return (opcode, payload);
            }
        }
        let n = tokio::time::timeout(READ_TIMEOUT, tcp.read(&mut chunk))
            .await
            .expect("a frame within the timeout")
            .unwrap();
        assert!(n > 0, "connection closed before a whole frame");
        buffered.extend_from_slice(&chunk[..n]);
    }
}

/// Opens a raw connection to `/ws`, sending `extra` in the same write as the
/// handshake; returns the socket and the bytes read past the 101's head.
async fn raw_connect(node: &TestNode, extra: &[u8]) -> (TcpStream, Vec<u8>) {
    raw_connect_to(node.addr, extra).await
}

async fn raw_connect_to(addr: SocketAddr, extra: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = handshake_request_to(addr, &format!("/ws?token={}", client()));
    request.extend_from_slice(extra);
    tcp.write_all(&request).await.unwrap();
    let (head, rest) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    (tcp, rest)
}

/// Sends `request` on a new connection; returns all the node answers
/// before it closes the connection.
async fn refusal(node: &TestNode, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, tcp.read_to_end(&mut response))
        .await
        .expect("the refusal, then the connection closed")
        .unwrap();
    String::from_utf8(response).unwrap()
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[tokio::test]
async fn frames_sent_with_the_handshake_are_answered() {
    let node = spawn_node().await;
    let ping = client_frame(0x1, true, br#"{"op":"ping","id":7}"#);
    let (mut tcp, mut buffered) = raw_connect(&node, &ping).await;
    let (opcode, payload) = read_frame(&mut tcp, &mut buffered).await;
    assert_eq!(opcode, 0x1);
    let reply: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(reply, json!({"op": "pong", "id": 7}));
}

#[tokio::test]
async fn fragmented_messages_are_joined_around_control_frames() {
    let node = spawn_node().await;
    let mut ws = node.connect(&client()).await;
    let request = json!({"op": "publish", "id": 3, "topic": "frag.one", "data": "whole"});
    let text = request.to_string().into_bytes();
    let (a, rest) = text.split_at(10);
    let (b, c) = rest.split_at(10);
    ws.send_raw(Message::Frame(Frame::message(
        a.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    ws.send_raw(Message::Frame(Frame::message(
        b.to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    // A control frame may come between fragments.
    ws.send_raw(Message::Ping(b"between".to_vec().into())).await;
    ws.send_raw(Message::Frame(Frame::message(
        c.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    let pong = loop {
        match ws.stream_next().await {
            Message::Pong(payload) => break payload,
            Message::Ping(_) => continue,
            other => panic!("expected the pong first, got {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"between");
    let reply = ws.recv().await;
    assert_eq!(reply["op"], "published", "{reply}");
    assert_eq!(
        (reply["id"].clone(), reply["offset"].clone()),
        (json!(3), json!(1))
    );
}

#[tokio::test]
async fn fragments_adding_up_past_the_limit_close_with_1009() {
    let node = spawn_node_with(|s| s.limits.max_payload_bytes = 1024).await;
    let mut ws = node.connect(&client()).await;
    let part = vec![b' '; 4000];
    ws.send_raw(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    ws.send_raw(Message::Frame(Frame::message(
        part,
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    let frame = ws.closed().await.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1009);
}

#[tokio::test]
async fn a_frame_announced_larger_than_the_limit_is_refused_before_it_arrives() {
    let node = spawn_node_with(|s| s.limits.max_payload_bytes = 1024).await;
    let (mut tcp, mut buffered) = raw_connect(&node, &[]).await;
    // The header announces 1 GiB; only a little of it ever comes.
    let mut frame = client_frame(0x2, true, &[]);
    frame.truncate(2);
    frame[1] = 0x80 | 127;
    frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&[0u8; 16 * 1024]);
    tcp.write_all(&frame).await.unwrap();
    let (opcode, payload) = read_frame(&mut tcp, &mut buffered).await;
    assert_eq!((opcode, close_code(&payload)), (0x8, 1009));
}

#[tokio::test]
async fn a_continuation_of_no_message_closes_with_1002() {
    let node = spawn_node().await;
    let (mut tcp, mut buffered) = raw_connect(&node, &[]).await;
    tcp.write_all(&client_frame(0x0, true, b"orphan"))
        .await
        .unwrap();
    let (opcode, payload) = read_frame(&mut tcp, &mut buffered).await;
    assert_eq!((opcode, close_code(&payload)), (0x8, 1002));
}

#[tokio::test]
async fn upgrades_to_other_routes_or_with_other_methods_are_refused_over_http() {
    let node = spawn_node().await;
    for (request, status, error) in [
        (handshake_request(&node, "/nope"), "404", "not_found"),
        (
            String::from_utf8(handshake_request(&node, "/ws"))
                .unwrap()
                .replacen("GET", "POST", 1)
                .into_bytes(),
            "405",
            "method_not_allowed",
        ),
        (handshake_request(&node, "/ws"), "401", "unauthorized"),
    ] {
        let response = refusal(&node, &request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{response}"
        );
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], error, "{response}");
    }
    // The answer to HEAD has no body.
    let head = String::from_utf8(handshake_request(&node, "/ws"))
        .unwrap()
        .replacen("GET", "HEAD", 1);
    let response = refusal(&node, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "{response}");
}

#[tokio::test]
async fn a_fragmented_control_frame_closes_with_1002() {
    let node = spawn_node().await;
    let (mut tcp, mut buffered) = raw_connect(&node, &[]).await;
    tcp.write_all(&client_frame(0x9, false, b"half a ping"))
        .await
        .unwrap();
    let (opcode, payload) = read_frame(&mut tcp, &mut buffered).await;
    assert_eq!((opcode, close_code(&payload)), (0x8, 1002));
}

#[tokio::test]
async fn a_client_that_sends_but_never_reads_is_cut_off_and_frees_its_place() {
    let node = spawn_node_with(|s| {
        s.limits.max_connections = 1;
        s.server.write_timeout = Duration::from_millis(500);
    })
    .await;
    // A small receive buffer, never read past the 101: the node's answers
    // back up until its writes wait.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(node.addr).await.unwrap();
    let request = handshake_request(&node, &format!("/ws?token={}", client()));
    tcp.write_all(&request).await.unwrap();
    let (head, _) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // WebSocket pings, each answered with a pong as large: bounded in count
    // and stopped when the node stops reading (or cuts the connection).
    let ping = client_frame(0x9, true, &[b'p'; 125]);
    let flood = tokio::spawn(async move {
        for _ in 0..200_000 {
            let write = tokio::time::timeout(READ_TIMEOUT, tcp.write_all(&ping));
            if !matches!(write.await, Ok(Ok(()))) {
                break;
            }
        }
        tcp
    });
    // The only place is taken until the node gives up on that client.
    crate::helpers::eventually("the stalled client's place is free", || async {
        node.handshake(&format!("?token={}", client()))
            .try_open()
            .await
            .is_ok()
    })
    .await;
    flood.abort();
}

#[tokio::test]
async fn an_unsupported_websocket_version_gets_426_naming_version_13() {
    let node = spawn_node().await;
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    let request = String::from_utf8(handshake_request(&node, &format!("/ws?token={}", client())))
        .unwrap()
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn a_frame_with_reserved_bits_fails_the_connection_with_1002() {
    let node = spawn_node().await;
    let mut frame = client_frame(0x1, true, br#"{"op":"ping","id":1}"#);
    frame[0] |= 0x40; // RSV1, as a compression extension would set it
    let (mut tcp, mut buffered) = raw_connect(&node, &[]).await;
    tcp.write_all(&frame).await.unwrap();
    let (opcode, payload) = read_frame(&mut tcp, &mut buffered).await;
    assert_eq!(opcode, 0x8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002);
}

/// CPU time a process has used, user and system, from `/proc` (in the
/// kernel's clock ticks, 100 a second on Linux).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name: state is field 3 of stat(5), utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Opens a WebSocket to `addr`, sends `opening`, then `unit` over and over
/// (for at most 5 s) until the node sends a close frame: its code, and how
/// long that took. `None` if none came within 2 s.
async fn flood(addr: SocketAddr, opening: &[u8], unit: &[u8]) -> Option<(u16, Duration)> {
    let (tcp, mut buffered) = raw_connect_to(addr, &[]).await;
    let (mut reader, mut writer) = tcp.into_split();
    let started = Instant::now();
    writer.write_all(opening).await.unwrap();
    let batch = unit.repeat(1_000);
    let flooding = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(5) {
            if writer.write_all(&batch).await.is_err() {
                break;
            }
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let (opcode, payload) = read_frame(&mut reader, &mut buffered).await;
            if opcode == 0x8 {
                return close_code(&payload);
            }
        }
    })
    .await
    .ok()
    .map(|code| (code, started.elapsed()));
    flooding.abort();
    closed
}

#[tokio::test]
async fn floods_of_frames_that_complete_no_message_are_closed_with_1008_at_little_cost() {
    let node =
        crate::helpers::ServeProcess::start("frame-floods", &[], std::process::Stdio::null()).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let pid = node.child.0.id();
    let floods = [
        (
            "empty continuations of a message that never ends",
            client_frame(0x1, false, b"{"),
            client_frame(0x0, false, b""),
        ),
        ("pings", Vec::new(), client_frame(0x9, true, b"")),
        (
            "unsolicited pongs",
            Vec::new(),
            client_frame(0xA, true, b""),
        ),
    ];
    for (what, opening, unit) in floods {
        let before = cpu_time(pid);
        let (code, after) = flood(addr, &opening, &unit)
            .await
            .unwrap_or_else(|| panic!("a flood of {what} was not closed within 2 s"));
        let cpu = cpu_time(pid) - before;
        assert_eq!(code, 1008, "{what}");
        assert!(
            after < Duration::from_secs(1),
            "{what}: closed after {after:?}"
        );
        assert!(
            cpu < Duration::from_millis(500),
            "{what}: the node spent {cpu:?} of CPU"
        );
    }
}
