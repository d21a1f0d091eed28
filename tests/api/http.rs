//! The HTTP publish API and health endpoint.

use serde_json::{Value, json};

use crate::helpers::{claims_token, now, spawn_node, spawn_node_with, token};

fn publisher() -> String {
    token("pub", &[], &["alerts", "chat.>"])
}

/// Asserts an error reply: its status, its JSON `error` code and a message.
async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"].as_str().expect("a message").to_owned();
    assert!(!message.is_empty());
    message
}

#[tokio::test]
async fn healthz_answers_200() {
    let node = spawn_node().await;
    let response = node.http.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn non_json_bodies_are_published_as_binary() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &["alerts"], &[])).await;
    ws.subscribe("alerts").await;
    let response = node
        .http
        .post(node.url("/api/v1/topics/alerts/events"))
        .bearer_auth(publisher())
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 2, 255])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"topic": "alerts", "offset": 1})
    );
    assert_eq!(ws.recv().await["data_b64"], "AAEC/w==");
}

#[tokio::test]
async fn batch_publishes_in_order_and_lists_the_offsets() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &["chat.>"], &[])).await;
    ws.subscribe("chat.a").await;
    let response = node
        .http
        .post(node.url("/api/v1/events"))
        .bearer_auth(publisher())
        .json(&json!([
            {"topic": "chat.a", "data": {"n": 1}},
            {"topic": "chat.b", "data": null},
            {"topic": "chat.a", "data_b64": "AQ=="},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"offsets": [1, 1, 2]})
    );
    let first = ws.recv().await;
    assert_eq!(
        (&first["offset"], &first["data"]),
        (&json!(1), &json!({"n": 1}))
    );
    let second = ws.recv().await;
    assert_eq!(
        (&second["offset"], &second["data_b64"]),
        (&json!(2), &json!("AQ=="))
    );
}

#[tokio::test]
async fn a_batch_with_one_refused_event_publishes_nothing() {
    let node = spawn_node().await;
    let p = publisher();
    let response = node
        .http
        .post(node.url("/api/v1/events"))
        .bearer_auth(&p)
        .json(&json!([
            {"topic": "chat.a", "data": 1},
            {"topic": "secret", "data": 2},
        ]))
        .send()
        .await
        .unwrap();
    assert_error(response, 403, "forbidden").await;
    // chat.a's first offset is still free: nothing of the batch went out.
    assert_eq!(node.publish_ok(&p, "chat.a", &json!(3)).await, 1);
}

#[tokio::test]
async fn malformed_batches_are_400() {
    let node = spawn_node_with(|s| s.limits.max_batch_events = 2).await;
    let bodies = [
        json!({"topic": "chat.a", "data": 1}),
        json!([{"topic": "chat.a"}]),
        json!([{"topic": "chat.a", "data": 1, "data_b64": "AQ=="}]),
        json!([{"topic": "chat.a", "data_b64": "%%%"}]),
        json!([{"topic": "chat.a", "data": 1}, {"topic": "chat.a", "data": 2}, {"topic": "chat.a", "data": 3}]),
    ];
    for body in bodies {
        let response = node
            .http
            .post(node.url("/api/v1/events"))
            .bearer_auth(publisher())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "bad_request").await;
    }
    let response = node
        .http
        .post(node.url("/api/v1/events"))
        .bearer_auth(publisher())
        .json(&json!([{"topic": "chat..a", "data": 1}]))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_topic").await;
}

#[tokio::test]
async fn publish_errors_have_the_documented_status_and_code() {
    let node = spawn_node_with(|s| s.limits.max_payload_bytes = 1024).await;
    let p = publisher();
    // A publish to `topic` with `authorization` (if any) and a body.
    let post = |topic: &str, authorization: Option<String>, content_type: &str, body: Vec<u8>| {
        let mut request = node
            .http
            .post(node.url(&format!("/api/v1/topics/{topic}/events")))
            .header("content-type", content_type)
            .body(body);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.send()
    };
    let bearer = |token: &str| Some(format!("Bearer {token}"));
    let json_one = || b"1".to_vec();
    const JSON: &str = "application/json";
    const BYTES: &str = "application/octet-stream";

    let response = post("alerts", None, JSON, json_one()).await.unwrap();
    assert_error(response, 401, "unauthorized").await;

    let expired = claims_token(json!({"sub": "p", "exp": now() - 120, "publish": [">"]}));
    let response = post("alerts", bearer(&expired), JSON, json_one())
        .await
        .unwrap();
    assert!(
        assert_error(response, 401, "unauthorized")
            .await
            .contains("expired")
    );

    let basic = Some("Basic dXNlcjpwYXNz".to_owned());
    let response = post("alerts", basic, JSON, json_one()).await.unwrap();
    assert_error(response, 401, "unauthorized").await;

    let subscriber_only = token("s", &[">"], &[]);
    let response = post("alerts", bearer(&subscriber_only), JSON, json_one())
        .await
        .unwrap();
    assert_error(response, 403, "forbidden").await;

    let response = post("secret", bearer(&p), JSON, json_one()).await.unwrap();
    assert_error(response, 403, "forbidden").await;

    let long = "a".repeat(256);
    for bad_topic in ["a..b", "chat.*", "chat.%3E", "sp%20ace", long.as_str()] {
        let response = post(bad_topic, bearer(&p), JSON, json_one()).await.unwrap();
        assert_error(response, 400, "invalid_topic").await;
    }

    let response = post("alerts", bearer(&p), JSON, b"{not json".to_vec())
        .await
        .unwrap();
    assert_error(response, 400, "bad_request").await;

    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200)).into_bytes();
    let response = post("alerts", bearer(&p), JSON, deep).await.unwrap();
    assert_error(response, 400, "bad_request").await;

    let response = post("alerts", bearer(&p), BYTES, vec![7u8; 1025])
        .await
        .unwrap();
    assert_error(response, 413, "payload_too_large").await;

    // Exactly at the limit is fine.
    let response = post("alerts", bearer(&p), BYTES, vec![7u8; 1024])
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn unknown_routes_are_404_and_unknown_methods_405_json() {
    let node = spawn_node().await;
    let response = node.http.get(node.url("/nope")).send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    let response = node
        .http
        .delete(node.url("/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_error(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn an_empty_batch_publishes_nothing() {
    let node = spawn_node().await;
    let response = node
        .http
        .post(node.url("/api/v1/events"))
        .bearer_auth(publisher())
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"offsets": []})
    );
}

#[tokio::test]
async fn the_content_type_decides_what_a_body_is_and_a_body_that_is_not_it_is_refused() {
    let node = spawn_node().await;
    let mut ws = node.connect(&token("s", &["typed"], &[])).await;
    ws.subscribe("typed").await;
    let post = |content_type: Option<&'static str>, body: Vec<u8>| {
        let mut request = node
            .http
            .post(node.url("/api/v1/topics/typed/events"))
            .bearer_auth(token("p", &[], &["typed"]))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let accepted = [
        (
            Some("application/json"),
            &br#"{"text":"hi"}"#[..],
            "data",
            json!({"text": "hi"}),
        ),
        (
            Some("application/cloudevents+json"),
            b"[1]",
            "data",
            json!([1]),
        ),
        // What `curl -d` sends: the body is text, not JSON, and says so.
        (
            Some("application/x-www-form-urlencoded"),
            br#"{"text":"hi"}"#,
            "data",
            json!(r#"{"text":"hi"}"#),
        ),
        (
            Some("text/plain; charset=utf-8"),
            "héllo".as_bytes(),
            "data",
            json!("héllo"),
        ),
        (
            Some("application/octet-stream"),
            &[0, 255],
            "data_b64",
            json!("AP8="),
        ),
        (None, &[1, 2], "data_b64", json!("AQI=")),
    ];
    for (content_type, body, field, expected) in accepted {
        let (status, reply) = post(content_type, body.to_vec()).await;
        assert_eq!(status, 201, "{content_type:?}: {reply}");
        let event = ws.recv().await;
        assert_eq!(event[field], expected, "{content_type:?}: {event}");
    }
    let refused = [
        (
            Some("application/json"),
            b"{not json".to_vec(),
            "application/json",
        ),
        (Some("text/plain"), vec![0xff, 0xfe], "text/plain"),
        (Some("text/plain; charset=latin1"), b"abc".to_vec(), "UTF-8"),
        (Some("not a type"), b"abc".to_vec(), "not a type"),
    ];
    for (content_type, body, named) in refused {
        let (status, reply) = post(content_type, body).await;
        assert_eq!(status, 400, "{content_type:?}: {reply}");
        assert_eq!(reply["error"], "bad_request");
        assert!(
            reply["message"].as_str().unwrap().contains(named),
            "{reply}"
        );
    }
}
