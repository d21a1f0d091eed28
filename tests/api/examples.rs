//! The runnable examples in `examples/` (Node `ws`, Python `websockets`,
//! Python `aiohttp`) against a real node: each subscribes, receives an
//! HTTP-published event and publishes one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{KillOnDrop, spawn_node, token};

async fn run_example(topic: &str, program: &Path, script: &str, examples: &Path) {
    let node = spawn_node().await;
    let mut child = KillOnDrop(
        Command::new(program)
            .arg(script)
            .current_dir(examples)
            .env("HERALD_URL", format!("ws://{}/ws", node.addr))
            .env("HERALD_TOKEN", token("example", &[">"], &[">"]))
            .env("HERALD_TOPIC", topic)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} runs {script}: {e}", program.display())),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // What the child says on stderr, shown with any failure.
    let stderr = child.0.stderr.take().unwrap();
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let said_by_child = said.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut said = said_by_child.lock().unwrap();
            said.push_str(&line);
            said.push('\n');
        }
    });
    let stderr = || {
        // Let the child's last words arrive.
        std::thread::sleep(Duration::from_millis(200));
        format!("\n--- {script}'s stderr ---\n{}", said.lock().unwrap())
    };
    let mut next_line =
        async || match tokio::time::timeout(Duration::from_secs(20), lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{script} exited early{}", stderr()),
            Err(_) => panic!("{script} printed nothing more within 20 s{}", stderr()),
        };
    assert_eq!(next_line().await, format!("subscribed to {topic}"));
    node.publish_ok(&token("p", &[], &[">"]), topic, &json!({"from": "http"}))
        .await;
    let json = if script.ends_with(".mjs") {
        r#"{"from":"http"}"#
    } else {
        r#"{"from": "http"}"#
    };
    assert_eq!(next_line().await, format!("event 1: {json}"));
    assert_eq!(next_line().await, "published at offset 2");
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "{script} exited with {status}{}",
        stderr()
    );
}

fn python_examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python")
}

#[tokio::test]
async fn node_ws_example_works_unchanged() {
    let examples = crate::testenv::js_package("examples/node");
    run_example(
        "examples.node",
        Path::new("node"),
        "subscribe.mjs",
        &examples,
    )
    .await;
}

#[tokio::test]
async fn python_websockets_example_works_unchanged() {
    let python = crate::testenv::python();
    run_example(
        "examples.websockets",
        &python,
        "websockets_example.py",
        &python_examples(),
    )
    .await;
}

#[tokio::test]
async fn python_aiohttp_example_works_unchanged() {
    let python = crate::testenv::python();
    run_example(
        "examples.aiohttp",
        &python,
        "aiohttp_example.py",
        &python_examples(),
    )
    .await;
}
