//! publish: HTTP publish requests per second one node accepts with its
//! PostgreSQL event log: one event per request over many topics and over
//! one, in batches, and a lone publisher at a steady rate beside the
//! store's own commit time for the same statement. Beside them, the same
//! single-event load on topics without history: what one request costs
//! without the log, the ceiling for single-event publishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::task::JoinSet;

use crate::client;
use crate::http::Http;
use crate::nodes::Cluster;
use crate::report::{Report, latencies, quantile};

pub struct Options {
    pub seconds: f64,
    /// Events per batch request.
    pub batch: usize,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Topics the events are spread over.
    pub topics: usize,
    /// Events of the lone publisher (0: skip it).
    pub lone_events: u64,
    /// Its events per second.
    pub lone_rate: f64,
}

/// Topics of the durable variants, and of the one without history.
const DURABLE: &str = "bench.pub.";
const VOLATILE: &str = "bench.volatile.pub.";

/// Runs the single-event variants (over `topics` topics, then over one,
/// then without history) and the batch variant (for `seconds` each; 0
/// skips them), then the lone publisher.
pub async fn run(cluster: &Cluster, options: &Options) -> Result<Vec<Report>> {
    let mut reports = Vec::new();
    if options.seconds > 0.0 {
        let topics = options.topics;
        let batch = options.batch.max(1);
        for (name, batch, topics, prefix) in [
            ("publish_single", 1, topics, DURABLE),
            ("publish_single_one_topic", 1, 1, DURABLE),
            ("publish_single_no_history", 1, topics, VOLATILE),
            ("publish_batch", batch, topics, DURABLE),
        ] {
            reports.push(load(cluster, options, name, batch, topics, prefix).await?);
        }
    }
    if options.lone_events > 0 {
        reports.push(lone(cluster, options.lone_events, options.lone_rate).await?);
    }
    Ok(reports)
}

async fn load(
    cluster: &Cluster,
    options: &Options,
    name: &str,
    batch: usize,
    topics: usize,
    prefix: &'static str,
) -> Result<Report> {
    let mut report = Report::new(name, cluster.system);
    report.set("topics", topics as f64);
    report.set("connections", options.connections as f64);
    let token: Arc<str> = client::token().into();
    let topics = topics.max(1);
    // Spread over the nodes: a cluster's nodes publishing to the same
    // topics contend for their rows.
    let mut connections = Vec::new();
    for c in 0..options.connections.max(1) {
        let node = &cluster.nodes[c % cluster.nodes.len()];
        connections.push(Http::connect(node.addr).await?);
    }
    report.set("nodes", cluster.nodes.len() as f64);
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
                    let topic = format!("{prefix}{}", (w + seq as usize) % topics);
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
                            format!(r#"{{"topic":"{prefix}{topic}","data":"#).as_bytes(),
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

/// What Herald runs for one event without a key on PostgreSQL (see
/// `Store::append`): the store's own commit time is this statement's.
const APPEND_ONE: &str = "WITH v (topic, n) AS (VALUES ($2, $3)), \
     t AS ( \
         INSERT INTO herald_topics (topic, epoch, last_seq, created_ms) \
         SELECT topic, (SELECT value FROM herald_meta WHERE name = 'log_epoch'), n, $1 \
         FROM v WHERE topic IS NOT NULL \
         ON CONFLICT (topic) DO UPDATE SET last_seq = herald_topics.last_seq + excluded.last_seq \
         RETURNING topic, last_seq), \
     e (topic, back, is_binary, payload) AS (VALUES ($4, $5, $6, $7)), \
     i AS ( \
         INSERT INTO herald_events (topic, seq, ts, is_binary, payload) \
         SELECT e.topic, t.last_seq - e.back, $1, e.is_binary, e.payload \
         FROM e JOIN t ON t.topic = e.topic \
         RETURNING 1) \
     SELECT topic, last_seq, (SELECT count(*) FROM i) FROM t";

/// One publisher, one event at a time at `rate` per second: each
/// request's time to 201. Then the same number of the same statement
/// straight to the same database, at the same rate: the floor.
async fn lone(cluster: &Cluster, events: u64, rate: f64) -> Result<Report> {
    use sqlx::Connection;
    let mut report = Report::new("publish_lone", cluster.system);
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let token = client::token();
    let path = client::publish_path("bench.lone");
    let mut http = Http::connect(cluster.nodes[0].addr).await?;
    let mut herald = Vec::with_capacity(events as usize);
    let mut next = tokio::time::Instant::now();
    for seq in 1..=events {
        tokio::time::sleep_until(next).await;
        next += interval;
        let sent = Instant::now();
        let res = http
            .post_json(&path, &token, &client::event_body(seq, 0))
            .await?;
        if res.status != 201 {
            bail!("publish_lone: publish answered {}", res.status);
        }
        herald.push(micros(sent));
    }
    let mut conn = sqlx::PgConnection::connect(&cluster.database_url()?).await?;
    let mut floor = Vec::with_capacity(events as usize);
    for seq in 1..=events {
        tokio::time::sleep_until(next).await;
        next += interval;
        let sent = Instant::now();
        sqlx::query(APPEND_ONE)
            .bind(unix_ms())
            .bind("bench.lone.floor")
            .bind(1_i64) // one event for the topic
            .bind("bench.lone.floor")
            .bind(0_i64) // it is the topic's last
            .bind(0_i64) // is_binary: a JSON payload
            .bind(client::event_body(seq, 0))
            .fetch_all(&mut conn)
            .await?;
        floor.push(micros(sent));
    }
    let _ = conn.close().await;
    report.set("events", events as f64);
    report.set("rate", rate);
    floor.sort_unstable();
    let (floor_p50, floor_p99) = (
        quantile(&floor, 0.5) / 1000.0,
        quantile(&floor, 0.99) / 1000.0,
    );
    report.set("store_commit_p50_ms", floor_p50);
    report.set("store_commit_p99_ms", floor_p99);
    latencies(&mut report, herald);
    let (p50, p99) = (report.get("p50_ms"), report.get("p99_ms"));
    report.set("p50_above_store_ms", p50.unwrap_or(f64::NAN) - floor_p50);
    report.set("p99_above_store_ms", p99.unwrap_or(f64::NAN) - floor_p99);
    Ok(report)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}
