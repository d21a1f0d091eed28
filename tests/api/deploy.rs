//! The compose cluster's topology without a container engine: three nodes,
//! their Redis and PostgreSQL, and Debian's HAProxy running a config made
//! from `deploy/haproxy.cfg` with only the addresses swapped.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    Handshake, KillOnDrop, PgDatabase, RedisServer, TestNode, eventually, free_port, temp_dir,
    token,
};

/// `deploy/haproxy.cfg` with the balancer on `port` and each `server`
/// line pointing at one of `nodes`. Its global `maxconn` (50,000, for
/// HAProxy's image, whose open-file limit allows it) is lowered to what
/// this machine's limit allows (HAProxy needs two files per connection).
fn haproxy_config(port: u16, nodes: &[&TestNode]) -> String {
    let original = include_str!("../../deploy/haproxy.cfg");
    let mut servers = nodes.iter();
    original
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("maxconn ") {
                "    maxconn 4000".to_owned()
            } else if trimmed.starts_with("bind :8080") {
                line.replace(":8080", &format!("127.0.0.1:{port}"))
            } else if let Some(rest) = trimmed.strip_prefix("server ") {
                let name = rest.split_whitespace().next().unwrap();
                let node = servers.next().expect("one node per server line");
                format!("    server {name} {}", node.addr)
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[tokio::test]
async fn through_haproxy_events_flow_and_a_stopped_node_is_taken_out() {
    let redis = RedisServer::start().await;
    let pg = PgDatabase::create().await;
    let a = TestNode::clustered(&redis, &pg).await;
    let b = TestNode::clustered(&redis, &pg).await;
    let c = TestNode::clustered(&redis, &pg).await;
    let port = free_port();
    let config = temp_dir("haproxy").join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(port, &[&a, &b, &c])).unwrap();
    let _lb = KillOnDrop(
        std::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy is installed (apt-get install haproxy; .ci/run does)"),
    );
    let lb = format!("127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let healthy = || async {
        http.get(format!("http://{lb}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    eventually("the balancer answers through a ready node", healthy).await;

    // A subscriber and a publisher, both through the balancer.
    let mut ws = Handshake::to(&format!("ws://{lb}/ws?token={}", token("s", &["lb"], &[])))
        .open()
        .await;
    ws.subscribe("lb").await;
    let published = http
        .post(format!("http://{lb}/api/v1/topics/lb/events"))
        .bearer_auth(token("p", &[], &["lb"]))
        .json(&json!("through haproxy"))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    assert_eq!(ws.recv().await["data"], "through haproxy");

    // One node stops; once its /readyz fails HAProxy's checks (every 2 s,
    // down after 2), every new connection lands on the others.
    drop(a);
    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..9 {
        let opened = Handshake::to(&format!("ws://{lb}/ws?token={}", token("s", &["lb"], &[])))
            .try_open()
            .await;
        assert!(opened.is_ok(), "connection {i} through the balancer failed");
        let ready = http
            .get(format!("http://{lb}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "request {i} reached the stopped node");
    }
    drop((b, c));
}

/// The settings file in `deploy/kubernetes/configmap.yaml`, out of its
/// YAML block.
fn configmap_settings() -> String {
    let yaml = include_str!("../../deploy/kubernetes/configmap.yaml");
    let block = yaml
        .split_once("default.toml: |\n")
        .expect("the ConfigMap holds default.toml")
        .1;
    block
        .lines()
        .map_while(|line| {
            line.strip_prefix("    ")
                .or((line.is_empty()).then_some(""))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_kubernetes_node_reads_the_same_settings_file_as_a_compose_node() {
    let settings_of = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let configmap = configmap_settings();
    assert_eq!(
        settings_of(&configmap),
        settings_of(include_str!("../../deploy/herald.toml")),
        "the ConfigMap's default.toml differs from deploy/herald.toml"
    );
    // A node started with it as config/default.toml serves the console.
    let dir = temp_dir("configmap");
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/default.toml"), &configmap).unwrap();
    let mut child = KillOnDrop(
        crate::helpers::herald_command(&dir)
            .arg("serve")
            .env("HERALD__AUTH__JWT_SECRET", crate::helpers::secret())
            .env("HERALD__SERVER__BIND", "127.0.0.1:0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The port it took, from its log.
    let stderr = child.0.stderr.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split("addr=").nth(1).map(|a| a.trim().to_owned()))
    })
    .await
    .unwrap()
    .expect("the node logs its address");
    let page = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(page.status(), 200, "the console is on");
}
