//! What an attacker holding an ordinary valid token must not be able to do:
//! poison a topic for other subscribers, pin a node's memory, take another
//! user's share of a node, or hijack another publisher's idempotency key.

use serde_json::{Value, json};

use crate::helpers::{TestNode, eventually, get_text, spawn_node, token};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

async fn post_json(node: &TestNode, path: &str, body: String) -> (u16, Value) {
    let response = node
        .http
        .post(node.url(path))
        .bearer_auth(publisher())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_number_neither_encoding_can_carry_is_refused_at_every_edge() {
    let node = spawn_node().await;
    let (status, body) = post_json(&node, "/api/v1/topics/t/events", r#"{"x":1e400}"#.into()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("out of range"),
        "{body}"
    );

    let batch = r#"[{"topic":"t","data":1},{"topic":"t","data":-1e400}]"#;
    let (status, body) = post_json(&node, "/api/v1/events", batch.into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("event 1:"),
        "{body}"
    );

    let mut ws = node.connect(&token("c", &[">"], &[">"])).await;
    ws.send_raw(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"op":"publish","id":5,"topic":"t","data":{"x":1e400}}"#.into(),
    ))
    .await;
    let reply = ws.recv().await;
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_u64()),
        (Some("error"), Some(5))
    );
    assert_eq!(reply["code"], "bad_request");
    assert!(
        reply["message"].as_str().unwrap().contains("out of range"),
        "{reply}"
    );

    // Nothing was stored.
    let history = node
        .get_json("/api/v1/topics/t/events", &subscriber())
        .await;
    assert_eq!(history["events"], json!([]), "{history}");
}

#[tokio::test]
async fn the_documented_nesting_limit_is_delivered_in_both_encodings_and_one_more_is_refused() {
    let node = spawn_node().await;
    let mut msgpack = node.connect_msgpack(&subscriber()).await;
    assert!(msgpack.msgpack);
    msgpack.subscribe("deep").await;
    let mut json_ws = node.connect(&subscriber()).await;
    json_ws.subscribe("deep").await;

    let (status, body) = post_json(&node, "/api/v1/topics/deep/events", nested(128)).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_json(&node, "/api/v1/topics/deep/events", nested(129)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("128"), "{body}");

    // Built by hand: serde_json's own parser stops at 127 levels.
    let expected = (0..128).fold(json!(1), |inner, _| json!([inner]));
    assert_eq!(json_ws.recv().await["data"], expected);
    assert_eq!(msgpack.recv().await["data"], expected);
}

/// Puts a payload into the node's log behind the edge's back, as an older
/// Herald that did not check payloads could have stored it.
async fn overwrite_stored_payload(node: &TestNode, topic: &str, offset: u64, json: &str) {
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", node.sqlite_path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let updated =
        sqlx::query("UPDATE herald_events SET payload = $1 WHERE topic = $2 AND seq = $3")
            .bind(json.as_bytes())
            .bind(topic)
            .bind(offset as i64)
            .execute(&mut db)
            .await
            .unwrap();
    assert_eq!(updated.rows_affected(), 1);
}

#[tokio::test]
async fn a_stored_event_msgpack_cannot_carry_is_skipped_and_the_connection_lives_on() {
    let node = spawn_node().await;
    let publisher = publisher();
    for i in 1..=3 {
        node.publish_ok(&publisher, "poisoned", &json!(i)).await;
    }
    overwrite_stored_payload(&node, "poisoned", 2, r#"{"x":1e400}"#).await;

    let mut ws = node.connect_msgpack(&subscriber()).await;
    ws.subscribe_with(json!({"op": "subscribe", "id": 1, "topic": "poisoned", "since": 0}))
        .await;
    assert_eq!(ws.recv().await["data"], 1);
    let skipped = ws.recv().await;
    assert_eq!(skipped["op"], "error", "{skipped}");
    assert!(
        skipped["message"]
            .as_str()
            .unwrap()
            .contains("event 2 of \"poisoned\""),
        "{skipped}"
    );
    assert_eq!(ws.recv().await["data"], 3);
    // Still served: a ping, and a live event.
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 9})).await["op"],
        "pong"
    );
    node.publish_ok(&publisher, "poisoned", &json!(4)).await;
    assert_eq!(ws.recv().await["offset"], 4);

    let metrics = get_text(&node.http, node.url("/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_encode_failures_total{encoding=\"herald.msgpack\"}")),
        "{metrics}"
    );

    // Leaving releases its registration.
    drop(ws);
    eventually("the subscriber's registration is released", || async {
        let info = node.get_json("/api/v1/topics/poisoned", &publisher).await;
        info["local_subscribers"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_signing_secret_published_in_heralds_own_files_is_refused_at_start_up() {
    let dir = crate::helpers::temp_dir("published-secret");
    // The compose file's former default, and any placeholder still saying
    // "change me".
    for secret in [
        "local-cluster-secret-change-me-0123456789",
        "please-CHANGE_ME-before-production-0123456789",
    ] {
        let out = crate::helpers::herald_command(&dir)
            .arg("serve")
            .env("HERALD__AUTH__JWT_SECRET", secret)
            .env("HERALD__SERVER__BIND", "127.0.0.1:0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{secret} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("auth.jwt_secret"), "{stderr}");
        assert!(stderr.contains("HERALD__AUTH__JWT_SECRET"), "{stderr}");
        assert!(!stderr.contains(secret), "the secret is echoed: {stderr}");
    }
    // Herald's own files no longer default to any secret.
    for file in ["docker-compose.yml", "scripts/cluster.sh"] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            !text.contains("JWT_SECRET:-local"),
            "{file} defaults the secret"
        );
    }
}

#[tokio::test]
async fn an_audience_array_is_accepted_when_it_holds_the_configured_audience() {
    let node = crate::helpers::spawn_node_with(|s| s.auth.audience = Some("herald".into())).await;
    let claims = |aud: Value| {
        crate::helpers::claims_token(
            json!({"sub": "a", "exp": crate::helpers::now() + 60, "aud": aud, "topics": [">"]}),
        )
    };
    node.connect(&claims(json!(["billing", "herald"]))).await;
    node.connect(&claims(json!("herald"))).await;
    let (status, body) = node
        .handshake(&format!("?token={}", claims(json!(["billing", "other"]))))
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("audience"),
        "{body}"
    );
}

#[tokio::test]
async fn a_store_failure_answers_a_generic_message_with_an_id_and_no_database_text() {
    let pg = crate::helpers::PgDatabase::create().await;
    let url = pg.url();
    let node = crate::helpers::spawn_node_with(|s| s.store.url = url.into()).await;
    node.publish_ok(&publisher(), "t", &json!(1)).await;
    pg.drop_now().await;

    let response = node
        .http
        .get(node.url("/api/v1/topics/t/events"))
        .bearer_auth(subscriber())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("the event store is unavailable; retry (error id "),
        "{message}"
    );
    for leak in ["database", "herald_test_", "postgres", "sqlx", "relation"] {
        assert!(
            !message.contains(leak),
            "{leak} reached the client: {message}"
        );
    }
}

#[tokio::test]
async fn a_replay_ends_with_the_token_that_authorised_it() {
    // One publisher sends 4,000 events at once.
    let node = crate::helpers::spawn_node_with(|s| {
        s.limits.http_publish_rate = 1_000_000;
        s.auth.leeway = std::time::Duration::ZERO;
    })
    .await;
    // Far more than the socket buffers hold, so the replay is still
    // running when the token expires.
    let data = "x".repeat(8 * 1024);
    let batch: Vec<Value> = (0..100)
        .map(|_| json!({"topic": "long", "data": data}))
        .collect();
    let batch = Value::Array(batch);
    for _ in 0..40 {
        let response = node.publish_batch(&publisher(), &batch).await;
        assert_eq!(response.status(), 201);
    }
    let short_lived = crate::helpers::claims_token(
        json!({"sub": "s", "exp": crate::helpers::now() + 2, "topics": [">"]}),
    );
    let mut ws = node
        .handshake(&format!("?token={short_lived}"))
        .open_with_small_receive_buffer()
        .await;
    ws.send(json!({"op": "subscribe", "id": 1, "topic": "long", "since": 0}))
        .await;
    // Not reading while the token runs out.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let mut events = 0;
    let close = loop {
        match ws.stream_next().await {
            tokio_tungstenite::tungstenite::Message::Close(frame) => break frame,
            tokio_tungstenite::tungstenite::Message::Text(text)
                if text.contains(r#""op":"event""#) =>
            {
                events += 1
            }
            _ => {}
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4001));
    assert!(
        events < 4000,
        "the whole replay went out after the token expired"
    );
}

#[tokio::test]
async fn one_user_cannot_take_every_connection_slot_of_a_node() {
    let node = crate::helpers::spawn_node_with(|s| s.limits.max_connections_per_sub = 3).await;
    let greedy = token("greedy", &[">"], &[]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(node.connect(&greedy).await);
    }
    let (status, body) = node
        .handshake(&format!("?token={greedy}"))
        .try_open()
        .await
        .err()
        .expect("a fourth connection of the same user is refused");
    assert_eq!(status, 429);
    assert_eq!(body["error"], "too_many_connections");
    // Another user is unaffected.
    node.connect(&token("someone-else", &[">"], &[])).await;
    // A slot given back can be taken again.
    drop(held.pop());
    eventually("the user's slot is given back", || async {
        node.handshake(&format!("?token={greedy}"))
            .try_open()
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn http_publishing_is_rate_limited_per_user_with_retry_after() {
    // A slow rate, so that the test's own pace does not refill the bucket.
    let node = crate::helpers::spawn_node_with(|s| s.limits.http_publish_rate = 2).await;
    let hasty = token("hasty", &[], &[">"]);
    // A batch counts its events: the whole burst of 2.
    let batch = json!([{"topic": "r", "data": 1}, {"topic": "r", "data": 2}]);
    assert_eq!(node.publish_batch(&hasty, &batch).await.status(), 201);
    let refused = node.publish(&hasty, "r", &json!(3)).await;
    let retry_after = crate::helpers::rate_limited(refused, "limits.http_publish_rate").await;
    assert_eq!(retry_after, 1, "a token comes back within half a second");
    // Another user has a bucket of its own.
    assert_eq!(
        node.publish(&publisher(), "r", &json!(7)).await.status(),
        201
    );
    // A batch larger than the burst can never pass: no Retry-After.
    let big: Vec<Value> = (0..3).map(|i| json!({"topic": "r", "data": i})).collect();
    let refused = node
        .publish_batch(&token("other", &[], &[">"]), &Value::Array(big))
        .await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn subscribe_ops_are_rate_limited_per_connection_then_closed_with_1008() {
    // One a second, so that the test's own pace does not refill it.
    let node = crate::helpers::spawn_node_with(|s| s.limits.subscribe_rate = 1).await;
    let mut ws = node.connect(&token("churner", &[">"], &[])).await;
    let reply = ws
        .request(json!({"op": "subscribe", "id": 1, "topic": "t0"}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let reply = ws
        .request(json!({"op": "unsubscribe", "id": 9, "topic": "t0"}))
        .await;
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("rate_limited"))
    );
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("limits.subscribe_rate"),
        "{reply}"
    );
    // Pings are not limited.
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 10})).await["op"],
        "pong"
    );
    // Going on regardless closes the connection.
    for i in 0..30 {
        ws.send(json!({"op": "refresh", "id": 100 + i, "token": "x"}))
            .await;
    }
    let close = ws.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(
        close.reason.contains("limits.subscribe_rate"),
        "{}",
        close.reason
    );
}

/// Two publishers use one key on one topic: both events are stored and
/// delivered; each publisher's retry gets its own first offset back.
async fn idempotency_keys_belong_to_their_publisher(node: &TestNode) {
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("orders").await;
    let post = |who: &'static str, data: Value| {
        let request = node
            .http
            .post(node.url("/api/v1/topics/orders/events"))
            .bearer_auth(token(who, &[], &["orders"]))
            .header("idempotency-key", "order-1002")
            .json(&data);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()["offset"]
                .as_u64()
                .unwrap()
        }
    };
    let attacker = post("attacker", json!("first, by someone else")).await;
    let backend = post("backend", json!("the real order")).await;
    assert_ne!(
        attacker, backend,
        "the backend's event took the attacker's offset"
    );
    assert_eq!(post("backend", json!("retry")).await, backend);
    assert_eq!(post("attacker", json!("retry")).await, attacker);
    // The same key in a batch, and over WebSocket, is the same publisher's.
    let batch = node
        .http
        .post(node.url("/api/v1/events"))
        .bearer_auth(token("backend", &[], &["orders"]))
        .json(&json!([{"topic": "orders", "data": "retry in a batch", "key": "order-1002"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        batch.json::<Value>().await.unwrap()["offsets"],
        json!([backend])
    );
    let mut backend_ws = node.connect(&token("backend", &[], &["orders"])).await;
    let reply = backend_ws
        .request(json!({"op": "publish", "id": 1, "topic": "orders", "data": "ws retry", "key": "order-1002"}))
        .await;
    assert_eq!(reply["offset"], backend, "{reply}");

    let received = [ws.recv().await, ws.recv().await];
    let data: Vec<&Value> = received.iter().map(|e| &e["data"]).collect();
    assert_eq!(
        data,
        [&json!("first, by someone else"), &json!("the real order")]
    );
    let history = node
        .get_json("/api/v1/topics/orders/events", &subscriber())
        .await;
    assert_eq!(history["events"].as_array().unwrap().len(), 2, "{history}");
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_publisher_on_sqlite() {
    idempotency_keys_belong_to_their_publisher(&spawn_node().await).await;
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_publisher_on_postgres() {
    let pg = crate::helpers::PgDatabase::create().await;
    let url = pg.url();
    let node = crate::helpers::spawn_node_with(|s| s.store.url = url.into()).await;
    idempotency_keys_belong_to_their_publisher(&node).await;
}

#[tokio::test]
async fn a_history_page_is_bounded_in_bytes_and_says_more_follow() {
    let node = crate::helpers::spawn_node_with(|s| s.limits.max_page_bytes = 10_000).await;
    let data = "x".repeat(4000);
    for _ in 0..5 {
        node.publish_ok(&publisher(), "pages", &json!(data)).await;
    }
    let (mut since, mut epoch) = (0, String::new());
    let mut pages = Vec::new();
    while pages.len() < 10 {
        let page = node
            .get_json(
                &format!("/api/v1/topics/pages/events?since={since}&epoch={epoch}&limit=1000"),
                &subscriber(),
            )
            .await;
        epoch = page["epoch"].as_str().unwrap().to_owned();
        let offsets: Vec<u64> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        pages.push(offsets.clone());
        if page["more"] == false {
            break;
        }
        assert_eq!(page["more"], true, "{page}");
        since = *offsets.last().unwrap();
    }
    // Two 4,000-byte payloads fit in 10,000 bytes; a third would not.
    assert_eq!(pages, [vec![1, 2], vec![3, 4], vec![5]]);
}

/// Sends `GET path` on a raw socket with a tiny receive buffer and reads
/// nothing; returns the socket.
async fn request_and_read_nothing(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        subscriber()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn an_http_response_the_client_does_not_take_is_abandoned_after_write_timeout() {
    use tokio::io::AsyncReadExt as _;
    let node = crate::helpers::spawn_node_with(|s| {
        s.server.write_timeout = std::time::Duration::from_millis(500);
        s.limits.http_publish_rate = 1_000_000;
        // One page larger than the kernel's socket buffers can absorb.
        s.limits.max_page_bytes = 64 << 20;
    })
    .await;
    let data = "y".repeat(60_000);
    for _ in 0..14 {
        let batch: Vec<Value> = (0..15)
            .map(|_| json!({"topic": "big", "data": data}))
            .collect();
        assert_eq!(
            node.publish_batch(&publisher(), &Value::Array(batch))
                .await
                .status(),
            201
        );
    }
    let mut tcp = request_and_read_nothing(node.addr, "/api/v1/topics/big/events?limit=1000").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // Now read: what the kernel had buffered, then the end of a connection
    // the node gave up on, well before the whole (~12 MB) response.
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(crate::helpers::RECV_TIMEOUT, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the node still holds the connection open"),
        }
    }
    let head = String::from_utf8_lossy(&received[..received.len().min(200)]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        received.len() < 12_000_000,
        "the whole response went out: {} bytes",
        received.len()
    );
}

/// Resident memory of a process, in KiB, from /proc.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test]
async fn readers_that_do_not_read_cannot_pin_a_nodes_memory() {
    let node = crate::helpers::ServeProcess::start(
        "pinned-memory",
        &[("HERALD__LIMITS__HTTP_PUBLISH_RATE", "1000000".into())],
        std::process::Stdio::null(),
    )
    .await;
    let pid = node.child.0.id();
    let http = reqwest::Client::new();
    // The largest history page: 1,000 events of the largest payload.
    let data = "z".repeat(65_000);
    for _ in 0..67 {
        let batch: Vec<Value> = (0..15)
            .map(|_| json!({"topic": "huge", "data": data}))
            .collect();
        let response = http
            .post(node.url("/api/v1/events"))
            .bearer_auth(publisher())
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let path = "/api/v1/topics/huge/events?limit=1000";
    // Warm up: read the page fully from several clients at once, so that
    // caches and pools are at their working size before measuring.
    let warm: Vec<_> = (0..8)
        .map(|_| {
            let request = http.get(node.url(path)).bearer_auth(subscriber()).send();
            async move { request.await.unwrap().bytes().await.unwrap().len() }
        })
        .collect();
    futures_util::future::join_all(warm).await;
    let before = resident_kib(pid);

    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.port).parse().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..16 {
        stalled.push(request_and_read_nothing(addr, path).await);
    }
    // Every request answered as far as the sockets take it, and held.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let grown = resident_kib(pid).saturating_sub(before);
    eprintln!("16 stalled readers of the largest page: +{grown} KiB resident");
    assert!(
        grown < 64 * 1024,
        "16 stalled readers grew the node by {grown} KiB"
    );
    drop(stalled);
}

/// Rows in the node's SQLite tables.
async fn sqlite_rows(node: &TestNode, table: &str) -> i64 {
    use sqlx::{Connection as _, Row as _};
    let url = format!("sqlite://{}", node.sqlite_path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let sql = format!("SELECT COUNT(*) FROM {table}");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut db)
        .await
        .unwrap()
        .get(0)
}

/// A node whose events live one second, pruned five times a second.
async fn short_retention_node() -> TestNode {
    crate::helpers::spawn_node_with(|s| {
        s.retention.max_age = std::time::Duration::from_secs(1);
        s.retention.prune_interval = std::time::Duration::from_millis(200);
        s.limits.http_publish_rate = 1_000_000;
    })
    .await
}

#[tokio::test]
async fn one_shot_topics_leave_no_rows_once_pruned_and_come_back_in_a_new_epoch() {
    let node = short_retention_node().await;
    let first = node.publish_ok(&publisher(), "once.again", &json!(1)).await;
    let old = node
        .get_json("/api/v1/topics/once.again/events", &subscriber())
        .await;
    let old_epoch = old["epoch"].as_str().unwrap().to_owned();
    for round in 0..10 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"topic": format!("once.{round}.{i}"), "data": i}))
            .collect();
        let response = node.publish_batch(&publisher(), &json!(batch)).await;
        assert_eq!(response.status(), 201);
    }
    eventually("every one-shot topic is gone, events and logs", || async {
        sqlite_rows(&node, "herald_topics").await == 0
            && sqlite_rows(&node, "herald_events").await == 0
    })
    .await;

    // Published to again: a new log, which a resume from the old one
    // cannot mistake for its own.
    assert_eq!(
        node.publish_ok(&publisher(), "once.again", &json!(2)).await,
        first
    );
    let mut ws = node.connect(&subscriber()).await;
    let reply = ws
        .subscribe_with(json!({"op": "subscribe", "id": 1, "topic": "once.again", "since": 1, "epoch": old_epoch}))
        .await;
    assert_ne!(reply["epoch"], old_epoch.as_str(), "{reply}");
    assert_eq!(reply["truncated"], true, "{reply}");
    assert_eq!(ws.recv().await["data"], 2);
}

#[tokio::test]
async fn a_watched_topic_keeps_its_log_when_its_events_are_pruned() {
    let node = short_retention_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("kept").await;
    assert_eq!(node.publish_ok(&publisher(), "kept", &json!(1)).await, 1);
    assert_eq!(ws.recv().await["offset"], 1);
    eventually("the watched topic's event is pruned", || async {
        sqlite_rows(&node, "herald_events").await == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(sqlite_rows(&node, "herald_topics").await, 1);
    // Its numbering goes on, and its subscriber gets what follows.
    assert_eq!(node.publish_ok(&publisher(), "kept", &json!(2)).await, 2);
    assert_eq!(ws.recv().await["offset"], 2);
}

#[tokio::test]
async fn in_a_cluster_a_log_watched_on_another_node_stays() {
    use crate::helpers::{PgDatabase, RedisServer};
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let short = |s: &mut herald::config::Settings| {
        s.retention.max_age = std::time::Duration::from_secs(1);
        s.retention.prune_interval = std::time::Duration::from_millis(200);
    };
    let a = TestNode::clustered_with(&redis, &pg, short).await;
    let b = TestNode::clustered_with(&redis, &pg, short).await;
    let mut ws = b.connect(&subscriber()).await;
    ws.subscribe("watched.on.b").await;
    a.publish_ok(&publisher(), "watched.on.b", &json!(1)).await;
    a.publish_ok(&publisher(), "nobody.watches", &json!(1))
        .await;
    assert_eq!(ws.recv().await["offset"], 1);
    let topics = || async {
        let info = a
            .get_json("/api/v1/topics/watched.on.b", &publisher())
            .await;
        let gone = a
            .get_json("/api/v1/topics/nobody.watches", &publisher())
            .await;
        (info["retained"].as_u64(), gone["offset"].as_u64())
    };
    eventually(
        "the unwatched log is removed and the watched one emptied",
        || async { topics().await == (Some(0), Some(0)) },
    )
    .await;
    // The watched log was kept: its offsets go on for b's subscriber.
    assert_eq!(
        a.publish_ok(&publisher(), "watched.on.b", &json!(2)).await,
        2
    );
    assert_eq!(ws.recv().await["offset"], 2);
    drop((a, b));
}

#[tokio::test]
async fn counters_of_topics_without_history_expire() {
    use crate::helpers::{PgDatabase, RedisServer};
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let node = TestNode::clustered_with(&redis, &pg, |s| {
        s.topics = vec![herald::config::TopicRule {
            pattern: "ticker.>".into(),
            history: Some(false),
            max_age: None,
            max_events: None,
            presence: None,
        }];
    })
    .await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("ticker.btc").await;
    node.publish_ok(&publisher(), "ticker.btc", &json!(1)).await;
    let ttl: i64 = redis
        .query(redis::cmd("PTTL").arg("herald:offset:ticker.btc"))
        .await;
    assert!(ttl > 0, "the counter has no expiry (PTTL {ttl})");
}

/// Every string literal of 32 or more characters on a line of Herald's
/// tracked files that speaks of a secret, and every unquoted value given to
/// a `…SECRET` variable: the secrets anyone who reads the repository knows.
fn secrets_written_in_the_repository() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let files = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .expect("git lists the repository's files");
    assert!(files.status.success());
    let mut found = Vec::new();
    for file in files.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let file = String::from_utf8_lossy(file).to_string();
        let Ok(text) = std::fs::read_to_string(format!("{root}/{file}")) else {
            continue; // not text
        };
        for line in text
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("secret"))
        {
            let mut literals: Vec<&str> = Vec::new();
            for quote in ['"', '\''] {
                literals.extend(line.split(quote).skip(1).step_by(2));
            }
            if let Some((_, value)) = line.split_once("SECRET=").or(line.split_once("SECRET: ")) {
                literals.push(value.split_whitespace().next().unwrap_or_default());
            }
            for literal in literals {
                let shell = literal.contains("${") || literal.contains("$(");
                if literal.len() >= 32 && !literal.contains(char::is_whitespace) && !shell {
                    found.push((file.clone(), literal.to_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn no_secret_written_in_the_repository_starts_a_node_nor_does_a_weak_one() {
    let refused = |secret: &str| {
        let mut settings = herald::config::Settings::defaults();
        settings.auth.jwt_secret = Some(secret.to_owned().into());
        herald::auth::Verifier::new(&settings.auth).is_err()
    };
    let written = secrets_written_in_the_repository();
    // The compose file's former default is still named (in the denylist
    // and in the test above), so the scan finds at least that one.
    assert!(!written.is_empty(), "the scan finds nothing: it is broken");
    for (file, secret) in &written {
        assert!(
            refused(secret),
            "{file} holds {secret:?}, which starts a node"
        );
    }
    // One repeated character, or one class of characters, is no secret.
    for weak in [
        "a".repeat(40),
        "7".repeat(40),
        "0123456789".repeat(4),
        "abcdefghijklmnopqrstuvwxyzabcdefghij".to_owned(),
        "ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ".to_owned(),
        "-".repeat(40),
    ] {
        assert!(refused(&weak), "{weak:?} starts a node");
    }
    // What `openssl rand -base64 32` and `openssl rand -hex 32` make does.
    for strong in [
        crate::helpers::random_secret(),
        format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        ),
    ] {
        assert!(!refused(&strong), "{strong:?} is refused");
    }
}
