//! What an attacker holding an ordinary valid token must not be able to do:
//! poison a topic for other subscribers, pin a node's memory, take another
//! user's share of a node, or hijack another publisher's idempotency key.

use serde_json::{Value, json};

use crate::helpers::{TestNode, eventually, spawn_node, token};

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
    let mut msgpack = node
        .handshake(&format!("?token={}", subscriber()))
        .protocol("herald.msgpack")
        .open()
        .await;
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

    let mut ws = node
        .handshake(&format!("?token={}", subscriber()))
        .protocol("herald.msgpack")
        .open()
        .await;
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

    let metrics = node
        .http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
