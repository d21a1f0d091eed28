//! The scenarios, each one function from a running cluster to a report, and
//! what they share: opening many subscribers and publishing on a schedule.

pub mod connections;
pub mod fanout;
pub mod latency;
pub mod presence;
pub mod prune;
pub mod publish;
pub mod shards;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::client::{self, Subscriber, Transport};
use crate::http::Http;
use crate::nodes::System;

/// Loopback source addresses subscribers are spread over, so that tens of
/// thousands of connections do not run out of ephemeral ports.
const SOURCES: u8 = 8;
/// Handshakes in flight at once.
const CONNECT_CONCURRENCY: usize = 256;

fn source(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (k % SOURCES as usize) as u8))
}

/// Opens `count` subscribers round-robin over `nodes`, subscriber `k` on
/// `topic(k)` (over `transport`, for Herald); returns them in order with
/// the time it took.
pub async fn subscribe_many(
    system: System,
    transport: Transport,
    nodes: &[SocketAddr],
    count: usize,
    topic: impl Fn(usize) -> String,
) -> Result<(Vec<Subscriber>, Duration)> {
    let token: Arc<str> = client::token().into();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for k in 0..count {
        let (token, gate) = (token.clone(), gate.clone());
        let addr = nodes[k % nodes.len()];
        let topic = topic(k);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("never closed");
            let mut sub = Subscriber::connect(system, transport, addr, Some(source(k)), &token)
                .await
                .with_context(|| format!("subscriber {k} cannot connect to {addr}"))?;
            sub.subscribe(&topic)
                .await
                .with_context(|| format!("subscriber {k} cannot subscribe to {topic}"))?;
            anyhow::Ok((k, sub))
        });
    }
    let mut subs: Vec<Option<Subscriber>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (k, sub) = joined??;
        subs[k] = Some(sub);
    }
    let took = started.elapsed();
    Ok((
        subs.into_iter().map(|s| s.expect("all joined")).collect(),
        took,
    ))
}

/// Warm-up events published before a schedule.
pub const WARMUP: u64 = 3;

/// Publishes [`WARMUP`] events numbered 0, which subscribers skip, and lets
/// them settle: the first publish to a topic sets up its log and routes, a
/// cost a steady stream does not pay. Call before taking measurements.
pub async fn warm_up(addr: SocketAddr, topic: &str) -> Result<()> {
    let token = client::token();
    let path = client::publish_path(topic);
    let mut http = Http::connect(addr).await?;
    for _ in 0..WARMUP {
        let res = http
            .post_json(&path, &token, &client::event_body(0, client::now_nanos()))
            .await?;
        anyhow::ensure!(res.status == 201, "warm-up publish answered {}", res.status);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// What a publisher did.
pub struct Published {
    /// Sequence numbers of the events answered 201, as a bitset.
    pub accepted: Vec<u64>,
    pub accepted_count: u64,
    /// Events answered otherwise, or not at all.
    pub failed: u64,
    /// When the first event was scheduled.
    pub first: Instant,
}

/// A bitset able to hold sequence numbers 0..=`max`.
pub fn bitset(max: u64) -> Vec<u64> {
    vec![0; (max as usize) / 64 + 1]
}

/// Sets `seq` in `bits`; false when it was set already or is out of range
/// (a duplicate, or a number never published).
pub fn mark(bits: &mut [u64], seq: u64) -> bool {
    let (word, bit) = ((seq / 64) as usize, seq % 64);
    match bits.get_mut(word) {
        Some(w) if *w & (1 << bit) == 0 => {
            *w |= 1 << bit;
            true
        }
        _ => false,
    }
}

/// Publishes events 1..=`count` to `topic` on `addr`, event `k` scheduled
/// at `k / rate` seconds, over `connections` keep-alive connections. Each
/// body carries the time its timer fired (the timer's millisecond
/// granularity is not the system's latency); the queue to the connections
/// is unbounded, so a publisher waiting on slow replies counts against the
/// system, not for it.
pub async fn publish_schedule(
    addr: SocketAddr,
    topic: &str,
    count: u64,
    rate: f64,
    connections: usize,
) -> Result<Published> {
    let token: Arc<str> = client::token().into();
    let path: Arc<str> = client::publish_path(topic).into();
    let (tx, rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        let (token, path, rx) = (token.clone(), path.clone(), rx.clone());
        let mut http = Http::connect(addr).await?;
        workers.spawn(async move {
            let (mut accepted, mut failed) = (Vec::new(), 0u64);
            loop {
                let next = rx.lock().await.recv().await;
                let Some((seq, nanos)) = next else { break };
                match http
                    .post_json(&path, &token, &client::event_body(seq, nanos))
                    .await
                {
                    Ok(res) if res.status == 201 => accepted.push(seq),
                    Ok(_) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        if let Ok(fresh) = Http::connect(addr).await {
                            http = fresh;
                        }
                    }
                }
            }
            (accepted, failed)
        });
    }
    let first = Instant::now() + Duration::from_millis(10);
    let interval = Duration::from_secs_f64(1.0 / rate);
    for k in 1..=count {
        let at = first + interval.mul_f64((k - 1) as f64);
        tokio::time::sleep_until(at.into()).await;
        tx.send((k, client::now_nanos()))
            .expect("workers outlive the schedule");
    }
    drop(tx);
    let (mut accepted, mut accepted_count, mut failed) = (bitset(count), 0, 0);
    while let Some(joined) = workers.join_next().await {
        let (seqs, f) = joined?;
        for seq in seqs {
            if mark(&mut accepted, seq) {
                accepted_count += 1;
            }
        }
        failed += f;
    }
    Ok(Published {
        accepted,
        accepted_count,
        failed,
        first,
    })
}
