//! Cluster mode on a Redis Cluster (`redis.mode = "cluster"`): topics
//! travel on shard channels spread over the masters, and nothing
//! acknowledged is lost, duplicated or reordered through a failover, a
//! slot migration or a node restart. Each test starts its own six-process
//! Redis Cluster on free ports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald::config::{RedisMode, TopicRule};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::helpers::{
    PgDatabase, RedisCluster, ServeProcess, TestNode, WsClient, eventually, spawn_node_with, token,
};

fn subscriber() -> String {
    token("sub", &[">"], &[])
}

fn publisher() -> String {
    token("pub", &[], &[">"])
}

/// The shard channel of `topic` (default prefix).
fn channel(topic: &str) -> String {
    format!("herald:topic:{{{topic}}}")
}

/// Topics under `live.` keep no history.
fn cluster_settings(
    cluster: &RedisCluster,
    pg: &PgDatabase,
) -> impl FnOnce(&mut herald::config::Settings) {
    let (redis_url, store_url) = (cluster.url(), pg.url());
    move |s| {
        s.redis.mode = RedisMode::Cluster;
        s.redis.url = Some(redis_url.into());
        s.store.url = store_url.into();
        s.topics = vec![TopicRule {
            pattern: "live.>".into(),
            history: Some(false),
            max_age: None,
            max_events: None,
            presence: None,
        }];
    }
}

async fn node_on(cluster: &RedisCluster, pg: &PgDatabase) -> TestNode {
    let node = spawn_node_with(cluster_settings(cluster, pg)).await;
    node.wait_ready().await;
    node
}

/// A client of `node` subscribed to every topic of `topics`.
async fn watching(node_ws: WsClient, topics: &[String]) -> WsClient {
    let mut ws = node_ws;
    for topic in topics {
        ws.subscribe(topic).await;
    }
    ws
}

/// Offsets each topic's events arrived with, read from `ws` until every
/// topic of `expected` reached its last acknowledged offset (topics with
/// history; topics without history too when `live_complete`, i.e. when no
/// failover may lose one) and nothing more arrives for a moment.
async fn received(
    ws: &mut WsClient,
    expected: &BTreeMap<String, Vec<u64>>,
    live_complete: bool,
) -> BTreeMap<String, Vec<u64>> {
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let done = |got: &BTreeMap<String, Vec<u64>>| {
        expected.iter().all(|(topic, offsets)| {
            (!live_complete && topic.starts_with("live."))
                || offsets
                    .last()
                    .is_none_or(|last| got.get(topic).is_some_and(|o| o.contains(last)))
        })
    };
    while !done(&got) {
        let Ok(frame) = tokio::time::timeout(Duration::from_secs(4), ws.recv()).await else {
            panic!("events stopped coming: got {got:?}, acknowledged {expected:?}");
        };
        if frame["op"] == "subscribed" {
            continue;
        }
        assert_eq!(frame["op"], "event", "{frame}");
        let topic = frame["topic"].as_str().unwrap().to_owned();
        got.entry(topic)
            .or_default()
            .push(frame["offset"].as_u64().unwrap());
    }
    // Anything late (a duplicate) shows up within a ping's round trip.
    loop {
        let frame = ws.request(json!({"op": "ping"})).await;
        if frame["op"] == "pong" {
            break;
        }
        let topic = frame["topic"].as_str().unwrap().to_owned();
        got.entry(topic)
            .or_default()
            .push(frame["offset"].as_u64().unwrap());
    }
    got
}

/// Every acknowledged event of a topic with history arrived once, in
/// order, and nothing else; a topic without history lost at most some
/// (at-most-once) and duplicated or reordered none.
fn assert_exact(who: &str, got: &BTreeMap<String, Vec<u64>>, acked: &BTreeMap<String, Vec<u64>>) {
    for (topic, offsets) in acked {
        let seen = got.get(topic).cloned().unwrap_or_default();
        if topic.starts_with("live.") {
            assert!(
                seen.windows(2).all(|w| w[0] != w[1]) && seen.iter().all(|o| offsets.contains(o)),
                "{who}: {topic} got {seen:?}, acknowledged {offsets:?}"
            );
        } else {
            assert_eq!(&seen, offsets, "{who}: {topic}");
        }
    }
}

/// What a steady publisher saw: per topic, the acknowledged offsets in
/// order; and each answer with when it came.
#[derive(Default)]
struct Load {
    acked: BTreeMap<String, Vec<u64>>,
    answers: Vec<(Instant, String, u16)>,
}

/// Publishes round-robin over `topics` through `url_of` until `stop` (at
/// most `MAX_ROUNDS` rounds), one publish at a time with a short pause
/// after each round. Accepts 201 and 503 (nothing published), nothing
/// else.
fn spawn_load(
    http: reqwest::Client,
    base: String,
    topics: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    const MAX_ROUNDS: usize = 2_000;
    tokio::spawn(async move {
        let mut load = Load::default();
        for round in 0..MAX_ROUNDS {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            for topic in &topics {
                let response = http
                    .post(format!("{base}/api/v1/topics/{topic}/events"))
                    .bearer_auth(publisher())
                    .json(&json!({"round": round}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                load.answers.push((Instant::now(), topic.clone(), status));
                match status {
                    201 => {
                        let body: Value = response.json().await.unwrap();
                        let offset = body["offset"].as_u64().unwrap();
                        load.acked.entry(topic.clone()).or_default().push(offset);
                    }
                    503 => {}
                    other => panic!("unexpected status {other} for {topic}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        load
    })
}

/// Topics named `{stem}{k}`, as many as it takes for every master to own
/// at least `per_master` of them; with `live.` stems for some.
async fn topics_over_masters(cluster: &RedisCluster, stem: &str, per_master: usize) -> Vec<String> {
    let masters = cluster.masters().await;
    let mut owned: HashMap<u16, usize> = HashMap::new();
    let mut topics = Vec::new();
    for k in 0.. {
        if masters
            .iter()
            .all(|m| owned.get(m).copied().unwrap_or(0) >= per_master)
        {
            break;
        }
        let topic = format!("{stem}{k}");
        let master = cluster.master_of(&channel(&topic)).await;
        if owned.get(&master).copied().unwrap_or(0) < per_master {
            *owned.entry(master).or_default() += 1;
            topics.push(topic);
        }
    }
    topics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_nodes_on_shard_channels_spread_over_every_master() {
    let cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let (a, b) = (node_on(&cluster, &pg).await, node_on(&cluster, &pg).await);
    let mut topics: Vec<String> = (0..30).map(|k| format!("spread.t{k}")).collect();
    topics.extend((0..6).map(|k| format!("live.t{k}")));
    let mut on_a = watching(a.connect(&subscriber()).await, &topics).await;
    let mut on_b = watching(b.connect(&subscriber()).await, &topics).await;

    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (k, topic) in topics.iter().enumerate() {
        let from = if k % 2 == 0 { &a } else { &b };
        for _ in 0..2 {
            let offset = from.publish_ok(&publisher(), topic, &json!({"k": k})).await;
            acked.entry(topic.clone()).or_default().push(offset);
        }
    }
    for (who, ws) in [("a", &mut on_a), ("b", &mut on_b)] {
        // Topics without history lose nothing while the cluster is
        // healthy: waited for like the others (their events were published
        // last, and may still be on their way through Redis when the
        // others are in).
        let got = received(ws, &acked, true).await;
        assert_eq!(got, acked, "{who}");
    }

    // Every master holds some of the shard channels, each subscribed once
    // by each node; no master holds another's.
    let mut seen = 0;
    for master in cluster.masters().await {
        let channels: Vec<String> = cluster
            .query(master, redis::cmd("PUBSUB").arg("SHARDCHANNELS"))
            .await;
        assert!(!channels.is_empty(), "master {master} holds no channel");
        for name in &channels {
            assert_eq!(cluster.master_of(name).await, master, "{name}");
        }
        let counts: Vec<(String, u64)> = cluster
            .query(
                master,
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channels),
            )
            .await;
        assert!(counts.iter().all(|(_, n)| *n == 2), "{counts:?}");
        seen += channels.len();
    }
    assert_eq!(seen, topics.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_duplicates_and_reorders_nothing_acknowledged() {
    let mut cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let (a, b) = (node_on(&cluster, &pg).await, node_on(&cluster, &pg).await);
    let mut topics = topics_over_masters(&cluster, "failover.t", 3).await;
    topics.extend(topics_over_masters(&cluster, "live.f", 1).await);
    let mut on_a = watching(a.connect(&subscriber()).await, &topics).await;
    let mut on_b = watching(b.connect(&subscriber()).await, &topics).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(b.http.clone(), b.url(""), topics.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cluster.master_of(&channel(&topics[0])).await;
    let mut on_victim = Vec::new();
    for topic in &topics {
        if cluster.master_of(&channel(topic)).await == victim {
            on_victim.push(topic.clone());
        }
    }
    let killed_at = Instant::now();
    cluster.kill(victim);

    // Its replica takes over; both nodes follow by themselves.
    // Until it is back, node B cannot subscribe the dead master's topics:
    // it says so on /readyz.
    let mut unready = false;
    while killed_at.elapsed() < Duration::from_secs(30) {
        unready |= b.readyz().await == 503;
        let masters = cluster.masters().await;
        if masters.len() == 3 && !masters.contains(&victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_failover(victim).await;
    assert!(
        unready,
        "node B answered /readyz 503 while the master was away"
    );
    cluster.wait_healthy().await;
    a.wait_ready().await;
    b.wait_ready().await;
    // The dead master comes back, as a replica of its successor.
    cluster.restart(victim).await;
    cluster.wait_healthy().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();

    // While the master was away, some of its topics' publishes answered
    // 503 (at least those without history: their script cannot run), and
    // every publish to another master's topic went on.
    let after: Vec<&(Instant, String, u16)> = load
        .answers
        .iter()
        .filter(|(at, _, _)| *at > killed_at)
        .collect();
    assert!(
        after
            .iter()
            .any(|(_, topic, status)| *status == 503 && on_victim.contains(topic)),
        "publishes to the dead master's topics answered 503: {after:?}"
    );
    assert!(
        after
            .iter()
            .all(|(_, topic, status)| *status == 201 || on_victim.contains(topic)),
        "publishes to other masters' topics went on: {after:?}"
    );

    // Delivery resumed with no client action, and every acknowledged event
    // of a topic with history arrived once, in order.
    for topic in &topics {
        assert!(
            load.acked.get(topic).is_some_and(|o| o.len() > 2),
            "{topic} was published to after the failover"
        );
    }
    for (who, ws) in [("a", &mut on_a), ("b", &mut on_b)] {
        let got = received(ws, &load.acked, false).await;
        assert_exact(who, &got, &load.acked);
    }
}

/// Moves `slot` from master `from` to master `to` the way `redis-cli
/// --cluster reshard` does: importing / migrating, its keys, then the
/// owner everywhere.
async fn move_slot(cluster: &RedisCluster, slot: u16, from: u16, to: u16) {
    let ids: HashMap<u16, String> = cluster
        .nodes()
        .await
        .into_iter()
        .map(|(p, id, _)| (p, id))
        .collect();
    let setslot = |state: &str, node: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
        cmd
    };
    let _: () = cluster.query(to, &setslot("IMPORTING", &ids[&from])).await;
    let _: () = cluster.query(from, &setslot("MIGRATING", &ids[&to])).await;
    let keys: Vec<String> = cluster
        .query(
            from,
            redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100),
        )
        .await;
    if !keys.is_empty() {
        let _: () = cluster
            .query(
                from,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            )
            .await;
    }
    for master in cluster.masters().await {
        let _: () = cluster.query(master, &setslot("NODE", &ids[&to])).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_under_load_loses_duplicates_and_reorders_nothing() {
    let cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let (a, b) = (node_on(&cluster, &pg).await, node_on(&cluster, &pg).await);
    let mut topics = topics_over_masters(&cluster, "reshard.t", 2).await;
    topics.push("live.moving".into());
    let mut on_a = watching(a.connect(&subscriber()).await, &topics).await;
    let mut on_b = watching(b.connect(&subscriber()).await, &topics).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(a.http.clone(), a.url(""), topics.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for moving in [&topics[0], topics.last().unwrap()] {
        let name = channel(moving);
        let slot = cluster.slot_of(&name).await;
        let from = cluster.master_of(&name).await;
        let to = *cluster
            .masters()
            .await
            .iter()
            .find(|m| **m != from)
            .unwrap();
        move_slot(&cluster, slot, from, to).await;
        // Both nodes' subscriptions follow the slot to its new master.
        eventually(
            "the moved topic's channel is subscribed on its new master",
            || async { cluster.shard_subscribers(to, &name).await == 2 },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();
    for (who, ws) in [("a", &mut on_a), ("b", &mut on_b)] {
        let got = received(ws, &load.acked, false).await;
        assert_exact(who, &got, &load.acked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_during_a_failover_serves_every_acknowledged_event() {
    let mut cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let a = node_on(&cluster, &pg).await;
    let env = [
        ("HERALD__REDIS__MODE", "cluster".to_owned()),
        ("HERALD__REDIS__URL", cluster.url()),
        ("HERALD__STORE__URL", pg.url()),
    ];
    let mut b = ServeProcess::start("sharded-restart", &env, std::process::Stdio::null()).await;
    let topics = topics_over_masters(&cluster, "restart.t", 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(a.http.clone(), a.url(""), topics.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = cluster.master_of(&channel(&topics[0])).await;
    let killed_at = Instant::now();
    cluster.kill(victim);
    // The Herald node dies and comes back while the cluster fails over.
    b.stop_with("KILL").await;
    b.restart().await;
    b.wait_ready().await;
    assert!(
        cluster.masters().await.len() < 3 || killed_at.elapsed() < Duration::from_secs(2),
        "the node came back before the failover ended"
    );
    // A client subscribes from the start of each topic while the dead
    // master's topics cannot be subscribed yet: replay, then live, with
    // no seam, once the replica took over.
    let mut on_b = b.connect(&subscriber()).await;
    for topic in &topics {
        on_b.send(json!({"op": "subscribe", "topic": topic, "since": 0}))
            .await;
    }
    cluster.wait_failover(victim).await;
    cluster.wait_healthy().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.unwrap();
    // The node holds each channel on the master that owns it now.
    for topic in &topics {
        let name = channel(topic);
        let master = cluster.master_of(&name).await;
        eventually("the channel is subscribed on its master", || async {
            cluster.shard_subscribers(master, &name).await == 1
        })
        .await;
    }
    let got = received(&mut on_b, &load.acked, false).await;
    assert_exact("b", &got, &load.acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_churn_on_a_healthy_cluster_is_not_taken_for_a_failure() {
    let cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let env = [
        ("HERALD__REDIS__MODE", "cluster".to_owned()),
        ("HERALD__REDIS__URL", cluster.url()),
        ("HERALD__STORE__URL", pg.url()),
        ("HERALD__LIMITS__SUBSCRIBE_RATE", "100000".to_owned()),
    ];
    let node = ServeProcess::start("sharded-churn", &env, std::process::Stdio::null()).await;
    node.wait_ready().await;
    let http = reqwest::Client::new();
    let mut ws = node.connect(&subscriber()).await;
    for round in 0..3 {
        for k in 0..20 {
            ws.subscribe(&format!("churn.t{k}")).await;
        }
        for k in 0..20 {
            let reply = ws
                .request(json!({"op": "unsubscribe", "id": round, "topic": format!("churn.t{k}")}))
                .await;
            assert_eq!(reply["op"], "unsubscribed", "{reply}");
        }
    }
    // Events still flow, and the relay never thought it had lost Redis.
    ws.subscribe("churn.t0").await;
    let published = http
        .post(node.url("/api/v1/topics/churn.t0/events"))
        .bearer_auth(publisher())
        .json(&json!("after churn"))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    assert_eq!(ws.recv().await["data"], "after churn");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let metrics = http
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let reconnects = metrics
        .lines()
        .find(|l| l.starts_with("herald_relay_reconnects_total"))
        .unwrap_or_else(|| panic!("no reconnect counter in {metrics}"));
    assert!(reconnects.ends_with(" 0"), "{reconnects}");
    let ready = http.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_their_master_is_away_arrive_with_no_later_event() {
    let mut cluster = RedisCluster::start().await;
    let pg = PgDatabase::create().await;
    let (a, b) = (node_on(&cluster, &pg).await, node_on(&cluster, &pg).await);
    let topic = "quiet.t0";
    let mut on_b = watching(b.connect(&subscriber()).await, &[topic.to_owned()]).await;
    let mut acked = vec![a.publish_ok(&publisher(), topic, &json!(0)).await];
    assert_eq!(on_b.recv().await["offset"], acked[0]);

    // Publish through the failover, then stop as soon as the replica took
    // over: the last events were committed while their master was away,
    // and no event follows them.
    let victim = cluster.master_of(&channel(topic)).await;
    cluster.kill(victim);
    loop {
        let response = a.publish(&publisher(), topic, &json!(acked.len())).await;
        match response.status().as_u16() {
            201 => {
                let body: Value = response.json().await.unwrap();
                acked.push(body["offset"].as_u64().unwrap());
            }
            503 => {}
            other => panic!("unexpected status {other}"),
        }
        let masters = cluster.masters().await;
        if masters.len() == 3 && !masters.contains(&victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(acked.len() < 600, "no failover");
    }
    let expected: BTreeMap<String, Vec<u64>> = [(topic.to_owned(), acked[1..].to_vec())].into();
    let got = received(&mut on_b, &expected, false).await;
    assert_exact("b", &got, &expected);
}
