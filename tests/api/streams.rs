//! Event streams over plain HTTP: Server-Sent Events and NDJSON, read by a
//! real HTTP client from real nodes.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const SSE: &str = "text/event-stream";
const NDJSON: &str = "application/x-ndjson";

fn events_url(node: &TestNode, topic: &str, query: &str) -> String {
    node.url(&format!("/api/v1/topics/{topic}/events{query}"))
}

/// The topic and offset of each of the next `n` events, sorted (a stream
/// of several topics orders only within a topic).
async fn topics_and_offsets(stream: &mut StreamClient, n: usize) -> Vec<(String, u64)> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let event = stream.next_event().await;
        got.push((
            event["topic"].as_str().unwrap().to_owned(),
            event["offset"].as_u64().unwrap(),
        ));
    }
    got.sort();
    got
}

/// Publishes `n` events `{"n": i}` to `topic`; their offsets.
async fn publish_n(node: &TestNode, token: &str, topic: &str, n: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    for i in 0..n {
        offsets.push(node.publish_ok(token, topic, &json!({ "n": i })).await);
    }
    offsets
}

#[tokio::test]
async fn sse_streams_live_events_as_websocket_event_frames_with_resume_ids_and_heartbeats() {
    let node = spawn_node_with(|s| s.server.heartbeat_interval = Duration::from_millis(300)).await;
    let reader = token("reader", &["alerts.>"], &[]);
    let writer = token("writer", &[], &["alerts.>"]);
    // EventSource cannot set headers: the token rides in the query.
    let url = events_url(&node, "alerts.eu", &format!("?token={reader}"));
    let mut stream = StreamClient::sse(&url, &[]).await;

    // Where the topic stands, as a WebSocket subscribe's reply says it.
    let subscribed = stream.next().await.unwrap();
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let subscribed = subscribed.data.unwrap();
    assert_eq!(subscribed["topic"], "alerts.eu");
    assert_eq!(subscribed["offset"], 0);
    assert!(subscribed["epoch"].is_string());
    let opening = stream.next().await.unwrap();
    assert_eq!(opening.retry, Some(2000), "{opening:?}");
    let start = opening.id.clone().expect("the opening carries a resume id");
    assert!(opening.data.is_none(), "the opening dispatches no event");

    let offset = node
        .publish_ok(&writer, "alerts.eu", &json!({"level": "high"}))
        .await;
    let message = stream.next().await.unwrap();
    assert_eq!(message.event, None, "the default type, for onmessage");
    let data = message.data.unwrap();
    assert_eq!(data["op"], "event");
    assert_eq!(data["topic"], "alerts.eu");
    assert_eq!(data["offset"], offset);
    assert_eq!(data["data"], json!({"level": "high"}));
    let id = message.id.expect("each event carries its resume id");
    assert_ne!(id, start, "the id moves with each event");

    // The same frame a WebSocket subscriber gets, byte for byte in JSON.
    let mut ws = node.connect(&reader).await;
    ws.subscribe_with(json!({"op": "subscribe", "topic": "alerts.eu", "since": 0}))
        .await;
    assert_eq!(ws.recv().await, data);

    // Idle: heartbeats, as comments.
    let mut heartbeats = 0;
    while heartbeats < 2 {
        let message = stream.next().await.unwrap();
        assert!(message.heartbeat, "only heartbeats while idle: {message:?}");
        heartbeats += 1;
    }
}

#[tokio::test]
async fn ndjson_streams_one_event_per_line_with_the_epoch_to_resume_and_blank_heartbeats() {
    let node = spawn_node_with(|s| s.server.heartbeat_interval = Duration::from_millis(300)).await;
    let reader = token("reader", &["jobs"], &[]);
    let writer = token("writer", &[], &["jobs"]);
    let bearer = format!("Bearer {reader}");
    let url = events_url(&node, "jobs", "");
    let mut stream = StreamClient::ndjson(&url, &[("authorization", &bearer)]).await;

    // Published with line breaks in its whitespace: still one line.
    let response = node
        .http
        .post(node.url("/api/v1/topics/jobs/events"))
        .bearer_auth(&writer)
        .header("content-type", "application/json")
        .body("{\"step\":\r\n  1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let line = stream.next_event().await;
    assert_eq!(line["data"], json!({"step": 1}));
    assert_eq!(line["offset"], 1);
    let head = node.get_json("/api/v1/topics/jobs/events", &reader).await;
    assert_eq!(line["epoch"], head["epoch"], "each line carries its epoch");

    let blank = stream.next().await.unwrap();
    assert!(
        blank.heartbeat,
        "an idle stream sends empty lines: {blank:?}"
    );
}

#[tokio::test]
async fn streams_are_refused_with_json_errors_before_they_start() {
    let node = spawn_node_with(|s| {
        s.limits.max_connections_per_sub = 1;
        s.limits.max_subscriptions = 2;
    })
    .await;
    let reader = token("reader", &["alerts.>"], &[]);
    let one = |query: &str| events_url(&node, "alerts.eu", query);

    for accept in [SSE, NDJSON] {
        let (status, body) = StreamClient::open(&one(""), accept, &[])
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized"))
        );
        let bad = StreamClient::open(&one("?token=nope"), accept, &[])
            .await
            .err()
            .unwrap();
        assert_eq!(bad.0, 401);
        let other = events_url(&node, "billing", &format!("?token={reader}"));
        let (status, body) = StreamClient::open(&other, accept, &[]).await.err().unwrap();
        assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
        // Which topic, for a client streaming several to drop it.
        assert_eq!(body["topic"], "billing");
    }
    let cases = [
        (one(&format!("?token={reader}&since=x")), 400),
        (one(&format!("?token={reader}&limit=5")), 400),
        (one(&format!("?token={reader}&epoch=e")), 400),
        (
            node.url(&format!(
                "/api/v1/stream?token={reader}&topic=alerts.a&topic=alerts.b&topic=alerts.c"
            )),
            400,
        ),
        (node.url(&format!("/api/v1/stream?token={reader}")), 400),
        (
            node.url(&format!(
                "/api/v1/stream?token={reader}&topic=alerts.a&since=alerts.b:1"
            )),
            400,
        ),
    ];
    for (url, status) in cases {
        let refused = StreamClient::open(&url, SSE, &[]).await.err();
        assert_eq!(refused.map(|r| r.0), Some(status), "{url}");
    }
    let garbage = StreamClient::open(
        &one(&format!("?token={reader}")),
        SSE,
        &[("last-event-id", "not-a-token")],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(garbage.0, 400);
    assert!(
        garbage.1["message"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID")
    );

    // A stream holds one of its user's connections, as a WebSocket does.
    let _held = StreamClient::sse(&one(&format!("?token={reader}")), &[]).await;
    let (status, body) = StreamClient::open(&one(&format!("?token={reader}")), NDJSON, &[])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    let refused = node
        .handshake(&format!("?token={reader}"))
        .try_open()
        .await
        .err()
        .unwrap();
    assert_eq!(refused.0, 429);
}

#[tokio::test]
async fn sse_and_ndjson_resume_exactly_after_the_node_is_killed_and_restarted() {
    let mut node = ServeProcess::start("stream-restart", &[], Stdio::null()).await;
    let reader = token("reader", &["orders"], &[]);
    let writer = token("writer", &[], &["orders"]);
    let http = reqwest::Client::new();
    let publish_url = node.url("/api/v1/topics/orders/events");
    let publish = |n: u64| {
        let request = http
            .post(&publish_url)
            .bearer_auth(&writer)
            .json(&json!({"data": {"n": n}}));
        async move {
            assert_eq!(request.send().await.unwrap().status(), 201);
        }
    };
    let url = node.url(&format!("/api/v1/topics/orders/events?token={reader}"));
    let mut sse = StreamClient::sse(&url, &[]).await;
    let mut ndjson = StreamClient::ndjson(&url, &[]).await;
    for n in 1..=3 {
        publish(n).await;
    }
    assert_eq!(sse.offsets(3).await, [1, 2, 3]);
    let mut last_line = Value::Null;
    for _ in 0..3 {
        last_line = ndjson.next_event().await;
    }
    let last_id = sse.last_id.clone().unwrap();

    assert!(!node.stop_with("KILL").await.success());
    drop((sse, ndjson));
    node.restart().await;
    for n in 4..=5 {
        publish(n).await;
    }

    let mut sse = StreamClient::sse(&url, &[("last-event-id", &last_id)]).await;
    let mut resumed = format!(
        "{url}&since={}&epoch={}",
        last_line["offset"],
        last_line["epoch"].as_str().unwrap()
    );
    let mut ndjson = StreamClient::ndjson(&resumed, &[]).await;
    assert_eq!(sse.offsets(2).await, [4, 5], "exactly what was missed");
    assert_eq!(ndjson.offsets(2).await, [4, 5], "exactly what was missed");
    publish(6).await;
    assert_eq!(sse.offsets(1).await, [6], "then live, with no seam");
    assert_eq!(ndjson.offsets(1).await, [6], "then live, with no seam");

    // `?last_event_id=` does what the header does, for clients that
    // cannot set it.
    resumed = format!("{url}&last_event_id={}", sse.last_id.clone().unwrap());
    publish(7).await;
    let mut again = StreamClient::sse(&resumed, &[]).await;
    assert_eq!(again.offsets(1).await, [7]);
}

#[tokio::test]
async fn a_stream_resumes_on_another_node_of_the_cluster() {
    let nodes = TwoNodes::start().await;
    let reader = token("reader", &["feed"], &[]);
    let writer = token("writer", &[], &["feed"]);
    let on = |node: &TestNode| events_url(node, "feed", &format!("?token={reader}"));

    let mut on_a = StreamClient::sse(&on(&nodes.a), &[]).await;
    publish_n(&nodes.b, &writer, "feed", 2).await;
    assert_eq!(on_a.offsets(2).await, [1, 2]);
    let last_id = on_a.last_id.clone().unwrap();
    drop(on_a);

    publish_n(&nodes.a, &writer, "feed", 3).await;
    let mut on_b = StreamClient::sse(&on(&nodes.b), &[("last-event-id", &last_id)]).await;
    assert_eq!(on_b.offsets(3).await, [3, 4, 5]);
    publish_n(&nodes.a, &writer, "feed", 1).await;
    assert_eq!(on_b.offsets(1).await, [6]);

    // NDJSON: the last line's offset and epoch, on the other node.
    let mut on_a = StreamClient::ndjson(&on(&nodes.a), &[]).await;
    publish_n(&nodes.b, &writer, "feed", 1).await;
    let last = on_a.next_event().await;
    assert_eq!(last["offset"], 7);
    drop(on_a);
    publish_n(&nodes.a, &writer, "feed", 2).await;
    let resumed = format!(
        "{}&since=7&epoch={}",
        on(&nodes.b),
        last["epoch"].as_str().unwrap()
    );
    let mut on_b = StreamClient::ndjson(&resumed, &[]).await;
    assert_eq!(on_b.offsets(2).await, [8, 9]);

    let mut lines = StreamClient::ndjson(&format!("{}&since=4", on(&nodes.a)), &[]).await;
    let subscribed = lines.next_data().await;
    assert_eq!(subscribed["truncated"], true, "{subscribed}");
    let notice = lines.next_data().await;
    assert_eq!(
        notice["op"], "truncated",
        "since without its epoch is not trusted"
    );
    assert_eq!(lines.offsets(9).await, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
}

#[tokio::test]
async fn a_resume_from_another_log_says_truncated_then_replays_what_is_kept() {
    // Two nodes with their own logs: the same topic, other epochs.
    let first = spawn_node().await;
    let second = spawn_node_with(|s| {
        s.retention.max_events = 3;
        s.retention.prune_interval = Duration::from_millis(200);
    })
    .await;
    let reader = token("reader", &["news"], &[]);
    let writer = token("writer", &[], &["news"]);

    let mut stream = StreamClient::sse(
        &events_url(&first, "news", &format!("?token={reader}")),
        &[],
    )
    .await;
    publish_n(&first, &writer, "news", 2).await;
    assert_eq!(stream.offsets(2).await, [1, 2]);
    let foreign = stream.last_id.clone().unwrap();

    publish_n(&second, &writer, "news", 2).await;
    let url = events_url(&second, "news", &format!("?token={reader}"));
    let mut resumed = StreamClient::sse(&url, &[("last-event-id", &foreign)]).await;
    let subscribed = resumed.next().await.unwrap();
    assert_eq!(subscribed.data.unwrap()["truncated"], true);
    let notice = resumed.next().await.unwrap();
    assert_eq!(notice.event.as_deref(), Some("truncated"));
    let head = second.get_json("/api/v1/topics/news/events", &reader).await;
    assert_eq!(notice.data.as_ref().unwrap()["topic"], "news");
    assert_eq!(notice.data.as_ref().unwrap()["epoch"], head["epoch"]);
    assert_eq!(resumed.offsets(2).await, [1, 2], "everything the log keeps");

    // Pruned: `since` older than what is retained.
    publish_n(&second, &writer, "news", 6).await;
    eventually("the log is pruned to its last 3 events", || async {
        let page = second
            .get_json("/api/v1/topics/news/events?since=0", &reader)
            .await;
        page["events"][0]["offset"] == 6
    })
    .await;
    let epoch = head["epoch"].as_str().unwrap();
    let mut lines = StreamClient::ndjson(&format!("{url}&since=1&epoch={epoch}"), &[]).await;
    assert_eq!(lines.next_data().await["op"], "subscribed");
    assert_eq!(lines.next_data().await["op"], "truncated");
    assert_eq!(lines.offsets(3).await, [6, 7, 8], "from the oldest kept");
}

#[tokio::test]
async fn a_stream_of_several_topics_resumes_with_its_one_token() {
    let node = spawn_node().await;
    let reader = token("reader", &["a", "b", "c"], &[]);
    let writer = token("writer", &[], &["a", "b", "c"]);
    let url = node.url(&format!("/api/v1/stream?topic=b&topic=a&token={reader}"));
    let mut stream = StreamClient::sse(&url, &[]).await;
    publish_n(&node, &writer, "a", 2).await;
    publish_n(&node, &writer, "b", 1).await;
    publish_n(&node, &writer, "c", 1).await;
    let got = topics_and_offsets(&mut stream, 3).await;
    assert_eq!(got, [("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]);
    let token_id = stream.last_id.clone().unwrap();
    assert!(token_id.len() < 64, "a compact token: {token_id}");
    drop(stream);

    publish_n(&node, &writer, "a", 1).await;
    publish_n(&node, &writer, "b", 2).await;
    let mut resumed = StreamClient::sse(&url, &[("last-event-id", &token_id)]).await;
    let got = topics_and_offsets(&mut resumed, 3).await;
    assert_eq!(got, [("a".into(), 3), ("b".into(), 2), ("b".into(), 3)]);

    // The token is only good for its own stream.
    let other = node.url(&format!("/api/v1/stream?topic=a&topic=c&token={reader}"));
    let refused = StreamClient::open(&other, SSE, &[("last-event-id", &token_id)])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.0, 400);

    // NDJSON resumes per topic with `since=topic:offset:epoch`.
    let epoch_a = node.get_json("/api/v1/topics/a/events", &reader).await["epoch"].clone();
    let epoch_b = node.get_json("/api/v1/topics/b/events", &reader).await["epoch"].clone();
    let (epoch_a, epoch_b) = (epoch_a.as_str().unwrap(), epoch_b.as_str().unwrap());
    let mut lines = StreamClient::ndjson(
        &format!("{url}&since=a:2:{epoch_a}&since=b:3:{epoch_b}"),
        &[],
    )
    .await;
    assert_eq!(lines.offsets(1).await, [3]);
    publish_n(&node, &writer, "b", 1).await;
    assert_eq!(topics_and_offsets(&mut lines, 1).await, [("b".into(), 4)]);
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let node = spawn_node_with(|s| s.auth.leeway = Duration::ZERO).await;
    let reader = claims_token(json!({"sub": "reader", "exp": now() + 2, "topics": ["t"]}));
    let url = events_url(&node, "t", &format!("?token={reader}"));
    let mut lines = StreamClient::ndjson(&url, &[]).await;
    let end = loop {
        let message = lines
            .next_within(Duration::from_secs(10))
            .await
            .expect("an end message before the response ends");
        if let Some(data) = message.data.filter(|d| d["op"] != "subscribed") {
            break data;
        }
    };
    assert_eq!(end["op"], "end");
    assert_eq!(end["reason"], "token_expired");
    assert!(lines.next().await.is_none(), "the response ends after it");
}

#[tokio::test]
async fn an_sse_stream_that_does_not_keep_up_is_ended_while_others_go_on_and_it_resumes() {
    a_stream_that_does_not_keep_up_is_ended_while_others_go_on_and_it_resumes(SSE).await;
}

#[tokio::test]
async fn an_ndjson_stream_that_does_not_keep_up_is_ended_while_others_go_on_and_it_resumes() {
    a_stream_that_does_not_keep_up_is_ended_while_others_go_on_and_it_resumes(NDJSON).await;
}

async fn a_stream_that_does_not_keep_up_is_ended_while_others_go_on_and_it_resumes(accept: &str) {
    // Room for a reader that keeps up to lag by a few batches, not for
    // one that stops.
    let node = spawn_node_with(|s| {
        s.limits.outbound_queue_bytes = 1 << 20;
        s.limits.http_publish_rate = 1_000_000;
    })
    .await;
    let reader = token("reader", &["firehose"], &[]);
    let writer = token("writer", &[], &["firehose"]);
    let url = events_url(&node, "firehose", &format!("?token={reader}"));
    let open = |url: String| async move { StreamClient::open(&url, accept, &[]).await.unwrap() };
    let mut slow = open(url.clone()).await;
    let mut fast = open(url.clone()).await;
    slow.next().await.unwrap();

    // 100 batches of 50 events of 4 KiB: 20 MiB, far more than the socket
    // buffers and the slow stream's mailbox hold.
    let total = 100 * 50;
    let payload = "x".repeat(4 * 1024);
    let publisher = {
        let (http, url, writer) = (
            node.http.clone(),
            node.url("/api/v1/events"),
            writer.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..100 {
                let events: Vec<Value> = (0..50)
                    .map(|_| json!({"topic": "firehose", "data": payload}))
                    .collect();
                let response = http
                    .post(&url)
                    .bearer_auth(&writer)
                    .json(&events)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
            }
        })
    };
    let mut expected = 1;
    while expected <= total {
        let offset = fast.next_event().await["offset"].as_u64().unwrap();
        assert_eq!(
            offset, expected,
            "the fast stream gets every event in order"
        );
        expected += 1;
    }
    publisher.await.unwrap();

    // The slow one now reads: what it got, then the end.
    let mut received = Vec::new();
    let mut last_line = Value::Null;
    let reason = loop {
        let message = slow.next().await.expect("an end message");
        match message.data {
            Some(data) if data["op"] == "event" => {
                received.push(data["offset"].as_u64().unwrap());
                last_line = data;
            }
            Some(data) if data["op"] == "subscribed" => {}
            Some(data) => break data,
            None => {}
        }
    };
    assert_eq!(reason["op"], "end");
    assert_eq!(reason["reason"], "slow_consumer");
    assert!((received.len() as u64) < total, "it was ended early");
    assert_eq!(received, (1..=received.len() as u64).collect::<Vec<_>>());
    assert!(slow.next().await.is_none());

    // It resumes after the last event it got, and gets all the rest: with
    // its last id (SSE), or its last line's offset and epoch (NDJSON).
    let mut resumed = match slow.last_id.clone() {
        Some(id) if accept == SSE => StreamClient::sse(&url, &[("last-event-id", &id)]).await,
        _ if last_line.is_null() => open(format!("{url}&since=0")).await,
        _ => {
            let since = format!(
                "{url}&since={}&epoch={}",
                last_line["offset"],
                last_line["epoch"].as_str().unwrap()
            );
            open(since).await
        }
    };
    let mut next = received.len() as u64 + 1;
    while next <= total {
        assert_eq!(resumed.next_event().await["offset"].as_u64().unwrap(), next);
        next += 1;
    }
}

#[tokio::test]
async fn a_stream_whose_client_leaves_gives_its_place_back() {
    let node = spawn_node_with(|s| s.limits.max_connections_per_sub = 1).await;
    let reader = token("reader", &["t"], &[]);
    let url = events_url(&node, "t", &format!("?token={reader}"));
    let first = StreamClient::sse(&url, &[]).await;
    assert_eq!(
        StreamClient::open(&url, SSE, &[]).await.err().unwrap().0,
        429
    );
    drop(first);
    eventually("the place is given back", || async {
        StreamClient::open(&url, SSE, &[]).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_stream_ends_with_going_away_when_its_node_shuts_down() {
    let mut node = ServeProcess::start("stream-shutdown", &[], Stdio::null()).await;
    let reader = token("reader", &["t"], &[]);
    let url = node.url(&format!("/api/v1/topics/t/events?token={reader}"));
    let mut lines = StreamClient::ndjson(&url, &[]).await;
    let stopping = tokio::spawn(async move {
        let status = node.stop_with("TERM").await;
        (node, status)
    });
    assert_eq!(lines.next_data().await["op"], "subscribed");
    let end = lines.next_data().await;
    assert_eq!(end["op"], "end");
    assert_eq!(end["reason"], "going_away");
    assert!(lines.next().await.is_none());
    let (_node, status) = stopping.await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn accept_ranks_json_over_a_stream_and_a_query_says_each_thing_once() {
    let node = spawn_node().await;
    let reader = token("reader", &["t"], &[]);
    let writer = token("writer", &[], &["t"]);
    node.publish_ok(&writer, "t", &json!(1)).await;
    let url = events_url(&node, "t", &format!("?token={reader}"));

    // JSON ranked first: a page of history, not a stream.
    let page = node
        .http
        .get(events_url(&node, "t", ""))
        .bearer_auth(&reader)
        .header("accept", "application/json, application/x-ndjson;q=0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let vary = page.headers()["vary"].to_str().unwrap().to_owned();
    assert!(vary.split(", ").any(|v| v == "Accept"), "{vary}");
    assert_eq!(
        page.json::<Value>().await.unwrap()["events"][0]["offset"],
        1
    );
    assert!(
        StreamClient::open(&url, "text/event-stream;q=0", &[])
            .await
            .is_err()
    );

    let twice = node.url(&format!(
        "/api/v1/stream?topic=t&token={reader}&token={reader}"
    ));
    assert_eq!(
        StreamClient::open(&twice, SSE, &[]).await.err().unwrap().0,
        400
    );
    let since_twice = node.url(&format!(
        "/api/v1/stream?topic=t&since=t:0&since=t:1&token={reader}"
    ));
    assert_eq!(
        StreamClient::open(&since_twice, SSE, &[])
            .await
            .err()
            .unwrap()
            .0,
        400
    );

    // An empty Last-Event-ID is no token: the query's is used.
    let mut first = StreamClient::sse(&format!("{url}&since=0"), &[]).await;
    assert_eq!(first.offsets(1).await, [1]);
    let id = first.last_id.clone().unwrap();
    node.publish_ok(&writer, "t", &json!(2)).await;
    let mut resumed = StreamClient::sse(
        &format!("{url}&last_event_id={id}"),
        &[("last-event-id", "")],
    )
    .await;
    assert_eq!(resumed.offsets(1).await, [2]);
}

#[tokio::test]
async fn browsers_on_other_origins_may_stream_and_publish_where_allowed() {
    let open = spawn_node().await;
    let listed = spawn_node_with(|s| {
        s.server.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let preflight = |node: &TestNode, path: &str, origin: &str, method: &str| {
        node.http
            .request(reqwest::Method::OPTIONS, node.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key, last-event-id",
            )
            .send()
    };
    let allowed_origin = |answer: &reqwest::Response| {
        let value = answer.headers().get("access-control-allow-origin")?;
        Some(value.to_str().unwrap().to_owned())
    };
    // Any origin by default: a stream with its Authorization header, and a
    // JSON publish with its idempotency key.
    for (path, method) in [
        ("/api/v1/stream?topic=t", "GET"),
        ("/api/v1/topics/t/events", "POST"),
    ] {
        let answer = preflight(&open, path, "https://elsewhere.example", method)
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{method} {path}");
        assert_eq!(
            answer.headers()["access-control-allow-origin"],
            "https://elsewhere.example"
        );
        let allowed = answer.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        for name in ["authorization", "idempotency-key", "last-event-id"] {
            assert!(allowed.contains(name), "{allowed}");
        }
    }
    // Operations routes stay same-origin: a page elsewhere cannot read the
    // metrics.
    let answer = preflight(&open, "/metrics", "https://elsewhere.example", "GET")
        .await
        .unwrap();
    assert_eq!(allowed_origin(&answer), None);
    let read = open
        .http
        .get(open.url("/metrics"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed_origin(&read), None);
    // With server.allowed_origins, only those.
    let answer = preflight(
        &listed,
        "/api/v1/stream?topic=t",
        "https://app.example.com",
        "GET",
    )
    .await
    .unwrap();
    assert_eq!(
        allowed_origin(&answer).as_deref(),
        Some("https://app.example.com")
    );
    let answer = preflight(
        &listed,
        "/api/v1/stream?topic=t",
        "https://evil.example",
        "GET",
    )
    .await
    .unwrap();
    assert_eq!(allowed_origin(&answer), None);
    // And the stream itself refuses an origin not listed.
    let reader = token("reader", &["t"], &[]);
    let url = listed.url(&format!("/api/v1/stream?topic=t&token={reader}"));
    let refused = StreamClient::open(&url, SSE, &[("origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.0, 403);
    let mut ok = StreamClient::sse(&url, &[("origin", "https://app.example.com")]).await;
    assert_eq!(ok.next_data().await["op"], "subscribed");
}
