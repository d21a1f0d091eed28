//! fanout: S subscribers on one topic (or spread over T topics) spread over
//! the cluster's nodes, a publisher posting at a fixed rate to the first
//! node; deliveries per second, publish→receive latency, lost and
//! duplicated deliveries, the nodes' CPU time per delivery, and the
//! busiest node's cores in use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{bitset, mark, publish_schedule, subscribe_many, warm_up};
use crate::client::{Subscriber, Transport};
use crate::nodes::{Cluster, self_cpu};
use crate::report::{Report, latencies};

pub struct Options {
    pub subscribers: usize,
    /// Offered deliveries per second (events per second × subscribers).
    pub rate: u64,
    pub seconds: f64,
    /// Subscribers are spread round-robin over this many topics, each
    /// published to at the same rate: the same offered deliveries as one
    /// topic, over several.
    pub topics: usize,
    /// How Herald's subscribers receive.
    pub transport: Transport,
}

/// What one subscriber saw.
struct Seen {
    /// Sequence numbers received, as a bitset.
    bits: Vec<u64>,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    latencies_us: Vec<u32>,
    last: Option<Instant>,
    closed: Option<String>,
}

const TOPIC: &str = "bench.fanout";
/// A run ends this long after the last delivery once publishing is over.
const QUIET: Duration = Duration::from_secs(5);
/// ... and at most this long after publishing is over.
const DRAIN: Duration = Duration::from_secs(60);

pub async fn run(name: &str, cluster: &Cluster, options: &Options) -> Result<Report> {
    let mut report = Report::new(name, cluster.system);
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let subscribers = options.subscribers.max(1);
    let topics: Vec<String> = match options.topics.max(1) {
        1 => vec![TOPIC.to_owned()],
        n => (0..n).map(|t| format!("{TOPIC}.{t}")).collect(),
    };
    // Per topic: each of its events reaches subscribers / topics.
    let events_per_sec = (options.rate as f64 / subscribers as f64).max(0.1);
    let events = ((events_per_sec * options.seconds).round() as u64).max(1);
    report.set("subscribers", subscribers as f64);
    report.set("topics", topics.len() as f64);
    report.set(
        "offered_deliveries_per_s",
        events_per_sec * subscribers as f64,
    );
    report.set("events", (events * topics.len() as u64) as f64);

    let topic_of = |i: usize| i % topics.len();
    let (subs, _) = subscribe_many(
        cluster.system,
        options.transport,
        &addrs,
        subscribers,
        |i| topics[topic_of(i)].clone(),
    )
    .await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (i, sub) in subs.into_iter().enumerate() {
        let (delivered, finished, stop) = (delivered.clone(), finished.clone(), stop.clone());
        let topic = topic_of(i);
        tasks.spawn(async move {
            let seen = receive(sub, events, delivered, stop).await;
            finished.fetch_add(1, Ordering::Relaxed);
            (topic, seen)
        });
    }

    for topic in &topics {
        warm_up(addrs[0], topic).await?;
    }
    let (cpu0, store0) = (cluster.cpu(), cluster.store_cpu().await);
    let (redis0, self0) = (cluster.redis_cpu(), self_cpu());
    let nodes0: Vec<Duration> = cluster.nodes.iter().map(|n| n.proc.cpu()).collect();
    let started = Instant::now();
    let schedules: Vec<_> = topics
        .iter()
        .map(|topic| {
            let (addr, topic) = (addrs[0], topic.clone());
            tokio::spawn(
                async move { publish_schedule(addr, &topic, events, events_per_sec, 4).await },
            )
        })
        .collect();
    let mut published = Vec::with_capacity(schedules.len());
    for schedule in schedules {
        published.push(schedule.await??);
    }
    let subs_per_topic = |t: usize| (subscribers - t).div_ceil(topics.len()) as u64;
    let expected: u64 = published
        .iter()
        .enumerate()
        .map(|(t, p)| p.accepted_count * subs_per_topic(t))
        .sum();
    let publish_end = Instant::now();
    let (mut last_count, mut last_progress) = (delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = delivered.load(Ordering::Relaxed);
        if now >= expected || finished.load(Ordering::Relaxed) == subscribers {
            break;
        }
        if now != last_count {
            (last_count, last_progress) = (now, Instant::now());
        }
        if last_progress.elapsed() > QUIET || publish_end.elapsed() > DRAIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cpu1, redis1, self1) = (cluster.cpu(), cluster.redis_cpu(), self_cpu());
    let wall = started.elapsed().as_secs_f64();
    let busiest = cluster
        .nodes
        .iter()
        .zip(&nodes0)
        .map(|(n, before)| n.proc.cpu().saturating_sub(*before))
        .max()
        .unwrap_or_default();
    let store1 = cluster.store_cpu().await;
    let _ = stop_tx.send(true);

    let (mut unique, mut duplicates, mut reordered, mut closed) = (0u64, 0u64, 0u64, 0u64);
    // Judged per event: accepted but not received is lost; received but
    // never accepted (its publish failed) is reported, not netted off.
    let (mut lost, mut unacknowledged) = (0u64, 0u64);
    let mut all = Vec::with_capacity(expected as usize);
    let mut last: Option<Instant> = None;
    let mut first_close = None;
    while let Some(joined) = tasks.join_next().await {
        let (topic, seen) = joined?;
        unique += seen.unique;
        for (got, ok) in seen.bits.iter().zip(&published[topic].accepted) {
            lost += u64::from((ok & !got).count_ones());
            unacknowledged += u64::from((got & !ok).count_ones());
        }
        duplicates += seen.duplicates;
        reordered += seen.reordered;
        all.extend_from_slice(&seen.latencies_us);
        last = last.max(seen.last);
        if let Some(reason) = seen.closed {
            closed += 1;
            first_close.get_or_insert(reason);
        }
    }
    let first = published.iter().map(|p| p.first).min().unwrap_or(started);
    let span = last.map_or(0.0, |l| (l - first).as_secs_f64());
    let failed: u64 = published.iter().map(|p| p.failed).sum();
    report.set("publish_failed", failed as f64);
    report.set("deliveries", unique as f64);
    report.set(
        "deliveries_per_s",
        if span > 0.0 {
            unique as f64 / span
        } else {
            0.0
        },
    );
    report.set("lost", lost as f64);
    report.set("delivered_unacknowledged", unacknowledged as f64);
    report.set("duplicated", duplicates as f64);
    report.set("reordered", reordered as f64);
    report.set("disconnected", closed as f64);
    latencies(&mut report, all);
    let per_delivery = |d: Duration| {
        if unique == 0 {
            f64::NAN
        } else {
            d.as_secs_f64() * 1e6 / unique as f64
        }
    };
    report.set("node_cpu_us_per_delivery", per_delivery(cpu1 - cpu0));
    if let (Some(store0), Some(store1)) = (store0, store1) {
        report.set(
            "store_cpu_us_per_delivery",
            per_delivery(store1.saturating_sub(store0)),
        );
    }
    report.set("redis_cpu_us_per_delivery", per_delivery(redis1 - redis0));
    // CPU seconds per second of the run on the busiest node: above 1.0,
    // it used more than one core.
    report.set("busiest_node_cores", busiest.as_secs_f64() / wall);
    report.set("harness_cpu_us_per_delivery", per_delivery(self1 - self0));
    if let Some(reason) = first_close {
        report.error = Some(format!("{closed} subscribers disconnected, e.g.: {reason}"));
    }
    Ok(report)
}

/// Receives until all `events` arrived or the run stops.
async fn receive(
    mut sub: Subscriber,
    events: u64,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen {
        bits: bitset(events),
        unique: 0,
        duplicates: 0,
        reordered: 0,
        latencies_us: Vec::with_capacity(events as usize),
        last: None,
        closed: None,
    };
    let mut last_offset = 0;
    while seen.unique < events {
        let received = tokio::select! {
            biased;
            r = sub.next_event() => r,
            _ = stop.changed() => break,
        };
        let event = match received {
            Ok(event) => event,
            Err(e) => {
                seen.closed = Some(e.to_string());
                break;
            }
        };
        if event.seq == 0 {
            continue; // warm-up
        }
        if !mark(&mut seen.bits, event.seq) {
            seen.duplicates += 1;
            continue;
        }
        // Order is the system's: offsets must rise. (Sequence numbers need
        // not, since the publisher's connections race each other.)
        if let Some(offset) = event.offset {
            if offset <= last_offset {
                seen.reordered += 1;
            }
            last_offset = last_offset.max(offset);
        }
        seen.unique += 1;
        seen.latencies_us
            .push(event.latency_us.min(u64::from(u32::MAX)) as u32);
        seen.last = Some(Instant::now());
        delivered.fetch_add(1, Ordering::Relaxed);
    }
    if seen.closed.is_none() {
        sub.close().await;
    }
    seen
}
