//! Presence: who is in a topic, on one node and across a cluster, through
//! crashes, restarts and Redis going away.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use herald::config::Settings;
use serde_json::{Value, json};

use crate::helpers::{
    PgDatabase, RedisServer, ServeProcess, TestNode, WsClient, claims_token, eventually, now,
    spawn_node_with, token, with_presence,
};

/// A token for `sub` on `room.>`, with `presence_info` when given.
fn member_token(sub: &str, info: Option<Value>) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 3600, "topics": ["room.>"]});
    if let Some(info) = info {
        claims["presence_info"] = info;
    }
    claims_token(claims)
}

/// Joins `topic`'s presence on `node` as `sub`.
async fn join(node: &TestNode, sub: &str, topic: &str) -> WsClient {
    enter(node.connect(&member_token(sub, None)).await, topic).await
}

/// Joins `topic`'s presence on a node process as `sub`.
async fn join_process(node: &ServeProcess, sub: &str, topic: &str) -> WsClient {
    enter(node.connect(&member_token(sub, None)).await, topic).await
}

/// Subscribes `client` to `topic` with `"presence": true`.
async fn enter(mut client: WsClient, topic: &str) -> WsClient {
    client
        .subscribe_with(json!({"op": "subscribe", "id": 1, "topic": topic, "presence": true}))
        .await;
    client
}

/// Sends `request` and returns its reply, keeping the `presence_diff`s
/// (and `presence_resync`s) that came before it in `diffs`.
async fn ask(client: &mut WsClient, request: Value, diffs: &mut Vec<Value>) -> Value {
    client.send(request).await;
    loop {
        let frame = client.recv().await;
        if frame["op"] == "presence_diff" || frame["op"] == "presence_resync" {
            diffs.push(frame);
        } else {
            return frame;
        }
    }
}

/// The first `presence_diff` with a leave; the join-only diffs before it
/// (a join's diff may come after a reply sent later) are skipped.
async fn first_leave(client: &mut WsClient) -> Value {
    loop {
        let diff = next_diff(client).await;
        if diff["leaves"] != json!([]) {
            return diff;
        }
    }
}

/// The next `presence_diff`.
async fn next_diff(client: &mut WsClient) -> Value {
    let frame = client.recv().await;
    assert_eq!(frame["op"], "presence_diff", "{frame}");
    frame
}

fn subs(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["sub"].as_str().unwrap())
        .collect()
}

/// What a client knows of a topic's presence, built as docs/protocol.md
/// says: a `sub`'s state is that of the latest (by `seq`) of the page that
/// covers it and the diffs that name it.
#[derive(Default)]
struct View {
    epoch: Option<String>,
    /// Per `sub`: present or not, and the `seq` that said so.
    known: BTreeMap<String, (bool, u64)>,
}

impl View {
    fn see(&mut self, sub: &str, present: bool, seq: u64) {
        let entry = self.known.entry(sub.to_owned()).or_insert((false, 0));
        if seq > entry.1 {
            *entry = (present, seq);
        }
    }

    fn diff(&mut self, diff: &Value) {
        assert_eq!(diff["epoch"].as_str(), self.epoch.as_deref(), "{diff}");
        let seq = diff["seq"].as_u64().unwrap();
        for sub in subs(&diff["joins"]) {
            self.see(sub, true, seq);
        }
        for sub in subs(&diff["leaves"]) {
            self.see(sub, false, seq);
        }
    }

    /// A page that started after `after`.
    fn page(&mut self, page: &Value, after: Option<&str>) {
        let epoch = page["epoch"].as_str().unwrap();
        assert_eq!(*self.epoch.get_or_insert(epoch.to_owned()), epoch);
        let seq = page["seq"].as_u64().unwrap();
        let members = subs(&page["members"]);
        // The page covers the subs after `after`, up to its last one (or
        // to the end, on the last page).
        let last = page["cursor"].is_string().then(|| *members.last().unwrap());
        let covered = |sub: &str| after.is_none_or(|a| sub > a) && last.is_none_or(|l| sub <= l);
        let absent: Vec<String> = self
            .known
            .keys()
            .filter(|sub| covered(sub) && !members.contains(&sub.as_str()))
            .cloned()
            .collect();
        for sub in absent {
            self.see(&sub, false, seq);
        }
        for sub in members {
            self.see(sub, true, seq);
        }
    }

    fn members(&self) -> BTreeSet<String> {
        self.known
            .iter()
            .filter(|(_, (present, _))| *present)
            .map(|(sub, _)| sub.clone())
            .collect()
    }
}

/// Takes every page of `topic`'s presence through `client`, `limit` at a
/// time, into `view`, applying the diffs that arrive meanwhile.
async fn snapshot(client: &mut WsClient, topic: &str, limit: u64, view: &mut View) {
    // The cursor, and the last member before it: a page covers the subs
    // after that one (cursors are opaque; the client remembers).
    let mut cursor: Option<(String, String)> = None;
    loop {
        let mut diffs = Vec::new();
        let mut request = json!({"op": "presence", "id": 9, "topic": topic, "limit": limit});
        if let Some((c, _)) = &cursor {
            request["cursor"] = json!(c);
        }
        let page = ask(client, request, &mut diffs).await;
        assert_eq!(page["op"], "presence", "{page}");
        if view.epoch.is_none() {
            view.epoch = page["epoch"].as_str().map(str::to_owned);
        }
        for diff in &diffs {
            view.diff(diff);
        }
        view.page(&page, cursor.as_ref().map(|(_, after)| after.as_str()));
        match page["cursor"].as_str() {
            Some(next) => {
                let last = subs(&page["members"]).last().unwrap().to_string();
                cursor = Some((next.to_owned(), last));
            }
            None => return,
        }
    }
}

#[tokio::test]
async fn members_join_and_leave_once_per_user_and_pages_list_them_on_one_node() {
    let node = spawn_node_with(with_presence).await;
    let mut watcher = join(&node, "watcher", "room.a").await;
    let first = next_diff(&mut watcher).await;
    assert_eq!(subs(&first["joins"]), ["watcher"]);
    assert_eq!(first["topic"], "room.a");

    let ada_info = json!({"name": "Ada", "avatar": "https://example.com/ada.png"});
    let ada = enter(
        node.connect(&member_token("ada", Some(ada_info.clone())))
            .await,
        "room.a",
    )
    .await;
    let joined = next_diff(&mut watcher).await;
    assert_eq!(joined["joins"], json!([{"sub": "ada", "info": ada_info}]));
    assert_eq!(joined["leaves"], json!([]));
    assert_eq!(
        joined["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1
    );

    // Ada's second connection: still one member, nothing to tell.
    let mut ada_again = join(&node, "ada", "room.a").await;
    let mut diffs = Vec::new();
    let page = ask(
        &mut watcher,
        json!({"op": "presence", "id": 2, "topic": "room.a"}),
        &mut diffs,
    )
    .await;
    assert_eq!(page["count"], 2, "{page}");
    assert_eq!(
        page["members"],
        json!([{"sub": "ada", "info": ada_info}, {"sub": "watcher"}])
    );
    assert_eq!(page["cursor"], Value::Null);
    assert_eq!(page["id"], 2);
    assert_eq!(page["seq"], joined["seq"]);

    // Her first connection goes: she is still in.
    drop(ada);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let count = ask(
        &mut watcher,
        json!({"op": "presence", "topic": "room.a", "count_only": true}),
        &mut diffs,
    )
    .await;
    assert_eq!(count["count"], 2, "{count}");
    assert!(count.get("members").is_none(), "{count}");
    assert!(diffs.is_empty(), "{diffs:?}");

    // Her last one unsubscribes: she leaves, once.
    let reply = ask(
        &mut ada_again,
        json!({"op": "unsubscribe", "topic": "room.a"}),
        &mut Vec::new(),
    )
    .await;
    assert_eq!(reply["op"], "unsubscribed");
    let left = next_diff(&mut watcher).await;
    assert_eq!(left["joins"], json!([]));
    assert_eq!(left["leaves"], json!([{"sub": "ada"}]));

    // HTTP gives the same pages, a member at a time here.
    let auth = format!("Bearer {}", member_token("reader", None));
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: Value = node
            .http
            .get(node.url(&format!(
                "/api/v1/topics/room.a/presence?limit=1&cursor={cursor}"
            )))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["topic"], "room.a");
        assert_eq!(page["count"], 1);
        seen.extend(subs(&page["members"]).into_iter().map(str::to_owned));
        match page["cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ["watcher"]);

    // MessagePack connections get the same page.
    let mut packed = node.connect_msgpack(&member_token("packed", None)).await;
    let page = packed
        .request(json!({"op": "presence", "id": 3, "topic": "room.a"}))
        .await;
    assert_eq!(page["op"], "presence", "{page}");
    assert_eq!(page["members"], json!([{"sub": "watcher"}]));
    assert_eq!(page["cursor"], Value::Null);
}

#[tokio::test]
async fn presence_false_leaves_the_presence_and_keeps_the_events() {
    let node = spawn_node_with(with_presence).await;
    let mut watcher = join(&node, "watcher", "room.c").await;
    assert_eq!(subs(&next_diff(&mut watcher).await["joins"]), ["watcher"]);
    let mut ada = enter(
        node.connect(&token("ada", &["room.>"], &["room.>"])).await,
        "room.c",
    )
    .await;
    assert_eq!(subs(&next_diff(&mut watcher).await["joins"]), ["ada"]);
    let reply = ask(
        &mut ada,
        json!({"op": "subscribe", "id": 2, "topic": "room.c", "presence": false}),
        &mut Vec::new(),
    )
    .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(
        next_diff(&mut watcher).await["leaves"],
        json!([{"sub": "ada"}])
    );
    // Still subscribed: the events come, and no more diffs.
    node.publish_ok(&token("p", &[], &["room.>"]), "room.c", &json!("hi"))
        .await;
    let event = ada.recv().await;
    assert_eq!(
        (&event["op"], &event["data"]),
        (&json!("event"), &json!("hi"))
    );
}

#[tokio::test]
async fn a_join_and_a_leave_within_one_interval_cancel_out() {
    let node = spawn_node_with(|s| {
        with_presence(s);
        s.presence.batch_interval = Duration::from_secs(1);
    })
    .await;
    let mut watcher = join(&node, "watcher", "room.b").await;
    assert_eq!(subs(&next_diff(&mut watcher).await["joins"]), ["watcher"]);
    // In and out well within the second: nobody is told.
    let brief = join(&node, "brief", "room.b").await;
    drop(brief);
    let stays = join(&node, "stays", "room.b").await;
    let diff = next_diff(&mut watcher).await;
    assert_eq!(diff["joins"], json!([{"sub": "stays"}]), "{diff}");
    assert_eq!(diff["leaves"], json!([]), "{diff}");
    drop(stays);
}

#[tokio::test]
async fn presence_is_refused_without_the_rule_or_the_grant() {
    let node = spawn_node_with(with_presence).await;
    // A topic without `presence = true`.
    let mut client = node.connect(&token("u", &["room.>", "plain"], &[])).await;
    let refused = client
        .request(json!({"op": "subscribe", "id": 3, "topic": "plain", "presence": true}))
        .await;
    assert_eq!(refused["op"], "error");
    assert_eq!(refused["code"], "presence_disabled", "{refused}");
    assert_eq!(refused["id"], 3);
    let refused = client
        .request(json!({"op": "presence", "id": 4, "topic": "plain"}))
        .await;
    assert_eq!(refused["code"], "presence_disabled", "{refused}");
    // Not subscribed by the refused request.
    let reply = client
        .request(json!({"op": "unsubscribe", "topic": "plain"}))
        .await;
    assert_eq!(reply["op"], "unsubscribed");

    // A topic the token does not grant.
    let refused = client
        .request(json!({"op": "presence", "id": 5, "topic": "room2.x"}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let mut other = node.connect(&token("v", &["other.>"], &[])).await;
    let refused = other
        .request(json!({"op": "presence", "id": 6, "topic": "room.a"}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let refused = other
        .request(json!({"op": "subscribe", "id": 7, "topic": "room.a", "presence": true}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // The same over HTTP.
    let get = |path: &str, token: Option<String>| {
        let mut request = node.http.get(node.url(path));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        request.send()
    };
    let response = get("/api/v1/topics/room.a/presence", None).await.unwrap();
    assert_eq!(response.status(), 401);
    let response = get(
        "/api/v1/topics/room.a/presence",
        Some(token("v", &["other.>"], &[])),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 403);
    let response = get(
        "/api/v1/topics/plain/presence",
        Some(token("u", &["plain"], &[])),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "presence_disabled", "{body}");
    let response = get(
        "/api/v1/topics/room.a/presence?cursor=not*base64url",
        Some(token("u", &["room.>"], &[])),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 400);

    // A `presence_info` claim that is not a small object refuses the token.
    let big = json!({"name": "x".repeat(2000)});
    let refused = node
        .handshake(&format!("?token={}", member_token("w", Some(big))))
        .try_open()
        .await
        .err()
        .expect("the handshake is refused");
    assert_eq!(refused.0, 401);
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap()
            .contains("presence_info"),
        "{}",
        refused.1
    );
}

#[tokio::test]
async fn a_snapshot_taken_in_pages_plus_the_diffs_after_it_is_the_truth_under_concurrent_churn() {
    let node = spawn_node_with(|s| {
        with_presence(s);
        s.presence.batch_interval = Duration::from_millis(20);
    })
    .await;
    let topic = "room.churn";
    // Members that stay, and members that come and go while the watcher
    // takes its pages.
    let mut stayers = Vec::new();
    for i in 0..30 {
        stayers.push(join(&node, &format!("stay-{i:02}"), topic).await);
    }
    let addr = node.addr;
    let churn = tokio::spawn(async move {
        let node_url = format!("ws://{addr}/ws");
        let mut kept = Vec::new();
        for round in 0..6 {
            let mut clients = Vec::new();
            for i in 0..15 {
                let sub = format!("churn-{:02}", (round * 7 + i) % 40);
                let mut client = crate::helpers::Handshake::to(&format!(
                    "{node_url}?token={}",
                    member_token(&sub, None)
                ))
                .open()
                .await;
                client
                    .subscribe_with(
                        json!({"op": "subscribe", "id": 1, "topic": topic, "presence": true}),
                    )
                    .await;
                clients.push(client);
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
            // Some leave, some stay until the end.
            clients.truncate(5 + round);
            tokio::time::sleep(Duration::from_millis(15)).await;
            kept.append(&mut clients);
        }
        kept
    });

    let mut watcher = join(&node, "watcher", topic).await;
    let mut view = View::default();
    // Pages of 4 while the churn goes on: each at its own seq.
    for _ in 0..3 {
        snapshot(&mut watcher, topic, 4, &mut view).await;
    }
    let kept = churn.await.unwrap();
    // Quiet: the last diffs come in, then the view must be the truth.
    let mut diffs = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let truth = ask(
        &mut watcher,
        json!({"op": "presence", "id": 10, "topic": topic}),
        &mut diffs,
    )
    .await;
    for diff in &diffs {
        view.diff(diff);
    }
    let truth: BTreeSet<String> = subs(&truth["members"])
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(truth.contains("watcher") && truth.contains("stay-00"));
    assert_eq!(view.members(), truth);
    drop((stayers, kept));
}

/// Cluster settings: presence on `room.>`, and a node's members leave
/// within `ttl` of its death.
fn clustered_presence(ttl: Duration) -> impl FnOnce(&mut Settings) {
    move |s| {
        with_presence(s);
        s.presence.node_ttl = ttl;
    }
}

/// The `sub`s on a page of `topic`'s presence, asked of `node`; a refusal
/// (e.g. 503 while Redis is away) is one entry naming its status.
async fn members_on(node: &TestNode, topic: &str) -> Vec<String> {
    let response = node
        .http
        .get(node.url(&format!("/api/v1/topics/{topic}/presence")))
        .header(
            "Authorization",
            format!("Bearer {}", member_token("reader", None)),
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    if !status.is_success() {
        return vec![format!("(answered {status})")];
    }
    let page: Value = response.json().await.unwrap();
    subs(&page["members"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn three_nodes_share_one_membership_and_a_user_on_two_nodes_is_one_member() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let ttl = Duration::from_secs(15);
    let a = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let b = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let c = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let topic = "room.cluster";
    let mut watcher = join(&a, "watcher", topic).await;
    assert_eq!(subs(&next_diff(&mut watcher).await["joins"]), ["watcher"]);

    let ada_on_b = join(&b, "ada", topic).await;
    let diff = next_diff(&mut watcher).await;
    assert_eq!(diff["joins"], json!([{"sub": "ada"}]), "{diff}");
    // Ada on a second node: the same member, nobody is told.
    let mut ada_on_c = join(&c, "ada", topic).await;
    let bob = join(&c, "bob", topic).await;
    let diff = next_diff(&mut watcher).await;
    assert_eq!(diff["joins"], json!([{"sub": "bob"}]), "{diff}");
    for node in [&a, &b, &c] {
        assert_eq!(members_on(node, topic).await, ["ada", "bob", "watcher"]);
    }

    // Ada leaves one node: still in. Then the other: out, once.
    drop(ada_on_b);
    drop(bob);
    let diff = next_diff(&mut watcher).await;
    assert_eq!(diff["leaves"], json!([{"sub": "bob"}]), "{diff}");
    assert_eq!(diff["joins"], json!([]), "{diff}");
    let reply = ask(
        &mut ada_on_c,
        json!({"op": "unsubscribe", "topic": topic}),
        &mut Vec::new(),
    )
    .await;
    assert_eq!(reply["op"], "unsubscribed");
    let diff = next_diff(&mut watcher).await;
    assert_eq!(diff["leaves"], json!([{"sub": "ada"}]), "{diff}");
    assert_eq!(members_on(&b, topic).await, ["watcher"]);
}

/// The TOML a node process starts with: cluster mode on `redis` and `pg`,
/// presence on `room.>` with `ttl`.
fn process_config(redis: &RedisServer, pg: &PgDatabase, ttl: Duration) -> String {
    format!(
        r#"
[redis]
url = "{}"
[store]
url = "{}"
[presence]
batch_interval = "100ms"
node_ttl = "{}ms"
[[topics]]
pattern = "room.>"
presence = true
"#,
        redis.url(),
        pg.url(),
        ttl.as_millis()
    )
}

#[tokio::test]
async fn a_killed_node_s_members_leave_once_within_the_ttl_and_users_still_elsewhere_stay() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let ttl = Duration::from_secs(3);
    let a = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let b = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let mut doomed = ServeProcess::start_with_config(
        "presence-doomed",
        &process_config(&redis, &pg, ttl),
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let topic = "room.crash";
    // A watcher on each surviving node: both reap, each must hear one leave.
    let mut watchers = vec![
        join(&a, "watcher-a", topic).await,
        join(&b, "watcher-b", topic).await,
    ];
    let _zed = join_process(&doomed, "zed", topic).await;
    let _ada = join_process(&doomed, "ada", topic).await;
    let _ada_on_a = join(&a, "ada", topic).await;
    eventually("everyone is in", || async {
        members_on(&b, topic).await == ["ada", "watcher-a", "watcher-b", "zed"]
    })
    .await;
    // Drain the joins each watcher was told.
    let mut diffs = Vec::new();
    for watcher in &mut watchers {
        ask(watcher, json!({"op": "ping", "id": 1}), &mut diffs).await;
    }

    doomed.stop_with("KILL").await;
    let killed = std::time::Instant::now();
    for watcher in &mut watchers {
        let diff = tokio::time::timeout(ttl + Duration::from_secs(5), first_leave(watcher))
            .await
            .expect("the dead node's members leave");
        assert_eq!(diff["leaves"], json!([{"sub": "zed"}]), "{diff}");
        assert_eq!(diff["joins"], json!([]), "{diff}");
    }
    println!(
        "the dead node's member left {:?} after the kill",
        killed.elapsed()
    );
    // Once: nothing more comes for a while (every node reaps).
    tokio::time::sleep(ttl).await;
    for watcher in &mut watchers {
        let mut diffs = Vec::new();
        let pong = ask(watcher, json!({"op": "ping", "id": 2}), &mut diffs).await;
        assert_eq!(pong["op"], "pong");
        assert!(diffs.is_empty(), "a second diff: {diffs:?}");
    }
    assert_eq!(
        members_on(&a, topic).await,
        ["ada", "watcher-a", "watcher-b"]
    );
}

#[tokio::test]
async fn a_node_restarted_after_a_crash_removes_what_its_earlier_run_left_at_start_up() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    // Far longer than the test: only the restart can remove Zed in time.
    let ttl = Duration::from_secs(120);
    let a = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let mut crashing = ServeProcess::start_with_config(
        "presence-restart",
        &process_config(&redis, &pg, ttl),
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let topic = "room.restart";
    let mut watcher = join(&a, "watcher", topic).await;
    let _zed = join_process(&crashing, "zed", topic).await;
    eventually("zed is in", || async {
        members_on(&a, topic).await == ["watcher", "zed"]
    })
    .await;
    crashing.stop_with("KILL").await;
    crashing.restart().await;
    eventually("zed left", || async {
        members_on(&a, topic).await == ["watcher"]
    })
    .await;
    let mut diffs = Vec::new();
    ask(&mut watcher, json!({"op": "ping"}), &mut diffs).await;
    let leaves: Vec<&Value> = diffs.iter().filter(|d| d["leaves"] != json!([])).collect();
    assert_eq!(leaves.len(), 1, "{diffs:?}");
    assert_eq!(leaves[0]["leaves"], json!([{"sub": "zed"}]));
}

#[tokio::test]
async fn a_redis_restart_loses_nobody_who_is_still_connected() {
    let mut redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let ttl = Duration::from_secs(3);
    let a = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let b = TestNode::clustered_with(&redis, &pg, clustered_presence(ttl)).await;
    let topic = "room.redis";
    let mut clients = Vec::new();
    for (node, sub) in [(&a, "ada"), (&b, "bob"), (&b, "cy"), (&a, "cy")] {
        clients.push(join(node, sub, topic).await);
    }
    eventually("everyone is in", || async {
        members_on(&a, topic).await == ["ada", "bob", "cy"]
    })
    .await;
    let epoch = |page: &Value| page["epoch"].as_str().unwrap().to_owned();
    let mut diffs = Vec::new();
    let before = ask(
        &mut clients[0],
        json!({"op": "presence", "id": 1, "topic": topic}),
        &mut diffs,
    )
    .await;

    // Redis comes back empty: the nodes rebuild what it held.
    redis.restart().await;
    a.wait_ready().await;
    b.wait_ready().await;
    for node in [&a, &b] {
        eventually("the membership is rebuilt", || async {
            node.readyz().await == 200 && members_on(node, topic).await == ["ada", "bob", "cy"]
        })
        .await;
    }
    let after = ask(
        &mut clients[0],
        json!({"op": "presence", "id": 2, "topic": topic}),
        &mut diffs,
    )
    .await;
    // A client holding the old epoch knows to take a new page; and every
    // listener was told that it may have missed changes.
    assert_ne!(epoch(&after), epoch(&before));
    assert!(
        diffs
            .iter()
            .any(|d| d["op"] == "presence_resync" && d["topic"] == topic),
        "{diffs:?}"
    );
    // And Cy, on both nodes, leaves only when her last connection does.
    clients.truncate(3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(members_on(&a, topic).await, ["ada", "bob", "cy"]);
    clients.truncate(2);
    eventually("cy left", || async {
        members_on(&a, topic).await == ["ada", "bob"]
    })
    .await;
}

#[tokio::test]
async fn a_change_under_an_incarnation_whose_lease_is_gone_is_refused() {
    use herald::config::PresenceSettings;
    use herald::presence::{Book, PresenceError, RedisBook};
    use herald::protocol::{Member, PresenceQuery};

    let redis = RedisServer::start().await;
    let settings = PresenceSettings {
        batch_interval: Duration::from_millis(100),
        node_ttl: Duration::from_secs(3),
    };
    let book = RedisBook::new(&redis.url().into(), "herald:", "fence-test:1", &settings).unwrap();
    book.rotate().await.unwrap();
    let topic = herald::topic::Topic::parse("room.fence").unwrap();
    let member = |sub: &str| Member {
        sub: sub.into(),
        info: None,
    };
    book.apply(&topic, &[member("ada")], &[]).await.unwrap();
    // A reaper claims the incarnation (it leaves the leases) and has not
    // reaped it yet: nothing may land under it meanwhile, or it would
    // outlive the reaping.
    let incarnations: Vec<String> = redis
        .query(
            redis::cmd("ZRANGE")
                .arg("herald:presence:leases")
                .arg(0)
                .arg(-1),
        )
        .await;
    assert_eq!(incarnations.len(), 1, "{incarnations:?}");
    let _: () = redis
        .query(
            redis::cmd("ZREM")
                .arg("herald:presence:leases")
                .arg(&incarnations[0]),
        )
        .await;
    let refused = book.apply(&topic, &[member("bo")], &[]).await;
    assert!(matches!(refused, Err(PresenceError::Fenced)), "{refused:?}");
    let query = PresenceQuery {
        after: None,
        limit: 10,
        count_only: false,
    };
    let page = book.page(&topic, &query).await.unwrap();
    let subs: Vec<String> = page.members.unwrap().into_iter().map(|m| m.sub).collect();
    assert_eq!(subs, ["ada"]);
}

#[tokio::test]
async fn a_user_who_moves_to_another_node_within_the_interval_is_not_reported_leaving() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let settings = |s: &mut Settings| {
        clustered_presence(Duration::from_secs(15))(s);
        s.presence.batch_interval = Duration::from_millis(500);
    };
    let a = TestNode::clustered_with(&redis, &pg, settings).await;
    let b = TestNode::clustered_with(&redis, &pg, settings).await;
    let topic = "room.move";
    let mut watcher = join(&b, "watcher", topic).await;
    let on_a = join(&a, "ada", topic).await;
    // Both joins, each in its own node's diff, in either order.
    let mut joined = Vec::new();
    while !(joined.contains(&json!({"sub": "ada"})) && joined.contains(&json!({"sub": "watcher"})))
    {
        let diff = next_diff(&mut watcher).await;
        joined.extend(diff["joins"].as_array().unwrap().iter().cloned());
    }
    // Ada's connection to one node drops; she is back on the other at once.
    drop(on_a);
    let _on_b = join(&b, "ada", topic).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut diffs = Vec::new();
    let pong = ask(&mut watcher, json!({"op": "ping", "id": 1}), &mut diffs).await;
    assert_eq!(pong["op"], "pong");
    assert!(diffs.is_empty(), "a reconnect was reported: {diffs:?}");
    assert_eq!(members_on(&a, topic).await, ["ada", "watcher"]);
}

#[tokio::test]
async fn a_sub_is_at_most_256_bytes_and_every_member_can_be_paged_past() {
    let node = spawn_node_with(with_presence).await;
    // One byte past the bound: refused at the handshake and on HTTP, naming `sub`.
    let long = "é".repeat(128) + "x";
    assert_eq!(long.len(), 257);
    let (status, body) = node.refused(&member_token(&long, None)).await;
    assert_eq!(status, 401);
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("`sub`") && message.contains("256"),
        "{message}"
    );
    let response = node
        .http
        .get(node.url("/api/v1/topics/room.long/presence"))
        .bearer_auth(member_token(&long, None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // At the bound: a member like any other, and the page after it is
    // reachable with the cursor it gave.
    let longest = "a".repeat(254) + "é";
    assert_eq!(longest.len(), 256);
    let _a = join(&node, &longest, "room.long").await;
    let _b = join(&node, "zz-last", "room.long").await;
    eventually("both members are in", || async {
        members_on(&node, "room.long").await.len() == 2
    })
    .await;
    let reader = member_token("reader", None);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=1&cursor={c}"),
            None => "?limit=1".to_owned(),
        };
        let page = node
            .get_json(
                &format!("/api/v1/topics/room.long/presence{query}"),
                &reader,
            )
            .await;
        assert!(page["members"].is_array(), "{page}");
        seen.extend(subs(&page["members"]).into_iter().map(str::to_owned));
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    // The first page ends on the longest sub: its cursor is the longest.
    assert_eq!(seen, vec![longest, "zz-last".to_owned()]);
}
