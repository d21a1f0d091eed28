//! latency: one subscriber on the last node, events published to the first
//! node at a steady rate; publish→receive latency percentiles. Run against
//! the echo floor too, so a system's figures can be read above it.

use std::time::Duration;

use anyhow::{Result, bail};

use super::{bitset, mark, publish_schedule, subscribe_many, warm_up};
use crate::client::Transport;
use crate::nodes::Cluster;
use crate::report::{Report, latencies};

pub struct Options {
    pub events: u64,
    pub rate: f64,
}

/// A topic with history (Herald commits each event to its log first).
pub const DURABLE: &str = "bench.latency";
/// A topic without history on Herald (see `nodes::HERALD_CONFIG`).
pub const VOLATILE: &str = "bench.volatile.latency";

pub async fn run(
    name: &str,
    topic: &'static str,
    cluster: &Cluster,
    options: &Options,
) -> Result<Report> {
    let mut report = Report::new(name, cluster.system);
    let first = cluster.nodes[0].addr;
    let last = cluster.nodes[cluster.nodes.len() - 1].addr;
    let (mut subs, _) = subscribe_many(cluster.system, Transport::WebSocket, &[last], 1, |_| {
        topic.into()
    })
    .await?;
    let mut sub = subs.pop().expect("one subscriber");
    let events = options.events;
    let receiver = tokio::spawn(async move {
        let (mut micros, mut seen, mut duplicates) = (Vec::new(), bitset(events), 0u64);
        while (micros.len() as u64) < events {
            match tokio::time::timeout(Duration::from_secs(10), sub.next_event()).await {
                Ok(Ok(event)) if event.seq == 0 => {} // warm-up
                Ok(Ok(event)) => {
                    if !mark(&mut seen, event.seq) {
                        duplicates += 1;
                        continue;
                    }
                    micros.push(event.latency_us.min(u64::from(u32::MAX)) as u32);
                }
                Ok(Err(e)) => return Err(anyhow::Error::from(e)),
                Err(_) => break,
            }
        }
        sub.close().await;
        Ok((micros, duplicates))
    });
    warm_up(first, topic).await?;
    let published = publish_schedule(first, topic, events, options.rate, 1).await?;
    let (micros, duplicates) = receiver.await??;
    if published.failed > 0 {
        bail!("{} of {events} publishes failed", published.failed);
    }
    report.set("events", events as f64);
    report.set(
        "lost",
        published.accepted_count.saturating_sub(micros.len() as u64) as f64,
    );
    report.set("duplicated", duplicates as f64);
    latencies(&mut report, micros);
    Ok(report)
}
