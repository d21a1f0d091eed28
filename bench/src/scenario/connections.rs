//! connections: C idle, authenticated connections (WebSockets, or SSE
//! streams) to one node, each subscribed to its own topic; connections
//! accepted (and subscribed) per second, and the node's resident memory
//! growth per connection.

use std::time::Duration;

use anyhow::Result;

use super::subscribe_many;
use crate::client::Transport;
use crate::nodes::Cluster;
use crate::report::Report;

#[derive(Clone, Copy)]
pub struct Options {
    pub connections: usize,
    /// All connections on one topic instead of one topic each, to tell
    /// per-connection from per-topic memory.
    pub shared_topic: bool,
    /// How Herald's subscribers receive.
    pub transport: Transport,
}

/// How long connections sit idle before the node's memory is read.
const SETTLE: Duration = Duration::from_secs(3);

pub async fn run(cluster: &Cluster, options: &Options) -> Result<Report> {
    let name = match (options.shared_topic, options.transport) {
        (true, _) => "connections_one_topic",
        (false, Transport::Sse) => "connections_sse",
        (false, Transport::WebSocket) => "connections",
    };
    let mut report = Report::new(name, cluster.system);
    let node = &cluster.nodes[0];
    let before = node.proc.rss();
    let shared = options.shared_topic;
    let (subs, took) = subscribe_many(
        cluster.system,
        options.transport,
        &[node.addr],
        options.connections,
        |k| {
            if shared {
                "bench.conn".to_owned()
            } else {
                format!("bench.conn.{k}")
            }
        },
    )
    .await?;
    // Idle: each connection only answers the node's pings.
    let mut idle = tokio::task::JoinSet::new();
    for mut sub in subs {
        idle.spawn(async move { sub.idle().await });
    }
    tokio::time::sleep(SETTLE).await;
    let after = node.proc.rss();
    // A connection that ended while idle was dropped by the node.
    let mut dropped = 0;
    while idle.try_join_next().is_some() {
        dropped += 1;
    }
    idle.shutdown().await;
    let n = options.connections as f64;
    report.set("connections", n);
    report.set("accepted_per_s", n / took.as_secs_f64());
    report.set("rss_before_mib", before as f64 / 1048576.0);
    report.set("rss_after_mib", after as f64 / 1048576.0);
    report.set(
        "rss_kib_per_connection",
        after.saturating_sub(before) as f64 / 1024.0 / n,
    );
    report.set("dropped_while_idle", f64::from(dropped));
    Ok(report)
}
