//! Limits, backpressure, heartbeats, token lifetime and hostile input: each
//! bad input against a running node, with the exact reply or close code,
//! then proof the node still serves a well-behaved client.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::{TestNode, WsClient, claims_token, now, spawn_node, spawn_node_with, token};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

/// A well-behaved client still gets served: subscribe, publish, receive.
async fn still_serves(node: &TestNode) {
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("health.check").await;
    node.publish_ok(&publisher(), "health.check", &json!("ok"))
        .await;
    assert_eq!(ws.recv().await["data"], "ok");
}

async fn close_code(ws: &mut WsClient) -> (u16, String) {
    let frame = ws.closed().await.expect("a close frame with a code");
    (u16::from(frame.code), frame.reason.to_string())
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn bad_frames_get_the_documented_error_codes_and_the_connection_stays_open() {
    let node = spawn_node_with(|s| s.limits.max_payload_bytes = 1024).await;
    let mut ws = node.connect(&token("s", &[">"], &[">"])).await;
    let too_long_topic = "a".repeat(256);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_request"),
        ("{}".into(), "bad_request"),
        ("null".into(), "bad_request"),
        (
            r#"{"op":"subscribe","topic":"a","id":-1}"#.into(),
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","topic":"a","id":"x"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","topic":"a","since":-5}"#.into(),
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","topic":"a","since":"1"}"#.into(),
            "bad_request",
        ),
        (
            format!(
                r#"{{"op":"subscribe","topic":"a","epoch":"{}"}}"#,
                "e".repeat(100)
            ),
            "bad_request",
        ),
        (r#"{"op":"subscribe","topic":7}"#.into(), "bad_request"),
        (
            format!(r#"{{"op":"subscribe","topic":"{too_long_topic}"}}"#),
            "invalid_topic",
        ),
        (
            r#"{"op":"subscribe","topic":"a..b"}"#.into(),
            "invalid_topic",
        ),
        (r#"{"op":"subscribe","topic":".a"}"#.into(), "invalid_topic"),
        (
            r#"{"op":"subscribe","topic":"a b"}"#.into(),
            "invalid_topic",
        ),
        (
            r#"{"op":"subscribe","topic":"a.>"}"#.into(),
            "invalid_topic",
        ),
        (r#"{"op":"subscribe","topic":""}"#.into(), "invalid_topic"),
        (
            r#"{"op":"publish","topic":"a","data_b64":"***"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"op":"publish","topic":"a","data":1,"key":""}"#.into(),
            "bad_request",
        ),
        (
            r#"{"op":"publish","topic":"a","data":1,"key":"with space"}"#.into(),
            "bad_request",
        ),
        (
            format!(
                r#"{{"op":"publish","topic":"a","data":"{}"}}"#,
                "x".repeat(2000)
            ),
            "payload_too_large",
        ),
        (
            format!(r#"{{"op":"publish","topic":"a","data":{}}}"#, nested(200)),
            "bad_request",
        ),
        (r#"{"op":"refresh"}"#.into(), "bad_request"),
        (r#"{"op":"refresh","token":"nope"}"#.into(), "unauthorized"),
    ];
    for (frame, code) in cases {
        ws.send_raw(Message::Text(frame.clone().into())).await;
        let reply = ws.recv().await;
        assert_eq!(
            (&reply["op"], &reply["code"]),
            (&json!("error"), &json!(code)),
            "{frame}"
        );
    }
    // Nesting just under the limit is fine.
    let ok = format!(
        r#"{{"op":"publish","id":1,"topic":"a","data":{}}}"#,
        nested(100)
    );
    ws.send_raw(Message::Text(ok.into())).await;
    assert_eq!(ws.recv().await["op"], "published");
    still_serves(&node).await;
}

#[tokio::test]
async fn deeply_nested_msgpack_is_refused_without_harm() {
    let node = spawn_node().await;
    let mut mp = node.connect_msgpack(&publisher()).await;
    // 50,000 nested one-element arrays (0x91 is "array of 1"), within the
    // frame size limit.
    let mut frame = vec![0x84];
    for (k, v) in [("op", "publish"), ("topic", "a")] {
        frame.extend(rmp_serde::to_vec(k).unwrap());
        frame.extend(rmp_serde::to_vec(v).unwrap());
    }
    frame.extend(rmp_serde::to_vec("id").unwrap());
    frame.push(0x05);
    frame.extend(rmp_serde::to_vec("data").unwrap());
    frame.extend(std::iter::repeat_n(0x91, 50_000));
    frame.push(0x01);
    mp.send_raw(Message::Binary(frame.into())).await;
    let reply = mp.recv().await;
    // Refused before it is read far enough to find its id.
    assert_eq!(reply["code"], "bad_request");
    still_serves(&node).await;
}

#[tokio::test]
async fn protocol_level_violations_close_with_their_codes() {
    let node = spawn_node_with(|s| s.limits.max_payload_bytes = 1024).await;

    let mut ws = node.connect(&subscriber()).await;
    let invalid_utf8 = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send_raw(Message::Frame(invalid_utf8)).await;
    assert_eq!(close_code(&mut ws).await.0, 1007);

    let mut ws = node.connect(&subscriber()).await;
    ws.send_raw(Message::Text("x".repeat(64 * 1024).into()))
        .await;
    assert_eq!(close_code(&mut ws).await.0, 1009);

    still_serves(&node).await;
}

#[tokio::test]
async fn a_connection_may_hold_only_max_subscriptions() {
    let node = spawn_node_with(|s| s.limits.max_subscriptions = 3).await;
    let mut ws = node.connect(&subscriber()).await;
    for topic in ["a", "b", "c"] {
        ws.subscribe(topic).await;
    }
    ws.subscribe("a").await; // already held: not a new one
    let reply = ws
        .request(json!({"op": "subscribe", "id": 4, "topic": "d"}))
        .await;
    assert_eq!(reply["code"], "too_many_subscriptions");
    let reply = ws
        .request(json!({"op": "unsubscribe", "id": 5, "topic": "a"}))
        .await;
    assert_eq!(reply["op"], "unsubscribed");
    ws.subscribe("d").await;
}

#[tokio::test]
async fn past_max_connections_handshakes_get_503() {
    let node = spawn_node_with(|s| s.limits.max_connections = 2).await;
    let first = node.connect(&subscriber()).await;
    let _second = node.connect(&subscriber()).await;
    let (status, body) = node
        .handshake(&format!("?token={}", subscriber()))
        .try_open()
        .await
        .err()
        .expect("the third connection is refused");
    assert_eq!((status, &body["error"]), (503, &json!("unavailable")));
    // A place frees up when a client leaves.
    drop(first);
    crate::helpers::eventually("a connection slot is free again", || async {
        node.handshake(&format!("?token={}", subscriber()))
            .try_open()
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_publish_flood_is_rate_limited_then_closed_with_1008() {
    const FLOOD: u64 = 200;
    let node = spawn_node_with(|s| s.limits.publish_rate = 10).await;
    let mut watcher = node.connect(&subscriber()).await;
    watcher.subscribe("flood").await;
    let mut flooder = node.connect(&publisher()).await;
    for id in 0..FLOOD {
        flooder
            .send(json!({"op": "publish", "id": id, "topic": "flood", "data": id}))
            .await;
    }
    let mut published = 0;
    let mut limited = 0;
    let close = loop {
        match flooder.stream_next().await {
            Message::Text(text) => {
                let reply: Value = serde_json::from_str(&text).unwrap();
                match reply["op"].as_str() {
                    Some("published") => published += 1,
                    _ => {
                        assert_eq!(reply["code"], "rate_limited", "{reply}");
                        limited += 1;
                    }
                }
            }
            Message::Close(frame) => break frame.expect("a close code"),
            _ => {}
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert!(
        (10..FLOOD).contains(&published),
        "the burst went through: {published}"
    );
    assert!(limited > 0);
    // The other client got exactly what was accepted, and the node serves on.
    for offset in 1..=published {
        assert_eq!(watcher.recv().await["offset"], offset);
    }
    still_serves(&node).await;
}

#[tokio::test]
async fn a_connection_is_closed_with_4001_when_its_token_expires() {
    let node = spawn_node_with(|s| s.auth.leeway = Duration::ZERO).await;
    let short = claims_token(json!({"sub": "a", "exp": now() + 1, "topics": [">"]}));
    let mut ws = node.connect(&short).await;
    let (code, reason) = close_code(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
}

#[tokio::test]
async fn refresh_extends_the_connection_and_drops_subscriptions_no_longer_granted() {
    let node = spawn_node().await;
    let short = claims_token(json!({"sub": "a", "exp": now() + 2, "topics": ["keep", "lose"]}));
    let mut ws = node.connect(&short).await;
    ws.subscribe("keep").await;
    ws.subscribe("lose").await;

    let other = claims_token(json!({"sub": "b", "exp": now() + 3600, "topics": [">"]}));
    let reply = ws
        .request(json!({"op": "refresh", "id": 1, "token": other}))
        .await;
    assert_eq!(
        (&reply["op"], &reply["code"]),
        (&json!("error"), &json!("forbidden"))
    );

    let longer = claims_token(json!({"sub": "a", "exp": now() + 3600, "topics": ["keep"]}));
    let dropped = ws
        .request(json!({"op": "refresh", "id": 2, "token": longer}))
        .await;
    assert_eq!(
        (&dropped["op"], &dropped["code"], &dropped["topic"]),
        (&json!("error"), &json!("forbidden"), &json!("lose"))
    );
    assert_eq!(ws.recv().await, json!({"op": "refreshed", "id": 2}));

    // Past the first token's expiry the connection lives on …
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.publish_ok(&publisher(), "lose", &json!("not for us"))
        .await;
    node.publish_ok(&publisher(), "keep", &json!("still here"))
        .await;
    assert_eq!(ws.recv().await["data"], "still here");
}

#[tokio::test]
async fn clients_that_stop_answering_pings_are_closed() {
    let node = spawn_node_with(|s| {
        s.server.heartbeat_interval = Duration::from_millis(100);
        s.server.heartbeat_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = node.connect(&subscriber()).await;
    let mut lively = node.connect(&subscriber()).await;
    // `silent` neither reads nor writes (so it answers no ping); `lively`
    // keeps talking.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(lively.request(json!({"op": "ping"})).await["op"], "pong");
    }
    let (code, reason) = close_code(&mut silent).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("heartbeat"), "{reason}");
    assert_eq!(lively.request(json!({"op": "ping"})).await["op"], "pong");
}

#[tokio::test]
async fn token_expiry_has_one_rule_on_every_path() {
    let node = spawn_node_with(|s| s.auth.leeway = Duration::from_secs(3)).await;
    // Expired a second ago, within the leeway: accepted everywhere.
    let late =
        claims_token(json!({"sub": "a", "exp": now() - 1, "topics": [">"], "publish": [">"]}));
    let response = node.publish(&late, "leeway", &json!(1)).await;
    assert_eq!(response.status(), 201);
    let mut ws = node.connect(&late).await;
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
    // ... and the open connection ends when the leeway does.
    let (code, _) = close_code(&mut ws).await;
    assert_eq!(code, 4001);
    // Past the leeway: refused everywhere.
    let expired =
        claims_token(json!({"sub": "a", "exp": now() - 4, "topics": [">"], "publish": [">"]}));
    assert_eq!(
        node.publish(&expired, "leeway", &json!(2)).await.status(),
        401
    );
    let (status, _) = node
        .handshake(&format!("?token={expired}"))
        .try_open()
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_text_frame_on_a_msgpack_connection_is_told_which_encoding_to_speak() {
    let node = spawn_node().await;
    let mut ws = node.connect_msgpack(&subscriber()).await;
    ws.send_raw(Message::Text(r#"{"op":"ping","id":1}"#.into()))
        .await;
    let reply = ws.recv().await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("herald.msgpack"),
        "{reply}"
    );
    // The connection goes on in MessagePack.
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 2})).await["op"],
        "pong"
    );
}
