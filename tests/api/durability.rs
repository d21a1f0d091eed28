//! The durable log: replay on resume, epochs, retention, idempotency, the
//! history API and migrations, against real SQLite and PostgreSQL.

use std::collections::HashSet;
use std::process::{Command, Stdio};

use herald::config::TopicRule;
use serde_json::{Value, json};

use crate::helpers::{
    PgDatabase, RedisServer, ServeProcess, TestNode, TwoNodes, WsClient, eventually, get_text,
    secret, spawn_node, spawn_node_with, temp_dir, token,
};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

/// Subscribes with `since` and `epoch` and returns the reply.
async fn resume(ws: &mut WsClient, topic: &str, since: u64, epoch: &Value) -> Value {
    ws.subscribe_with(
        json!({"op": "subscribe", "id": 7, "topic": topic, "since": since, "epoch": epoch}),
    )
    .await
}

/// Receives `count` events and returns their offsets.
async fn offsets(ws: &mut WsClient, count: usize) -> Vec<u64> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        let event = ws.recv().await;
        assert_eq!(event["op"], "event", "{event}");
        got.push(event["offset"].as_u64().unwrap());
    }
    got
}

/// Asserts nothing else is pending: the next frame answers a ping.
async fn nothing_more(ws: &mut WsClient) {
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 99})).await["op"],
        "pong"
    );
}

/// One field of every event in a history page, as numbers.
fn column(history: &Value, field: &str) -> Vec<u64> {
    let events = history["events"].as_array().unwrap();
    events.iter().map(|e| e[field].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn a_client_that_resumes_with_since_gets_exactly_the_missed_events_then_live_ones() {
    let node = spawn_node().await;
    let p = publisher();
    node.publish_ok(&p, "alerts", &json!(1)).await;
    node.publish_ok(&p, "alerts", &json!(2)).await;

    let mut ws = node.connect(&subscriber()).await;
    let reply = ws.subscribe("alerts").await;
    assert_eq!(reply["offset"], 2);
    assert!(reply.get("truncated").is_none());
    let epoch = reply["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()));
    node.publish_ok(&p, "alerts", &json!(3)).await;
    assert_eq!(offsets(&mut ws, 1).await, [3]);
    drop(ws);

    node.publish_ok(&p, "alerts", &json!(4)).await;
    node.publish_ok(&p, "alerts", &json!(5)).await;
    let mut ws = node.connect(&subscriber()).await;
    let reply = resume(&mut ws, "alerts", 3, &epoch).await;
    assert_eq!((&reply["offset"], &reply["epoch"]), (&json!(5), &epoch));
    assert!(reply.get("truncated").is_none());
    let replayed = ws.recv().await;
    assert_eq!(
        (&replayed["offset"], &replayed["data"]),
        (&json!(4), &json!(4))
    );
    assert_eq!(offsets(&mut ws, 1).await, [5]);
    node.publish_ok(&p, "alerts", &json!(6)).await;
    assert_eq!(offsets(&mut ws, 1).await, [6]);
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn replay_and_live_meet_without_gap_or_duplicate_under_concurrent_publishing() {
    const EVENTS: u64 = 200;
    let node = spawn_node().await;
    let p = publisher();
    for i in 1..=50 {
        node.publish_ok(&p, "busy", &json!(i)).await;
    }
    let http = node.http.clone();
    let url = node.url("/api/v1/topics/busy/events");
    let publishing = tokio::spawn(async move {
        for i in 51..=EVENTS {
            let response = http
                .post(&url)
                .bearer_auth(publisher())
                .json(&json!(i))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }
    });
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe_with(json!({"op": "subscribe", "id": 1, "topic": "busy", "since": 0}))
        .await;
    publishing.await.unwrap();
    assert_eq!(
        offsets(&mut ws, EVENTS as usize).await,
        (1..=EVENTS).collect::<Vec<_>>()
    );
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn a_since_from_another_epoch_is_not_trusted() {
    let node = spawn_node().await;
    let p = publisher();
    for i in 1..=3 {
        node.publish_ok(&p, "alerts", &json!(i)).await;
    }
    let mut ws = node.connect(&subscriber()).await;
    let reply = resume(&mut ws, "alerts", 2, &json!("an-old-epoch")).await;
    assert_eq!(reply["truncated"], true);
    assert_eq!(offsets(&mut ws, 3).await, [1, 2, 3]);
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn a_new_log_has_a_new_epoch_and_a_restarted_node_keeps_its_epoch() {
    let dir = temp_dir("epoch");
    let url = format!("sqlite://{}", dir.join("herald.db").display());
    let epoch_of = |node: TestNode| async move {
        let mut ws = node.connect(&subscriber()).await;
        ws.subscribe("alerts").await["epoch"].clone()
    };
    let first = epoch_of(spawn_node_with(|s| s.store.url = url.clone().into()).await).await;
    let again = epoch_of(spawn_node_with(|s| s.store.url = url.clone().into()).await).await;
    assert_eq!(first, again, "same file, same log");
    let fresh = epoch_of(spawn_node().await).await;
    assert_ne!(first, fresh, "a fresh file is a new log");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn pruned_events_make_a_resume_truncated_from_the_oldest_retained() {
    let node = spawn_node_with(|s| {
        s.retention.max_events = 2;
        s.retention.prune_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let p = publisher();
    for i in 1..=5 {
        node.publish_ok(&p, "alerts", &json!(i)).await;
    }
    let (path, token) = ("/api/v1/topics/alerts/events?since=0", subscriber());
    eventually("old events are pruned", || async {
        node.get_json(path, &token).await["events"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let body = node.get_json(path, &token).await;
    assert_eq!(body["truncated"], true);
    let epoch = body["epoch"].clone();

    let mut ws = node.connect(&subscriber()).await;
    let reply = resume(&mut ws, "alerts", 1, &epoch).await;
    assert_eq!(reply["truncated"], true);
    assert_eq!(offsets(&mut ws, 2).await, [4, 5]);
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn retries_with_an_idempotency_key_publish_once() {
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("orders").await;
    let post = |key: &str| {
        node.http
            .post(node.url("/api/v1/topics/orders/events"))
            .bearer_auth(publisher())
            .header("idempotency-key", key)
            .json(&json!({"order": key}))
            .send()
    };
    for _ in 0..3 {
        let response = post("order-1").await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.json::<Value>().await.unwrap()["offset"], 1);
    }
    assert_eq!(
        post("order-2")
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["offset"],
        2
    );
    // Over the WebSocket, `key` does the same.
    let mut publishing = node.connect(&publisher()).await;
    for _ in 0..2 {
        let reply = publishing
            .request(
                json!({"op": "publish", "id": 3, "topic": "orders", "data": 3, "key": "order-3"}),
            )
            .await;
        assert_eq!(reply["offset"], 3);
    }
    assert_eq!(offsets(&mut ws, 3).await, [1, 2, 3]);
    nothing_more(&mut ws).await;

    let bad = post("has space").await.unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn history_api_returns_retained_events_under_the_subscribe_rules() {
    let node = spawn_node().await;
    let p = publisher();
    for i in 1..=5 {
        node.publish_ok(&p, "alerts", &json!({"n": i})).await;
    }
    let get = |query: &str, token: String| {
        node.http
            .get(node.url(&format!("/api/v1/topics/alerts/events{query}")))
            .bearer_auth(token)
            .send()
    };
    // Without an epoch only `since=0` is trusted; the reply names the epoch.
    let first: Value = get("?since=0&limit=1", subscriber())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["events"][0]["offset"], 1);
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let body: Value = get(&format!("?since=2&limit=2&epoch={epoch}"), subscriber())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["topic"], "alerts");
    assert_eq!(body["offset"], 5);
    assert_eq!(body["truncated"], false);
    assert!(body["epoch"].as_str().is_some());
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (&events[0]["offset"], &events[0]["data"]),
        (&json!(3), &json!({"n": 3}))
    );
    assert_eq!(events[1]["offset"], 4);

    assert_eq!(
        get("", token("s", &["other"], &[])).await.unwrap().status(),
        403
    );
    assert_eq!(get("?limit=0", subscriber()).await.unwrap().status(), 400);
    assert_eq!(get("?since=x", subscriber()).await.unwrap().status(), 400);
    let no_token = node
        .http
        .get(node.url("/api/v1/topics/alerts/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
}

/// A node where `ticker.>` topics keep no history.
async fn node_with_tickers_without_history() -> TestNode {
    spawn_node_with(|s| {
        s.topics = vec![TopicRule {
            pattern: "ticker.>".into(),
            history: Some(false),
            max_age: None,
            max_events: None,
            presence: None,
        }];
        // One publisher sends thousands of events at once below.
        s.limits.http_publish_rate = 1_000_000;
    })
    .await
}

#[tokio::test]
async fn topics_without_history_skip_the_store() {
    let node = node_with_tickers_without_history().await;
    let mut ws = node.connect(&subscriber()).await;
    let reply = ws.subscribe("ticker.btc").await;
    assert!(reply.get("epoch").is_none(), "{reply}");
    assert_eq!(
        node.publish_ok(&publisher(), "ticker.btc", &json!(1)).await,
        1
    );
    assert_eq!(offsets(&mut ws, 1).await, [1]);
    let history = node
        .http
        .get(node.url("/api/v1/topics/ticker.btc/events"))
        .bearer_auth(subscriber())
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 404);
    let mut again = node.connect(&subscriber()).await;
    let reply = again
        .subscribe_with(json!({"op": "subscribe", "id": 1, "topic": "ticker.btc", "since": 0}))
        .await;
    assert_eq!(
        reply["truncated"], true,
        "no history: a resume cannot be complete"
    );
}

#[tokio::test]
async fn unwatched_topics_without_history_are_forgotten_and_watched_ones_keep_counting() {
    let node = node_with_tickers_without_history().await;
    let mut ws = node.connect(&subscriber()).await;
    ws.subscribe("ticker.watched").await;
    let (token, zero) = (publisher(), json!(0));
    let publish = |topic: &'static str| node.publish_ok(&token, topic, &zero);
    assert_eq!(publish("ticker.watched").await, 1);
    assert_eq!(publish("ticker.unwatched").await, 1);
    assert_eq!(publish("ticker.unwatched").await, 2);
    // Publishing to ever new topics nobody watches: their numbering must
    // not be kept forever.
    for round in 0..3 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"topic": format!("ticker.once.{round}.{i}"), "data": i}))
            .collect();
        let reply = node.publish_batch(&publisher(), &json!(batch)).await;
        assert_eq!(reply.status(), 201);
    }
    assert_eq!(
        publish("ticker.unwatched").await,
        1,
        "an unwatched topic's numbering was dropped and starts again"
    );
    assert_eq!(
        publish("ticker.watched").await,
        2,
        "a watched topic keeps counting"
    );
    assert_eq!(offsets(&mut ws, 2).await, [1, 2]);
}

fn herald_migrate(store_url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("migrate")
        .env("HERALD__STORE__URL", store_url)
        .current_dir(temp_dir("migrate"))
        .output()
        .unwrap()
}

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_reapply_as_a_no_op() {
    let pg = PgDatabase::create().await;
    let dir = temp_dir("sqlite-migrate");
    let sqlite = format!("sqlite://{}", dir.join("fresh.db").display());
    for url in [pg.url(), sqlite] {
        for _ in 0..2 {
            let out = herald_migrate(&url);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (applied,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied as usize, migrations);
}

#[tokio::test]
async fn a_cluster_with_a_sqlite_store_is_refused_at_start_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .env("HERALD__AUTH__JWT_SECRET", secret())
        .env("HERALD__REDIS__URL", "redis://127.0.0.1:1")
        // Never the default 8080: a developer's own node may hold it.
        .env("HERALD__SERVER__BIND", "127.0.0.1:0")
        .current_dir(temp_dir("cluster-sqlite"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("store.url") && stderr.contains("shared store"),
        "{stderr}"
    );
}

#[tokio::test]
async fn clients_of_a_node_killed_with_sigkill_resume_on_another_node_without_loss() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let env = [
        ("HERALD__REDIS__URL", redis.url()),
        ("HERALD__STORE__URL", pg.url()),
    ];
    let mut doomed = ServeProcess::start("doomed", &env, Stdio::null()).await;
    let survivor = TestNode::clustered(&redis, &pg).await;
    eventually("the doomed node is ready", || async {
        let ready = reqwest::get(doomed.url("/readyz")).await;
        ready.is_ok_and(|r| r.status() == 200)
    })
    .await;

    let mut ws = doomed.connect(&subscriber()).await;
    let epoch = ws.subscribe("alerts").await["epoch"].clone();
    survivor.publish_ok(&publisher(), "alerts", &json!(1)).await;
    assert_eq!(offsets(&mut ws, 1).await, [1]);

    doomed.stop_with("KILL").await;
    for i in 2..=4 {
        survivor.publish_ok(&publisher(), "alerts", &json!(i)).await;
    }
    let mut ws = survivor.connect(&subscriber()).await;
    let reply = resume(&mut ws, "alerts", 1, &epoch).await;
    assert!(reply.get("truncated").is_none(), "{reply}");
    assert_eq!(offsets(&mut ws, 3).await, [2, 3, 4]);
    survivor.publish_ok(&publisher(), "alerts", &json!(5)).await;
    assert_eq!(offsets(&mut ws, 1).await, [5]);
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_node_of_a_postgres_cluster() {
    let cluster = TwoNodes::start().await;
    let (a, b) = (&cluster.a, &cluster.b);
    let mut ws = a.connect(&subscriber()).await;
    let epoch = ws.subscribe("alerts").await["epoch"].clone();
    b.publish_ok(&publisher(), "alerts", &json!(1)).await;
    assert_eq!(offsets(&mut ws, 1).await, [1]);
    drop(ws);
    b.publish_ok(&publisher(), "alerts", &json!(2)).await;
    a.publish_ok(&publisher(), "alerts", &json!(3)).await;
    let mut ws = b.connect(&subscriber()).await;
    resume(&mut ws, "alerts", 1, &epoch).await;
    assert_eq!(offsets(&mut ws, 2).await, [2, 3]);
    a.publish_ok(&publisher(), "alerts", &json!(4)).await;
    assert_eq!(offsets(&mut ws, 1).await, [4]);
    nothing_more(&mut ws).await;
}

/// A single node on each store backend, adjusted by `adjust`; the
/// PostgreSQL database lives as long as the returned guard.
async fn on_each_backend(
    adjust: impl Fn(&mut herald::config::Settings) + Clone,
) -> Vec<(&'static str, TestNode, Option<PgDatabase>)> {
    let pg = PgDatabase::create().await;
    let url = pg.url();
    let sqlite = spawn_node_with(adjust.clone()).await;
    let postgres = spawn_node_with(move |s| {
        adjust(s);
        s.store.url = url.into();
    })
    .await;
    vec![("sqlite", sqlite, None), ("postgres", postgres, Some(pg))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_gap_free_unique_offsets_on_both_backends() {
    const PUBLISHERS: u64 = 8;
    const EACH: u64 = 25;
    for (backend, node, _db) in on_each_backend(|_| {}).await {
        let mut ws = node.connect(&subscriber()).await;
        ws.subscribe("orders").await;
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|_| node.spawn_publisher("orders", EACH))
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_unstable();
        let total = PUBLISHERS * EACH;
        assert_eq!(all, (1..=total).collect::<Vec<_>>(), "{backend}");
        assert_eq!(
            offsets(&mut ws, total as usize).await,
            (1..=total).collect::<Vec<_>>(),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn pruning_keeps_max_events_on_both_backends() {
    let adjust = |s: &mut herald::config::Settings| {
        s.retention.max_events = 3;
        s.retention.prune_interval = std::time::Duration::from_millis(100);
    };
    for (backend, node, _db) in on_each_backend(adjust).await {
        for i in 1..=6 {
            node.publish_ok(&publisher(), "alerts", &json!(i)).await;
        }
        let oldest = || async {
            let body = node
                .get_json("/api/v1/topics/alerts/events?since=0", &subscriber())
                .await;
            body["events"][0]["offset"].as_u64()
        };
        eventually(&format!("{backend} prunes to the newest 3"), || async {
            oldest().await == Some(4)
        })
        .await;
        // The log's offsets go on from where they were.
        assert_eq!(
            node.publish_ok(&publisher(), "alerts", &json!(7)).await,
            7,
            "{backend}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_over_the_same_topics_in_any_order_all_commit_on_both_backends() {
    // Batches listing the same topics in opposite orders once deadlocked
    // PostgreSQL (row locks taken in batch order); found by herald-bench.
    const TASKS: usize = 6;
    const BATCHES: usize = 8;
    for (backend, node, _db) in on_each_backend(|_| {}).await {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (http, url) = (node.http.clone(), node.url("/api/v1/events"));
                tokio::spawn(async move {
                    let (first, second) = if t % 2 == 0 {
                        ("ab.a", "ab.b")
                    } else {
                        ("ab.b", "ab.a")
                    };
                    let mut statuses = Vec::new();
                    for _ in 0..BATCHES {
                        let batch = json!([
                            {"topic": first, "data": 1}, {"topic": second, "data": 2},
                            {"topic": first, "data": 3}, {"topic": second, "data": 4},
                        ]);
                        let response = http.post(&url).bearer_auth(publisher()).json(&batch).send();
                        statuses.push(response.await.unwrap().status().as_u16());
                    }
                    statuses
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().iter().all(|&s| s == 201), "{backend}");
        }
        for topic in ["ab.a", "ab.b"] {
            let path = format!("/api/v1/topics/{topic}/events?limit=1000");
            let history = node.get_json(&path, &subscriber()).await;
            let total = (TASKS * BATCHES * 2) as u64;
            assert_eq!(
                column(&history, "offset"),
                (1..=total).collect::<Vec<_>>(),
                "{backend} {topic}"
            );
            // Each batch's two events of a topic got consecutive offsets,
            // in the batch's order: 1 then 3, or 2 then 4.
            let data = column(&history, "data");
            for pair in data.chunks(2) {
                assert!(
                    pair == [1, 3] || pair == [2, 4],
                    "{backend} {topic}: {data:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_batch_repeating_an_idempotency_key_publishes_it_once_on_both_backends() {
    for (backend, node, _db) in on_each_backend(|_| {}).await {
        let mut ws = node.connect(&subscriber()).await;
        ws.subscribe("orders").await;
        let batch = json!([
            {"topic": "orders", "data": 1, "key": "k1"},
            {"topic": "orders", "data": 2},
            {"topic": "orders", "data": 3, "key": "k1"},
            {"topic": "other", "data": 4, "key": "k1"},
        ]);
        let post = || {
            node.http
                .post(node.url("/api/v1/events"))
                .bearer_auth(publisher())
                .json(&batch)
                .send()
        };
        let first: Value = post().await.unwrap().json().await.unwrap();
        assert_eq!(first["offsets"], json!([1, 2, 1, 1]), "{backend}");
        let again: Value = post().await.unwrap().json().await.unwrap();
        // Keys dedupe; the keyless event is published again.
        assert_eq!(again["offsets"], json!([1, 3, 1, 1]), "{backend}");
        assert_eq!(offsets(&mut ws, 3).await, [1, 2, 3], "{backend}");
        nothing_more(&mut ws).await;
    }
}

#[tokio::test]
async fn an_epoch_given_before_the_first_publish_is_the_log_s_epoch_on_both_backends() {
    // Subscribing to a topic never published to writes nothing, yet its
    // epoch already is the one its log will have, so a resume is trusted.
    for (backend, node, _db) in on_each_backend(|_| {}).await {
        let mut early = node.connect(&subscriber()).await;
        let reply = early.subscribe("fresh").await;
        assert_eq!(reply["offset"], 0, "{backend}");
        let epoch = reply["epoch"].clone();
        assert!(epoch.as_str().is_some_and(|e| !e.is_empty()), "{backend}");
        for n in 1..=2 {
            node.publish_ok(&publisher(), "fresh", &json!(n)).await;
        }
        assert_eq!(offsets(&mut early, 2).await, [1, 2], "{backend}");
        let mut later = node.connect(&subscriber()).await;
        let resumed = resume(&mut later, "fresh", 1, &epoch).await;
        assert!(resumed.get("truncated").is_none(), "{backend}: {resumed}");
        assert_eq!(resumed["epoch"], epoch, "{backend}");
        assert_eq!(offsets(&mut later, 1).await, [2], "{backend}");
    }
}

#[tokio::test]
async fn heads_of_many_topics_are_read_in_one_go_on_both_backends() {
    use herald::payload::Payload;
    use herald::store::{NewEvent, Store};
    use herald::topic::Topic;

    let pg = PgDatabase::create().await;
    let dir = temp_dir("last-offsets");
    let sqlite = format!("sqlite://{}", dir.join("herald.db").display());
    for url in [sqlite, pg.url()] {
        let store = Store::open(&url.clone().into()).await.unwrap();
        let topic = |name: &str| Topic::parse(name).unwrap();
        let events: Vec<NewEvent> = [("a", 3), ("b", 1), ("c", 5)]
            .iter()
            .flat_map(|&(name, n)| {
                (0..n).map(move |_| NewEvent {
                    topic: topic(name),
                    payload: Payload::Binary(bytes::Bytes::from_static(b"x")),
                    key: None,
                })
            })
            .collect();
        store.append(&events, 1).await.unwrap();
        // More topics than one statement takes, most never published to.
        let mut names: Vec<String> = (0..1200).map(|i| format!("never.{i}")).collect();
        names.insert(600, "c".into());
        names.insert(0, "a".into());
        names.push("b".into());
        let topics: Vec<Topic> = names.iter().map(|n| topic(n)).collect();
        let refs: Vec<&Topic> = topics.iter().collect();
        let last: Vec<u64> = store
            .heads(&refs)
            .await
            .unwrap()
            .iter()
            .map(|h| h.last)
            .collect();
        assert_eq!(last.len(), topics.len(), "{url}");
        for (name, last) in names.iter().zip(&last) {
            let expected = match name.as_str() {
                "a" => 3,
                "b" => 1,
                "c" => 5,
                _ => 0,
            };
            assert_eq!(*last, expected, "{url}: {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_subscribing_at_once_each_get_their_own_topic_s_head_on_both_backends() {
    const TOPICS: u64 = 30;
    for (backend, node, _db) in on_each_backend(|_| {}).await {
        // Topic `heads.k` holds k events (none for k = 0).
        for k in 1..TOPICS {
            let batch: Vec<Value> = (0..k)
                .map(|n| json!({"topic": format!("heads.{k}"), "data": n}))
                .collect();
            let reply = node.publish_batch(&publisher(), &json!(batch)).await;
            assert_eq!(reply.status(), 201, "{backend}");
        }
        let subscribes = (0..TOPICS).map(|k| {
            let node = &node;
            async move {
                let mut ws = node.connect(&subscriber()).await;
                let reply = ws.subscribe(&format!("heads.{k}")).await;
                (k, reply)
            }
        });
        let replies = futures_util::future::join_all(subscribes).await;
        let epochs: HashSet<String> = replies
            .iter()
            .map(|(_, r)| r["epoch"].as_str().unwrap().to_owned())
            .collect();
        for (k, reply) in &replies {
            assert_eq!(reply["offset"], *k, "{backend}: {reply}");
        }
        assert_eq!(
            epochs.len(),
            1,
            "{backend}: one store, one epoch: {epochs:?}"
        );
    }
}

/// The value of an unlabelled series in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_publishes_arriving_together_commit_together_with_gap_free_offsets() {
    // Its own process: /metrics then counts this node's commits only.
    let pg = PgDatabase::create().await;
    let node = ServeProcess::start(
        "group-commit",
        &[("HERALD__STORE__URL", pg.url())],
        std::process::Stdio::null(),
    )
    .await;
    const TOPICS: usize = 4;
    const EACH: usize = 50;
    let http = reqwest::Client::new();
    let publishes = (0..TOPICS * EACH).map(|i| {
        let (http, url) = (
            http.clone(),
            node.url(&format!("/api/v1/topics/hot.{}/events", i % TOPICS)),
        );
        async move {
            let res = http
                .post(url)
                .bearer_auth(publisher())
                .json(&json!({ "i": i }))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            let body: Value = res.json().await.unwrap();
            (i % TOPICS, body["offset"].as_u64().unwrap())
        }
    });
    let mut offsets = vec![Vec::new(); TOPICS];
    for (topic, offset) in futures_util::future::join_all(publishes).await {
        offsets[topic].push(offset);
    }
    for mut topic in offsets {
        topic.sort_unstable();
        assert_eq!(topic, (1..=EACH as u64).collect::<Vec<_>>());
    }
    let text = get_text(&http, node.url("/metrics")).await;
    let events = metric(&text, "herald_store_commit_group_events_sum");
    let commits = metric(&text, "herald_store_commit_group_events_count");
    assert_eq!(events, (TOPICS * EACH) as f64);
    assert!(
        commits < events,
        "{commits} commits for {events} concurrent publishes: none were grouped"
    );
}

#[tokio::test]
async fn a_repeated_subscribe_that_fails_keeps_the_subscription_it_had() {
    use sqlx::Connection as _;
    let node = spawn_node().await;
    let mut ws = node.connect(&subscriber()).await;
    assert_eq!(ws.subscribe("kept").await["offset"], 0);
    // The next head read fails: the store's topics table is away.
    let url = format!("sqlite://{}", node.sqlite_path().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mut rename = async |from: &str, to: &str| {
        let sql = format!("ALTER TABLE {from} RENAME TO {to}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut db)
            .await
            .unwrap();
    };
    rename("herald_topics", "herald_topics_away").await;
    let reply = ws
        .request(json!({"op": "subscribe", "id": 2, "topic": "kept"}))
        .await;
    assert_eq!(
        (&reply["op"], &reply["code"]),
        (&json!("error"), &json!("unavailable")),
        "{reply}"
    );
    rename("herald_topics_away", "herald_topics").await;
    // The subscription held before the failed repeat still delivers.
    node.publish_ok(&publisher(), "kept", &json!("still here"))
        .await;
    let event = ws.recv().await;
    assert_eq!(
        (&event["offset"], &event["data"]),
        (&json!(1), &json!("still here"))
    );
}

#[tokio::test]
async fn publishing_recovers_by_itself_when_the_database_closes_the_node_s_connections() {
    // As after a PostgreSQL restart or failover: every pooled connection
    // is closed under the node.
    let pg = PgDatabase::create().await;
    let url = pg.url();
    let node = spawn_node_with(move |s| s.store.url = url.into()).await;
    let p = publisher();
    let publish = |n: u64| {
        node.http
            .post(node.url("/api/v1/topics/recovering/events"))
            .bearer_auth(&p)
            .json(&json!(n))
            .send()
    };
    for n in 1..=3 {
        assert_eq!(publish(n).await.unwrap().status(), 201);
    }

    // A connection idle for a second or more is checked before use: after
    // a quiet second, not one request fails.
    pg.terminate_connections().await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(publish(4).await.unwrap().status(), 201);

    // Right away, a request may meet a closed connection (503, retry);
    // each such connection is replaced, so at most the pool's size fail.
    pg.terminate_connections().await;
    let mut published = vec![1, 2, 3, 4];
    let mut failed = 0;
    for n in 5..=20 {
        match publish(n).await.unwrap().status().as_u16() {
            201 => published.push(n),
            503 => failed += 1,
            other => panic!("publish answered {other}"),
        }
    }
    assert!(failed <= 8, "{failed} of 16 requests failed");
    for n in 21..=25 {
        assert_eq!(publish(n).await.unwrap().status(), 201);
        published.push(n);
    }
    let history = node
        .get_json("/api/v1/topics/recovering/events", &subscriber())
        .await;
    assert_eq!(column(&history, "data"), published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_chosen_as_a_deadlock_s_victim_is_retried_and_answers_201() {
    use sqlx::Connection as _;
    let pg = PgDatabase::create().await;
    let url = pg.url();
    let node = spawn_node_with({
        let url = url.clone();
        move |s| s.store.url = url.into()
    })
    .await;
    let p = publisher();
    node.publish_ok(&p, "dl.a", &json!(0)).await;
    node.publish_ok(&p, "dl.b", &json!(0)).await;

    // Another writer (as a pruning pass can be) holds dl.b's row...
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let lock = "UPDATE herald_topics SET last_seq = last_seq WHERE topic = $1";
    sqlx::query(lock)
        .bind("dl.b")
        .execute(&mut other)
        .await
        .unwrap();
    // ...while a batch takes dl.a's and waits for dl.b's.
    let batch = {
        let (http, url) = (node.http.clone(), node.url("/api/v1/events"));
        tokio::spawn(async move {
            let events = json!([{"topic": "dl.a", "data": 1}, {"topic": "dl.b", "data": 1}]);
            let response = http.post(url).bearer_auth(publisher()).json(&events).send();
            response.await.unwrap().status().as_u16()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Now the other writer wants dl.a: a deadlock. The batch's statement,
    // waiting longer, finds it first and is aborted (40P01).
    sqlx::query(lock)
        .bind("dl.a")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();

    assert_eq!(batch.await.unwrap(), 201);
    for topic in ["dl.a", "dl.b"] {
        let path = format!("/api/v1/topics/{topic}/events");
        let history = node.get_json(&path, &subscriber()).await;
        assert_eq!(column(&history, "offset"), [1, 2], "{topic}");
    }
}
