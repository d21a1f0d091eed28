//! Logs and metrics.
//!
//! Logs go to stderr (stdout stays for what the user asked for: tokens, the
//! dev banner), human-readable by default or JSON with `log.format =
//! "json"`; `RUST_LOG` filters them (default `info`). Tokens, secrets and
//! payloads are never logged.
//!
//! Metrics are recorded with the `metrics` facade into one process-wide
//! Prometheus recorder and rendered at `GET /metrics`. Hot paths touch them
//! once per event (never per subscriber) through handles resolved once.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let fmt = tracing_subscriber::fmt::layer()
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(AcceptErrors.with_filter(tracing_subscriber::filter::filter_fn(is_accept_error)))
        .with(
            fmt.with_filter(filter)
                // Dynamic: asked at every event, not once per call site.
                .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
                    !is_accept_error(meta) || accept_error_log_due()
                })),
        )
        .try_init();
}

/// How often a node that cannot accept connections says so: the HTTP
/// server retries every half second, and each failure would be a line.
pub const ACCEPT_ERROR_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP server's (actix-server's) own log of a failed `accept()`:
/// the only error its accept loop logs while it runs.
fn is_accept_error(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::ERROR && meta.target() == "actix_server::accept"
}

/// Whether a failed accept's log line may go out now: the first, then one
/// per [`ACCEPT_ERROR_LOG_INTERVAL`].
fn accept_error_log_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    // Milliseconds since the first look, plus one so that 0 means never.
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1;
    let last = LAST.load(Ordering::Relaxed);
    let due = last == 0 || now - last >= ACCEPT_ERROR_LOG_INTERVAL.as_millis() as u64;
    due && LAST
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Counts failed accepts ([`names::ACCEPT_ERRORS`]) whatever the log
/// filter keeps.
struct AcceptErrors;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AcceptErrors {
    fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        metrics::counter!(names::ACCEPT_ERRORS).increment(1);
    }
}

/// Latency buckets, in seconds, for the histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Buckets of [`names::COMMIT_GROUP_EVENTS`]: events per commit.
const GROUP_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(names::COMMIT_GROUP_EVENTS.into()),
                    GROUP_BUCKETS,
                )
            })
            // The buckets are constants, valid by construction.
            .expect("histogram buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (an embedding
        // program's); then that one receives Herald's metrics.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        register_at_zero();
        handle
    })
}

/// Metric names, in one place.
pub mod names {
    pub const CONNECTIONS: &str = "herald_connections";
    pub const HANDSHAKES: &str = "herald_handshakes_total";
    pub const SUBSCRIPTIONS: &str = "herald_subscriptions";
    pub const TOPICS_ACTIVE: &str = "herald_topics_active";
    pub const PUBLISHED: &str = "herald_events_published_total";
    pub const DELIVERIES: &str = "herald_deliveries_total";
    pub const SLOW_CONSUMERS: &str = "herald_slow_consumer_closes_total";
    pub const FANOUT_LATENCY: &str = "herald_publish_to_fanout_seconds";
    pub const STORE_COMMIT: &str = "herald_store_commit_seconds";
    pub const COMMIT_GROUP_EVENTS: &str = "herald_store_commit_group_events";
    pub const RELAY_CONNECTED: &str = "herald_relay_connected";
    pub const RELAY_RECONNECTS: &str = "herald_relay_reconnects_total";
    pub const REPLAYS: &str = "herald_recovery_replays_total";
    pub const REPLAYED_EVENTS: &str = "herald_recovery_replayed_events_total";
    pub const ENCODE_FAILURES: &str = "herald_encode_failures_total";
    pub const PRUNE_SECONDS: &str = "herald_prune_seconds";
    pub const PRUNED_EVENTS: &str = "herald_pruned_events_total";
    pub const TOPICS_REMOVED: &str = "herald_topics_removed_total";
    pub const PRUNE_FAILURES: &str = "herald_prune_failures_total";
    pub const PRESENCE_MEMBERS: &str = "herald_presence_members";
    pub const PRESENCE_DIFFS: &str = "herald_presence_diffs_total";
    pub const REQUEST_TIMEOUTS: &str = "herald_request_timeouts_total";
    pub const ACCEPT_ERRORS: &str = "herald_accept_errors_total";

    /// Every metric Herald documents (README, Operations).
    pub const ALL: &[&str] = &[
        CONNECTIONS,
        HANDSHAKES,
        SUBSCRIPTIONS,
        TOPICS_ACTIVE,
        PUBLISHED,
        DELIVERIES,
        SLOW_CONSUMERS,
        FANOUT_LATENCY,
        STORE_COMMIT,
        COMMIT_GROUP_EVENTS,
        RELAY_CONNECTED,
        RELAY_RECONNECTS,
        REPLAYS,
        REPLAYED_EVENTS,
        ENCODE_FAILURES,
        PRUNE_SECONDS,
        PRUNED_EVENTS,
        TOPICS_REMOVED,
        PRUNE_FAILURES,
        PRESENCE_MEMBERS,
        PRESENCE_DIFFS,
        REQUEST_TIMEOUTS,
        ACCEPT_ERRORS,
    ];
}

/// Registers every series at zero, so a fresh node's first scrape already
/// has them (dashboards and alerts work before any traffic). Gauges are
/// moved by 0, not set: several nodes may share one process (tests).
fn register_at_zero() {
    use names::*;
    for gauge in [
        CONNECTIONS,
        SUBSCRIPTIONS,
        TOPICS_ACTIVE,
        RELAY_CONNECTED,
        PRESENCE_MEMBERS,
    ] {
        metrics::gauge!(gauge).increment(0.0);
    }
    for counter in [
        DELIVERIES,
        SLOW_CONSUMERS,
        RELAY_RECONNECTS,
        REPLAYS,
        REPLAYED_EVENTS,
        PRUNED_EVENTS,
        TOPICS_REMOVED,
        PRUNE_FAILURES,
        PRESENCE_DIFFS,
        ACCEPT_ERRORS,
    ] {
        metrics::counter!(counter).increment(0);
    }
    for part in ["head", "body"] {
        metrics::counter!(REQUEST_TIMEOUTS, "part" => part).increment(0);
    }
    metrics::counter!(HANDSHAKES, "result" => "accepted").increment(0);
    for transport in ["http", "ws"] {
        metrics::counter!(PUBLISHED, "transport" => transport).increment(0);
    }
    // ENCODE_FAILURES, labelled by encoding: `event::register_metrics`.
    for histogram in [
        FANOUT_LATENCY,
        STORE_COMMIT,
        COMMIT_GROUP_EVENTS,
        PRUNE_SECONDS,
    ] {
        let _ = metrics::histogram!(histogram);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(CONNECTIONS, "Open WebSocket connections on this node.");
    describe_counter!(
        HANDSHAKES,
        "WebSocket handshakes, by result and refusal reason."
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        "Subscriptions held by this node's connections."
    );
    describe_gauge!(
        TOPICS_ACTIVE,
        "Topics with at least one subscriber on this node."
    );
    describe_counter!(
        PUBLISHED,
        "Events published through this node, by transport."
    );
    describe_counter!(DELIVERIES, "Events handed to subscribers' outbound queues.");
    describe_counter!(
        SLOW_CONSUMERS,
        "Connections closed (1013) because their outbound queue overflowed."
    );
    describe_histogram!(
        FANOUT_LATENCY,
        Unit::Seconds,
        "From publish to fan-out on this node."
    );
    describe_histogram!(
        STORE_COMMIT,
        Unit::Seconds,
        "Time to commit one group of publishes to the event log."
    );
    describe_histogram!(
        COMMIT_GROUP_EVENTS,
        Unit::Count,
        "Events committed together in one transaction (group commit)."
    );
    describe_gauge!(
        RELAY_CONNECTED,
        "1 while the Redis relay is connected (cluster mode)."
    );
    describe_counter!(
        RELAY_RECONNECTS,
        "Times the Redis relay connected again after losing Redis."
    );
    describe_counter!(
        REPLAYS,
        "Subscriptions that replayed missed events (recovery)."
    );
    describe_counter!(REPLAYED_EVENTS, "Events sent by recovery replays.");
    describe_histogram!(
        PRUNE_SECONDS,
        Unit::Seconds,
        "Time one pruning pass over the event log took."
    );
    describe_counter!(PRUNED_EVENTS, "Events pruned from the event log.");
    describe_counter!(
        PRUNE_FAILURES,
        "Pruning passes that failed (the store was unavailable); retried at the next interval."
    );
    describe_counter!(
        TOPICS_REMOVED,
        "Topic logs removed entirely: no event left and nobody watching."
    );
    describe_gauge!(
        PRESENCE_MEMBERS,
        "Presence members held by this node's connections, summed over topics (a user in two topics counts twice)."
    );
    describe_counter!(
        PRESENCE_DIFFS,
        "Presence diffs this node received for the topics its connections watch."
    );
    describe_counter!(
        REQUEST_TIMEOUTS,
        "HTTP requests cut off with 408 because their head (server.handshake_timeout) or body (server.body_timeout) did not arrive in time, by part."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Connections the node could not accept (e.g. out of open files); it retries, serving what it holds."
    );
    describe_counter!(
        ENCODE_FAILURES,
        "Events that could not be encoded for subscribers of one encoding, and were skipped for them."
    );
}
