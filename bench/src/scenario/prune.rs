//! prune: what Herald's pruning pass costs. One node whose events expire
//! after a second publishes one-shot topics (one event each), waits until
//! its pruner has removed every one, and times the passes from the node's
//! own metrics (`herald_prune_seconds`, `herald_pruned_events_total`,
//! `herald_topics_removed_total` at `GET /metrics`). First a few topics,
//! then many: the passes that delete should cost in proportion to what
//! they delete, and an idle pass afterwards what it cost before, since a
//! removed topic leaves no row behind. Herald only: Socket.IO keeps no log.
//!
//! Deleted rows leave dead row versions in PostgreSQL's pages until a
//! `VACUUM` (autovacuum, when the server runs it), and a pass's scans read
//! those pages too. So after the many topics, idle passes are timed twice:
//! on the tables as the deletions left them, and after the harness
//! vacuums them. `--vacuum-after-small` also vacuums between the phases,
//! as autovacuum would on a server where the log had just emptied: the
//! pass's statements are then planned for empty tables (see
//! docs/benchmarks-history.md for what that does to the many topics' removal).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::client;
use crate::http::Http;
use crate::nodes::Cluster;
use crate::report::Report;

/// The node's settings for this scenario: an event is pruned once it is a
/// second old, by a pass every 250 ms.
pub const NODE_ENV: &[(&str, &str)] = &[
    ("HERALD__RETENTION__MAX_AGE", "1s"),
    ("HERALD__RETENTION__PRUNE_INTERVAL", "250ms"),
];

/// Most one-shot topics one phase may publish (`--large`), and most idle
/// passes averaged (`--passes`): each wait ends within [`WAIT`].
pub const MAX_TOPICS: u64 = 100_000;
pub const MAX_PASSES: u64 = 50;

/// Events per `POST /api/v1/events`: the node's `limits.max_batch_events`.
const BATCH: u64 = 1000;
/// How often the metrics are read while topics are being removed: well
/// under the prune interval, so that a read rarely sees two new passes.
const PROBE: Duration = Duration::from_millis(20);
/// How often they are read while idle passes are counted: seldom enough
/// not to weigh on the passes measured.
const IDLE_PROBE: Duration = Duration::from_millis(100);
/// Passes left untimed before idle passes are timed: the first passes
/// after the tables changed (the deletes, a vacuum) run on cold caches and
/// statistics, and cost more.
const SETTLE_PASSES: u64 = 4;
/// Longest wait for the pruner to remove a phase's topics (from the last
/// publish), or to run the idle passes.
const WAIT: Duration = Duration::from_secs(30);
/// Rows left in Herald's event log tables: none, once every topic is gone.
const ROWS_LEFT: &str =
    "SELECT (SELECT COUNT(*) FROM herald_topics) + (SELECT COUNT(*) FROM herald_events)";
/// What autovacuum would do, when it runs: dead row versions removed and
/// empty pages at the end of each table given back.
const VACUUM: &str = "VACUUM herald_topics, herald_events";
/// The event log tables' size, indexes included, in KiB.
const LOG_KIB: &str = "SELECT (pg_total_relation_size('herald_topics') \
     + pg_total_relation_size('herald_events')) / 1024";
/// Whether the PostgreSQL server runs autovacuum (1) or not (0).
const AUTOVACUUM: &str =
    "SELECT CASE current_setting('autovacuum') WHEN 'on' THEN 1 ELSE 0 END::int8";

pub struct Options {
    /// One-shot topics of the first phase (the baseline).
    pub small: u64,
    /// One-shot topics of the second phase.
    pub large: u64,
    /// Idle passes averaged after each phase (and after each vacuum).
    pub passes: u64,
    /// Vacuum the log after the first phase too, not only after the second.
    pub vacuum_after_small: bool,
}

pub async fn run(cluster: &Cluster, options: &Options) -> Result<Report> {
    let mut report = Report::new("prune", cluster.system);
    let token = client::token();
    let addr = cluster.nodes[0].addr;
    let mut metrics = Scraper {
        addr,
        http: Http::connect(addr).await?,
    };
    let autovacuum = cluster.store_sql(AUTOVACUUM).await?.unwrap_or(0);
    let small = Phase {
        prefix: "bench.prune.small",
        topics: options.small,
        passes: options.passes,
        vacuum: options.vacuum_after_small,
    }
    .run(cluster, &mut metrics, &token)
    .await?;
    let large = Phase {
        prefix: "bench.prune.large",
        topics: options.large,
        passes: options.passes,
        vacuum: true,
    }
    .run(cluster, &mut metrics, &token)
    .await?;
    let rows_left = cluster.store_sql(ROWS_LEFT).await?.unwrap_or(0);

    report.set("small_topics", options.small as f64);
    report.set("small_removal_passes", small.removal.passes as f64);
    report.set("small_removal_ms", small.removal.seconds * 1e3);
    report.set("idle_ms_after_small", small.idle * 1e3);
    if let Some(vacuumed) = &small.vacuumed {
        report.set("idle_ms_after_small_vacuum", vacuumed.idle * 1e3);
    }
    report.set("large_topics", options.large as f64);
    report.set("large_published_in_s", large.published_in.as_secs_f64());
    report.set("large_removal_passes", large.removal.passes as f64);
    report.set("large_removal_ms", large.removal.seconds * 1e3);
    report.set("large_removal_max_read_ms", large.removal.longest * 1e3);
    report.set(
        "removal_us_per_topic",
        large.removal.seconds * 1e6 / options.large as f64,
    );
    report.set("large_removed_after_s", large.removal.waited.as_secs_f64());
    report.set("idle_ms_after_large", large.idle * 1e3);
    report.set("idle_ratio_large_small", large.idle / small.idle);
    if let Some(vacuumed) = &large.vacuumed {
        report.set("idle_ms_after_large_vacuum", vacuumed.idle * 1e3);
        report.set("idle_ratio_vacuumed_small", vacuumed.idle / small.idle);
        report.set("log_kib_before_vacuum", vacuumed.kib_before as f64);
        report.set("log_kib_after_vacuum", vacuumed.kib_after as f64);
    }
    report.set("rows_left", rows_left as f64);
    report.set("pg_autovacuum", autovacuum as f64);
    report.set("idle_passes_averaged", options.passes as f64);
    if rows_left > 0 {
        report.error = Some(format!(
            "{rows_left} rows left in the event log after every topic was removed"
        ));
    }
    Ok(report)
}

/// One phase: `topics` one-shot topics `{prefix}.{k}`.
struct Phase {
    prefix: &'static str,
    topics: u64,
    /// Idle passes averaged, before and after the vacuum.
    passes: u64,
    /// Whether to vacuum the log at the end and time idle passes again.
    vacuum: bool,
}

/// What one phase measured.
struct Measured {
    /// From the first batch sent to the last one's answer.
    published_in: Duration,
    removal: Removal,
    /// Mean idle pass on the tables as the removal left them, in seconds.
    idle: f64,
    vacuumed: Option<Vacuumed>,
}

/// A phase's end, after a `VACUUM` of the log.
struct Vacuumed {
    /// Mean idle pass, in seconds.
    idle: f64,
    /// The log's size before and after the vacuum, in KiB.
    kib_before: i64,
    kib_after: i64,
}

impl Phase {
    /// Publishes the phase's topics, waits until the pruner has removed
    /// them all, checks through the API that their logs are gone, then
    /// times idle passes (and again after a vacuum, if asked).
    async fn run(&self, cluster: &Cluster, metrics: &mut Scraper, token: &str) -> Result<Measured> {
        let (addr, prefix, topics) = (metrics.addr, self.prefix, self.topics);
        let before = metrics.sample().await?;
        let publishing = Instant::now();
        publish_one_shot(addr, token, prefix, topics).await?;
        let published_in = publishing.elapsed();
        let removal = watch_removal(metrics, before, topics).await?;
        let mut http = Http::connect(addr).await?;
        for k in [0, topics / 2, topics - 1] {
            check_gone(&mut http, token, &format!("{prefix}.{k}")).await?;
        }
        let idle = idle_mean(metrics, self.passes).await?;
        let vacuumed = if self.vacuum {
            let kib_before = cluster.store_sql(LOG_KIB).await?.unwrap_or(0);
            cluster.store_sql(VACUUM).await?;
            let kib_after = cluster.store_sql(LOG_KIB).await?.unwrap_or(0);
            Some(Vacuumed {
                idle: idle_mean(metrics, self.passes).await?,
                kib_before,
                kib_after,
            })
        } else {
            None
        };
        Ok(Measured {
            published_in,
            removal,
            idle,
            vacuumed,
        })
    }
}

/// How the pruner removed one phase's topics.
#[derive(Default)]
struct Removal {
    /// Passes that pruned something, and their total time. A read of the
    /// metrics that saw two passes at once counts both (one may have been
    /// idle), so this leans high, never low.
    passes: u64,
    seconds: f64,
    /// The longest time of one read's new passes among them.
    longest: f64,
    /// From the last publish's answer to the last topic's removal.
    waited: Duration,
}

/// Publishes one event to each topic `{prefix}.0` … `{prefix}.{count-1}`,
/// in batches of [`BATCH`]; each must be its topic's first event.
async fn publish_one_shot(addr: SocketAddr, token: &str, prefix: &str, count: u64) -> Result<()> {
    let mut http = Http::connect(addr).await?;
    let mut first = 0;
    while first < count {
        let end = (first + BATCH).min(count);
        let mut body = Vec::with_capacity((end - first) as usize * 64);
        body.push(b'[');
        for k in first..end {
            if k > first {
                body.push(b',');
            }
            body.extend_from_slice(
                format!(r#"{{"topic":"{prefix}.{k}","data":{{"i":{k}}}}}"#).as_bytes(),
            );
        }
        body.push(b']');
        let res = http.post_json("/api/v1/events", token, &body).await?;
        ensure!(
            res.status == 201,
            "batch publish answered {}: {}",
            res.status,
            String::from_utf8_lossy(&res.body)
        );
        let answer: Value = serde_json::from_slice(&res.body)?;
        let offsets = answer["offsets"]
            .as_array()
            .context("batch publish answered without offsets")?;
        ensure!(
            offsets.len() as u64 == end - first && offsets.iter().all(|o| o.as_u64() == Some(1)),
            "a one-shot topic of {prefix} was not new (offsets {offsets:?})"
        );
        first = end;
    }
    Ok(())
}

/// Reads the metrics every [`PROBE`] until `topics` more topics were
/// removed than at `before`, and sums the passes that pruned them.
async fn watch_removal(metrics: &mut Scraper, before: Sample, topics: u64) -> Result<Removal> {
    let published = Instant::now();
    // One entry per read that saw new passes: (passes, seconds, pruned).
    // Counters move just after a pass's time is recorded, so what a read
    // finds pruned belongs to the last passes seen, maybe by the read
    // before.
    let mut reads: Vec<(u64, f64, bool)> = Vec::new();
    let mut prev = before;
    loop {
        tokio::time::sleep(PROBE).await;
        let now = metrics.sample().await?;
        if now.passes > prev.passes {
            reads.push((now.passes - prev.passes, now.seconds - prev.seconds, false));
        }
        if now.events > prev.events || now.topics > prev.topics {
            let last = reads
                .last_mut()
                .context("the prune counters moved before any pass was recorded")?;
            last.2 = true;
        }
        prev = now;
        let removed = now.topics - before.topics;
        if removed >= topics {
            let pruned = now.events - before.events;
            ensure!(
                removed == topics && pruned == topics,
                "{topics} one-shot topics published; \
                 the pruner removed {removed} topics and {pruned} events"
            );
            break;
        }
        if published.elapsed() > WAIT {
            bail!(
                "{removed} of {topics} one-shot topics removed {} s after publishing",
                WAIT.as_secs()
            );
        }
    }
    let mut removal = Removal {
        waited: published.elapsed(),
        ..Removal::default()
    };
    for (passes, seconds, _) in reads.into_iter().filter(|r| r.2) {
        removal.passes += passes;
        removal.seconds += seconds;
        removal.longest = removal.longest.max(seconds);
    }
    Ok(removal)
}

/// The mean time of `passes` prune passes, which must prune nothing,
/// after [`SETTLE_PASSES`] that are not timed.
async fn idle_mean(metrics: &mut Scraper, passes: u64) -> Result<f64> {
    run_passes(metrics, SETTLE_PASSES).await?;
    let (start, end) = run_passes(metrics, passes).await?;
    Ok((end.seconds - start.seconds) / (end.passes - start.passes) as f64)
}

/// Waits (at most [`WAIT`]) until `passes` more prune passes have ended,
/// none of which may prune anything; returns the metrics before and after.
async fn run_passes(metrics: &mut Scraper, passes: u64) -> Result<(Sample, Sample)> {
    let start = metrics.sample().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(IDLE_PROBE).await;
        let now = metrics.sample().await?;
        let ran = now.passes - start.passes;
        if ran >= passes {
            ensure!(
                now.events == start.events && now.topics == start.topics,
                "passes meant to be idle pruned {} events and removed {} topics",
                now.events - start.events,
                now.topics - start.topics
            );
            return Ok((start, now));
        }
        if Instant::now() > deadline {
            bail!("{ran} of {passes} prune passes ran in {} s", WAIT.as_secs());
        }
    }
}

/// Checks through `GET /api/v1/topics/{topic}` that a removed topic has no
/// log: last offset 0, nothing retained.
async fn check_gone(http: &mut Http, token: &str, topic: &str) -> Result<()> {
    let res = http
        .get_authorized(&format!("/api/v1/topics/{topic}"), token)
        .await?;
    ensure!(
        res.status == 200,
        "GET /api/v1/topics/{topic} answered {}: {}",
        res.status,
        String::from_utf8_lossy(&res.body)
    );
    let info: Value = serde_json::from_slice(&res.body)?;
    ensure!(
        info["offset"].as_u64() == Some(0) && info["retained"].as_u64() == Some(0),
        "{topic} still has a log after it was pruned: {info}"
    );
    Ok(())
}

/// The pruner's figures at one read of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// `herald_prune_seconds_count` and `_sum`: passes so far, their time.
    passes: u64,
    seconds: f64,
    /// `herald_pruned_events_total`.
    events: u64,
    /// `herald_topics_removed_total`.
    topics: u64,
}

impl Sample {
    fn parse(text: &str) -> Result<Sample> {
        let get = |name: &str| value(text, name).with_context(|| format!("/metrics has no {name}"));
        Ok(Sample {
            passes: get("herald_prune_seconds_count")? as u64,
            seconds: get("herald_prune_seconds_sum")?,
            events: get("herald_pruned_events_total")? as u64,
            topics: get("herald_topics_removed_total")? as u64,
        })
    }
}

/// The value of the series `name` without labels in Prometheus text
/// exposition (`name value [timestamp]` lines).
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, rest) = line.split_once(' ')?;
            if series != name {
                return None;
            }
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// Reads the node's `/metrics` on a keep-alive connection, opened again
/// when the node closed it (it may sit idle between phases).
struct Scraper {
    addr: SocketAddr,
    http: Http,
}

impl Scraper {
    async fn sample(&mut self) -> Result<Sample> {
        let res = match self.http.get("/metrics").await {
            Ok(res) => res,
            Err(_) => {
                self.http = Http::connect(self.addr).await?;
                self.http.get("/metrics").await?
            }
        };
        ensure!(res.status == 200, "GET /metrics answered {}", res.status);
        Sample::parse(std::str::from_utf8(&res.body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "\
# TYPE herald_topics_removed_total counter
herald_topics_removed_total 10010
# TYPE herald_pruned_events_total counter
herald_pruned_events_total 10010
# TYPE herald_prune_seconds histogram
herald_prune_seconds_bucket{le=\"0.0005\"} 3
herald_prune_seconds_bucket{le=\"+Inf\"} 42
herald_prune_seconds_sum 0.125
herald_prune_seconds_count 42
herald_handshakes_total{result=\"accepted\"} 0
";

    #[test]
    fn reads_the_pruner_series() {
        let sample = Sample::parse(EXPOSITION).expect("all four series are there");
        assert_eq!(
            sample,
            Sample {
                passes: 42,
                seconds: 0.125,
                events: 10010,
                topics: 10010,
            }
        );
    }

    #[test]
    fn a_prefix_or_a_labelled_series_is_not_the_series() {
        assert_eq!(value(EXPOSITION, "herald_prune_seconds"), None);
        assert_eq!(value(EXPOSITION, "herald_handshakes_total"), None);
        assert!(Sample::parse("herald_prune_seconds_sum 1\n").is_err());
    }
}
