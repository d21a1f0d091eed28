//! The runnable examples in `examples/` (Node `ws`, Python `websockets`,
//! Python `aiohttp`) against a real node: each subscribes, receives an
//! HTTP-published event and publishes one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{KillOnDrop, spawn_node, token};

async fn run_example(topic: &str, program: &str, script: &str, dir: &str) {
    let node = spawn_node().await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(dir);
    let mut child = KillOnDrop(
        Command::new(program)
            .arg(script)
            .current_dir(&examples)
            .env("HERALD_URL", format!("ws://{}/ws", node.addr))
            .env("HERALD_TOKEN", token("example", &[">"], &[">"]))
            .env("HERALD_TOPIC", topic)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} runs the {dir} example: {e}")),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{script} printed nothing more within 20 s"))
            .unwrap_or_else(|| panic!("{script} exited early"))
    };
    assert_eq!(next_line().await, format!("subscribed to {topic}"));
    node.publish_ok(&token("p", &[], &[">"]), topic, &json!({"from": "http"}))
        .await;
    assert_eq!(
        next_line().await,
        format!("event 1: {}", json_text(program))
    );
    assert_eq!(next_line().await, "published at offset 2");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{script} exited with {status}");
}

/// How each language prints `{"from":"http"}`.
fn json_text(program: &str) -> String {
    if program == "node" {
        r#"{"from":"http"}"#.into()
    } else {
        r#"{"from": "http"}"#.into()
    }
}

#[tokio::test]
async fn node_ws_example_works_unchanged() {
    assert!(
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/node/node_modules/ws"
        ))
        .exists(),
        "run `npm ci --prefix examples/node` first (.ci/run does)"
    );
    run_example("examples.node", "node", "subscribe.mjs", "node").await;
}

#[tokio::test]
async fn python_websockets_example_works_unchanged() {
    run_example(
        "examples.websockets",
        "python3",
        "websockets_example.py",
        "python",
    )
    .await;
}

#[tokio::test]
async fn python_aiohttp_example_works_unchanged() {
    run_example(
        "examples.aiohttp",
        "python3",
        "aiohttp_example.py",
        "python",
    )
    .await;
}
