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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    ClusterLink, Interest, MIN_BACKOFF, Names, RESPONSE_TIMEOUT, acknowledge, confirmed, hand_over,
    more_changes,
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

/// How long a probe may take to come back. After a recovery the relay
/// does not take redis-rs's word that a subscription is in force: while a
/// master is away, redis-rs can confirm an `SSUBSCRIBE` that no node
/// holds (seen in `herald-bench shards`: every topic of the dead master
/// went silent after its replica took over). So it publishes a probe
/// (`h {nonce}`) on each watched channel and waits for its own copy;
/// a topic whose probe does not come back is subscribed again, and
/// probed again, until all come back.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// The background task that owns the cluster pub/sub connection.
pub(super) struct Subscriber {
    /// Its connection, replaced when it keeps failing.
    pub(super) link: ClusterLink,
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
    /// Confirmations still to come of this task's own `SUNSUBSCRIBE`s.
    unsubscribing: HashMap<Topic, u32>,
    /// Topics not watched whose messages still arrive: unsubscribed on
    /// the next pass.
    strays: HashSet<Topic>,
    /// The probe round under way, if any.
    probe: Option<Probe>,
}

/// Subscriptions being checked end to end.
struct Probe {
    nonce: u64,
    /// Topics whose probe has not come back.
    awaiting: HashSet<Topic>,
    /// Set once every probe was sent.
    deadline: Option<Instant>,
}

/// What a background pass did.
enum Done {
    /// Subscribed `checked`; `failed` did not subscribe.
    Subscribed {
        checked: HashSet<Topic>,
        failed: HashSet<Topic>,
    },
    /// Sent the probes.
    Probed,
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

/// Work beside the loop: subscribing topics again, or sending probes.
type Pass = BoxFuture<'static, Done>;

impl Subscriber {
    pub(super) async fn run(mut self) {
        let mut watch = Watch {
            wanted: HashSet::new(),
            unreached: Arc::clone(&self.unreached),
            suspect: HashSet::new(),
            unsubscribing: HashMap::new(),
            strays: HashSet::new(),
            probe: None,
        };
        let Some((mut conn, mut generation)) = self.connect(&mut watch).await else {
            return;
        };
        self.opened.store(true, Ordering::Relaxed);
        // Everything watched so far is subscribed by the first pass.
        watch.mark(watch.wanted.clone(), false);
        let mut backoff = Duration::ZERO;
        let mut retry_at = Some(Instant::now());
        // A pass runs beside the loop, so that messages keep flowing while
        // it waits on a master that is away.
        let mut pass: Option<Pass> = None;
        // Something went wrong since everything was last in force.
        let mut disturbed = false;
        loop {
            let deadline = if pass.is_some() { None } else { retry_at };
            let retry = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let passing = async {
                match pass.as_mut() {
                    Some(pass) => pass.await,
                    None => std::future::pending().await,
                }
            };
            let probed_by = watch.probe.as_ref().and_then(|p| p.deadline);
            let probed = async move {
                match probed_by {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(push) = self.pushes.recv() => {
                    if let Some(lost) = self.lost_by(push, &mut watch).await {
                        if !disturbed {
                            tracing::warn!("redis cluster relay may have lost subscriptions; subscribing again");
                        }
                        // Not ready until every subscription is checked
                        // again: a probe under way no longer speaks for them.
                        self.down();
                        watch.probe = None;
                        match lost {
                            Lost::Maybe(topics) => watch.suspect.extend(topics),
                            Lost::Surely(topic) => watch.mark([topic], false),
                        }
                        disturbed = true;
                        retry_at.get_or_insert_with(Instant::now);
                    } else if !watch.strays.is_empty() {
                        retry_at.get_or_insert_with(|| Instant::now() + MIN_BACKOFF);
                    }
                }
                done = passing => {
                    pass = None;
                    let Done::Subscribed { checked, failed } = done else {
                        if let Some(probe) = watch.probe.as_mut() {
                            probe.deadline = Some(Instant::now() + PROBE_WAIT);
                        }
                        continue;
                    };
                    // Topics unwatched meanwhile are not kept subscribed.
                    watch.strays.extend(
                        checked.iter().filter(|t| !watch.wanted.contains(*t) && !failed.contains(*t)).cloned(),
                    );
                    let recovered = checked.len() > failed.len();
                    self.link.outcome(failed.is_empty());
                    watch.mark(failed, false);
                    if !watch.missing().is_empty() {
                        self.down();
                        disturbed = true;
                        backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_RETRY);
                        retry_at = Some(Instant::now() + backoff);
                        // What came back fills its gaps now, not when every
                        // master is back.
                        if recovered {
                            self.inbound.resync().await;
                        }
                        continue;
                    }
                    backoff = Duration::ZERO;
                    if !watch.strays.is_empty() {
                        retry_at = Some(Instant::now() + MIN_BACKOFF);
                    }
                    if disturbed {
                        metrics::counter!(names::RELAY_RECONNECTS).increment(1);
                        tracing::info!(topics = watch.wanted.len(), "redis cluster relay subscribed again; checking each subscription");
                        disturbed = false;
                        // Checked end to end before it is believed.
                        let nonce = rand::random::<u64>();
                        let topics: Vec<Topic> = watch.wanted.iter().cloned().collect();
                        watch.probe = Some(Probe {
                            nonce,
                            awaiting: topics.iter().cloned().collect(),
                            deadline: None,
                        });
                        let (conn, names) = (conn.clone(), self.names.clone());
                        pass = Some(Box::pin(async move {
                            send_probes(&conn, &names, &topics, nonce).await;
                            Done::Probed
                        }));
                        // Gaps fill now; the node is ready once the probes
                        // are back.
                        self.inbound.resync().await;
                    } else if watch.probe.is_none() {
                        tracing::info!(topics = watch.wanted.len(), "redis cluster relay connected");
                        self.up().await;
                    }
                }
                () = probed => {
                    let probe = watch.probe.take().expect("a deadline means a probe");
                    let silent: Vec<Topic> = probe
                        .awaiting
                        .into_iter()
                        .filter(|t| watch.wanted.contains(t))
                        .collect();
                    self.link.outcome(silent.is_empty());
                    if silent.is_empty() {
                        tracing::info!(topics = watch.wanted.len(), "redis cluster relay: every subscription checked");
                        self.up().await;
                    } else {
                        tracing::warn!(topics = silent.len(), "redis cluster subscriptions confirmed but not in force; subscribing again");
                        watch.mark(silent, false);
                        self.down();
                        disturbed = true;
                        retry_at.get_or_insert_with(|| Instant::now() + MIN_BACKOFF);
                    }
                }
                Some(change) = self.interest.recv() => {
                    let changes = more_changes(change, &mut self.interest);
                    let renewed = self.current(&mut conn, &mut generation, &mut watch).await;
                    if self.apply(&conn, &mut watch, changes).await || renewed {
                        self.down();
                        // A probe under way no longer speaks for them.
                        watch.probe = None;
                        disturbed = true;
                        retry_at.get_or_insert_with(|| Instant::now() + MIN_BACKOFF);
                    }
                }
                () = retry => {
                    retry_at = None;
                    if self.current(&mut conn, &mut generation, &mut watch).await {
                        disturbed = true;
                    }
                    let strays: Vec<Topic> = watch.strays.drain().filter(|t| !watch.wanted.contains(t)).collect();
                    self.unsubscribe(&conn, &mut watch, strays).await;
                    let mut check = watch.missing();
                    check.extend(std::mem::take(&mut watch.suspect));
                    check.retain(|t| watch.wanted.contains(t));
                    // Nothing to check (only strays to drop): no pass, unless
                    // the relay is still to be declared up.
                    if check.is_empty() && !disturbed && self.connected.load(Ordering::Relaxed) {
                        continue;
                    }
                    let (conn, names) = (conn.clone(), self.names.clone());
                    let unreached = Arc::clone(&watch.unreached);
                    // Each topic is reachable again as soon as its own
                    // subscription is.
                    pass = Some(Box::pin(async move {
                        let failed = subscribe(&conn, &names, check.iter(), true, Some(&unreached)).await;
                        Done::Subscribed { checked: check, failed }
                    }));
                }
            }
        }
        self.down();
    }

    /// Opens the cluster connection, retrying with backoff; subscription
    /// changes meanwhile are recorded and acknowledged at once (they are
    /// subscribed once connected). `None` on shutdown.
    async fn connect(&mut self, watch: &mut Watch) -> Option<(ClusterConnection, u64)> {
        let mut backoff = MIN_BACKOFF;
        let mut logged = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                attempt = self.link.connection() => if let Ok(opened) = attempt {
                    return Some(opened);
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

    /// The link's connection now. One that replaced the connection this
    /// task used holds none of its subscriptions: every watched topic is
    /// then subscribed again. Whether it replaced the one in use.
    async fn current(
        &self,
        conn: &mut ClusterConnection,
        generation: &mut u64,
        watch: &mut Watch,
    ) -> bool {
        if let Ok((now, current)) = self.link.connection().await
            && current != *generation
        {
            *conn = now;
            *generation = current;
            watch.mark(watch.wanted.clone(), false);
            watch.probe = None;
            self.down();
            return true;
        }
        false
    }

    /// Applies watch and unwatch changes; a watch is acknowledged once its
    /// subscription is confirmed, or once it failed (it is retried, and
    /// the pipeline resynchronises when it succeeds). Whether any
    /// subscription failed.
    async fn apply(
        &self,
        conn: &ClusterConnection,
        watch: &mut Watch,
        changes: Vec<Interest>,
    ) -> bool {
        // Whether each topic the changes touch was watched before them: the
        // work is the batch's size, not the watched set's.
        let mut before: HashMap<Topic, bool> = HashMap::new();
        for change in &changes {
            before
                .entry(change.topic.clone())
                .or_insert_with(|| watch.wanted.contains(&change.topic));
            record(&mut watch.wanted, change);
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (topic, was) in before {
            match (was, watch.wanted.contains(&topic)) {
                (false, true) => added.push(topic),
                (true, false) => removed.push(topic),
                _ => {}
            }
        }
        let failed = subscribe(conn, &self.names, added.iter(), true, None).await;
        let failed_any = !failed.is_empty();
        watch.mark(added.iter().filter(|t| !failed.contains(t)).cloned(), true);
        watch.mark(failed, false);
        watch.mark(removed.iter().cloned(), true);
        self.unsubscribe(conn, watch, removed).await;
        changes.into_iter().for_each(acknowledge);
        failed_any
    }

    /// `SUNSUBSCRIBE`s topics not watched, counting the confirmations to
    /// come (so that they are not taken for the server's). One that fails
    /// is tried again when a message shows it still subscribed.
    async fn unsubscribe(&self, conn: &ClusterConnection, watch: &mut Watch, topics: Vec<Topic>) {
        if topics.is_empty() {
            return;
        }
        for topic in &topics {
            *watch.unsubscribing.entry(topic.clone()).or_default() += 1;
        }
        for topic in subscribe(conn, &self.names, topics.iter(), false, None).await {
            if let Some(count) = watch.unsubscribing.get_mut(&topic) {
                *count -= 1;
                if *count == 0 {
                    watch.unsubscribing.remove(&topic);
                }
            }
        }
    }

    /// What a push says: hands messages over; the topics whose
    /// subscription it ended, if any.
    async fn lost_by(&self, push: PushInfo, watch: &mut Watch) -> Option<Lost> {
        match push.kind {
            PushKind::SMessage => {
                let message = redis::Msg::from_push_info(push)?;
                // A probe: this node's comes back; others' are not events.
                if let Some(nonce) = message.get_payload_bytes().strip_prefix(b"h ") {
                    if let Some(probe) = watch.probe.as_mut()
                        && nonce == probe.nonce.to_string().as_bytes()
                        && let Some(topic) = self.names.topic_of(message.get_channel_name())
                    {
                        probe.awaiting.remove(&topic);
                    }
                    return None;
                }
                // A subscription left behind (an unsubscribe that failed,
                // or redis-rs restoring one it had before): dropped soon.
                if let Some(topic) = self.names.topic_of(message.get_channel_name())
                    && !watch.wanted.contains(&topic)
                    && !watch.unsubscribing.contains_key(&topic)
                {
                    watch.strays.insert(topic);
                }
                hand_over(&self.names, &self.inbound, &message).await;
                None
            }
            // Which node went away the push does not say: any of them may
            // be lost (a second `SSUBSCRIBE` on a node that kept it is
            // harmless).
            PushKind::Disconnection => Some(Lost::Maybe(watch.wanted.iter().cloned().collect())),
            // The confirmation of an unwatch, or the server's own when the
            // slot moved.
            PushKind::SUnsubscribe => {
                let channel: String =
                    redis::from_redis_value(push.data.into_iter().next()?).ok()?;
                let topic = self.names.topic_of(&channel)?;
                if let Some(count) = watch.unsubscribing.get_mut(&topic) {
                    *count -= 1;
                    if *count == 0 {
                        watch.unsubscribing.remove(&topic);
                    }
                    return None;
                }
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

/// Publishes this node's probe on each topic's shard channel (failures
/// leave the topic awaiting: it is subscribed again).
async fn send_probes(conn: &ClusterConnection, names: &Names, topics: &[Topic], nonce: u64) {
    let payload = format!("h {nonce}");
    let sends: Vec<_> = topics
        .iter()
        .map(|topic| {
            let mut conn = conn.clone();
            let mut cmd = redis::cmd("SPUBLISH");
            cmd.arg(names.channel(topic)).arg(&payload);
            async move {
                let _ =
                    tokio::time::timeout(RESPONSE_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await;
            }
        })
        .collect();
    stream::iter(sends)
        .buffer_unordered(SUBSCRIBE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}
