//! publish: HTTP publish requests per second one node accepts with its
//! PostgreSQL event log, one event per request and in batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::task::JoinSet;

use crate::client;
use crate::http::Http;
use crate::nodes::Cluster;
use crate::report::{Report, latencies};

pub struct Options {
    pub seconds: f64,
    /// Events per batch request.
    pub batch: usize,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Topics the events are spread over.
    pub topics: usize,
}

/// Runs the single-event and the batch variant.
pub async fn run(cluster: &Cluster, options: &Options) -> Result<Vec<Report>> {
    let single = load(cluster, options, 1).await?;
    let batch = load(cluster, options, options.batch.max(1)).await?;
    Ok(vec![single, batch])
}

async fn load(cluster: &Cluster, options: &Options, batch: usize) -> Result<Report> {
    let name = if batch == 1 {
        "publish_single"
    } else {
        "publish_batch"
    };
    let mut report = Report::new(name, cluster.system);
    let addr = cluster.nodes[0].addr;
    let token: Arc<str> = client::token().into();
    let topics = options.topics.max(1);
    let mut connections = Vec::new();
    for _ in 0..options.connections.max(1) {
        connections.push(Http::connect(addr).await?);
    }
    // Measured from here: connections are open, the clock and CPU start.
    let (cpu0, self0) = (cluster.cpu(), crate::nodes::self_cpu());
    let store0 = cluster.store_cpu().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.seconds);
    let mut workers = JoinSet::new();
    for (w, mut http) in connections.into_iter().enumerate() {
        let token = token.clone();
        workers.spawn(async move {
            let mut micros = Vec::new();
            let (mut events, mut failed) = (0u64, 0u64);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let res = if batch == 1 {
                    let topic = format!("bench.pub.{}", (w + seq as usize) % topics);
                    seq += 1;
                    http.post_json(
                        &client::publish_path(&topic),
                        &token,
                        &client::event_body(seq, 0),
                    )
                    .await?
                } else {
                    let mut body = Vec::with_capacity(batch * 48);
                    body.push(b'[');
                    for i in 0..batch {
                        seq += 1;
                        if i > 0 {
                            body.push(b',');
                        }
                        let topic = (w + i) % topics;
                        body.extend_from_slice(
                            format!(r#"{{"topic":"bench.pub.{topic}","data":"#).as_bytes(),
                        );
                        body.extend_from_slice(&client::event_body(seq, 0));
                        body.push(b'}');
                    }
                    body.push(b']');
                    http.post_json("/api/v1/events", &token, &body).await?
                };
                micros.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if res.status == 201 {
                    events += batch as u64;
                } else {
                    failed += 1;
                    if failed == 1 {
                        eprintln!(
                            "publish answered {}: {}",
                            res.status,
                            String::from_utf8_lossy(&res.body)
                        );
                    }
                }
            }
            anyhow::Ok((events, failed, micros))
        });
    }
    let (mut events, mut failed, mut all) = (0, 0, Vec::new());
    while let Some(joined) = workers.join_next().await {
        let (e, f, m) = joined??;
        events += e;
        failed += f;
        all.extend(m);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu1, self1) = (cluster.cpu(), crate::nodes::self_cpu());
    let store1 = cluster.store_cpu().await;
    if events == 0 {
        bail!("{name}: no publish succeeded ({failed} failed)");
    }
    report.set("batch", batch as f64);
    report.set("requests_per_s", all.len() as f64 / elapsed);
    report.set("events_per_s", events as f64 / elapsed);
    report.set("failed_requests", failed as f64);
    report.set(
        "node_cpu_us_per_event",
        (cpu1 - cpu0).as_secs_f64() * 1e6 / events as f64,
    );
    if let (Some(store0), Some(store1)) = (store0, store1) {
        report.set(
            "store_cpu_us_per_event",
            store1.saturating_sub(store0).as_secs_f64() * 1e6 / events as f64,
        );
    }
    report.set(
        "harness_cpu_us_per_event",
        (self1 - self0).as_secs_f64() * 1e6 / events as f64,
    );
    latencies(&mut report, all);
    Ok(report)
}
