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

/// The HS256 secret of this run's test nodes: drawn at random, so that no
/// secret written in Herald's files can start a node.
pub fn secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(random_secret)
}

/// A fresh random HS256 secret (32 bytes, base64).
pub fn random_secret() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// How long a test waits for a frame it expects before failing.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TestNode {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    /// Holds the node's SQLite file, when it has one.
    dir: std::path::PathBuf,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh, empty directory under the system's temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("herald-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn spawn_node() -> TestNode {
    spawn_node_with(|_| {}).await
}

/// Starts a node with test defaults (its own SQLite store), adjusted by
/// `adjust`.
pub async fn spawn_node_with(adjust: impl FnOnce(&mut Settings)) -> TestNode {
    let dir = temp_dir("node");
    let mut settings = Settings::defaults();
    settings.server.bind = "127.0.0.1:0".into();
    settings.auth.jwt_secret = Some(secret().into());
    settings.store.url = format!("sqlite://{}", dir.join("herald.db").display()).into();
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
        dir,
    }
}

/// `room.>` topics keep presence; changes are sent every 100 ms.
pub fn with_presence(s: &mut Settings) {
    s.topics = vec![herald::config::TopicRule {
        pattern: "room.>".into(),
        history: None,
        max_age: None,
        max_events: None,
        presence: Some(true),
    }];
    s.presence.batch_interval = Duration::from_millis(100);
    s.limits.subscribe_rate = 10_000;
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
        &jsonwebtoken::EncodingKey::from_secret(secret().as_bytes()),
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
    /// The node's SQLite file (nodes started by [`spawn_node_with`] without
    /// another `store.url`).
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self.dir.join("herald.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A handshake to `/ws` with `query` appended (e.g. `?token=…`).
    pub fn handshake(&self, query: &str) -> Handshake {
        Handshake::to(&format!("ws://{}/ws{}", self.addr, query))
    }

    /// The refusal of a handshake with `token`: its status and JSON body.
    pub async fn refused(&self, token: &str) -> (u16, Value) {
        match self.handshake(&format!("?token={token}")).try_open().await {
            Ok(_) => panic!("a handshake that should be refused was accepted"),
            Err(refusal) => refusal,
        }
    }

    /// A `herald.msgpack` connection authenticated with `token`.
    pub async fn connect_msgpack(&self, token: &str) -> WsClient {
        let ws = self
            .handshake(&format!("?token={token}"))
            .protocol("herald.msgpack")
            .open()
            .await;
        assert!(ws.msgpack, "the node chose herald.msgpack");
        ws
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

    /// GETs `path` with `token` and returns the JSON body.
    /// POSTs `events` (a JSON array) to the batch publish endpoint.
    pub async fn publish_batch(&self, token: &str, events: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/events"))
            .bearer_auth(token)
            .json(events)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` with `token` as its bearer.
    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        self.get(path, token).await.json().await.unwrap()
    }

    /// A task that publishes `count` events to `topic` over HTTP, one after
    /// the other, each answered 201; it returns their offsets in order.
    pub fn spawn_publisher(&self, topic: &str, count: u64) -> tokio::task::JoinHandle<Vec<u64>> {
        let (http, url) = (
            self.http.clone(),
            self.url(&format!("/api/v1/topics/{topic}/events")),
        );
        let token = token("pub", &[], &[">"]);
        tokio::spawn(async move {
            let mut offsets = Vec::with_capacity(count as usize);
            for i in 0..count {
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!(i))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                let body: Value = response.json().await.unwrap();
                offsets.push(body["offset"].as_u64().unwrap());
            }
            offsets
        })
    }

    /// Publishes and asserts success; returns the offset.
    pub async fn publish_ok(&self, token: &str, topic: &str, data: &Value) -> u64 {
        let response = self.publish(token, topic, data).await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["topic"], topic);
        body["offset"].as_u64().unwrap()
    }

    /// Publishes a binary payload and asserts success; returns the offset.
    pub async fn publish_binary_ok(&self, token: &str, topic: &str, payload: &[u8]) -> u64 {
        let response = self
            .http
            .post(self.url(&format!("/api/v1/topics/{topic}/events")))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(payload.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
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
                Message::Text(text) => return parse_frame(&text),
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

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, topic: &str) -> Value {
        self.subscribe_with(json!({"op": "subscribe", "id": 1, "topic": topic}))
            .await
    }

    /// Sends a subscribe request and asserts it was accepted.
    pub async fn subscribe_with(&mut self, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["topic"], request["topic"]);
        assert_eq!(reply["id"], request["id"]);
        reply
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

/// A JSON frame as a value. Without serde_json's depth limit: a payload
/// may nest 128 levels, and its frame is one more.
fn parse_frame(text: &str) -> Value {
    use serde::Deserialize as _;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    Value::deserialize(&mut de).unwrap()
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

/// A PostgreSQL database of its own for one test, dropped afterwards. The
/// server is `HERALD_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`);
/// the test fails, naming that setting, when no server answers.
pub struct PgDatabase {
    server: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::Connection as _;
        let server = std::env::var("HERALD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("herald_test_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to PostgreSQL at {server} (set HERALD_TEST_POSTGRES): {e}")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        PgDatabase { server, name }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// A connection to the server's `postgres` database, for statements
    /// about this one.
    async fn admin(&self) -> sqlx::PgConnection {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&format!("{}/postgres", self.server))
            .await
            .unwrap()
    }

    /// Drops the database now, under whatever is connected to it (a store
    /// that loses its database, as after an operator's mistake).
    pub async fn drop_now(&self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut self.admin().await)
            .await
            .unwrap();
    }

    /// Closes every connection to the database from the server's side, as
    /// a PostgreSQL restart or failover does.
    pub async fn terminate_connections(&self) {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut self.admin().await)
        .await
        .unwrap();
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", self.server);
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await; a short-lived runtime on its own thread can.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection as _;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Two nodes in cluster mode on a private Redis and a fresh PostgreSQL
/// database; dropping it stops the nodes, then Redis, then drops the
/// database.
pub struct TwoNodes {
    pub a: TestNode,
    pub b: TestNode,
    pub redis: RedisServer,
    _pg: PgDatabase,
}

impl TwoNodes {
    pub async fn start() -> TwoNodes {
        let redis = RedisServer::start().await;
        let pg = PgDatabase::create().await;
        TwoNodes {
            a: TestNode::clustered(&redis, &pg).await,
            b: TestNode::clustered(&redis, &pg).await,
            redis,
            _pg: pg,
        }
    }
}

impl TestNode {
    /// A node in cluster mode on `redis` and the shared store `pg`, once it
    /// is ready.
    pub async fn clustered(redis: &RedisServer, pg: &PgDatabase) -> TestNode {
        Self::clustered_with(redis, pg, |_| {}).await
    }

    pub async fn clustered_with(
        redis: &RedisServer,
        pg: &PgDatabase,
        adjust: impl FnOnce(&mut Settings),
    ) -> TestNode {
        let (redis_url, store_url) = (redis.url(), pg.url());
        let node = spawn_node_with(|s| {
            s.redis.url = Some(redis_url.into());
            s.store.url = store_url.into();
            adjust(s);
        })
        .await;
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

/// The body of `GET url` (e.g. a node's `/metrics`), as text.
pub async fn get_text(http: &reqwest::Client, url: String) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Checks a 429 `rate_limited` refusal that names `setting`; returns its
/// `Retry-After`, in seconds.
pub async fn rate_limited(refused: reqwest::Response, setting: &str) -> u64 {
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(setting), "{body}");
    retry_after
}

/// A child process stopped when the test ends, even when it fails first:
/// SIGTERM (so a script can stop what it started), SIGKILL after 5 s.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn owned(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The `herald` binary, run in `dir`, without the test's own `HERALD__*`
/// environment.
pub fn herald_command(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD__") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `herald serve` as its own process on a free loopback port, with the test
/// secret; stopped when dropped.
pub struct ServeProcess {
    pub child: KillOnDrop,
    pub port: u16,
    /// What it was started with, to start it again.
    dir: std::path::PathBuf,
    env: Vec<(String, String)>,
    config: bool,
}

impl ServeProcess {
    /// Starts the process with `env` added and waits until `/healthz`
    /// answers. Its stderr goes to `stderr`.
    pub async fn start(
        name: &str,
        env: &[(&str, String)],
        stderr: std::process::Stdio,
    ) -> ServeProcess {
        Self::launch(temp_dir(name), free_port(), false, owned(env), stderr).await
    }

    /// [`start`](Self::start) with `--config` naming a file holding
    /// `config` (TOML).
    pub async fn start_with_config(
        name: &str,
        config: &str,
        env: &[(&str, String)],
        stderr: std::process::Stdio,
    ) -> ServeProcess {
        let dir = temp_dir(name);
        std::fs::write(dir.join("herald.toml"), config).unwrap();
        Self::launch(dir, free_port(), true, owned(env), stderr).await
    }

    /// Starts the process again, as before and on the same port, once it
    /// has stopped.
    pub async fn restart(&mut self) {
        let again = Self::launch(
            self.dir.clone(),
            self.port,
            self.config,
            std::mem::take(&mut self.env),
            std::process::Stdio::null(),
        )
        .await;
        *self = again;
    }

    async fn launch(
        dir: std::path::PathBuf,
        port: u16,
        config: bool,
        env: Vec<(String, String)>,
        stderr: std::process::Stdio,
    ) -> ServeProcess {
        let mut cmd = herald_command(&dir);
        cmd.arg("serve")
            .env("HERALD__AUTH__JWT_SECRET", secret())
            .env("HERALD__SERVER__BIND", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        if config {
            cmd.args(["--config", "herald.toml"]);
        }
        for (key, value) in &env {
            cmd.env(key, value);
        }
        let process = ServeProcess {
            child: KillOnDrop(cmd.spawn().unwrap()),
            port,
            dir,
            env,
            config,
        };
        let http = reqwest::Client::new();
        eventually("the node answers", || async {
            http.get(process.url("/healthz")).send().await.is_ok()
        })
        .await;
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        eventually("the node is ready", || async {
            http.get(self.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// A JSON WebSocket to this process, authenticated with `token`.
    pub async fn connect(&self, token: &str) -> WsClient {
        Handshake::to(&format!("ws://127.0.0.1:{}/ws?token={token}", self.port))
            .open()
            .await
    }

    /// Sends `signal` (e.g. `TERM`) and waits until the process exits.
    pub async fn stop_with(&mut self, signal: &str) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let mut status = None;
        eventually("the process exits", || {
            status = status.or_else(|| self.child.0.try_wait().unwrap());
            let exited = status.is_some();
            async move { exited }
        })
        .await;
        status.unwrap()
    }
}

/// The port of the master that owns `key`'s slot, as the first of the
/// Redis Cluster nodes `ports` that answers says (`CLUSTER SLOTS`).
pub async fn cluster_master_of(ports: &[u16], key: &str) -> u16 {
    for port in ports {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ranges: Vec<(u16, u16, (String, u16))> = match redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
        {
            Ok(ranges) => ranges
                .into_iter()
                .filter_map(|range| {
                    let range: Vec<redis::Value> = redis::from_redis_value(range).ok()?;
                    let start = redis::from_redis_value(range.first()?.clone()).ok()?;
                    let end = redis::from_redis_value(range.get(1)?.clone()).ok()?;
                    let master: Vec<redis::Value> =
                        redis::from_redis_value(range.get(2)?.clone()).ok()?;
                    let host = redis::from_redis_value(master.first()?.clone()).ok()?;
                    let master_port = redis::from_redis_value(master.get(1)?.clone()).ok()?;
                    Some((start, end, (host, master_port)))
                })
                .collect(),
            Err(_) => continue,
        };
        if let Some((_, _, (_, master))) = ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
        {
            return *master;
        }
    }
    panic!("no Redis Cluster node of {ports:?} names the master of {key}");
}

/// Redis Cluster ports handed out by this process: clusters of tests
/// running side by side must not take each other's ports or bus ports
/// (10000 above).
static CLUSTER_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// `count` loopback ports in a row, free a moment ago with their cluster
/// bus ports, none handed out before by this process; returns the first.
pub fn cluster_ports_in_a_row(count: u16) -> u16 {
    loop {
        let base = free_port();
        if base > 50_000 {
            continue;
        }
        let mut taken = CLUSTER_PORTS.lock().unwrap();
        let ports: Vec<u16> = (base..base + count).collect();
        let clash = ports.iter().any(|p| {
            taken.contains(p)
                || taken.contains(&(p + 10_000))
                || taken.contains(&p.wrapping_sub(10_000))
        });
        let free = ports.iter().all(|p| {
            std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
        });
        if !clash && free {
            taken.extend(&ports);
            return base;
        }
    }
}

fn free_cluster_port() -> u16 {
    cluster_ports_in_a_row(1)
}

/// A private Redis Cluster: six `redis-server` processes with
/// `cluster-enabled yes` on free ports (three masters, three replicas),
/// made one cluster by `redis-cli --cluster create`; killed when dropped.
/// A master is declared failed after 2 s (`cluster-node-timeout`).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<Option<std::process::Child>>,
    /// Whether `redis-cli --cluster create` made them one cluster.
    formed: bool,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let ports: Vec<u16> = (0..6).map(|_| free_cluster_port()).collect();
        let mut cluster = RedisCluster {
            dir: temp_dir("redis-cluster"),
            children: ports.iter().map(|_| None).collect(),
            ports,
            formed: false,
        };
        for i in 0..cluster.ports.len() {
            cluster.start_node(i).await;
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli is installed (see README: Tests)");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.formed = true;
        cluster.wait_healthy().await;
        cluster
    }

    /// Starts node `i` (again, with its cluster state file, so a restarted
    /// node rejoins) and waits until it answers.
    pub async fn start_node(&mut self, i: usize) {
        // Before the cluster is made, a node whose port was taken meanwhile
        // moves to another; after, it must come back on its own.
        let may_move = !self.formed;
        for _ in 0..5 {
            let port = self.ports[i].to_string();
            let child = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                // A replica may take over however long ago it heard from
                // its master (a test kills masters soon after start).
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed (see README: Tests)");
            self.children[i] = Some(child);
            let deadline = tokio::time::Instant::now() + RECV_TIMEOUT * 2;
            while tokio::time::Instant::now() < deadline {
                let exited = self.children[i]
                    .as_mut()
                    .is_some_and(|c| c.try_wait().unwrap().is_some());
                if exited {
                    break;
                }
                // Our own process answers: it is alive and holds the port.
                if self
                    .try_query::<String>(self.ports[i], &redis::cmd("PING"))
                    .await
                    .is_some()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.children[i] = None;
            assert!(may_move, "redis-server on port {port} did not start again");
            self.ports[i] = free_cluster_port();
        }
        panic!("no cluster node could start on a free port");
    }

    /// The seed list for `redis.url`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `port` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        self.start_node(i).await;
    }

    async fn try_query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> Option<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async(&mut conn).await.ok()
    }

    /// Runs one command on node `port`.
    pub async fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut conn).await.unwrap()
    }

    /// How many clients of node `port` subscribe to shard channel `name`.
    pub async fn shard_subscribers(&self, port: u16, name: &str) -> u64 {
        let counts: Vec<(String, u64)> = self
            .query(port, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(name))
            .await;
        counts.first().map_or(0, |(_, n)| *n)
    }

    /// The live nodes' view: `(port, id, is_master)` of each node that is
    /// up and not failed, as a live node tells it.
    pub async fn nodes(&self) -> Vec<(u16, String, bool)> {
        for (i, port) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            if let Some(text) = self
                .try_query::<String>(*port, redis::cmd("CLUSTER").arg("NODES"))
                .await
            {
                return text
                    .lines()
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split(' ').collect();
                        let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                        let flags = fields.get(2)?;
                        (!flags.contains("fail"))
                            .then(|| (port, fields[0].to_owned(), flags.contains("master")))
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    /// The ports of the masters.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .nodes()
            .await
            .into_iter()
            .filter(|(_, _, master)| *master)
            .map(|(p, _, _)| p)
            .collect();
        masters.sort();
        masters
    }

    /// The hash slot of `key`.
    pub async fn slot_of(&self, key: &str) -> u16 {
        self.query(self.ports[0], redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
    }

    /// The port of the master that owns `key`'s slot.
    pub async fn master_of(&self, key: &str) -> u16 {
        let live: Vec<u16> = self
            .ports
            .iter()
            .zip(&self.children)
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
            .collect();
        cluster_master_of(&live, key).await
    }

    /// Waits until a replica took over from master `victim` (killed): 2 s
    /// to declare it failed, then an election. Panics after 30 s.
    pub async fn wait_failover(&self, victim: u16) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let masters = self.masters().await;
            if masters.len() == 3 && !masters.contains(&victim) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica took over from {victim} within 30 s: masters {masters:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every live node says the cluster is ok, every replica
    /// is in sync with its master, and three masters serve it.
    pub async fn wait_healthy(&self) {
        eventually("the redis cluster is ok with three masters", || async {
            for (i, port) in self.ports.iter().enumerate() {
                if self.children[i].is_none() {
                    continue;
                }
                let info = self
                    .try_query::<String>(*port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                    .unwrap_or_default();
                let replication = self
                    .try_query::<String>(*port, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok")
                    || (replication.contains("role:slave")
                        && !replication.contains("master_link_status:up"))
                {
                    return false;
                }
            }
            self.masters().await.len() == 3
        })
        .await;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One message of an event stream as a client parses it: an SSE message
/// (its fields), or one NDJSON line.
#[derive(Debug, Default, Clone)]
pub struct StreamMessage {
    /// SSE `event:`; `None` for the default type.
    pub event: Option<String>,
    pub id: Option<String>,
    /// SSE `data:` (joined lines) or the NDJSON line, as JSON.
    pub data: Option<Value>,
    pub retry: Option<u64>,
    /// Only a comment (SSE) or an empty line (NDJSON): a heartbeat.
    pub heartbeat: bool,
}

/// An event stream read over real HTTP: `text/event-stream` or
/// `application/x-ndjson`.
pub struct StreamClient {
    response: reqwest::Response,
    buf: Vec<u8>,
    ndjson: bool,
    /// The last SSE id received, as `EventSource` keeps it.
    pub last_id: Option<String>,
}

impl StreamClient {
    /// `GET url` with `accept`, and `headers`; the refusal's status and
    /// JSON body if it is not a stream.
    pub async fn open(
        url: &str,
        accept: &str,
        headers: &[(&str, &str)],
    ) -> Result<StreamClient, (u16, Value)> {
        let mut request = reqwest::Client::new().get(url).header("accept", accept);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the node answers");
        if response.status() != 200 {
            let status = response.status().as_u16();
            return Err((status, response.json().await.unwrap_or(Value::Null)));
        }
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, accept, "the stream's content type");
        Ok(StreamClient {
            response,
            buf: Vec::new(),
            ndjson: accept == "application/x-ndjson",
            last_id: None,
        })
    }

    /// [`open`](Self::open), which must succeed.
    pub async fn sse(url: &str, headers: &[(&str, &str)]) -> StreamClient {
        Self::open(url, "text/event-stream", headers)
            .await
            .expect("the stream opens")
    }

    pub async fn ndjson(url: &str, headers: &[(&str, &str)]) -> StreamClient {
        Self::open(url, "application/x-ndjson", headers)
            .await
            .expect("the stream opens")
    }

    /// The next message, within [`RECV_TIMEOUT`]; `None` once the response
    /// ended.
    pub async fn next(&mut self) -> Option<StreamMessage> {
        self.next_within(RECV_TIMEOUT).await
    }

    /// The next message, within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<StreamMessage> {
        tokio::time::timeout(limit, self.next_message())
            .await
            .expect("a stream message within the timeout")
    }

    async fn next_message(&mut self) -> Option<StreamMessage> {
        let end: &[u8] = if self.ndjson { b"\n" } else { b"\n\n" };
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                let raw: Vec<u8> = self.buf.drain(..at + end.len()).collect();
                let text = String::from_utf8(raw[..at].to_vec()).expect("UTF-8");
                return Some(if self.ndjson {
                    self.parse_line(&text)
                } else {
                    self.parse_sse(&text)
                });
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => {
                    assert!(self.buf.is_empty(), "a partial message at the end");
                    return None;
                }
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
    }

    fn parse_line(&self, line: &str) -> StreamMessage {
        if line.is_empty() {
            return StreamMessage {
                heartbeat: true,
                ..StreamMessage::default()
            };
        }
        StreamMessage {
            data: Some(serde_json::from_str(line).expect("each line is JSON")),
            ..StreamMessage::default()
        }
    }

    fn parse_sse(&mut self, text: &str) -> StreamMessage {
        let mut message = StreamMessage::default();
        let mut data: Option<String> = None;
        let mut comments = 0;
        for line in text.split('\n') {
            if line.starts_with(':') {
                comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => message.event = Some(value.to_owned()),
                "id" => {
                    message.id = Some(value.to_owned());
                    self.last_id = Some(value.to_owned());
                }
                "retry" => message.retry = Some(value.parse().expect("retry in ms")),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                other => panic!("unknown SSE field {other:?} in {text:?}"),
            }
        }
        message.data = data.map(|d| serde_json::from_str(&d).expect("data is JSON"));
        message.heartbeat = comments > 0
            && message.event.is_none()
            && message.id.is_none()
            && message.retry.is_none()
            && message.data.is_none();
        message
    }

    /// The next message that carries data (skipping heartbeats and
    /// data-less SSE messages), as JSON.
    pub async fn next_data(&mut self) -> Value {
        loop {
            let message = self.next().await.expect("the stream goes on");
            if let Some(data) = message.data {
                return data;
            }
        }
    }

    /// The next event, skipping the opening's `subscribed` messages.
    pub async fn next_event(&mut self) -> Value {
        loop {
            let data = self.next_data().await;
            match data["op"].as_str() {
                Some("event") => return data,
                Some("subscribed") => continue,
                _ => panic!("expected an event, got {data}"),
            }
        }
    }

    /// The offsets of the next `n` events.
    pub async fn offsets(&mut self, n: usize) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(n);
        for _ in 0..n {
            offsets.push(self.next_event().await["offset"].as_u64().unwrap());
        }
        offsets
    }
}
