//! Starts real nodes on random loopback ports and talks to them the way
//! users do: a WebSocket client and an HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::config::Settings;
use herald::startup::Application;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// The HS256 secret of test nodes.
pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";

/// How long a test waits for a frame it expects before failing.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TestNode {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_node() -> TestNode {
    spawn_node_with(|_| {}).await
}

/// Starts a node with test defaults, adjusted by `adjust`.
pub async fn spawn_node_with(adjust: impl FnOnce(&mut Settings)) -> TestNode {
    let mut settings = Settings::defaults();
    settings.server.bind = "127.0.0.1:0".into();
    settings.auth.jwt_secret = Some(SECRET.into());
    adjust(&mut settings);
    let app = Application::build(settings)
        .await
        .expect("test node starts");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    TestNode {
        addr,
        http: reqwest::Client::new(),
        shutdown,
    }
}

/// An HS256 token for the test secret.
pub fn token(sub: &str, topics: &[&str], publish: &[&str]) -> String {
    claims_token(json!({
        "sub": sub,
        "exp": now() + 3600,
        "topics": topics,
        "publish": publish,
    }))
}

/// An HS256 token with exactly these claims.
pub fn claims_token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A handshake request to open, before it is sent.
pub struct Handshake {
    request: tungstenite::handshake::client::Request,
}

impl Handshake {
    /// A handshake to any WebSocket URL.
    pub fn to(url: &str) -> Handshake {
        Handshake {
            request: url.into_client_request().unwrap(),
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.request
            .headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn protocol(self, name: &str) -> Self {
        self.header("sec-websocket-protocol", name)
    }

    /// Opens the connection; panics if the handshake is refused.
    pub async fn open(self) -> WsClient {
        match self.try_open().await {
            Ok(client) => client,
            Err(refused) => panic!("handshake refused: {refused:?}"),
        }
    }

    /// Opens the connection over a socket with a tiny receive buffer, so a
    /// client that stops reading backs up onto the server quickly.
    pub async fn open_with_small_receive_buffer(self) -> WsClient {
        let uri = self.request.uri();
        let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
        let (stream, _) = tokio_tungstenite::client_async(self.request, MaybeTlsStream::Plain(tcp))
            .await
            .expect("handshake accepted");
        WsClient {
            stream,
            msgpack: false,
        }
    }

    /// Opens the connection, or returns the refusal's status and JSON body.
    pub async fn try_open(self) -> Result<WsClient, (u16, Value)> {
        match tokio_tungstenite::connect_async(self.request).await {
            Ok((stream, response)) => {
                let protocol = response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_owned());
                Ok(WsClient {
                    stream,
                    msgpack: protocol.as_deref() == Some("herald.msgpack"),
                })
            }
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(other) => panic!("connect failed: {other}"),
        }
    }
}

impl TestNode {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A handshake to `/ws` with `query` appended (e.g. `?token=…`).
    pub fn handshake(&self, query: &str) -> Handshake {
        Handshake::to(&format!("ws://{}/ws{}", self.addr, query))
    }

    /// A JSON connection authenticated with `token` in the query string,
    /// as a browser would.
    pub async fn connect(&self, token: &str) -> WsClient {
        self.handshake(&format!("?token={token}")).open().await
    }

    /// POSTs `data` as JSON to the topic's publish endpoint.
    pub async fn publish(&self, token: &str, topic: &str, data: &Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/v1/topics/{topic}/events")))
            .bearer_auth(token)
            .json(data)
            .send()
            .await
            .unwrap()
    }

    /// Publishes and asserts success; returns the offset.
    pub async fn publish_ok(&self, token: &str, topic: &str, data: &Value) -> u64 {
        let response = self.publish(token, topic, data).await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["topic"], topic);
        body["offset"].as_u64().unwrap()
    }
}

/// A WebSocket client speaking `herald.json` or `herald.msgpack`; frames are
/// turned into JSON values either way so tests assert one shape.
pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub msgpack: bool,
}

impl WsClient {
    pub async fn send(&mut self, frame: Value) {
        let message = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&frame).unwrap().into())
        } else {
            Message::Text(frame.to_string().into())
        };
        self.stream.send(message).await.unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.unwrap();
    }

    /// The next frame of any kind. Fails the test on timeout or close.
    pub async fn stream_next(&mut self) -> Message {
        tokio::time::timeout(RECV_TIMEOUT, self.stream.next())
            .await
            .expect("a frame within the timeout")
            .expect("connection still open")
            .expect("a valid frame")
    }

    /// The next data frame, decoded. Fails the test on timeout or close.
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.stream_next().await {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Binary(bytes) => return msgpack_to_json(&bytes),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a data frame, got {other:?}"),
            }
        }
    }

    /// Sends `request` and returns the next frame (its reply).
    pub async fn request(&mut self, request: Value) -> Value {
        self.send(request).await;
        self.recv().await
    }

    pub async fn subscribe(&mut self, topic: &str) {
        let reply = self
            .request(json!({"op": "subscribe", "id": 1, "topic": topic}))
            .await;
        assert_eq!(reply, json!({"op": "subscribed", "id": 1, "topic": topic}));
    }

    /// Waits for the server's close frame and returns it.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            let message = tokio::time::timeout(RECV_TIMEOUT, self.stream.next())
                .await
                .expect("close within the timeout");
            match message {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// MessagePack → JSON for assertions; `bin` becomes `{"$bin": [bytes]}` so
/// tests can tell it apart from an array.
pub fn msgpack_to_json(bytes: &[u8]) -> Value {
    fn convert(v: rmpv::Value) -> Value {
        match v {
            rmpv::Value::Binary(b) => json!({ "$bin": b }),
            rmpv::Value::Map(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.as_str().unwrap().to_owned(), convert(v)))
                    .collect(),
            ),
            rmpv::Value::Array(items) => Value::Array(items.into_iter().map(convert).collect()),
            other => serde_json::to_value(other).unwrap(),
        }
    }
    convert(rmp_serde::from_slice(bytes).unwrap())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` on its own port, killed when dropped. Tests
/// that stop Redis use this, never the shared one on 6379.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it
    /// answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README: Tests)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Runs one command against this server.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut conn).await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after
/// `RECV_TIMEOUT` with `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT * 2;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

impl TestNode {
    /// A node in cluster mode on `redis`, once it is ready.
    pub async fn clustered(redis: &RedisServer) -> TestNode {
        let url = redis.url();
        let node = spawn_node_with(|s| s.redis.url = Some(url.into())).await;
        node.wait_ready().await;
        node
    }

    pub async fn readyz(&self) -> u16 {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn wait_ready(&self) {
        eventually("the node is ready", || async { self.readyz().await == 200 }).await;
    }
}
