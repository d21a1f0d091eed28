//! Cluster mode: several nodes relaying through a private Redis.

use std::collections::HashSet;

use serde_json::json;

use crate::helpers::{PgDatabase, RedisServer, TestNode, TwoNodes, eventually, token};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

#[tokio::test]
async fn events_published_on_one_node_reach_subscribers_on_every_node_once() {
    let cluster = TwoNodes::start().await;
    let (a, b) = (&cluster.a, &cluster.b);
    let mut on_a = a.connect(&subscriber()).await;
    let mut on_b = b.connect(&subscriber()).await;
    on_a.subscribe("alerts").await;
    on_b.subscribe("alerts").await;

    // HTTP publish on A.
    assert_eq!(a.publish_ok(&publisher(), "alerts", &json!("one")).await, 1);
    // WebSocket publish on B.
    let mut p = b.connect(&publisher()).await;
    let reply = p
        .request(json!({"op": "publish", "id": 1, "topic": "alerts", "data": "two"}))
        .await;
    assert_eq!(reply["offset"], 2);

    for ws in [&mut on_a, &mut on_b] {
        let first = ws.recv().await;
        assert_eq!(
            (&first["offset"], &first["data"]),
            (&json!(1), &json!("one"))
        );
        let second = ws.recv().await;
        assert_eq!(
            (&second["offset"], &second["data"]),
            (&json!(2), &json!("two"))
        );
        // Nothing twice: the next frame answers this ping.
        assert_eq!(
            ws.request(json!({"op": "ping", "id": 9})).await["op"],
            "pong"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_three_nodes_give_unique_increasing_offsets_delivered_exactly_once()
 {
    const PER_PUBLISHER: u64 = 40;
    const PUBLISHERS_PER_NODE: u64 = 2;
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let nodes = [
        TestNode::clustered(&redis, &pg).await,
        TestNode::clustered(&redis, &pg).await,
        TestNode::clustered(&redis, &pg).await,
    ];
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut ws = node.connect(&subscriber()).await;
        ws.subscribe("orders").await;
        subscribers.push(ws);
    }
    let total = PER_PUBLISHER * PUBLISHERS_PER_NODE * nodes.len() as u64;

    let mut publishers = Vec::new();
    for node in &nodes {
        for _ in 0..PUBLISHERS_PER_NODE {
            publishers.push(node.spawn_publisher("orders", PER_PUBLISHER));
        }
    }
    let mut acknowledged = HashSet::new();
    for publisher in publishers {
        for offset in publisher.await.unwrap() {
            assert!(acknowledged.insert(offset), "offset {offset} given twice");
        }
    }
    assert_eq!(acknowledged, (1..=total).collect::<HashSet<_>>());

    for ws in &mut subscribers {
        for expected in 1..=total {
            assert_eq!(ws.recv().await["offset"], expected);
        }
        assert_eq!(ws.request(json!({"op": "ping"})).await["op"], "pong");
    }
}

#[tokio::test]
async fn a_node_subscribes_in_redis_only_while_it_has_local_subscribers() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let node = TestNode::clustered(&redis, &pg).await;
    let numsub = || async {
        let reply: (String, u64) = redis
            .query(redis::cmd("PUBSUB").arg("NUMSUB").arg("herald:topic:news"))
            .await;
        reply.1
    };
    assert_eq!(numsub().await, 0);
    let mut first = node.connect(&subscriber()).await;
    let mut second = node.connect(&subscriber()).await;
    first.subscribe("news").await;
    assert_eq!(numsub().await, 1);
    second.subscribe("news").await;
    assert_eq!(
        numsub().await,
        1,
        "one Redis subscription per node, not per client"
    );

    let reply = first
        .request(json!({"op": "unsubscribe", "id": 1, "topic": "news"}))
        .await;
    assert_eq!(reply["op"], "unsubscribed");
    assert_eq!(numsub().await, 1);
    // The last local subscriber leaving by disconnecting counts too.
    drop(second);
    eventually("the node unsubscribed in Redis", || async {
        numsub().await == 0
    })
    .await;
}

#[tokio::test]
async fn deployments_with_different_prefixes_share_a_redis_without_crosstalk() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let green_pg = PgDatabase::create().await;
    let blue = TestNode::clustered_with(&redis, &pg, |s| s.redis.prefix = "blue:".into()).await;
    let green =
        TestNode::clustered_with(&redis, &green_pg, |s| s.redis.prefix = "green:".into()).await;
    let mut on_green = green.connect(&subscriber()).await;
    on_green.subscribe("alerts").await;
    assert_eq!(
        blue.publish_ok(&publisher(), "alerts", &json!("blue"))
            .await,
        1
    );
    assert_eq!(
        green
            .publish_ok(&publisher(), "alerts", &json!("green"))
            .await,
        1
    );
    let event = on_green.recv().await;
    assert_eq!(event["data"], "green");
}

#[tokio::test]
async fn while_redis_is_down_publishes_get_503_and_delivery_resumes_after_without_client_action() {
    let mut redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let a = TestNode::clustered(&redis, &pg).await;
    let b = TestNode::clustered(&redis, &pg).await;
    let mut on_b = b.connect(&subscriber()).await;
    on_b.subscribe("alerts").await;
    assert_eq!(
        a.publish_ok(&publisher(), "alerts", &json!("before")).await,
        1
    );
    assert_eq!(on_b.recv().await["data"], "before");

    redis.kill();
    eventually("readyz reports the outage", || async {
        b.readyz().await == 503
    })
    .await;
    let response = a.publish(&publisher(), "alerts", &json!("during")).await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    let healthz = b.http.get(b.url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200, "the process is alive");
    // The WebSocket stays open and served.
    assert_eq!(
        on_b.request(json!({"op": "ping", "id": 2})).await["op"],
        "pong"
    );

    redis.restart().await;
    a.wait_ready().await;
    b.wait_ready().await;
    // Offsets live in the store: the refused publish took none.
    assert_eq!(
        a.publish_ok(&publisher(), "alerts", &json!("after")).await,
        2
    );
    let event = on_b.recv().await;
    assert_eq!(
        (&event["data"], &event["offset"]),
        (&json!("after"), &json!(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_every_subscriber_still_gets_every_acknowledged_event_in_order() {
    const ATTEMPTS: u64 = 300;
    let mut redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let a = TestNode::clustered(&redis, &pg).await;
    let b = TestNode::clustered(&redis, &pg).await;
    let mut on_a = a.connect(&subscriber()).await;
    let mut on_b = b.connect(&subscriber()).await;
    on_a.subscribe("stream").await;
    on_b.subscribe("stream").await;

    // Publish steadily (bounded in count and time) while Redis goes away
    // and comes back; count what was acknowledged.
    let http = a.http.clone();
    let url = a.url("/api/v1/topics/stream/events");
    let publishing = tokio::spawn(async move {
        let mut acknowledged = 0u64;
        for i in 0..ATTEMPTS {
            let response = http
                .post(&url)
                .bearer_auth(publisher())
                .json(&json!(i))
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                201 => acknowledged += 1,
                503 => {}
                other => panic!("unexpected status {other}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        acknowledged
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    redis.restart().await;
    let acknowledged = publishing.await.unwrap();
    assert!(
        acknowledged > 0 && acknowledged < ATTEMPTS,
        "some publishes were refused while Redis was down: {acknowledged}"
    );

    for ws in [&mut on_a, &mut on_b] {
        for expected in 1..=acknowledged {
            assert_eq!(ws.recv().await["offset"], expected);
        }
        assert_eq!(ws.request(json!({"op": "ping"})).await["op"], "pong");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_subscribing_at_once_to_distinct_topics_each_get_their_events() {
    // Subscription changes that queue up are applied to Redis together;
    // every one of them must still be subscribed before its reply.
    const CLIENTS: usize = 60;
    let cluster = TwoNodes::start().await;
    let (a, b, redis) = (&cluster.a, &cluster.b, &cluster.redis);
    let connecting = (0..CLIENTS).map(|k| {
        let b = &b;
        async move {
            let mut ws = b.connect(&subscriber()).await;
            ws.subscribe(&format!("many.t{k}")).await;
            ws
        }
    });
    let mut clients = futures_util::future::join_all(connecting).await;
    for k in 0..CLIENTS {
        a.publish_ok(&publisher(), &format!("many.t{k}"), &json!({"k": k}))
            .await;
    }
    for (k, ws) in clients.iter_mut().enumerate() {
        let event = ws.recv().await;
        assert_eq!(event["topic"], format!("many.t{k}"), "{event}");
        assert_eq!(event["data"]["k"], k);
    }
    let channels: Vec<String> = (0..CLIENTS)
        .map(|k| format!("herald:topic:many.t{k}"))
        .collect();
    let numsub: Vec<(String, u64)> = redis
        .query(redis::cmd("PUBSUB").arg("NUMSUB").arg(&channels))
        .await;
    let counts: Vec<u64> = numsub.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, vec![1; CLIENTS], "one Redis subscription per topic");
}

#[tokio::test]
async fn redis_keeps_the_numbering_of_topics_without_history_only_while_watched() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let node = TestNode::clustered_with(&redis, &pg, |s| s.retention.history = false).await;
    let exists = |topic: &'static str| {
        let redis = &redis;
        async move {
            let n: u64 = redis
                .query(redis::cmd("EXISTS").arg(format!("herald:offset:{topic}")))
                .await;
            n == 1
        }
    };
    // Nobody watches: every event reaches no one and nothing is kept.
    for _ in 0..3 {
        assert_eq!(
            node.publish_ok(&publisher(), "typing.u1", &json!(1)).await,
            1
        );
    }
    assert!(!exists("typing.u1").await);

    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("typing.u1").await;
    let offsets: Vec<u64> = {
        let mut offsets = Vec::new();
        for n in 0..3 {
            offsets.push(node.publish_ok(&publisher(), "typing.u1", &json!(n)).await);
        }
        offsets
    };
    assert_eq!(offsets, [1, 2, 3], "a watched topic counts");
    assert!(exists("typing.u1").await);
    for expected in 1..=3 {
        assert_eq!(ws.recv().await["offset"], expected);
    }
}
