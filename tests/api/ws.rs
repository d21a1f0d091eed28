//! The WebSocket contract: subscribe, unsubscribe, publish, ping, both
//! encodings, and refusals that keep the connection open.

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_node, spawn_node_with, token};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

#[tokio::test]
async fn subscriber_receives_events_published_over_http() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("alerts").await;

    let offset = node
        .publish_ok(&publisher(), "alerts", &json!({"level": "high"}))
        .await;
    assert_eq!(offset, 1);
    let event = ws.recv().await;
    assert_eq!(event["op"], "event");
    assert_eq!(event["topic"], "alerts");
    assert_eq!(event["offset"], 1);
    assert_eq!(event["data"], json!({"level": "high"}));
    let ts = event["ts"].as_u64().unwrap();
    assert!(ts > 1_700_000_000_000, "ts is Unix milliseconds: {ts}");
}

#[tokio::test]
async fn offsets_count_from_one_per_topic() {
    let node = spawn_node().await;
    let p = publisher();
    assert_eq!(node.publish_ok(&p, "a", &json!(1)).await, 1);
    assert_eq!(node.publish_ok(&p, "a", &json!(2)).await, 2);
    assert_eq!(node.publish_ok(&p, "b", &json!(3)).await, 1);
    assert_eq!(node.publish_ok(&p, "a", &json!(4)).await, 3);
}

#[tokio::test]
async fn events_arrive_only_for_subscribed_topics_and_stop_after_unsubscribe() {
    let node = spawn_node().await;
    let p = publisher();
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("a").await;
    ws.subscribe("b").await;
    node.publish_ok(&p, "other", &json!("not for us")).await;
    node.publish_ok(&p, "a", &json!("a1")).await;
    assert_eq!(ws.recv().await["data"], "a1");

    let reply = ws
        .request(json!({"op": "unsubscribe", "id": 2, "topic": "a"}))
        .await;
    assert_eq!(reply, json!({"op": "unsubscribed", "id": 2, "topic": "a"}));
    node.publish_ok(&p, "a", &json!("a2")).await;
    node.publish_ok(&p, "b", &json!("b1")).await;
    // Frames arrive in order, so had "a2" been delivered it would come first.
    let next = ws.recv().await;
    assert_eq!((&next["topic"], &next["data"]), (&json!("b"), &json!("b1")));
}

#[tokio::test]
async fn subscribing_twice_delivers_once() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("a").await;
    ws.subscribe("a").await;
    node.publish_ok(&publisher(), "a", &json!(1)).await;
    node.publish_ok(&publisher(), "a", &json!(2)).await;
    assert_eq!(ws.recv().await["offset"], 1);
    assert_eq!(ws.recv().await["offset"], 2);
}

#[tokio::test]
async fn websocket_publish_replies_with_the_offset_and_reaches_subscribers() {
    let node = spawn_node().await;
    let mut sub = node.connect(&subscriber()).await;
    sub.subscribe("chat.room1").await;
    let mut publ = node.connect(&token("p", &[], &["chat.*"])).await;
    let reply = publ
        .request(json!({"op": "publish", "id": 3, "topic": "chat.room1", "data": {"text": "hi"}}))
        .await;
    assert_eq!(
        reply,
        json!({"op": "published", "id": 3, "topic": "chat.room1", "offset": 1})
    );
    let event = sub.recv().await;
    assert_eq!(event["data"], json!({"text": "hi"}));
    assert_eq!(event["offset"], 1);
}

#[tokio::test]
async fn ping_op_and_websocket_ping_are_answered() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 4})).await,
        json!({"op": "pong", "id": 4})
    );
    ws.send_raw(Message::Ping(b"hello"[..].into())).await;
    loop {
        match ws.stream_next().await {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"hello");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("expected pong, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refused_requests_get_error_frames_and_the_connection_stays_open() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &["allowed"], &[])).await;
    let cases = [
        (
            json!({"op": "subscribe", "id": 1, "topic": "secret"}),
            Some(1),
            "forbidden",
        ),
        (
            json!({"op": "publish", "id": 2, "topic": "allowed", "data": 1}),
            Some(2),
            "forbidden",
        ),
        (
            json!({"op": "subscribe", "id": 3, "topic": "a..b"}),
            Some(3),
            "invalid_topic",
        ),
        (
            json!({"op": "subscribe", "id": 4, "topic": "a.*"}),
            Some(4),
            "invalid_topic",
        ),
        (
            json!({"op": "subscribe", "id": 5, "topic": "caf\u{e9}"}),
            Some(5),
            "invalid_topic",
        ),
        (json!({"op": "subscribe", "id": 6}), Some(6), "bad_request"),
        (json!({"op": "dance", "id": 7}), Some(7), "bad_request"),
        (json!({"id": 8}), Some(8), "bad_request"),
        (
            json!({"op": "publish", "id": 9, "topic": "allowed"}),
            Some(9),
            "bad_request",
        ),
        (json!([1, 2, 3]), None, "bad_request"),
        (json!("subscribe"), None, "bad_request"),
    ];
    for (frame, id, code) in cases {
        let reply = ws.request(frame.clone()).await;
        assert_eq!(reply["op"], "error", "{frame}");
        assert_eq!(reply["code"], code, "{frame}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        match id {
            Some(id) => assert_eq!(reply["id"], id, "{frame}"),
            None => assert!(reply.get("id").is_none(), "{frame}"),
        }
    }
    ws.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(ws.recv().await["code"], "bad_request");
    // Still served after all that.
    ws.subscribe("allowed").await;
}

#[tokio::test]
async fn json_clients_send_and_receive_binary_payloads_as_data_b64() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &[">"], &[">"])).await;
    ws.subscribe("bin").await;
    let reply = ws
        .request(json!({"op": "publish", "id": 1, "topic": "bin", "data_b64": "AAEC/w=="}))
        .await;
    assert_eq!(reply["op"], "published");
    let event = ws.recv().await;
    assert_eq!(event["data_b64"], "AAEC/w==");
    assert!(event.get("data").is_none());
}

#[tokio::test]
async fn msgpack_is_negotiated_by_subprotocol_and_carries_binary_as_bin() {
    let node = spawn_node().await;
    let t = token("s", &[">"], &[">"]);
    let mut mp = node.connect_msgpack(&t).await;
    assert!(
        mp.msgpack,
        "server answered with the herald.msgpack protocol"
    );
    let mut js = node.connect(&t).await;
    mp.subscribe("bin").await;
    js.subscribe("bin").await;

    // A msgpack client publishes raw bytes (bin) …
    let frame = rmpv::Value::Map(vec![
        ("op".into(), "publish".into()),
        ("id".into(), 5.into()),
        ("topic".into(), "bin".into()),
        ("data".into(), rmpv::Value::Binary(vec![0, 1, 2, 255])),
    ]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &frame).unwrap();
    mp.send_raw(Message::Binary(bytes.into())).await;
    let reply = mp.recv().await;
    assert_eq!(
        reply,
        json!({"op": "published", "id": 5, "topic": "bin", "offset": 1})
    );

    // … which arrive intact in both encodings.
    let event = mp.recv().await;
    assert_eq!(event["data"], json!({"$bin": [0, 1, 2, 255]}));
    let event = js.recv().await;
    assert_eq!(event["data_b64"], "AAEC/w==");

    // JSON data published over HTTP reaches msgpack clients as a map.
    node.publish_ok(&t, "bin", &json!({"k": [1, "two"]})).await;
    assert_eq!(mp.recv().await["data"], json!({"k": [1, "two"]}));
    assert_eq!(js.recv().await["data"], json!({"k": [1, "two"]}));
}

#[tokio::test]
async fn malformed_msgpack_is_a_bad_request() {
    let node = spawn_node().await;
    let t = subscriber();
    let mut mp = node.connect_msgpack(&t).await;
    mp.send_raw(Message::Binary(vec![0xc1, 0x00, 0xff].into()))
        .await;
    let reply = mp.recv().await;
    assert_eq!(reply["code"], "bad_request");
    mp.subscribe("still-works").await;
}

#[tokio::test]
async fn unsupported_subprotocol_is_refused() {
    let node = spawn_node().await;
    let t = subscriber();
    let (status, body) = node
        .handshake(&format!("?token={t}"))
        .protocol("mqtt")
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("herald.json"));
}

#[tokio::test]
async fn client_close_is_answered_with_a_close_frame() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.stream.close(None).await.unwrap();
    let frame = ws.closed().await;
    let code = frame.map(|f| u16::from(f.code));
    assert!(matches!(code, None | Some(1000)), "{code:?}");
}

#[tokio::test]
async fn binary_frames_on_a_json_connection_are_parsed_as_json() {
    // Some clients send JSON in binary frames; accept it rather than drop it.
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.send_raw(Message::Binary(br#"{"op":"ping","id":9}"#.to_vec().into()))
        .await;
    assert_eq!(ws.recv().await, json!({"op": "pong", "id": 9}));
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_evicted_and_others_get_everything() {
    const EVENTS: u64 = 300;
    let node = spawn_node_with(|s| s.limits.outbound_queue = 8).await;
    let mut slow = node
        .handshake(&format!("?token={}", subscriber()))
        .open_with_small_receive_buffer()
        .await;
    slow.subscribe("firehose").await;
    let mut fast = node.connect(&subscriber()).await;
    fast.subscribe("firehose").await;

    // 32 KiB each: enough to fill the slow client's socket buffers and its
    // bounded queue many times over. The fast client reads each event
    // before the next is published, so only the slow one falls behind.
    let payload = vec![7u8; 32 * 1024];
    let p = publisher();
    for expected in 1..=EVENTS {
        node.publish_binary_ok(&p, "firehose", &payload).await;
        assert_eq!(fast.recv().await["offset"], expected);
    }

    // What the slow client did get is gap-free up to the close: it resumes
    // after its last offset, so nothing past a dropped event may reach it.
    let mut offsets = Vec::new();
    let frame = loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), slow.stream.next())
            .await
            .expect("a close within 10 s");
        match message {
            Some(Ok(Message::Text(text))) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                offsets.push(event["offset"].as_u64().unwrap());
            }
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => {}
            other => panic!("expected events then a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(frame.code), 1013);
    assert!(frame.reason.contains("slow"), "{}", frame.reason);
    assert!(
        (offsets.len() as u64) < EVENTS,
        "it was evicted before the end"
    );
    assert_eq!(offsets, (1..=offsets.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_subscriber_whose_socket_pushes_back_gets_every_event_in_order_once_it_reads() {
    // 192 events of 32 KiB (about 8 MiB as frames): more than a 4 KiB
    // receive buffer and the kernel's send queue (at most 4 MiB here)
    // take, inside the mailbox's bounds. The node writes what the socket
    // takes, queues the rest, and sends it in order as the client reads.
    const EVENTS: u64 = 192;
    let node = spawn_node_with(|s| s.limits.outbound_queue_bytes = 32 << 20).await;
    let mut slow = node
        .handshake(&format!("?token={}", subscriber()))
        .open_with_small_receive_buffer()
        .await;
    slow.subscribe("backlog").await;
    let payload = vec![7u8; 32 * 1024];
    let p = publisher();
    for _ in 0..EVENTS {
        node.publish_binary_ok(&p, "backlog", &payload).await;
    }
    // Only now does the client read.
    let mut offsets = Vec::new();
    for _ in 0..EVENTS {
        offsets.push(slow.recv().await["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, (1..=EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_subscriber_that_reads_slower_than_a_topic_publishes_is_not_cut_off_while_it_reads() {
    // Four publishers send about 17 MB of frames faster than the client
    // reads them; it reads all the while, at its own pace, for longer than
    // `server.write_timeout` (400 frames, 10 ms apart). Every wait for room
    // in its socket is short and ends in progress, so it is not a stalled
    // client; its queue stays inside the bounds, so it is not a slow
    // consumer either. The timeout is 3 s rather than 1 s: on a loaded
    // machine the reading task itself may not run for a second, which is
    // a stall by the node's definition.
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 100;
    let node = spawn_node_with(|s| {
        s.server.write_timeout = std::time::Duration::from_secs(3);
        s.limits.outbound_queue_bytes = 64 << 20;
    })
    .await;
    let mut reader = node
        .handshake(&format!("?token={}", subscriber()))
        .open_with_small_receive_buffer()
        .await;
    reader.subscribe("backlog").await;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (http, url) = (node.http.clone(), node.url("/api/v1/topics/backlog/events"));
            tokio::spawn(async move {
                for _ in 0..EACH {
                    let response = http
                        .post(&url)
                        .bearer_auth(publisher())
                        .header("content-type", "application/octet-stream")
                        .body(vec![7u8; 32 * 1024])
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                }
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for _ in 0..PUBLISHERS * EACH {
        offsets.push(reader.recv().await["offset"].as_u64().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for publishing in publishers {
        publishing.await.unwrap();
    }
    assert_eq!(offsets, (1..=PUBLISHERS * EACH).collect::<Vec<_>>());
}

#[tokio::test]
async fn subscribing_again_replays_nothing_and_answers_the_current_offset() {
    let node = spawn_node().await;
    for n in 1..=3 {
        node.publish_ok(&publisher(), "again", &json!(n)).await;
    }
    let mut ws = node.connect(&subscriber()).await;
    let reply = ws.subscribe("again").await;
    assert_eq!(reply["offset"], 3);
    node.publish_ok(&publisher(), "again", &json!(4)).await;
    assert_eq!(ws.recv().await["offset"], 4);

    // The subscription was live all along: `since` replays nothing.
    let reply = ws
        .subscribe_with(json!({"op": "subscribe", "id": 2, "topic": "again", "since": 0}))
        .await;
    assert_eq!(reply["offset"], 4);
    assert_eq!(reply.get("truncated"), None);
    node.publish_ok(&publisher(), "again", &json!(5)).await;
    let next = ws.recv().await;
    assert_eq!((&next["offset"], &next["data"]), (&json!(5), &json!(5)));
}

#[tokio::test]
async fn after_the_unsubscribed_reply_no_event_of_the_topic_arrives() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("burst").await;
    ws.subscribe("marker").await;
    let events: Vec<_> = (0..200)
        .map(|n| json!({"topic": "burst", "data": n}))
        .collect();
    let res = node.publish_batch(&publisher(), &json!(events)).await;
    assert_eq!(res.status(), 201);
    // Asked while the burst may still be on its way to this connection.
    ws.send(json!({"op": "unsubscribe", "id": 9, "topic": "burst"}))
        .await;
    loop {
        let frame = ws.recv().await;
        if frame["op"] == "unsubscribed" {
            break;
        }
        assert_eq!(frame["topic"], "burst", "{frame}");
    }
    node.publish_ok(&publisher(), "marker", &json!("end")).await;
    let next = ws.recv().await;
    assert_eq!(
        (&next["topic"], &next["data"]),
        (&json!("marker"), &json!("end"))
    );
}
