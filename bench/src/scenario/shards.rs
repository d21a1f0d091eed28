//! shards: Herald relaying through a Redis Cluster (`redis.mode =
//! "cluster"`), beside one Redis.
//!
//! - [`spread`]: T topics, each watched by a subscriber on node B; one
//!   event per topic and round published through node A, one per request,
//!   with history and without. Reports the Redis command time per published event
//!   (one Redis: `PUBLISH` and the numbering script; a Redis Cluster:
//!   `SPUBLISH` and the script, summed over the masters), the Redis
//!   processes' CPU per event (from `/proc`, replicas included) and, in a
//!   cluster, how evenly the masters share the channels and the commands
//!   (busiest over quietest).
//! - [`failover`]: a steady publisher over topics on every master; the
//!   master of some of them is SIGKILLed. Reports the time from its death
//!   until its topics' events arrive again (the first may come from the
//!   store), the time the cluster took to promote its replica, and from
//!   then until the first event published after it arrives; and whether
//!   every acknowledged event arrived once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::client::{self, now_nanos};
use crate::http::Http;
use crate::nodes::{CLUSTER_NODE_TIMEOUT_MS, Cluster, Paths, System};
use crate::report::Report;
use crate::wire::{Ws, field};

/// The nodes' settings: one connection watches many topics, subscribed
/// back to back.
pub const NODE_ENV: &[(&str, &str)] = &[
    ("HERALD__LIMITS__MAX_SUBSCRIPTIONS", "10000"),
    ("HERALD__LIMITS__SUBSCRIBE_RATE", "1000000"),
    (
        "RUST_LOG",
        "warn,herald::relay=debug,herald::pipeline=debug",
    ),
];

pub struct Options {
    pub topics: usize,
    /// Events published per topic and kind (with history, without).
    pub rounds: usize,
}

/// Topics watched by one subscriber connection.
const TOPICS_PER_CONNECTION: usize = 1000;
/// Concurrent publishing connections.
const PUBLISHERS: usize = 16;
/// How long the subscribers may take to receive everything published.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The commands Herald sends Redis to publish (a script's inner commands
/// are inside its time) and to subscribe.
fn commands(sharded: bool) -> (&'static [&'static str], &'static [&'static str]) {
    if sharded {
        (&["spublish", "evalsha", "eval"], &["ssubscribe"])
    } else {
        (&["publish", "evalsha", "eval"], &["subscribe"])
    }
}

/// Busiest over quietest of `values`.
fn spread_ratio(values: &[u64]) -> f64 {
    let max = values.iter().copied().max().unwrap_or(0) as f64;
    let min = values.iter().copied().min().unwrap_or(0).max(1) as f64;
    max / min
}

pub async fn spread(
    name: &str,
    cluster: &Cluster,
    sharded: bool,
    options: &Options,
) -> Result<Report> {
    if cluster.system != System::Herald {
        bail!("shards measures Herald only");
    }
    let mut report = Report::new(name, cluster.system);
    let (publish_cmds, subscribe_cmds) = commands(sharded);
    let a = cluster.nodes[0].addr;
    let b = cluster.nodes.last().context("no node")?.addr;
    let kinds = [
        ("bench.shard.t", "history"),
        ("bench.volatile.shard.t", "no_history"),
    ];
    let topics: Vec<String> = kinds
        .iter()
        .flat_map(|(stem, _)| (0..options.topics).map(move |k| format!("{stem}{k}")))
        .collect();

    cluster.redis_command_stats(subscribe_cmds).await?;
    let started = Instant::now();
    let mut readers = JoinSet::new();
    for chunk in topics.chunks(TOPICS_PER_CONNECTION) {
        let ws = watch(b, chunk).await?;
        let expected = chunk.len() * options.rounds;
        readers.spawn(read_count(ws, expected));
    }
    report.set("subscribe_s", started.elapsed().as_secs_f64());
    let subscribed = cluster.redis_command_stats(subscribe_cmds).await?;
    if sharded {
        let calls: Vec<u64> = subscribed.iter().map(|(_, calls, _)| *calls).collect();
        // Replicas take no subscription: the masters are those with calls.
        let masters: Vec<u64> = calls.iter().copied().filter(|c| *c > 0).collect();
        report.set("masters", masters.len() as f64);
        report.set("channels_busiest_to_quietest", spread_ratio(&masters));
    }

    let mut published = 0u64;
    let mut per_master_publish: BTreeMap<SocketAddr, u64> = BTreeMap::new();
    for (stem, kind) in kinds {
        cluster.redis_command_stats(publish_cmds).await?;
        let redis_cpu = cluster.redis_cpu();
        // One event per request (what one publish costs), over
        // PUBLISHERS keep-alive connections, each its share of the topics.
        let mut publishers = JoinSet::new();
        for p in 0..PUBLISHERS {
            let (stem, topics, rounds) = (stem.to_owned(), options.topics, options.rounds);
            publishers.spawn(async move {
                let token = client::token();
                let mut http = Http::connect(a).await?;
                let mut events = 0u64;
                for round in 0..rounds {
                    for k in (p..topics).step_by(PUBLISHERS) {
                        let body = format!(r#"{{"i":{round},"t":0}}"#);
                        let path = client::publish_path(&format!("{stem}{k}"));
                        let response = http.post_json(&path, &token, body.as_bytes()).await?;
                        if response.status != 201 {
                            bail!("publish answered {}", response.status);
                        }
                        events += 1;
                    }
                }
                anyhow::Ok(events)
            });
        }
        let mut events = 0u64;
        while let Some(done) = publishers.join_next().await {
            events += done??;
        }
        let redis_cpu = cluster.redis_cpu() - redis_cpu;
        let stats = cluster.redis_command_stats(publish_cmds).await?;
        let usec: u64 = stats.iter().map(|(_, _, usec)| usec).sum();
        report.set(
            if kind == "history" {
                "redis_cpu_us_per_event_history"
            } else {
                "redis_cpu_us_per_event_no_history"
            },
            redis_cpu.as_secs_f64() * 1e6 / events as f64,
        );
        for (addr, calls, _) in &stats {
            *per_master_publish.entry(*addr).or_default() += calls;
        }
        report.set(
            if kind == "history" {
                "redis_us_per_event_history"
            } else {
                "redis_us_per_event_no_history"
            },
            usec as f64 / events as f64,
        );
        published += events;
    }
    report.set("topics", options.topics as f64);
    report.set("events", published as f64);
    if sharded {
        let calls: Vec<u64> = per_master_publish
            .values()
            .copied()
            .filter(|c| *c > 0)
            .collect();
        report.set("commands_busiest_to_quietest", spread_ratio(&calls));
    }

    let mut delivered = 0;
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while let Some(done) = tokio::time::timeout_at(deadline, readers.join_next())
        .await
        .context("the subscribers did not receive every event within 120 s")?
    {
        delivered += done??;
    }
    report.set("delivered", delivered as f64);
    if delivered != published {
        bail!("{published} events published, {delivered} delivered");
    }
    Ok(report)
}

/// A connection to `addr` watching every topic of `topics`.
async fn watch(addr: SocketAddr, topics: &[String]) -> Result<Ws> {
    let token = client::token();
    let mut ws = Ws::connect(
        addr,
        None,
        &format!("/ws?token={token}"),
        Some("herald.json"),
    )
    .await?;
    for topic in topics {
        ws.send_text(&format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#))
            .await?;
    }
    let mut acknowledged = 0;
    while acknowledged < topics.len() {
        let frame = ws.next_data().await?;
        if memchr::memmem::find(frame, br#""op":"subscribed""#).is_some() {
            acknowledged += 1;
        } else {
            bail!("subscribe refused: {}", String::from_utf8_lossy(frame));
        }
    }
    Ok(ws)
}

/// Counts the events `ws` receives until `expected` arrived.
async fn read_count(mut ws: Ws, expected: usize) -> Result<u64> {
    let mut got = 0;
    while got < expected {
        let frame = ws.next_data().await?;
        if memchr::memmem::find(frame, br#""op":"event""#).is_some() {
            got += 1;
        }
    }
    Ok(got as u64)
}

/// Topics of the failover run.
const FAILOVER_TOPICS: usize = 30;
/// The steady publisher's pause between publishes.
const PUBLISH_PAUSE: Duration = Duration::from_millis(5);
/// The run's bound: the publisher stops by then whatever happens.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

/// One event received: when, on which topic, its offset, and when it was
/// published (both on the publisher's clock).
struct Arrival {
    /// The publisher's clock at arrival.
    at_nanos: u64,
    topic: String,
    offset: u64,
    sent_nanos: u64,
}

pub async fn failover(cluster: &mut Cluster, paths: &Paths) -> Result<Report> {
    let mut report = Report::new("shards_failover", cluster.system);
    report.set("cluster_node_timeout_ms", CLUSTER_NODE_TIMEOUT_MS as f64);
    let a = cluster.nodes[0].addr;
    let b = cluster.nodes.last().context("no node")?.addr;
    let topics: Vec<String> = (0..FAILOVER_TOPICS)
        .map(|k| format!("bench.failover.t{k}"))
        .collect();
    let channel = |topic: &str| format!("herald:topic:{{{topic}}}");
    let victim = cluster.redis_master_of(paths, &channel(&topics[0])).await?;
    let mut on_victim = HashSet::new();
    for topic in &topics {
        if cluster.redis_master_of(paths, &channel(topic)).await? == victim {
            on_victim.insert(topic.clone());
        }
    }

    let mut ws = watch(b, &topics).await?;
    let arrivals = Arc::new(Mutex::new(Vec::<Arrival>::new()));
    let reading = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            loop {
                let frame = ws.next_data().await?;
                let (Some(offset), Some(sent_nanos)) =
                    (field(frame, br#""offset":"#), field(frame, br#""t":"#))
                else {
                    continue;
                };
                let topic = topic_of(frame).unwrap_or_default();
                arrivals.lock().await.push(Arrival {
                    at_nanos: now_nanos(),
                    topic,
                    offset,
                    sent_nanos,
                });
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let (stop, topics) = (Arc::clone(&stop), topics.clone());
        tokio::spawn(async move {
            let token = client::token();
            let mut http = Http::connect(a).await?;
            let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            let (mut refused, started) = (0u64, Instant::now());
            'publishing: for round in 0.. {
                for topic in &topics {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > FAILOVER_BOUND {
                        break 'publishing;
                    }
                    let body = format!(r#"{{"i":{round},"t":{}}}"#, now_nanos());
                    let response = http
                        .post_json(&client::publish_path(topic), &token, body.as_bytes())
                        .await?;
                    match response.status {
                        201 => {
                            let offset = field(&response.body, br#""offset":"#)
                                .context("201 without an offset")?;
                            acked.entry(topic.clone()).or_default().push(offset);
                        }
                        503 => refused += 1,
                        other => bail!("publish answered {other}"),
                    }
                    tokio::time::sleep(PUBLISH_PAUSE).await;
                }
            }
            anyhow::Ok((acked, refused))
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (killed_at, killed_nanos) = (Instant::now(), now_nanos());
    cluster.kill_redis(victim);
    // When the cluster promoted the replica, as seen by polling.
    let (promoted, promoted_nanos) = loop {
        let masters = cluster.redis_masters(paths).await.unwrap_or_default();
        if masters.len() == 3 && !masters.contains(&victim) {
            break (killed_at.elapsed(), now_nanos());
        }
        if killed_at.elapsed() > Duration::from_secs(30) {
            bail!("no replica took over within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The first event of a dead master's topic published after its death
    // that reached the subscriber; then the first published after the
    // replica took over: how long Herald took to follow the cluster,
    // beyond the failover itself.
    let first_after = |nanos: u64| first_arrival(&arrivals, &on_victim, nanos, killed_at);
    let recovered = Duration::from_nanos(first_after(killed_nanos).await? - killed_nanos);
    let followed = Duration::from_nanos(first_after(promoted_nanos).await? - promoted_nanos);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publishing.await??;

    // Every acknowledged event arrives once, in order.
    let expected: usize = acked.values().map(Vec::len).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    let received = loop {
        let arrived = arrivals.lock().await;
        if arrived.len() >= expected || Instant::now() > deadline {
            let mut received: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for e in arrived.iter() {
                received.entry(e.topic.clone()).or_default().push(e.offset);
            }
            break received;
        }
        drop(arrived);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    reading.abort();
    let lost: usize = acked
        .iter()
        .map(|(t, offsets)| {
            let got = received.get(t).map(Vec::as_slice).unwrap_or(&[]);
            offsets.iter().filter(|o| !got.contains(o)).count()
        })
        .sum();
    let out_of_order = received
        .values()
        .filter(|offsets| offsets.windows(2).any(|w| w[0] >= w[1]))
        .count();

    report.set("topics", FAILOVER_TOPICS as f64);
    report.set("topics_on_dead_master", on_victim.len() as f64);
    report.set("replica_promoted_ms", promoted.as_secs_f64() * 1e3);
    report.set("delivery_resumed_ms", recovered.as_secs_f64() * 1e3);
    report.set(
        "after_failover_first_event_ms",
        followed.as_secs_f64() * 1e3,
    );
    report.set("acknowledged", expected as f64);
    report.set("refused_503", refused as f64);
    report.set("lost", lost as f64);
    report.set("topics_out_of_order_or_duplicated", out_of_order as f64);
    if lost > 0 || out_of_order > 0 {
        let detail: Vec<String> = acked
            .iter()
            .filter_map(|(t, offsets)| {
                let got = received.get(t).map(Vec::as_slice).unwrap_or(&[]);
                let missing: Vec<&u64> = offsets.iter().filter(|o| !got.contains(o)).collect();
                (!missing.is_empty()).then(|| {
                    format!(
                        "{t}{}: {} missing from {:?}, received up to {:?}",
                        if on_victim.contains(t) {
                            " (dead master)"
                        } else {
                            ""
                        },
                        missing.len(),
                        missing.first(),
                        got.last()
                    )
                })
            })
            .collect();
        bail!(
            "{lost} acknowledged events lost, {out_of_order} topics out of order or duplicated: {}",
            detail.join("; ")
        );
    }
    Ok(report)
}

/// When (the publisher's clock) the first event of `topics` published
/// after `nanos` arrived; waits for it until 45 s after `killed_at`.
async fn first_arrival(
    arrivals: &Mutex<Vec<Arrival>>,
    topics: &HashSet<String>,
    nanos: u64,
    killed_at: Instant,
) -> Result<u64> {
    loop {
        let first = arrivals
            .lock()
            .await
            .iter()
            .filter(|e| topics.contains(&e.topic) && e.sent_nanos > nanos)
            .map(|e| e.at_nanos)
            .min();
        if let Some(at_nanos) = first {
            return Ok(at_nanos);
        }
        if killed_at.elapsed() > Duration::from_secs(45) {
            bail!("no event of the dead master's topics arrived within 45 s of its death");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `"topic"` of an event frame.
fn topic_of(frame: &[u8]) -> Option<String> {
    let key = br#""topic":""#;
    let at = memchr::memmem::find(frame, key)? + key.len();
    let end = at + memchr::memchr(b'"', &frame[at..])?;
    Some(String::from_utf8_lossy(&frame[at..end]).into_owned())
}
