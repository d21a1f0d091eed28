//! presence: M members join one topic's presence over a few seconds,
//! spread over the nodes (each a distinct user, each also receiving the
//! topic's presence diffs), while one observer per node watches; then the
//! cost of `count_only` and of a 1,000-member page, in a room of M and in
//! a room of M/10 (every tenth member is in both), from which the cost at
//! ten times M is projected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::source;
use crate::client::member_token;
use crate::nodes::{Cluster, System};
use crate::report::Report;
use crate::wire::Ws;

/// The nodes' settings for this run: the queries are timed back to back
/// on one connection, past the default `limits.subscribe_rate`.
pub const NODE_ENV: &[(&str, &str)] = &[("HERALD__LIMITS__SUBSCRIBE_RATE", "1000000")];

pub struct Options {
    pub members: usize,
    /// Over how long the members join, evenly spaced.
    pub seconds: f64,
    /// Requests timed per kind of query and room.
    pub queries: usize,
}

const ROOM: &str = "bench.presence.room";
const TENTH: &str = "bench.presence.tenth";
/// How long the observers may take to see every member after the last
/// joined.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the nodes send Redis for presence: scripts, and the `SADD` before
/// a join (the commands the scripts call are inside their time).
const STORM_COMMANDS: &[&str] = &["evalsha", "eval", "sadd"];
/// A page or a count is one script.
const QUERY_COMMANDS: &[&str] = &["evalsha", "eval"];

/// Quiet time between the storm and the queries: every member has taken
/// the last diffs.
const SETTLE: Duration = Duration::from_secs(2);

/// Frames a connection counted: presence diffs, and the joins in them.
#[derive(Default)]
struct Counts {
    diffs: AtomicU64,
    joins: AtomicU64,
}

pub async fn run(cluster: &Cluster, options: &Options) -> Result<Report> {
    if cluster.system != System::Herald {
        bail!("presence measures Herald only");
    }
    let mut report = Report::new("presence", cluster.system);
    let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let (stop, stopped) = watch::channel(false);

    // One observer per node, in before the storm.
    let mut observers = Vec::new();
    let mut watching = JoinSet::new();
    for (i, &addr) in nodes.iter().enumerate() {
        let mut ws = join(addr, i, &format!("observer-{i}"), ROOM).await?;
        let counts = Arc::new(Counts::default());
        let seen = Arc::clone(&counts);
        let mut stopped = stopped.clone();
        // The observer's own join (and the other observers') first.
        watching.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => return anyhow::Ok(ws),
                    frame = ws.next_data() => count(frame?, &seen),
                }
            }
        });
        observers.push(counts);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_joins: Vec<u64> = observers
        .iter()
        .map(|c| c.joins.load(Ordering::Relaxed))
        .collect();
    let base_diffs: Vec<u64> = observers
        .iter()
        .map(|c| c.diffs.load(Ordering::Relaxed))
        .collect();

    // The storm: member k joins at k × seconds / M.
    let members = options.members;
    let spacing = Duration::from_secs_f64(options.seconds / members as f64);
    let member_counts = Arc::new(Counts::default());
    let cpu_before = cluster.cpu();
    let redis_before = cluster.redis_cpu();
    cluster.redis_command_micros(STORM_COMMANDS).await?;
    let redis_rss_before = cluster.redis_rss();
    let started = Instant::now();
    let mut storm = JoinSet::new();
    for k in 0..members {
        let addr = nodes[k % nodes.len()];
        let at = tokio::time::Instant::from_std(started + spacing * k as u32);
        let counts = Arc::clone(&member_counts);
        let mut stopped = stopped.clone();
        storm.spawn(async move {
            tokio::time::sleep_until(at).await;
            let sub = format!("member-{k:06}");
            let mut ws = join(addr, k, &sub, ROOM)
                .await
                .with_context(|| format!("member {k} cannot join"))?;
            if k % 10 == 0 {
                subscribe(&mut ws, TENTH).await?;
            }
            let joined = Instant::now();
            loop {
                tokio::select! {
                    _ = stopped.changed() => return anyhow::Ok((ws, joined)),
                    frame = ws.next_data() => count(frame?, &counts),
                }
            }
        });
    }
    // Until the observers have seen every member.
    let all = members as u64;
    let deadline = Instant::now() + Duration::from_secs_f64(options.seconds) + COMPLETE_TIMEOUT;
    let complete = loop {
        let seen = observers
            .iter()
            .zip(&base_joins)
            .map(|(c, base)| c.joins.load(Ordering::Relaxed) - base)
            .min()
            .unwrap_or(0);
        if seen >= all {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!("the observers saw {seen} of {all} joins");
        }
        if let Some(Err(e)) = storm.try_join_next() {
            bail!("a member task failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cpu = cluster.cpu() - cpu_before;
    let redis_cpu = cluster.redis_cpu() - redis_before;
    let redis_commands = cluster.redis_command_micros(STORM_COMMANDS).await?;
    report.set("members", all as f64);
    report.set("join_seconds", options.seconds);
    report.set(
        "complete_after_last_join_ms",
        (complete.as_secs_f64() - options.seconds).max(0.0) * 1000.0,
    );
    let observer_diffs = observers
        .iter()
        .zip(&base_diffs)
        .map(|(c, base)| c.diffs.load(Ordering::Relaxed) - base)
        .max()
        .unwrap_or(0);
    report.set(
        "diff_frames_per_s_per_observer",
        observer_diffs as f64 / complete.as_secs_f64(),
    );
    report.set(
        "diff_frames_per_member",
        member_counts.diffs.load(Ordering::Relaxed) as f64 / all as f64,
    );
    // Every member is told of every later join: about M²/2 in all.
    let delivered = member_counts.joins.load(Ordering::Relaxed);
    report.set("joins_delivered_to_members", delivered as f64);
    report.set("node_cpu_s", cpu.as_secs_f64());
    report.set("node_cpu_us_per_join", cpu.as_secs_f64() * 1e6 / all as f64);
    if delivered > 0 {
        report.set(
            "node_cpu_ns_per_join_delivered",
            cpu.as_secs_f64() * 1e9 / delivered as f64,
        );
    }
    // Redis's process CPU (relaying included) and its own account of
    // command time (the scripts), per member joined.
    report.set(
        "redis_cpu_us_per_join",
        redis_cpu.as_secs_f64() * 1e6 / all as f64,
    );
    report.set(
        "redis_command_us_per_join",
        redis_commands as f64 / all as f64,
    );
    if let (Some(before), Some(after)) = (redis_rss_before, cluster.redis_rss()) {
        report.set(
            "redis_bytes_per_member",
            after.saturating_sub(before) as f64 / (all + all / 10) as f64,
        );
    }

    // The queries, once the storm's last diffs are out, on a connection of
    // their own (no diffs to read past).
    tokio::time::sleep(SETTLE).await;
    let mut asker = connect(nodes[0], 0, "asker").await?;
    // The room holds the observers too.
    let in_room = all + nodes.len() as u64;
    // Per room: the count's and the page's round trip and Redis time.
    let rooms = [
        (
            ROOM,
            in_room,
            [
                "count_only_us",
                "count_only_redis_us",
                "page_1000_us",
                "page_1000_redis_us",
            ],
        ),
        (
            TENTH,
            all.div_ceil(10),
            [
                "tenth_count_only_us",
                "tenth_count_only_redis_us",
                "tenth_page_1000_us",
                "tenth_page_1000_redis_us",
            ],
        ),
    ];
    for (room, size, [count_us, count_redis_us, page_us, page_redis_us]) in rooms {
        let count = time_queries(cluster, &mut asker, room, true, options.queries).await?;
        let page = time_queries(cluster, &mut asker, room, false, options.queries).await?;
        if count.members != size {
            bail!("{room}: count {} for {size} members", count.members);
        }
        report.set(count_us, count.micros);
        report.set(count_redis_us, count.redis_micros);
        report.set(page_us, page.micros);
        report.set(page_redis_us, page.redis_micros);
    }
    // Projected to 10 × M, as if cost grew linearly with members from
    // M/10 to M (the structures say log; this bounds it from above).
    for (at_m, at_tenth, projected) in [
        (
            "count_only_redis_us",
            "tenth_count_only_redis_us",
            "projected_10x_count_only_redis_us",
        ),
        (
            "page_1000_redis_us",
            "tenth_page_1000_redis_us",
            "projected_10x_page_1000_redis_us",
        ),
    ] {
        if let (Some(m), Some(tenth)) = (report.get(at_m), report.get(at_tenth)) {
            let per_member = (m - tenth).max(0.0) / (all as f64 * 0.9);
            report.set(projected, m + per_member * all as f64 * 9.0);
        }
    }

    let _ = stop.send(true);
    asker.close().await;
    while let Some(done) = watching.join_next().await {
        if let Ok(Ok(ws)) = done {
            ws.close().await;
        }
    }
    let mut closing = JoinSet::new();
    while let Some(done) = storm.join_next().await {
        if let Ok(Ok((ws, _))) = done {
            closing.spawn(ws.close());
        }
    }
    while closing.join_next().await.is_some() {}
    Ok(report)
}

/// What timing one kind of query found.
struct Timed {
    /// Mean round trip, microseconds.
    micros: f64,
    /// Mean Redis command time per query, microseconds.
    redis_micros: f64,
    /// The count the replies gave.
    members: u64,
}

async fn time_queries(
    cluster: &Cluster,
    ws: &mut Ws,
    room: &str,
    count_only: bool,
    queries: usize,
) -> Result<Timed> {
    let request = if count_only {
        format!(r#"{{"op":"presence","id":1,"topic":"{room}","count_only":true}}"#)
    } else {
        format!(r#"{{"op":"presence","id":1,"topic":"{room}","limit":1000}}"#)
    };
    // Resets Redis's own count of the time its commands take.
    cluster.redis_command_micros(QUERY_COMMANDS).await?;
    let started = Instant::now();
    let mut members = 0;
    for _ in 0..queries.max(1) {
        ws.send_text(&request).await?;
        let reply = ws.next_data().await?;
        members = crate::wire::field(reply, br#""count":"#)
            .with_context(|| format!("no count in {}", String::from_utf8_lossy(reply)))?;
    }
    let n = queries.max(1) as f64;
    let micros = started.elapsed().as_secs_f64() * 1e6 / n;
    // Every command in the window, the nodes' lease renewals included (a
    // few per second): a slight overestimate.
    let redis_micros = cluster.redis_command_micros(QUERY_COMMANDS).await? as f64 / n;
    Ok(Timed {
        micros,
        redis_micros,
        members,
    })
}

async fn connect(addr: SocketAddr, k: usize, sub: &str) -> Result<Ws> {
    let path = format!("/ws?token={}", member_token(sub));
    Ok(Ws::connect(addr, Some(source(k)), &path, Some("herald.json")).await?)
}

/// Connects as `sub` and joins `topic`'s presence.
async fn join(addr: SocketAddr, k: usize, sub: &str, topic: &str) -> Result<Ws> {
    let mut ws = connect(addr, k, sub).await?;
    subscribe(&mut ws, topic).await?;
    Ok(ws)
}

async fn subscribe(ws: &mut Ws, topic: &str) -> Result<()> {
    let op = format!(r#"{{"op":"subscribe","id":1,"topic":"{topic}","presence":true}}"#);
    ws.send_text(&op).await?;
    loop {
        let reply = ws.next_data().await?;
        if memchr::memmem::find(reply, br#""op":"subscribed""#).is_some() {
            return Ok(());
        }
        if memchr::memmem::find(reply, br#""op":"presence_diff""#).is_none() {
            bail!("refused: {}", String::from_utf8_lossy(reply));
        }
    }
}

/// Counts a frame if it is a presence diff, and the joins in it.
fn count(frame: &[u8], counts: &Counts) {
    if memchr::memmem::find(frame, br#""op":"presence_diff""#).is_none() {
        return;
    }
    counts.diffs.fetch_add(1, Ordering::Relaxed);
    // Leaves never happen during the storm: every `"sub":` is a join.
    let joins = memchr::memmem::find_iter(frame, br#""sub":"#).count();
    counts.joins.fetch_add(joins as u64, Ordering::Relaxed);
}
