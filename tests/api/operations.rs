//! What operators see: metrics, introspection, structured logs, and the
//! protocol reference kept complete.

use std::process::Stdio;

use herald::protocol::ErrorCode;
use herald::ws::CloseCause;
use serde_json::{Value, json};

use crate::helpers::{ServeProcess, claims_token, now, spawn_node, temp_dir, token};

fn admin() -> String {
    claims_token(json!({"sub": "ops", "exp": now() + 600, "admin": true}))
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text_format() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &[">"], &[])).await;
    ws.subscribe("metrics.topic").await;
    node.publish_ok(&token("p", &[], &[">"]), "metrics.topic", &json!(1))
        .await;
    ws.recv().await;
    let refused = node.handshake("?token=nope").try_open().await;
    assert_eq!(refused.err().unwrap().0, 401);

    let response = node.http.get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for metric in [
        "herald_connections ",
        "herald_subscriptions ",
        "herald_topics_active ",
        r#"herald_handshakes_total{result="accepted"}"#,
        r#"herald_handshakes_total{result="refused",reason="unauthorized"}"#,
        r#"herald_events_published_total{transport="http"}"#,
        "herald_deliveries_total ",
        "herald_publish_to_fanout_seconds_bucket",
        "herald_store_commit_seconds_bucket",
    ] {
        assert!(text.contains(metric), "{metric} missing from:\n{text}");
    }
}

#[tokio::test]
async fn node_introspection_needs_an_admin_token() {
    let node = spawn_node().await;
    let _ws = node.connect(&token("s", &[">"], &[])).await;
    let get = |token: String| {
        node.http
            .get(node.url("/api/v1/node"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get(token("p", &[], &[">"])).await.unwrap().status(), 403);
    let info: Value = get(admin()).await.unwrap().json().await.unwrap();
    assert!(info["node_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["connections"], 1);
    assert_eq!(info["relay"], "local");
    assert_eq!(
        info["store"],
        json!({"backend": "sqlite", "reachable": true})
    );
    assert!(info["uptime_seconds"].as_u64().is_some());
}

#[tokio::test]
async fn topic_introspection_for_publishers_and_admins() {
    let node = spawn_node().await;
    let publisher = token("p", &[], &["orders.>"]);
    let mut ws = node.connect(&token("s", &[">"], &[])).await;
    ws.subscribe("orders.eu").await;
    for i in 0..3 {
        node.publish_ok(&publisher, "orders.eu", &json!(i)).await;
    }
    let get = |token: String| {
        node.http
            .get(node.url("/api/v1/topics/orders.eu"))
            .bearer_auth(token)
            .send()
    };
    for allowed in [publisher.clone(), admin()] {
        let info: Value = get(allowed).await.unwrap().json().await.unwrap();
        assert_eq!(info["offset"], 3);
        assert_eq!(info["retained"], 3);
        assert_eq!(info["local_subscribers"], 1);
        assert_eq!(info["history"], true);
        assert!(info["epoch"].as_str().is_some());
    }
    assert_eq!(get(token("s", &[">"], &[])).await.unwrap().status(), 403);
}

#[tokio::test]
async fn json_logs_have_one_object_per_line_with_connection_open_and_close() {
    let log = temp_dir("json-logs").join("stderr.log");
    let stderr = Stdio::from(std::fs::File::create(&log).unwrap());
    let env = [("HERALD__LOG__FORMAT", "json".to_owned())];
    let mut node = ServeProcess::start("json-logs", &env, stderr).await;
    let mut ws = node.connect(&token("json-sub", &[">"], &[])).await;
    ws.subscribe("a").await;
    drop(ws);
    let _ = reqwest::get(node.url("/ws?token=bad")).await;
    node.stop_with("TERM").await;

    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let find = |message: &str| lines.iter().find(|l| l["message"] == message).cloned();
    let opened = find("connection opened").expect("a connection-opened line");
    assert_eq!(opened["sub"], "json-sub");
    let closed = find("connection closed").expect("a connection-closed line");
    assert!(closed["duration_ms"].is_number());
    let refused = find("handshake refused").expect("a handshake-refused line");
    assert_eq!(refused["reason"], "unauthorized");
}

#[test]
fn every_error_code_and_close_code_is_documented() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    for code in ErrorCode::ALL {
        assert!(
            docs.contains(&format!("`{}`", code.as_str())),
            "error code {} is not in docs/protocol.md",
            code.as_str()
        );
    }
    for code in CloseCause::codes() {
        assert!(
            docs.contains(&format!("| {code} |")),
            "close code {code} is not in docs/protocol.md"
        );
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_http_endpoint() {
    let node = spawn_node().await;
    let doc: Value = node
        .http
        .get(node.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for (path, method) in [
        ("/api/v1/topics/{topic}/events", "post"),
        ("/api/v1/topics/{topic}/events", "get"),
        ("/api/v1/events", "post"),
        ("/api/v1/topics/{topic}", "get"),
        ("/api/v1/topics/{topic}/presence", "get"),
        ("/api/v1/node", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // The cursors the document admits are exactly those the node takes.
    let cursor = doc["paths"]["/api/v1/topics/{topic}/presence"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cursor")
        .unwrap();
    assert_eq!(
        cursor["schema"]["pattern"],
        herald::protocol::CURSOR_PATTERN
    );
}

#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    let port = crate::helpers::free_port();
    let node =
        crate::helpers::spawn_node_with(|s| s.metrics.bind = Some(format!("127.0.0.1:{port}")))
            .await;
    let main = node.http.get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(main.status(), 404);
    let own = node
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert!(own.text().await.unwrap().contains("herald_"));
}

#[tokio::test]
async fn a_fresh_node_exposes_every_documented_series_before_any_traffic() {
    let node = ServeProcess::start("fresh-metrics", &[], Stdio::null()).await;
    let body = reqwest::get(node.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let readme = include_str!("../../README.md");
    for name in herald::telemetry::names::ALL {
        let short = name.strip_prefix("herald_").unwrap();
        assert!(
            readme.contains(&format!("`{short}")),
            "{name} is not documented in README.md"
        );
        let present = body.lines().any(|line| {
            line.starts_with(name)
                && line[name.len()..].starts_with(['{', ' ', '_'])
                && !line.starts_with('#')
        });
        assert!(
            present,
            "{name} is missing from a fresh node's /metrics:\n{body}"
        );
    }
}
