//! The `herald` binary as a new user runs it: `serve --dev`, `token`, and
//! refusals of unusable settings.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::helpers::{Handshake, ServeProcess, StreamClient, herald_command, secret, temp_dir};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// A `herald` command in `dir` with no `HERALD__*` from the test's own
/// environment.
fn herald(dir: &Path) -> Command {
    herald_command(dir)
}

/// Runs `command`, which must fail; what it said on stderr.
fn refused(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(!out.status.success(), "{command:?} succeeded");
    assert!(
        out.stdout.is_empty() || !out.stdout.starts_with(b"ey"),
        "printed a token"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `serve --dev` and the lines of its banner.
struct DevNode {
    child: Child,
    addr: String,
    banner: Vec<String>,
}

impl Drop for DevNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(dir: &Path) -> DevNode {
    let mut child = herald(dir)
        .args(["serve", "--dev"])
        .env("HERALD__SERVER__BIND", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.starts_with("More tokens:");
        banner.push(line);
        if done {
            break;
        }
    }
    let addr = banner[0]
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("banner names the address")
        .to_owned();
    DevNode {
        child,
        addr,
        banner,
    }
}

impl DevNode {
    /// The token printed on the line after `heading`.
    fn token_after(&self, heading: &str) -> String {
        let i = self
            .banner
            .iter()
            .position(|l| l.starts_with(heading))
            .unwrap();
        self.banner[i + 1].trim().to_owned()
    }
}

#[tokio::test]
async fn serve_without_a_key_exits_naming_the_setting() {
    let dir = temp_dir("nokey");
    let out = herald(&dir).arg("serve").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERALD__AUTH__JWT_SECRET"), "{stderr}");
}

#[tokio::test]
async fn invalid_settings_stop_start_up_with_their_name() {
    let dir = temp_dir("badsetting");
    let cases = [
        ("HERALD__SERVER__BIND", "nowhere", "server.bind"),
        (
            "HERALD__LIMITS__MAX_PAYLOAD_BYTES",
            "lots",
            "limits.max_payload_bytes",
        ),
        (
            "HERALD__LIMITS__OUTBOUND_QUEUE",
            "0",
            "limits.outbound_queue",
        ),
        ("HERALD__AUTH__ALGORITHM", "HS512", "auth.algorithm"),
        ("HERALD__AUTH__JWT_SECRET", "short", "auth.jwt_secret"),
        (
            "HERALD__SERVER__ALLOWED_ORIGINS",
            "example.com",
            "server.allowed_origins",
        ),
    ];
    for (key, value, name) in cases {
        let out = herald(&dir)
            .args(["serve", "--dev"])
            .env(key, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{key}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(name), "{key}={value}: {stderr}");
    }
}

#[tokio::test]
async fn a_config_file_is_read_and_a_missing_one_is_an_error() {
    let dir = temp_dir("configfile");
    let out = herald(&dir)
        .args(["serve", "--config", "missing.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));

    std::fs::write(
        dir.join("herald.toml"),
        "[server]\nbind = \"not an address\"\n",
    )
    .unwrap();
    let out = herald(&dir)
        .args(["serve", "--dev", "--config", "herald.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.bind"));
}

#[tokio::test]
async fn dev_mode_prints_working_tokens_and_herald_token_reuses_its_key() {
    let dir = temp_dir("dev");
    let node = start_dev(&dir);
    assert!(dir.join(".herald/dev-secret").exists());
    let subscriber = node.token_after("Subscriber token");
    let publisher = node.token_after("Publisher token");
    assert!(node.banner.iter().any(|l| l.contains("curl")));
    assert!(node.banner.iter().any(|l| l.contains("ws://")));
    assert!(node.banner.iter().any(|l| l.contains("curl -N")));

    let url = format!("ws://{}/ws?token={subscriber}", node.addr);
    let mut client = Handshake::to(&url).open().await;
    client.subscribe("alerts").await;
    // The banner's `curl -N`: the same topic as an NDJSON stream.
    let bearer = format!("Bearer {subscriber}");
    let events = format!("http://{}/api/v1/topics/alerts/events", node.addr);
    let mut lines = StreamClient::ndjson(&events, &[("authorization", &bearer)]).await;

    let http = reqwest::Client::new();
    let published = http
        .post(format!("http://{}/api/v1/topics/alerts/events", node.addr))
        .bearer_auth(&publisher)
        .json(&json!({"text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    assert_eq!(client.recv().await["data"], json!({"text": "hello"}));
    assert_eq!(lines.next_event().await["data"], json!({"text": "hello"}));

    // `herald token` in the same directory signs with the same dev key.
    let out = herald(&dir)
        .args([
            "token",
            "--sub",
            "alice",
            "--publish",
            "user.{sub}.>",
            "--ttl",
            "5m",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let ok = http
        .post(format!(
            "http://{}/api/v1/topics/user.alice.x/events",
            node.addr
        ))
        .bearer_auth(&alice)
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    let denied = http
        .post(format!(
            "http://{}/api/v1/topics/user.bob.x/events",
            node.addr
        ))
        .bearer_auth(&alice)
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);

    // A restart keeps the key, so tokens already handed out stay valid.
    drop(node);
    let again = start_dev(&dir);
    // A fresh client: the new node may have been given the same port, and
    // a pooled connection to the killed one would be reset.
    let ok = reqwest::Client::new()
        .post(format!("http://{}/api/v1/topics/alerts/events", again.addr))
        .bearer_auth(&publisher)
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
}

#[tokio::test]
async fn token_refuses_invalid_patterns_and_missing_keys() {
    let dir = temp_dir("token");
    let out = herald(&dir)
        .args(["token", "--sub", "a", "--topics", "a..b"])
        .env("HERALD__AUTH__JWT_SECRET", secret())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a..b"));

    let out = herald(&dir).args(["token", "--sub", "a"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERALD__AUTH__JWT_SECRET"), "{stderr}");
    // Where it looked for a development key, and how to point it elsewhere.
    assert!(stderr.contains(".herald/dev-secret"), "{stderr}");
    assert!(stderr.contains("HERALD__DEV__SECRET_FILE"), "{stderr}");
}

#[tokio::test]
async fn token_warns_about_tokens_that_cannot_do_anything() {
    let dir = temp_dir("token-warnings");
    let cases: [(&[&str], &str); 3] = [
        (&["--sub", "a"], "grants nothing"),
        (
            &["--sub", "a", "--topics", "alerts", "--ttl", "30d"],
            "longer than a week",
        ),
        (
            &["--sub", "alice@example.com", "--topics", "user.{sub}.>"],
            "match nothing",
        ),
    ];
    for (args, warning) in cases {
        let out = herald(&dir)
            .arg("token")
            .args(args)
            .env("HERALD__AUTH__JWT_SECRET", secret())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).split('.').count(), 3);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("warning:") && stderr.contains(warning),
            "{args:?}: {stderr}"
        );
    }
    // A useful token gets no warning.
    let out = herald(&dir)
        .args(["token", "--sub", "alice", "--topics", "user.{sub}.>"])
        .env("HERALD__AUTH__JWT_SECRET", secret())
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits() {
    let mut node = ServeProcess::start("sigterm", &[], Stdio::null()).await;
    let mut ws = node
        .connect(&crate::helpers::token("a", &["alerts"], &[]))
        .await;
    ws.subscribe("alerts").await;
    let stopping = tokio::spawn(async move {
        let status = node.stop_with("TERM").await;
        assert!(status.success(), "{status:?}");
    });
    let frame = ws.closed().await.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1001);
    stopping.await.expect("the process exits successfully");
}

/// Runs `scripts/cluster.sh` with `args` on these ports and store, the
/// test secret and `env`; returns it once ready, with the lines it
/// printed up to "Press Ctrl-C". Its stdout is read to its end, so the
/// script never writes to a closed pipe.
async fn start_cluster_script(
    args: &[&str],
    ports: &[u16; 3],
    redis_port: u16,
    pg: &crate::helpers::PgDatabase,
    env: &[(&str, &str)],
) -> (crate::helpers::KillOnDrop, Vec<String>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh");
    let mut child = crate::helpers::KillOnDrop(
        Command::new("bash")
            .arg(script)
            .args(args)
            .env("HERALD_BIN", HERALD)
            .env(
                "HERALD_CLUSTER_PORTS",
                format!("{} {} {}", ports[0], ports[1], ports[2]),
            )
            .env("HERALD_CLUSTER_REDIS_PORT", redis_port.to_string())
            .env("HERALD_JWT_SECRET", secret())
            .env("HERALD_CLUSTER_STORE_URL", pg.url())
            .env("HERALD_CLUSTER_DIR", temp_dir("cluster-script"))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        let mut printed = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            printed.push(line.clone());
            if line.starts_with("Press Ctrl-C")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(std::mem::take(&mut printed));
            }
        }
    });
    let printed = tokio::time::timeout(std::time::Duration::from_secs(60), ready_rx)
        .await
        .expect("the cluster is ready within a minute")
        .expect("the script printed its ready lines");
    (child, printed)
}

#[tokio::test]
async fn cluster_script_runs_three_relaying_nodes_and_stops_everything_it_started() {
    use crate::helpers::free_port;
    let ports = [free_port(), free_port(), free_port()];
    let redis_port = free_port();
    let pg = crate::helpers::PgDatabase::create().await;
    let (mut child, printed) = start_cluster_script(
        &[],
        &ports,
        redis_port,
        &pg,
        // The nodes inherit it: a killed node's users leave sooner.
        &[("HERALD__PRESENCE__NODE_TTL", "3s")],
    )
    .await;
    assert!(
        printed[0].starts_with("Herald cluster ready"),
        "{printed:?}"
    );
    // Each node's line names its pid, to kill it with.
    let pid_of = |port: u16| -> String {
        let line = printed
            .iter()
            .find(|l| l.contains(&format!("http://127.0.0.1:{port} ")))
            .unwrap_or_else(|| panic!("no line for port {port}: {printed:?}"));
        line.rsplit_once("pid ")
            .unwrap()
            .1
            .trim_end_matches(')')
            .to_owned()
    };

    let sub = crate::helpers::token("s", &["alerts"], &[]);
    let mut ws = Handshake::to(&format!("ws://127.0.0.1:{}/ws?token={sub}", ports[2]))
        .open()
        .await;
    ws.subscribe("alerts").await;
    let response = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/api/v1/topics/alerts/events",
            ports[0]
        ))
        .bearer_auth(crate::helpers::token("p", &[], &["alerts"]))
        .json(&json!("across nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(ws.recv().await["data"], "across nodes");

    // Presence on `room.>` (deploy/herald.toml): a user on the second node
    // leaves, once, when that node is killed; the others go on.
    let join = |port: u16, sub: &str| {
        let token = crate::helpers::token(sub, &["room.>"], &[]);
        async move {
            let mut client = Handshake::to(&format!("ws://127.0.0.1:{port}/ws?token={token}"))
                .open()
                .await;
            client
                .subscribe_with(
                    json!({"op": "subscribe", "id": 1, "topic": "room.lobby", "presence": true}),
                )
                .await;
            client
        }
    };
    let mut watcher = join(ports[0], "watcher").await;
    let _ada = join(ports[1], "ada").await;
    // Both joins, each in its own node's diff, in either order.
    let mut joined = Vec::new();
    while !(joined.contains(&json!({"sub": "ada"})) && joined.contains(&json!({"sub": "watcher"})))
    {
        let diff = watcher.recv().await;
        assert_eq!(diff["op"], "presence_diff", "{diff}");
        joined.extend(diff["joins"].as_array().unwrap().iter().cloned());
    }
    let killed = Command::new("kill")
        .args(["-KILL", &pid_of(ports[1])])
        .status()
        .unwrap();
    assert!(killed.success());
    let left = tokio::time::timeout(std::time::Duration::from_secs(15), watcher.recv())
        .await
        .expect("the killed node's user leaves within its TTL");
    assert_eq!(left["leaves"], json!([{"sub": "ada"}]), "{left}");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", ports[0]))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "the other nodes go on");
    assert!(child.0.try_wait().unwrap().is_none(), "the script goes on");

    let stopped = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert_eq!(u16::from(ws.closed().await.unwrap().code), 1001);
    crate::helpers::eventually("the script exits", || {
        let exited = child.0.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    for port in ports.into_iter().chain([redis_port]) {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is still served after the script stopped"
        );
    }
}

#[tokio::test]
async fn cluster_script_on_a_redis_cluster_relays_through_a_master_s_death() {
    use crate::helpers::free_port;
    let ports = [free_port(), free_port(), free_port()];
    // Six ports in a row: `HERALD_CLUSTER_REDIS_PORT` with `--redis-cluster`.
    let redis_base = crate::helpers::cluster_ports_in_a_row(6);
    let pg = crate::helpers::PgDatabase::create().await;
    let (mut child, printed) =
        start_cluster_script(&["--redis-cluster"], &ports, redis_base, &pg, &[]).await;
    assert!(
        printed[0].starts_with("Herald cluster ready on a Redis Cluster"),
        "{printed:?}"
    );
    let redis_ports: Vec<u16> = (redis_base..redis_base + 6).collect();
    let roles: Vec<&String> = printed.iter().filter(|l| l.contains("  redis ")).collect();
    assert_eq!(
        roles.iter().filter(|l| l.contains(" master ")).count(),
        3,
        "{printed:?}"
    );
    assert_eq!(roles.iter().filter(|l| l.contains(" slave ")).count(), 3);

    let sub = crate::helpers::token("s", &["alerts"], &[]);
    let mut ws = Handshake::to(&format!("ws://127.0.0.1:{}/ws?token={sub}", ports[2]))
        .open()
        .await;
    ws.subscribe("alerts").await;
    let http = reqwest::Client::new();
    let publish = |n: u64| {
        let http = http.clone();
        async move {
            http.post(format!(
                "http://127.0.0.1:{}/api/v1/topics/alerts/events",
                ports[0]
            ))
            .bearer_auth(crate::helpers::token("p", &[], &["alerts"]))
            .json(&json!(n))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
        }
    };
    assert_eq!(publish(0).await, 201);
    assert_eq!(ws.recv().await["data"], 0);

    // Kill the master of the topic's slot with the pid the script printed:
    // its replica takes over and the topic's events flow again, with no
    // client action.
    let master = crate::helpers::cluster_master_of(&redis_ports, "herald:topic:{alerts}").await;
    let line = roles
        .iter()
        .find(|l| l.contains(&format!("127.0.0.1:{master} ")))
        .unwrap();
    let pid = line.rsplit_once("pid ").unwrap().1.trim_end_matches(')');
    assert!(
        Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .unwrap()
            .success()
    );
    let mut acknowledged = vec![0];
    for n in 1..=300 {
        match publish(n).await {
            201 => acknowledged.push(n),
            503 => {}
            other => panic!("publish answered {other}"),
        }
        if acknowledged.len() >= 3 && n > 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The failover takes cluster-node-timeout (5 s) and an election;
    // what was acknowledged meanwhile comes from the store after it.
    for n in &acknowledged[1..] {
        let mut event = None;
        for _ in 0..8 {
            // Shorter than `recv`'s own timeout, which would fail the test.
            if let Ok(frame) =
                tokio::time::timeout(std::time::Duration::from_secs(4), ws.recv()).await
            {
                event = Some(frame);
                break;
            }
        }
        let event = event.expect("events flow again after the failover");
        assert_eq!(event["data"], *n, "{event}");
    }
    assert!(child.0.try_wait().unwrap().is_none(), "the script goes on");

    let stopped = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    crate::helpers::eventually("the script exits", || {
        let exited = child.0.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    for port in ports.into_iter().chain(redis_ports) {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is still served after the script stopped"
        );
    }
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_the_logs_even_at_trace_level() {
    let log = temp_dir("logs").join("stderr.log");
    let stderr = Stdio::from(std::fs::File::create(&log).unwrap());
    let mut node = ServeProcess::start("logs", &[("RUST_LOG", "trace".into())], stderr).await;
    let http = reqwest::Client::new();
    let sub = crate::helpers::token("logged-sub", &["alerts"], &[]);
    let publ = crate::helpers::token("logged-pub", &[], &["alerts"]);
    let mut ws = node.connect(&sub).await;
    ws.subscribe("alerts").await;
    let refreshed = crate::helpers::token("logged-sub", &["alerts"], &[]);
    ws.send(json!({"op": "refresh", "id": 2, "token": refreshed}))
        .await;
    let published = http
        .post(node.url("/api/v1/topics/alerts/events"))
        .bearer_auth(&publ)
        .json(&json!({"secret-payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    let refused = http
        .get(node.url(&format!("/ws?token={publ}x")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    drop(ws);
    node.stop_with("TERM").await;

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("logged-sub"),
        "the log has the connection lines"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "a log written to a file has no colour codes"
    );
    for (what, secret) in [
        ("subscriber token", sub.as_str()),
        ("publisher token", publ.as_str()),
        ("refresh token", refreshed.as_str()),
        ("signing secret", secret()),
        ("payload", "secret-payload"),
    ] {
        // A JWT's signature part alone is as secret as the whole token.
        let needle = secret.rsplit('.').next().unwrap();
        assert!(!logs.contains(needle), "the {what} is in the logs");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn dev_mode_keeps_its_folder_and_files_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("dev-private");
    let node = start_dev(&dir);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let folder = dir.join(".herald");
    assert_eq!(mode(&folder), 0o700, "{}", folder.display());
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert!(folder.join("herald.db").exists());
    drop(node);
}

#[tokio::test]
async fn serve_takes_bind_on_the_command_line_and_host_names() {
    let dir = temp_dir("bind-flag");
    let port = crate::helpers::free_port();
    let mut child = crate::helpers::KillOnDrop(
        herald(&dir)
            .args(["serve", "--bind", &format!("localhost:{port}")])
            .env("HERALD__AUTH__JWT_SECRET", secret())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let url = format!("http://localhost:{port}/healthz");
    crate::helpers::eventually("the node answers on localhost", || async {
        http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let _ = child.0.kill();

    let out = herald(&dir)
        .args(["serve", "--bind", "nowhere"])
        .env("HERALD__AUTH__JWT_SECRET", secret())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--bind") && stderr.contains("IP:PORT"),
        "{stderr}"
    );
}

#[tokio::test]
async fn cluster_script_shows_the_log_of_a_node_that_cannot_start() {
    use crate::helpers::free_port;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh");
    let ports = [free_port(), free_port(), free_port()];
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .env("HERALD_BIN", HERALD)
        .env(
            "HERALD_CLUSTER_PORTS",
            format!("{} {} {}", ports[0], ports[1], ports[2]),
        )
        .env("HERALD_CLUSTER_REDIS_PORT", free_port().to_string())
        .env("HERALD_JWT_SECRET", secret())
        // A cluster refuses a SQLite store: every node exits at start-up.
        .env("HERALD_CLUSTER_STORE_URL", "sqlite://cluster.db")
        .env("HERALD_CLUSTER_DIR", temp_dir("cluster-script-fails"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not become ready"), "{stderr}");
    assert!(
        stderr.contains("store.url"),
        "the node's own error is shown: {stderr}"
    );
}

#[tokio::test]
async fn token_limits_mints_a_service_token_whose_limits_a_node_applies() {
    let dir = temp_dir("token-limits");
    let mint = |limits: &str| {
        herald(&dir)
            .args([
                "token",
                "--sub",
                "backend",
                "--publish",
                "jobs.>",
                "--limits",
                limits,
            ])
            .env("HERALD__AUTH__JWT_SECRET", secret())
            .output()
            .unwrap()
    };
    let out = mint("http_publish_rate=50000,max_connections_per_sub=1000");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // The claim, as the node reads it.
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["limits"],
        json!({"http_publish_rate": 50000, "max_connections_per_sub": 1000})
    );
    // A node takes 2,000 events at once from it (twice the default rate).
    let node = crate::helpers::spawn_node_with(|s| s.retention.history = false).await;
    let events: Vec<_> = (0..1000)
        .map(|i| json!({"topic": "jobs.a", "data": i}))
        .collect();
    for _ in 0..2 {
        let response = node.publish_batch(&token, &json!(events)).await;
        assert_eq!(response.status(), 201);
    }
    // Unknown keys and bad values are refused before anything is signed.
    for (limits, says) in [
        ("max_connections=5", "unknown limit `max_connections`"),
        ("http_publish_rate=0", "from 1"),
        ("http_publish_rate", "key=value"),
    ] {
        let out = mint(limits);
        assert!(!out.status.success(), "{limits}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{limits}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn token_refuses_a_lifetime_that_is_zero_or_negative() {
    let dir = temp_dir("token-ttl");
    for ttl in [&["--ttl", "0s"][..], &["--ttl=-5m"], &["--ttl", "-5m"]] {
        let stderr = refused(
            herald(&dir)
                .args(["token", "--sub", "a", "--topics", "alerts"])
                .args(ttl)
                .env("HERALD__AUTH__JWT_SECRET", secret()),
        );
        assert!(stderr.contains("positive duration"), "{ttl:?}: {stderr}");
        assert!(!stderr.contains("unexpected argument"), "{ttl:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unknown_setting_names_the_file_or_the_variable_it_came_from() {
    let dir = temp_dir("unknown-setting");
    std::fs::write(
        dir.join("herald.toml"),
        "[server]\nbindd = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let stderr = refused(
        herald(&dir)
            .args(["serve", "--config", "herald.toml"])
            .env("HERALD__AUTH__JWT_SECRET", secret()),
    );
    assert!(
        stderr.contains("`bindd`") && stderr.contains("the file herald.toml"),
        "{stderr}"
    );
    for (variable, field) in [
        ("HERALD__SERVER__BINDD", "`bindd`"),
        ("HERALD__SERVERR__BIND", "`serverr`"),
    ] {
        let stderr = refused(
            herald(&dir)
                .arg("serve")
                .env("HERALD__AUTH__JWT_SECRET", secret())
                .env(variable, "127.0.0.1:0"),
        );
        assert!(
            stderr.contains(field) && stderr.contains(&format!("environment variable {variable}")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_key_that_is_not_pem_says_what_is_expected() {
    let dir = temp_dir("bad-pem");
    for (algorithm, setting, says) in [
        (
            "RS256",
            "HERALD__AUTH__PUBLIC_KEY_PEM",
            "an RSA public key in PEM",
        ),
        (
            "ES256",
            "HERALD__AUTH__PUBLIC_KEY_PEM",
            "an EC P-256 public key in PEM",
        ),
    ] {
        let stderr = refused(
            herald(&dir)
                .arg("serve")
                .env("HERALD__AUTH__ALGORITHM", algorithm)
                .env(setting, "not a key"),
        );
        assert!(
            stderr.contains("auth.public_key_pem") && stderr.contains(says),
            "{algorithm}: {stderr}"
        );
        assert!(stderr.contains("BEGIN PUBLIC KEY"), "{stderr}");
    }
    let stderr = refused(
        herald(&dir)
            .args(["token", "--sub", "a", "--topics", "a"])
            .env("HERALD__AUTH__ALGORITHM", "ES256")
            .env("HERALD__AUTH__PRIVATE_KEY_PEM", "not a key"),
    );
    assert!(
        stderr.contains("auth.private_key_pem") && stderr.contains("PKCS#8"),
        "{stderr}"
    );
}
