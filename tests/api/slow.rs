//! Clients that start a request and never finish it: every request's head
//! is bounded by `server.handshake_timeout` and its body by
//! `server.body_timeout`, on every request of a kept-alive connection, and a
//! node holding thousands of them still answers everyone else.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{spawn_node_with, token};

/// How long the tests give a request head.
const HEAD: Duration = Duration::from_secs(2);
/// How long the tests give a request body.
const BODY: Duration = Duration::from_secs(2);
/// What the issue allows past a timeout before the connection must be gone.
const SLACK: Duration = Duration::from_secs(1);

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: herald\r\n\r\n";

/// Reads one response (head and `content-length` body) off `stream`,
/// leaving what follows it unread in `buffer`.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("response body");
                assert!(n > 0, "closed inside a response: {head}");
                buffer.extend_from_slice(&chunk[..n]);
            }
            buffer.drain(..end + 4 + length);
            return head;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("response head");
        assert!(n > 0, "closed before a response");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the node closes the connection; what it sent, and when it
/// closed, measured from `since`. `None` if it is still open at `limit`.
async fn until_closed(
    stream: &mut TcpStream,
    mut buffer: Vec<u8>,
    since: Instant,
    limit: Duration,
) -> Option<(String, Duration)> {
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let left = limit.saturating_sub(since.elapsed());
    tokio::time::timeout(left, read_all).await.ok()?;
    Some((
        String::from_utf8_lossy(&buffer).to_string(),
        since.elapsed(),
    ))
}

/// Asks `/healthz` on fresh connections until `stop`, each answer within
/// `HEAD`; how many answered.
fn health_checks(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut answered = 0;
        while !stop.is_cancelled() {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let status = tokio::time::timeout(HEAD, http.get(&url).send())
                .await
                .unwrap_or_else(|_| panic!("/healthz unanswered for {HEAD:?} beside slow clients"))
                .expect("/healthz answers beside slow clients")
                .status();
            assert_eq!(status, 200);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answered
    })
}

#[tokio::test]
async fn kept_alive_connections_that_stall_in_their_second_request_are_closed_with_408() {
    const CONNECTIONS: usize = 2_000;
    let node = spawn_node_with(|s| s.server.handshake_timeout = HEAD).await;
    let addr = node.addr;
    let stop = tokio_util::sync::CancellationToken::new();
    let checks = health_checks(node.url("/healthz"), stop.clone());
    // Connections open a few hundred at a time (the accept queue holds
    // 1,024); each then stalls on its own.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let mut stream = {
                    let _turn = gate.acquire().await.unwrap();
                    let mut stream = TcpStream::connect(addr).await.expect("connects");
                    stream.write_all(HEALTH).await.unwrap();
                    let mut buffer = Vec::new();
                    let head = read_response(&mut stream, &mut buffer).await;
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    stream
                };
                // The first byte of a second request, then silence.
                stream.write_all(b"G").await.unwrap();
                let stalled = Instant::now();
                until_closed(&mut stream, Vec::new(), stalled, HEAD + SLACK).await
            })
        })
        .collect();
    let mut open = 0;
    for client in clients {
        match client.await.unwrap() {
            Some((sent, _)) => assert!(
                sent.starts_with("HTTP/1.1 408") && sent.ends_with("server.handshake_timeout\"}"),
                "{sent:?}"
            ),
            None => open += 1,
        }
    }
    stop.cancel();
    let answered = checks.await.unwrap();
    assert_eq!(
        open,
        0,
        "{open} of {CONNECTIONS} stalled connections were still open {:?} after their stall",
        HEAD + SLACK
    );
    assert!(answered > 0);
}

#[tokio::test]
async fn a_partial_request_sent_behind_a_whole_one_is_closed_too() {
    let node = spawn_node_with(|s| s.server.handshake_timeout = HEAD).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    // One whole request and the start of the next in one write.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: herald\r\n\r\nGET /heal")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let head = read_response(&mut stream, &mut buffer).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    // Kept alive at most its keep-alive limit (5 s) or the head's, then closed.
    let limit = herald::startup::KEEP_ALIVE.max(HEAD) + SLACK;
    let (sent, _) = until_closed(&mut stream, buffer, answered, limit)
        .await
        .unwrap_or_else(|| panic!("still open {limit:?} after its last answer"));
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 408"),
        "{sent:?}"
    );
}

#[tokio::test]
async fn a_body_that_trickles_in_is_cut_off_at_the_body_timeout_with_408() {
    let node = spawn_node_with(|s| s.server.body_timeout = BODY).await;
    let publisher = token("pub", &[], &[">"]);
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/topics/slow/events HTTP/1.1\r\nhost: herald\r\n\
         authorization: Bearer {publisher}\r\ncontent-type: application/json\r\n\
         content-length: 60000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // One byte every half second, until the node answers or closes.
    let mut chunk = [0u8; 4096];
    let mut sent = Vec::new();
    let closed = loop {
        assert!(
            started.elapsed() < BODY + herald::ws::LINGER + SLACK,
            "a body still trickling in after {:?} is still read",
            started.elapsed()
        );
        let _ = stream.write_all(b" ").await;
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => sent.extend_from_slice(&chunk[..n]),
        }
    };
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent:?}");
    assert!(sent.contains("server.body_timeout"), "{sent:?}");
    // After the 408 the node lingers for the client's side to close (so
    // that the answer is read rather than reset), at most `LINGER`.
    let limit = BODY + herald::ws::LINGER + SLACK;
    assert!(closed < limit, "closed after {closed:?}");
}

#[tokio::test]
async fn an_idle_kept_alive_connection_still_closes_at_its_keep_alive_limit() {
    let node = spawn_node_with(|s| s.server.handshake_timeout = HEAD).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream.write_all(HEALTH).await.unwrap();
    let mut buffer = Vec::new();
    read_response(&mut stream, &mut buffer).await;
    let answered = Instant::now();
    // Past the head's limit it is still open and served: idle is no stall.
    tokio::time::sleep(HEAD + SLACK).await;
    stream.write_all(HEALTH).await.unwrap();
    let head = read_response(&mut stream, &mut buffer).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head} after {:?}",
        answered.elapsed()
    );
    let answered = Instant::now();
    let (sent, closed) = until_closed(
        &mut stream,
        buffer,
        answered,
        herald::startup::KEEP_ALIVE + SLACK,
    )
    .await
    .expect("closed at its keep-alive limit");
    assert!(
        sent.is_empty(),
        "an idle connection is closed without a reply: {sent:?}"
    );
    // At its keep-alive, not at a head's deadline (2 s): actix times
    // keep-alive from a clock it refreshes every 500 ms, so up to that much
    // early (4.5 s was seen).
    assert!(
        closed >= herald::startup::KEEP_ALIVE - Duration::from_secs(1) && closed > HEAD + SLACK,
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_node_out_of_open_files_serves_what_it_holds_says_so_once_and_recovers() {
    use crate::helpers::{KillOnDrop, WsClient, eventually, free_port, secret, temp_dir};
    // A hard limit the node cannot raise its soft limit past.
    const FILES: u32 = 128;
    let dir = temp_dir("nofile");
    let port = free_port();
    let log = dir.join("stderr.log");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--nofile={FILES}:{FILES}"))
        .arg(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .current_dir(&dir)
        .env("HERALD__AUTH__JWT_SECRET", secret())
        .env("HERALD__SERVER__BIND", format!("127.0.0.1:{port}"))
        // Connections that send nothing are held, not timed out.
        .env("HERALD__SERVER__HANDSHAKE_TIMEOUT", "60s")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HERALD__")) {
        if !["HERALD__AUTH__JWT_SECRET", "HERALD__SERVER__BIND"].contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
    let mut child = KillOnDrop(cmd.spawn().expect("prlimit runs herald"));
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    eventually("the node answers", || async {
        http.get(url("/healthz")).send().await.is_ok()
    })
    .await;
    // A subscriber and a publisher connected before the node runs out.
    let all = token("held", &[">"], &[">"]);
    let mut held: WsClient =
        crate::helpers::Handshake::to(&format!("ws://127.0.0.1:{port}/ws?token={all}"))
            .open()
            .await;
    held.subscribe("held.topic").await;
    // More connections than the node has files: the kernel completes them
    // all; the node accepts until it runs out.
    let mut hogs = Vec::new();
    for _ in 0..FILES * 2 {
        hogs.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Out of files, it still serves what it holds.
    let reply = held
        .request(serde_json::json!({"op": "publish", "id": 1, "topic": "held.topic", "data": "still here"}))
        .await;
    assert_eq!(reply["op"], "published", "{reply}");
    assert_eq!(held.recv().await["data"], "still here");
    // Files come back: it accepts again, by itself.
    drop(hogs);
    eventually("the node accepts again", || async {
        http.get(url("/healthz")).send().await.is_ok()
    })
    .await;
    let metrics = crate::helpers::get_text(&http, url("/metrics")).await;
    let failed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herald_accept_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no herald_accept_errors_total in {metrics}"));
    assert!(failed >= 2.0, "{failed} failed accepts counted");
    drop(held);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    let limit_line = log
        .lines()
        .find(|l| l.contains("open files limit"))
        .unwrap_or_else(|| panic!("no open files limit at start-up in {log}"));
    assert!(
        limit_line.contains(&format!("soft={FILES}"))
            && limit_line.contains(&format!("hard={FILES}")),
        "{limit_line}"
    );
    // Every failed accept counted, but said once per interval: the test
    // ran out of files for well under two intervals.
    let said = log
        .lines()
        .filter(|l| l.contains("accepting connection"))
        .count();
    assert!(
        (1..=2).contains(&said),
        "{said} log lines for {failed} failed accepts:\n{log}"
    );
}

#[tokio::test]
async fn an_answer_given_before_its_body_was_read_closes_the_connection_without_a_408() {
    // The body's rest, which the server drains, is bounded by the body's
    // deadline, not held open for as long as the client sends it.
    let node = spawn_node_with(|s| {
        s.server.handshake_timeout = HEAD;
        s.server.body_timeout = BODY;
    })
    .await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    // Refused (401) before its body is read; the body goes on in chunks.
    stream
        .write_all(
            b"POST /api/v1/topics/t/events HTTP/1.1\r\nhost: herald\r\n\
              authorization: Bearer not-a-token\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        assert!(
            started.elapsed() < BODY + SLACK,
            "still open after {:?}: {:?}",
            started.elapsed(),
            String::from_utf8_lossy(&sent)
        );
        let _ = stream.write_all(b"1\r\n \r\n").await;
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => sent.extend_from_slice(&chunk[..n]),
        }
    };
    assert!(closed);
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 401"), "{sent:?}");
    assert!(
        sent.to_ascii_lowercase().contains("connection: close"),
        "{sent:?}"
    );
    assert!(!sent.contains("408"), "a 408 after the answer: {sent:?}");
}
