//! Cluster mode's receiving side: sharded pub/sub on a Redis Cluster.
//!
//! One background task owns a cluster connection (redis-rs's, RESP3, its
//! pushes sent here). Each watched topic's shard channel is `SSUBSCRIBE`d
//! on the master that owns its slot; redis-rs routes the command there and
//! follows `MOVED`.
//!
//! redis-rs does not keep every subscription alive by itself: after a
//! master's failover it tells only that a connection dropped (a
//! `Disconnection` push), and a slot that migrates ends its channels' subscriptions
//! with a server-sent `SUNSUBSCRIBE`. So the task tracks the topics whose
//! subscription is not in force (`unreached`) and subscribes them again
//! with backoff until the cluster answers from their new master:
//! - on `Disconnection`: every watched topic (the push does not say which
//!   node went away; a second `SSUBSCRIBE` on a node that kept it is
//!   harmless);
//! - on a `SUNSUBSCRIBE` it did not ask for: that topic.
//!
//! Once all are back, the pipeline is told to resynchronise: topics with
//! history fill what they missed from the store. While any is missing the
//! relay is disconnected (`/readyz` answers 503), and a publish to a
//! missing topic answers 503.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    CONNECT_TIMEOUT, Interest, MIN_BACKOFF, Names, acknowledge, confirmed, hand_over, more_changes,
};
use crate::relay::Inbound;
use crate::telemetry::names;
use crate::topic::Topic;

/// The longest wait between attempts to subscribe again: a failover takes
/// the cluster's `cluster-node-timeout` and an election, and the relay
/// should follow within a second of it.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Subscription commands in flight at once. While a master is away each
/// of its topics' commands waits up to `RESPONSE_TIMEOUT`, so a pass over
/// many topics must not queue them a few at a time.
const SUBSCRIBE_CONCURRENCY: usize = 512;

/// After a recovery, every watched topic is subscribed again this many
/// times, [`SETTLE_INTERVAL`] apart, each followed by a resynchronisation.
/// While the cluster settles, redis-rs may move a connection to a node and
/// lose subscriptions it had confirmed, with no push to say so (seen in
/// the restart-during-failover test); a second `SSUBSCRIBE` of a channel
/// already subscribed changes nothing.
const SETTLE_PASSES: u8 = 2;
const SETTLE_INTERVAL: Duration = Duration::from_secs(1);

/// The background task that owns the cluster pub/sub connection.
pub(super) struct Subscriber {
    pub(super) client: ClusterClient,
    pub(super) pushes: mpsc::UnboundedReceiver<PushInfo>,
    pub(super) inbound: Inbound,
    pub(super) names: Names,
    pub(super) interest: mpsc::UnboundedReceiver<Interest>,
    pub(super) connected: Arc<AtomicBool>,
    /// Watched topics whose subscription is not in force, shared with the
    /// relay (publishes to them answer 503).
    pub(super) unreached: Arc<SyncMutex<HashSet<Topic>>>,
    /// Whether the cluster connection opened: until then no topic is
    /// reachable.
    pub(super) opened: Arc<AtomicBool>,
    pub(super) shutdown: CancellationToken,
}

/// The watched topics and where each stands.
struct Watch {
    wanted: HashSet<Topic>,
    /// Subscriptions known not to be in force.
    unreached: Arc<SyncMutex<HashSet<Topic>>>,
    /// Subscriptions that may have been lost: they stay reachable until
    /// subscribing them again fails on the next pass.
    suspect: HashSet<Topic>,
}

/// Subscriptions a push says were lost.
enum Lost {
    /// A connection to some node dropped (which one, the push does not
    /// say): any of these. While redis-rs recovers, every command on the
    /// connection waits, so marking them all unreachable would refuse
    /// publishes to masters that are fine.
    Maybe(Vec<Topic>),
    /// The server ended this one (its slot moved).
    Surely(Topic),
}

impl Watch {
    fn missing(&self) -> HashSet<Topic> {
        self.unreached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn mark(&self, topics: impl IntoIterator<Item = Topic>, reached: bool) {
        let mut unreached = self.unreached.lock().unwrap_or_else(|e| e.into_inner());
        for topic in topics {
            if reached || !self.wanted.contains(&topic) {
                unreached.remove(&topic);
            } else {
                unreached.insert(topic);
            }
        }
    }
}

impl Subscriber {
    pub(super) async fn run(mut self) {
        let mut watch = Watch {
            wanted: HashSet::new(),
            unreached: Arc::clone(&self.unreached),
            suspect: HashSet::new(),
        };
        let Some(conn) = self.connect(&mut watch).await else {
            return;
        };
        self.opened.store(true, Ordering::Relaxed);
        // Everything watched so far is subscribed by the first pass.
        watch.mark(watch.wanted.clone(), false);
        let mut backoff = Duration::ZERO;
        let mut retry_at = Some(Instant::now());
        // Something went wrong since everything was last in force.
        let mut disturbed = false;
        // Passes over every watched topic still to run after a recovery.
        let mut settle = 0;
        loop {
            let deadline = retry_at;
            let retry = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(push) = self.pushes.recv() => {
                    if let Some(lost) = self.lost_by(push, &watch).await {
                        if !disturbed {
                            tracing::warn!("redis cluster relay may have lost subscriptions; subscribing again");
                        }
                        match lost {
                            Lost::Maybe(topics) => watch.suspect.extend(topics),
                            Lost::Surely(topic) => {
                                watch.mark([topic], false);
                                self.down();
                            }
                        }
                        disturbed = true;
                        retry_at.get_or_insert_with(Instant::now);
                    }
                }
                Some(change) = self.interest.recv() => {
                    let changes = more_changes(change, &mut self.interest);
                    if !self.apply(&conn, &mut watch, changes).await {
                        disturbed = true;
                        retry_at.get_or_insert_with(|| Instant::now() + MIN_BACKOFF);
                    }
                }
                () = retry => {
                    let mut check = if settle > 0 { watch.wanted.clone() } else { watch.missing() };
                    check.extend(std::mem::take(&mut watch.suspect));
                    check.retain(|t| watch.wanted.contains(t));
                    // Each topic is reachable again as soon as its own
                    // subscription is.
                    let failed = subscribe(&conn, &self.names, check.iter(), true, Some(&watch.unreached)).await;
                    watch.mark(failed, false);
                    if !watch.missing().is_empty() {
                        self.down();
                        disturbed = true;
                        backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_RETRY);
                        retry_at = Some(Instant::now() + backoff);
                        continue;
                    }
                    backoff = Duration::ZERO;
                    if disturbed {
                        metrics::counter!(names::RELAY_RECONNECTS).increment(1);
                        tracing::info!(topics = watch.wanted.len(), "redis cluster relay subscribed again");
                        disturbed = false;
                        settle = SETTLE_PASSES;
                    } else if settle > 0 {
                        settle -= 1;
                    } else {
                        tracing::info!(topics = watch.wanted.len(), "redis cluster relay connected");
                    }
                    retry_at = (settle > 0).then(|| Instant::now() + SETTLE_INTERVAL);
                    self.up().await;
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(0.0);
    }

    /// Opens the cluster connection, retrying with backoff; subscription
    /// changes meanwhile are recorded and acknowledged at once (they are
    /// subscribed once connected). `None` on shutdown.
    async fn connect(&mut self, watch: &mut Watch) -> Option<ClusterConnection> {
        let mut backoff = MIN_BACKOFF;
        let mut logged = false;
        loop {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_connection());
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                attempt = attempt => if let Ok(Ok(conn)) = attempt {
                    return Some(conn);
                },
            }
            if !logged {
                tracing::warn!("redis cluster unavailable; retrying with backoff");
                logged = true;
            }
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    () = &mut sleep => break,
                    Some(change) = self.interest.recv() => {
                        record(&mut watch.wanted, &change);
                        acknowledge(change);
                    }
                }
            }
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    }

    /// Applies watch and unwatch changes; a watch is acknowledged once its
    /// subscription is confirmed, or once it failed (it is retried, and
    /// the pipeline resynchronises when it succeeds). Whether every
    /// subscription succeeded.
    async fn apply(
        &self,
        conn: &ClusterConnection,
        watch: &mut Watch,
        changes: Vec<Interest>,
    ) -> bool {
        let before = watch.wanted.clone();
        changes.iter().for_each(|c| record(&mut watch.wanted, c));
        let added: Vec<Topic> = watch.wanted.difference(&before).cloned().collect();
        let removed: Vec<Topic> = before.difference(&watch.wanted).cloned().collect();
        let failed = subscribe(conn, &self.names, added.iter(), true, None).await;
        let failed_any = !failed.is_empty();
        watch.mark(added.iter().filter(|t| !failed.contains(t)).cloned(), true);
        watch.mark(failed, false);
        // A failed unsubscribe leaves a subscription nobody reads: its
        // events are dropped by the pipeline (no subscriber).
        subscribe(conn, &self.names, removed.iter(), false, None).await;
        watch.mark(removed, true);
        changes.into_iter().for_each(acknowledge);
        failed_any
    }

    /// What a push says: hands messages over; the topics whose
    /// subscription it ended, if any.
    async fn lost_by(&self, push: PushInfo, watch: &Watch) -> Option<Lost> {
        match push.kind {
            PushKind::SMessage => {
                if let Some(message) = redis::Msg::from_push_info(push) {
                    hand_over(&self.names, &self.inbound, &message).await;
                }
                None
            }
            // Which node went away the push does not say: any of them may
            // be lost (a second `SSUBSCRIBE` on a node that kept it is
            // harmless).
            PushKind::Disconnection => Some(Lost::Maybe(watch.wanted.iter().cloned().collect())),
            // The server's, when the slot moved, or the confirmation of an
            // unwatch (then the topic is not wanted and nothing happens).
            PushKind::SUnsubscribe => {
                let channel: String =
                    redis::from_redis_value(push.data.into_iter().next()?).ok()?;
                let topic = self.names.topic_of(&channel)?;
                watch.wanted.contains(&topic).then_some(Lost::Surely(topic))
            }
            _ => None,
        }
    }

    /// Every watched topic is subscribed (again): the node is ready, and
    /// the pipeline fills from the store what may have been missed.
    async fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(1.0);
        self.inbound.resync().await;
    }

    fn down(&self) {
        self.connected.store(false, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(0.0);
    }
}

/// Records a change in the watched set.
fn record(wanted: &mut HashSet<Topic>, change: &Interest) {
    if change.watch {
        wanted.insert(change.topic.clone());
    } else {
        wanted.remove(&change.topic);
    }
}

/// `SSUBSCRIBE`s (or `SUNSUBSCRIBE`s) each topic's shard channel, one
/// command per topic (their slots differ), many at once; returns the
/// topics whose command failed. A topic subscribed is taken out of
/// `unreached` at once.
async fn subscribe<'a>(
    conn: &ClusterConnection,
    names: &Names,
    topics: impl Iterator<Item = &'a Topic>,
    on: bool,
    unreached: Option<&SyncMutex<HashSet<Topic>>>,
) -> HashSet<Topic> {
    let commands: Vec<_> = topics
        .map(|topic| {
            let mut conn = conn.clone();
            let channel = names.channel(topic);
            let topic = topic.clone();
            async move {
                let done = if on {
                    confirmed(conn.ssubscribe(&channel)).await
                } else {
                    confirmed(conn.sunsubscribe(&channel)).await
                };
                match done {
                    Ok(()) => {
                        if let Some(unreached) = unreached {
                            unreached.lock().unwrap_or_else(|e| e.into_inner()).remove(&topic);
                        }
                        None
                    }
                    Err(e) => {
                        tracing::debug!(%topic, error = %e, on, "shard channel (un)subscribe failed");
                        Some(topic)
                    }
                }
            }
        })
        .collect();
    stream::iter(commands)
        .buffer_unordered(SUBSCRIBE_CONCURRENCY)
        .filter_map(std::future::ready)
        .collect()
        .await
}
