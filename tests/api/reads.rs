//! HTTP reads (history, presence, introspection) cost a node something:
//! they count toward a per-user rate, and a read of a topic nobody joined
//! or published to leaves nothing behind.

use serde_json::{Value, json};

use crate::helpers::{
    PgDatabase, RedisServer, TestNode, claims_token, now, spawn_node_with, with_presence,
};

fn reader(sub: &str) -> String {
    claims_token(json!({"sub": sub, "exp": now() + 3600, "topics": [">"], "publish": [">"]}))
}

#[tokio::test]
async fn history_presence_and_introspection_count_toward_limits_http_read_rate() {
    const RATE: u32 = 6;
    let node = spawn_node_with(|s| {
        with_presence(s);
        s.limits.http_read_rate = RATE;
    })
    .await;
    let ada = reader("ada");
    let paths = [
        "/api/v1/topics/room.a/events",
        "/api/v1/topics/room.a/presence",
        "/api/v1/topics/room.a",
    ];
    // One bucket for every read route: the burst, then 429.
    for i in 0..RATE as usize {
        let response = node.get(paths[i % paths.len()], &ada).await;
        assert_eq!(response.status(), 200, "read {i}");
    }
    for path in paths {
        let refused = node.get(path, &ada).await;
        let retry = crate::helpers::rate_limited(refused, "limits.http_read_rate").await;
        assert!(retry >= 1, "{path}");
    }
    // Another user is not held back by ada's reads.
    assert_eq!(node.get(paths[0], &reader("bo")).await.status(), 200);
}

#[tokio::test]
async fn reads_of_topics_nobody_joined_or_published_to_leave_nothing_behind() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let node = TestNode::clustered_with(&redis, &pg, |s| {
        with_presence(s);
        s.limits.http_read_rate = 1_000;
    })
    .await;
    // What names the topics read, in Redis and in the store.
    let mut pattern = redis::cmd("KEYS");
    pattern.arg("*room.empty-*");
    let keys = || redis.query::<Vec<String>>(&pattern);
    let topics = || async {
        use sqlx::Connection as _;
        let mut db = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM herald_topics WHERE topic LIKE 'room.empty-%'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap()
    };
    let ada = reader("ada");
    for i in 0..100 {
        let room = format!("room.empty-{i}");
        for path in [
            format!("/api/v1/topics/{room}/presence"),
            format!("/api/v1/topics/{room}/presence?count_only=true"),
            format!("/api/v1/topics/{room}/events"),
            format!("/api/v1/topics/{room}"),
        ] {
            let response = node.get(&path, &ada).await;
            assert_eq!(response.status(), 200, "{path}");
        }
    }
    assert_eq!(
        keys().await,
        Vec::<String>::new(),
        "reads left keys in Redis"
    );
    assert_eq!(topics().await, 0, "reads left rows in the store");
    // A page of an empty topic is still a page: no members, an epoch, seq 0.
    let page = node
        .get_json("/api/v1/topics/room.empty-0/presence", &ada)
        .await;
    assert_eq!(
        (page["count"].clone(), page["seq"].clone()),
        (json!(0), json!(0))
    );
    assert!(page["epoch"].is_string(), "{page}");
}

/// A batch of `count` events for `topic`.
fn batch(topic: &str, count: usize) -> Value {
    Value::Array(
        (0..count)
            .map(|i| json!({"topic": topic, "data": i}))
            .collect(),
    )
}

/// Publishes `batches` batches of 1,000 events as fast as it can: how many
/// were accepted and how many refused with 429.
async fn burst(node: &TestNode, token: &str, batches: usize) -> (usize, usize) {
    let (mut accepted, mut limited) = (0, 0);
    for _ in 0..batches {
        let response = node.publish_batch(token, &batch("burst", 1_000)).await;
        match response.status().as_u16() {
            201 => accepted += 1_000,
            429 => limited += 1_000,
            other => panic!("a batch answered {other}"),
        }
    }
    (accepted, limited)
}

#[tokio::test]
async fn a_service_token_s_limits_claim_lifts_the_defaults_for_its_sub_only() {
    let node = spawn_node_with(|s| {
        s.retention.history = false;
        s.limits.max_connections_per_sub = 2;
    })
    .await;
    let claims = |sub: &str, limits: Option<Value>| {
        let mut claims =
            json!({"sub": sub, "exp": now() + 3600, "topics": [">"], "publish": [">"]});
        if let Some(limits) = limits {
            claims["limits"] = limits;
        }
        claims_token(claims)
    };
    // A 20,000-event burst: the default (1,000 events/s per sub) limits it;
    // a service token that sets its own rate is taken whole.
    let (accepted, limited) = burst(&node, &claims("browser-user", None), 20).await;
    assert!(
        limited > 0 && accepted < 20_000,
        "default token: {accepted} accepted"
    );
    let service = claims(
        "backend",
        Some(json!({"http_publish_rate": 50_000, "max_connections_per_sub": 5})),
    );
    assert_eq!(burst(&node, &service, 20).await, (20_000, 0));
    // Its connection limit, too: five where others get two.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(node.connect(&service).await);
    }
    let (status, _) = node.refused(&service).await;
    assert_eq!(status, 429);
    let plain = claims("plain", None);
    let _one = node.connect(&plain).await;
    let _two = node.connect(&plain).await;
    let (status, _) = node.refused(&plain).await;
    assert_eq!(status, 429);
    // A limit the token may not set, or not a number, refuses the token.
    for (limits, says) in [
        (
            json!({"max_connections": 1_000_000}),
            "unknown limit `max_connections`",
        ),
        (json!({"http_publish_rate": "lots"}), "whole number"),
        (json!({"http_publish_rate": 0}), "from 1"),
    ] {
        let response = node
            .publish(&claims("bad", Some(limits)), "t", &json!(1))
            .await;
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
}
