//! The Redis relay (`redis.url` set). It moves bytes on namespaced channels
//! and knows nothing of ordering. It speaks to one Redis
//! (`redis.mode = "standalone"`, [`pubsub`]) or to a Redis Cluster
//! (`"cluster"`, [`shards`]), the same way except for the commands and
//! the names.
//!
//! Events of topics with history are committed to the store first (which
//! assigns their offsets) and then published; each node's pipeline puts
//! them in order. For topics without history, one Lua script
//! per publish (or batch) atomically increments each topic's offset counter
//! in Redis and publishes the event with that offset; scripts run one at a
//! time, so Redis hands every node those events in offset order.
//!
//! Receiving runs on a dedicated connection owned by one background task,
//! which hands each message to the node's [`Inbound`] lanes. It
//! subscribes only to the topics the node watches (on watch, and
//! unsubscribes on unwatch), subscribes again when Redis goes away and
//! comes back, and then tells the pipeline to resynchronise, without any
//! client action.
//!
//! In a Redis Cluster, a topic's offset counter and its channel carry the
//! topic as a hash tag (`{prefix}offset:{T}`, `{prefix}topic:{T}`), so
//! both live in the topic's slot: the script runs on one master, and
//! events travel with `SPUBLISH` / `SSUBSCRIBE` (sharded pub/sub, Redis
//! 7+) on the master that owns that slot. A batch over many topics runs
//! one script per topic, on each topic's master.
//!
//! Keys and channels all start with `redis.prefix`; topic names can only
//! hold `[A-Za-z0-9_.-]` and are never used as patterns, so a topic cannot
//! collide with or inject into anything else.
//!
//! Relay message, on the topic's channel:
//! `{offset} {ts} {kind} {payload}`, where `kind` is `j` (JSON text) or `b`
//! (raw bytes); or `p {json}`, a presence diff (see
//! [`crate::event::PresenceDiff::from_relayed`]), published by the
//! presence book's scripts on the same channel so that it reaches exactly
//! the nodes that watch the topic; or, in a Redis Cluster, `h {nonce}`, a
//! node's probe of its own subscription (see [`shards`]), which every
//! other node ignores.

mod pubsub;
mod shards;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt, stream};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Arrival, Inbound, Relay, RelayError, RelayState};
use crate::config::{ConfigError, RedisMode};
use crate::event::{Event, PresenceDiff};
use crate::payload::Payload;
use crate::store::retention::Watchers;
use crate::topic::Topic;

/// A Redis command that takes longer than this fails, so a publish answers
/// 503 instead of hanging while Redis is unreachable.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Subscription changes applied together (one SUBSCRIBE for all of them).
const MAX_CHANGES_AT_ONCE: usize = 256;
/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First and largest wait between reconnection attempts of the subscriber.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Waits before each retry of relaying committed events (the last entry is
/// unused: it marks the final attempt).
const BROADCAST_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::ZERO,
];
/// Batches of committed events waiting to be sent again to a Redis
/// Cluster (see [`relay_late`]), and for how long each is tried.
const LATE_QUEUE: usize = 1024;
const LATE_RETRY_FOR: Duration = Duration::from_secs(60);
/// Channels counted by one `PUBSUB NUMSUB`.
const NUMSUB_CHUNK: usize = 500;
/// Commands a cluster relay has in flight at once when one call covers
/// many topics (one per topic: their slots differ).
const CLUSTER_CONCURRENCY: usize = 64;
/// How long a counter of a topic without history lives after its last
/// publish: a topic watched but silent this long numbers from 1 again,
/// which subscribers of such topics accept (they keep no order by offset).
const EPHEMERAL_COUNTER_TTL_MS: u64 = 24 * 3600 * 1000;

/// Increments each topic's offset and publishes its event, atomically.
/// A topic no node subscribes to (its event reached nobody) has its counter
/// deleted: its numbering starts again from 1, seen by no subscriber, and
/// Redis holds counters only for topics someone watches. Every counter
/// kept expires [`EPHEMERAL_COUNTER_TTL_MS`] after its last publish, so one
/// whose watchers left without another publish does not stay forever.
/// KEYS: offset key and channel of each event, in pairs.
/// ARGV: the TTL in milliseconds, then `"{ts} {kind} {payload}"` of each
/// event. `PUBLISH` is `SPUBLISH` in a Redis Cluster.
const PUBLISH_SCRIPT: &str = r"
local offsets = {}
for i = 2, #ARGV do
  local key = KEYS[2 * i - 3]
  local offset = redis.call('INCR', key)
  local receivers = redis.call('PUBLISH', KEYS[2 * i - 2], offset .. ' ' .. ARGV[i])
  if receivers == 0 then
    redis.call('DEL', key)
  else
    redis.call('PEXPIRE', key, ARGV[1])
  end
  offsets[i - 1] = offset
end
return offsets
";

/// A client for `redis.url`, and a connection to it for commands that is
/// opened on first use and again after it fails: each command waits at
/// most [`RESPONSE_TIMEOUT`], so a caller answers 503 rather than hang
/// while Redis is away.
pub fn connect_lazily(
    url: &SecretString,
) -> Result<(redis::Client, ConnectionManager), ConfigError> {
    let client = redis::Client::open(url.expose_secret()).map_err(invalid_url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(MAX_BACKOFF);
    let conn =
        ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(invalid_url)?;
    Ok((client, conn))
}

fn invalid_url(e: redis::RedisError) -> ConfigError {
    ConfigError::invalid("redis.url", "HERALD__REDIS__URL", e)
}

/// A client of the Redis Cluster whose seed nodes `urls` lists
/// (comma-separated), speaking RESP3; pushes (shard messages, and a
/// `Disconnection` when a node's connection drops) go to `pushes`.
fn cluster_client(
    urls: &SecretString,
    pushes: Option<mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient, ConfigError> {
    let seeds: Vec<&str> = urls
        .expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut builder = ClusterClientBuilder::new(seeds)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .overall_response_timeout(Some(RESPONSE_TIMEOUT))
        .retries(3);
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder.build().map_err(invalid_url)
}

/// Builds the namespaced Redis names.
#[derive(Clone)]
struct Names {
    prefix: String,
    /// Whether the topic is a hash tag (a Redis Cluster).
    tagged: bool,
}

/// The channel `topic`'s events and presence diffs travel on (one Redis).
pub fn channel(prefix: &str, topic: &Topic) -> String {
    format!("{prefix}topic:{topic}")
}

impl Names {
    fn new(prefix: &str, mode: RedisMode) -> Names {
        Names {
            prefix: prefix.to_owned(),
            tagged: mode == RedisMode::Cluster,
        }
    }

    fn channel(&self, topic: &Topic) -> String {
        if self.tagged {
            format!("{}topic:{{{topic}}}", self.prefix)
        } else {
            channel(&self.prefix, topic)
        }
    }

    fn offset_key(&self, topic: &Topic) -> String {
        if self.tagged {
            format!("{}offset:{{{topic}}}", self.prefix)
        } else {
            format!("{}offset:{}", self.prefix, topic)
        }
    }

    fn topic_of(&self, channel: &str) -> Option<Topic> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix("topic:")?;
        let name = if self.tagged {
            name.strip_prefix('{')?.strip_suffix('}')?
        } else {
            name
        };
        Topic::parse(name).ok()
    }
}

/// A subscription change for the subscriber task, with an optional
/// acknowledgement once Redis confirmed it.
struct Interest {
    topic: Topic,
    watch: bool,
    done: Option<oneshot::Sender<()>>,
}

/// The connection commands go over.
#[derive(Clone)]
enum Link {
    /// One Redis: reconnects by itself.
    Standalone(ConnectionManager),
    /// A Redis Cluster: opened on first use (and again until it opens
    /// once), then it follows the cluster's topology by itself.
    Cluster(Arc<ClusterLink>),
}

/// A Redis Cluster client and its connection, opened on first use and
/// replaced when it keeps failing: redis-rs 1.8.1's connection can stay
/// wedged after a failover (every command to the promoted master's slots
/// timing out, 40 s and more, in `herald-bench shards`), while a new one
/// reads the topology afresh.
pub(super) struct ClusterLink {
    client: ClusterClient,
    state: SyncMutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    conn: Option<ClusterConnection>,
    /// Counts replacements, so that a user can tell its subscriptions
    /// went with the old connection.
    generation: u64,
    failing_since: Option<tokio::time::Instant>,
}

/// How long commands may keep failing before the connection is replaced.
const RENEW_AFTER: Duration = Duration::from_secs(5);

impl ClusterLink {
    pub(super) fn new(client: ClusterClient) -> ClusterLink {
        ClusterLink {
            client,
            state: SyncMutex::new(LinkState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection and its generation, opened now if there is none.
    pub(super) async fn connection(&self) -> redis::RedisResult<(ClusterConnection, u64)> {
        let open = {
            let state = self.state();
            state.conn.clone().map(|conn| (conn, state.generation))
        };
        if let Some(open) = open {
            return Ok(open);
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_connection())
            .await
            .map_err(|_| io_error("no Redis Cluster node answered"))??;
        let mut state = self.state();
        let conn = state.conn.get_or_insert(conn).clone();
        Ok((conn, state.generation))
    }

    /// Records whether commands on the connection succeeded; replaces it
    /// after [`RENEW_AFTER`] of failures.
    pub(super) fn outcome(&self, ok: bool) {
        let mut state = self.state();
        let now = tokio::time::Instant::now();
        match (ok, state.failing_since) {
            (true, _) => state.failing_since = None,
            (false, None) => state.failing_since = Some(now),
            (false, Some(since)) if now - since >= RENEW_AFTER => {
                tracing::warn!("redis cluster connection keeps failing; opening a new one");
                state.conn = None;
                state.generation += 1;
                state.failing_since = None;
            }
            (false, Some(_)) => {}
        }
    }
}

fn io_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, what))
}

pub struct RedisRelay {
    link: Link,
    script: redis::Script,
    names: Names,
    /// Unbounded so that the pipeline hands changes over in order without
    /// waiting; each is one client's subscribe or unsubscribe, themselves
    /// bounded by `limits.subscribe_rate`.
    interest: mpsc::UnboundedSender<Interest>,
    connected: Arc<AtomicBool>,
    /// Watched topics whose subscription is not in force (a Redis Cluster
    /// whose master for them is away); always empty with one Redis.
    unreached: Arc<SyncMutex<HashSet<Topic>>>,
    /// Whether the cluster connection opened (always true with one Redis).
    opened: Arc<AtomicBool>,
    /// Committed events to send again (a Redis Cluster only).
    late: Option<mpsc::Sender<Vec<Arc<Event>>>>,
    /// The subscriber, and in a Redis Cluster the late relayer.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisRelay {
    /// Opens the publishing connection lazily and starts the subscriber
    /// task. A Redis that is down at start-up is not an error: the node
    /// starts unready and connects when Redis appears.
    pub fn start(
        url: &SecretString,
        mode: RedisMode,
        prefix: &str,
        inbound: Inbound,
        shutdown: CancellationToken,
    ) -> Result<RedisRelay, ConfigError> {
        let names = Names::new(prefix, mode);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let unreached = Arc::new(SyncMutex::new(HashSet::new()));
        let opened = Arc::new(AtomicBool::new(mode == RedisMode::Standalone));
        let (link, tasks, late, command) = match mode {
            RedisMode::Standalone => {
                let (client, publisher) = connect_lazily(url)?;
                let subscriber = pubsub::Subscriber::new(
                    client,
                    inbound,
                    names.clone(),
                    interest_rx,
                    Arc::clone(&connected),
                    shutdown,
                );
                let task = tokio::spawn(subscriber.run());
                (Link::Standalone(publisher), vec![task], None, "PUBLISH")
            }
            RedisMode::Cluster => {
                let client = cluster_client(url, None)?;
                let (pushes, pushes_rx) = mpsc::unbounded_channel();
                let subscriber = shards::Subscriber {
                    link: ClusterLink::new(cluster_client(url, Some(pushes))?),
                    pushes: pushes_rx,
                    inbound,
                    names: names.clone(),
                    interest: interest_rx,
                    connected: Arc::clone(&connected),
                    unreached: Arc::clone(&unreached),
                    opened: Arc::clone(&opened),
                    shutdown: shutdown.clone(),
                };
                let task = tokio::spawn(subscriber.run());
                let link = Link::Cluster(Arc::new(ClusterLink::new(client)));
                let (late, late_rx) = mpsc::channel(LATE_QUEUE);
                let relayer =
                    tokio::spawn(relay_late(link.clone(), names.clone(), late_rx, shutdown));
                (link, vec![task, relayer], Some(late), "SPUBLISH")
            }
        };
        Ok(RedisRelay {
            link,
            script: redis::Script::new(
                &PUBLISH_SCRIPT.replace("'PUBLISH'", &format!("'{command}'")),
            ),
            names,
            interest,
            connected,
            unreached,
            opened,
            late,
            tasks: Mutex::new(tasks),
        })
    }

    fn change(&self, topic: &Topic, watch: bool, done: Option<oneshot::Sender<()>>) {
        let change = Interest {
            topic: topic.clone(),
            watch,
            done,
        };
        // Fails only once the task stopped (shutdown).
        let _ = self.interest.send(change);
    }

    async fn publish_committed(&self, events: &[Arc<Event>]) {
        // redis-rs retries within a cluster itself (and follows a failover);
        // retrying here would hold the publish for seconds while a master
        // is away.
        let attempts = match self.link {
            Link::Standalone(_) => BROADCAST_RETRY_DELAYS.len(),
            Link::Cluster(_) => 1,
        };
        for (attempt, delay) in BROADCAST_RETRY_DELAYS[..attempts].iter().enumerate() {
            match broadcast(&self.link, &self.names, events).await {
                Ok(()) => return,
                Err(e) if attempt + 1 == attempts => match &self.late {
                    Some(late) => {
                        if late.try_send(events.to_vec()).is_err() {
                            tracing::warn!(error = %e, "committed events not relayed (too many waiting); nodes fill the gap from the store with the next event");
                        }
                    }
                    None => {
                        tracing::warn!(error = %e, "committed events not relayed; nodes fill the gap from the store with the next event");
                    }
                },
                // The standalone connection reconnects after a failed
                // command (e.g. the first one after Redis came back), and a
                // cluster's learns where a slot moved: a retry is worth it.
                Err(_) => tokio::time::sleep(*delay).await,
            }
        }
    }

    async fn publish_numbered(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> Result<Vec<u64>, RelayError> {
        let sent = events.len();
        let offsets = match &self.link {
            Link::Standalone(conn) => {
                self.number(events.iter().map(|(t, p)| (t, p)), ts, &mut conn.clone())
                    .await
            }
            Link::Cluster(link) => {
                let (conn, _) = link.connection().await.map_err(RelayError::Unreachable)?;
                // One script per topic, on the topic's master; the offsets
                // are put back in the order of `events`.
                let groups = by_topic(events.iter().enumerate(), |(_, (t, _))| t);
                let scripts: Vec<_> = groups
                    .into_iter()
                    .map(|(_, group)| {
                        let mut conn = conn.clone();
                        async move {
                            let slots = group.iter().map(|(i, _)| *i).collect();
                            let offsets = self
                                .number(group.iter().map(|(_, (t, p))| (t, p)), ts, &mut conn)
                                .await?;
                            Ok::<Numbered, RelayError>((slots, offsets))
                        }
                    })
                    .collect();
                let numbered: Result<Vec<Numbered>, RelayError> = stream::iter(scripts)
                    .buffer_unordered(CLUSTER_CONCURRENCY)
                    .try_collect()
                    .await;
                link.outcome(numbered.is_ok());
                let numbered = numbered?;
                let mut offsets = vec![0; sent];
                for (slots, numbers) in numbered {
                    for (slot, offset) in slots.into_iter().zip(numbers) {
                        offsets[slot] = offset;
                    }
                }
                Ok(offsets)
            }
        }?;
        if offsets.len() != sent {
            return Err(RelayError::UnexpectedReply {
                sent,
                got: offsets.len(),
            });
        }
        Ok(offsets)
    }

    /// Runs the publish script over `events` on `conn`.
    async fn number<'a>(
        &self,
        events: impl Iterator<Item = (&'a Topic, &'a Payload)>,
        ts: u64,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Vec<u64>, RelayError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(EPHEMERAL_COUNTER_TTL_MS);
        let mut sent = 0;
        for (topic, payload) in events {
            invocation
                .key(self.names.offset_key(topic))
                .key(self.names.channel(topic))
                .arg(encode_tail(ts, payload));
            sent += 1;
        }
        let offsets: Vec<u64> = invocation.invoke_async(conn).await.map_err(|e| {
            tracing::debug!(error = %e, "publish through redis failed");
            RelayError::Unreachable(e)
        })?;
        if offsets.len() != sent {
            return Err(RelayError::UnexpectedReply {
                sent,
                got: offsets.len(),
            });
        }
        Ok(offsets)
    }

    /// Of `topics`, those no node subscribes to, by `PUBSUB NUMSUB` (or
    /// `SHARDNUMSUB` on each channel's master) of their channels; none
    /// when Redis cannot say.
    async fn count_unwatched(&self, topics: Vec<Topic>) -> Vec<Topic> {
        let counted = match &self.link {
            Link::Standalone(conn) => self.count_standalone(&topics, conn.clone()).await,
            Link::Cluster(link) => match link.connection().await {
                Ok((conn, _)) => self.count_sharded(&topics, conn).await,
                Err(e) => Err(e),
            },
        };
        match counted {
            Ok(counts) => topics
                .into_iter()
                .zip(counts)
                .filter(|(_, n)| *n == 0)
                .map(|(t, _)| t)
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot count a topic's subscribers; its log stays");
                Vec::new()
            }
        }
    }

    async fn count_standalone(
        &self,
        topics: &[Topic],
        mut conn: ConnectionManager,
    ) -> redis::RedisResult<Vec<u64>> {
        let mut counts = Vec::with_capacity(topics.len());
        for chunk in topics.chunks(NUMSUB_CHUNK) {
            let mut cmd = redis::cmd("PUBSUB");
            cmd.arg("NUMSUB");
            for topic in chunk {
                cmd.arg(self.names.channel(topic));
            }
            let got: Vec<(String, u64)> = cmd.query_async(&mut conn).await?;
            if got.len() != chunk.len() {
                return Err(io_error("PUBSUB NUMSUB answered another count"));
            }
            counts.extend(got.into_iter().map(|(_, n)| n));
        }
        Ok(counts)
    }

    async fn count_sharded(
        &self,
        topics: &[Topic],
        conn: ClusterConnection,
    ) -> redis::RedisResult<Vec<u64>> {
        let counts: Vec<_> = topics
            .iter()
            .map(|topic| {
                let channel = self.names.channel(topic);
                let mut conn = conn.clone();
                async move {
                    let mut cmd = redis::cmd("PUBSUB");
                    cmd.arg("SHARDNUMSUB").arg(&channel);
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(channel.as_bytes(), SlotAddr::Master),
                    ));
                    let reply = conn.route_command(cmd, route).await?;
                    let got: Vec<(String, u64)> = redis::from_redis_value(reply)?;
                    Ok::<u64, redis::RedisError>(got.first().map_or(0, |(_, n)| *n))
                }
            })
            .collect();
        stream::iter(counts)
            .buffered(CLUSTER_CONCURRENCY)
            .try_collect()
            .await
    }
}

/// Sends committed events, each on its topic's channel, in order per topic.
async fn broadcast(link: &Link, names: &Names, events: &[Arc<Event>]) -> redis::RedisResult<()> {
    let message = |event: &Event| {
        let mut message = format!("{} ", event.offset).into_bytes();
        message.extend(encode_tail(event.ts, &event.payload));
        message
    };
    match link {
        Link::Standalone(conn) => {
            let mut pipe = redis::pipe();
            for event in events {
                pipe.publish(names.channel(&event.topic), message(event))
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn.clone()).await
        }
        Link::Cluster(link) => {
            let (conn, _) = link.connection().await?;
            // One pipeline per topic (one slot each), sent concurrently.
            let sends: Vec<_> = by_topic(events.iter(), |e| &e.topic)
                .into_iter()
                .map(|(_, events)| {
                    let mut pipe = redis::pipe();
                    for event in events {
                        pipe.spublish(names.channel(&event.topic), message(event))
                            .ignore();
                    }
                    let mut conn = conn.clone();
                    async move { pipe.query_async::<()>(&mut conn).await }
                })
                .collect();
            let sent = stream::iter(sends)
                .buffer_unordered(CLUSTER_CONCURRENCY)
                .try_collect()
                .await;
            link.outcome(sent.is_ok());
            sent
        }
    }
}

/// Committed events a Redis Cluster did not take (their master away):
/// sent again in the background, every second at most, for up to
/// [`LATE_RETRY_FOR`]. A node that subscribes through the master's
/// replica, or again after a failover, may otherwise miss them: nothing
/// else tells it to look in the store until the topic's next event.
/// Offsets make a late copy harmless to a node that has the event.
async fn relay_late(
    link: Link,
    names: Names,
    mut late: mpsc::Receiver<Vec<Arc<Event>>>,
    shutdown: CancellationToken,
) {
    loop {
        let events = tokio::select! {
            () = shutdown.cancelled() => return,
            events = late.recv() => match events {
                Some(events) => events,
                None => return,
            },
        };
        let (started, mut delay) = (tokio::time::Instant::now(), MIN_BACKOFF);
        while let Err(e) = broadcast(&link, &names, &events).await {
            if started.elapsed() > LATE_RETRY_FOR {
                tracing::warn!(error = %e, "committed events not relayed; nodes fill the gap from the store with the next event");
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where a topic's events sit in a batch, and the offsets they got.
type Numbered = (Vec<usize>, Vec<u64>);

/// Groups `items` by topic, keeping their order within each topic.
fn by_topic<'a, T>(
    items: impl Iterator<Item = T>,
    topic: impl Fn(&T) -> &'a Topic,
) -> Vec<(&'a Topic, Vec<T>)> {
    let mut groups: Vec<(&Topic, Vec<T>)> = Vec::new();
    let mut index: std::collections::HashMap<&Topic, usize> = std::collections::HashMap::new();
    for item in items {
        let t = topic(&item);
        let at = *index.entry(t).or_insert_with(|| {
            groups.push((t, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(item);
    }
    groups
}

impl Relay for RedisRelay {
    fn publish(&self, events: Vec<Arc<Event>>) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.publish_committed(&events).await })
    }

    fn publish_live(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> BoxFuture<'_, Result<Vec<u64>, RelayError>> {
        Box::pin(self.publish_numbered(events, ts))
    }

    fn watch(&self, topic: &Topic) -> BoxFuture<'static, ()> {
        let (done, confirmed) = oneshot::channel();
        self.change(topic, true, Some(done));
        // Dropped without an answer only when the task stopped.
        Box::pin(async move {
            let _ = confirmed.await;
        })
    }

    fn unwatch(&self, topic: &Topic) {
        self.change(topic, false, None);
    }

    fn state(&self) -> RelayState {
        if self.connected.load(Ordering::Relaxed) {
            RelayState::Connected
        } else {
            RelayState::Disconnected
        }
    }

    fn reachable(&self, topic: &Topic) -> bool {
        match self.link {
            Link::Standalone(_) => self.connected.load(Ordering::Relaxed),
            Link::Cluster(_) => {
                self.opened.load(Ordering::Relaxed)
                    && !self
                        .unreached
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(topic)
            }
        }
    }

    fn stopped(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks = std::mem::take(&mut *self.tasks.lock().await);
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

/// Who watches a topic: any node subscribed to its channel.
impl Watchers for RedisRelay {
    fn unwatched(&self, topics: Vec<Topic>) -> BoxFuture<'_, Vec<Topic>> {
        Box::pin(self.count_unwatched(topics))
    }
}

/// Hands one relay message to the node.
async fn hand_over(names: &Names, inbound: &Inbound, message: &redis::Msg) {
    let arrival = names
        .topic_of(message.get_channel_name())
        .and_then(|topic| decode(topic, message.get_payload_bytes()));
    match arrival {
        Some(Arrival::Event(event)) => inbound.event(event).await,
        Some(Arrival::Presence(diff)) => inbound.presence(diff).await,
        Some(Arrival::Resync) | None => tracing::warn!(
            channel = message.get_channel_name(),
            "dropped a relay message that is not Herald's format"
        ),
    }
}

/// `first` and the changes queued behind it, up to
/// [`MAX_CHANGES_AT_ONCE`]: applied together, in one round trip where the
/// commands allow.
fn more_changes(first: Interest, queue: &mut mpsc::UnboundedReceiver<Interest>) -> Vec<Interest> {
    let mut changes = vec![first];
    while changes.len() < MAX_CHANGES_AT_ONCE
        && let Ok(change) = queue.try_recv()
    {
        changes.push(change);
    }
    changes
}

fn encode_tail(ts: u64, payload: &Payload) -> Vec<u8> {
    let (kind, body): (&str, &[u8]) = match payload {
        Payload::Json(raw) => ("j", raw.get().as_bytes()),
        Payload::Binary(bytes) => ("b", bytes),
    };
    let mut tail = format!("{ts} {kind} ").into_bytes();
    tail.extend_from_slice(body);
    tail
}

/// An event or a presence diff (`p {json}`); `None` for anything else.
fn decode(topic: Topic, message: &[u8]) -> Option<Arrival> {
    match message.strip_prefix(b"p ") {
        Some(diff) => {
            PresenceDiff::from_relayed(topic, diff).map(|d| Arrival::Presence(Arc::new(d)))
        }
        None => decode_message(topic, message).map(|e| Arrival::Event(Arc::new(e))),
    }
}

/// Parses `{offset} {ts} {kind} {payload}`; `None` for anything else.
fn decode_message(topic: Topic, message: &[u8]) -> Option<Event> {
    let mut parts = message.splitn(4, |b| *b == b' ');
    let mut number = || -> Option<u64> { std::str::from_utf8(parts.next()?).ok()?.parse().ok() };
    let offset = number()?;
    let ts = number()?;
    let kind = parts.next()?;
    let body = parts.next()?;
    let payload = match kind {
        b"j" => Payload::Json(serde_json::from_slice::<Box<RawValue>>(body).ok()?),
        b"b" => Payload::Binary(Bytes::copy_from_slice(body)),
        _ => return None,
    };
    Some(Event::new(topic, offset, ts, payload))
}

/// A (UN)SUBSCRIBE confirmation within [`RESPONSE_TIMEOUT`]; a half-open
/// connection must not hold the task (and every waiting subscriber).
async fn confirmed(
    command: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> redis::RedisResult<()> {
    tokio::time::timeout(RESPONSE_TIMEOUT, command)
        .await
        .map_err(|_| io_error("no confirmation from Redis"))?
}

fn acknowledge(change: Interest) {
    if let Some(done) = change.done {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_messages_roundtrip() {
        let topic = Topic::parse("a.b").unwrap();
        let raw = serde_json::value::to_raw_value(&serde_json::json!({"x": "y z"})).unwrap();
        let mut message = b"7 ".to_vec();
        message.extend(encode_tail(1234, &Payload::Json(raw)));
        let event = decode_message(topic.clone(), &message).unwrap();
        assert_eq!((event.offset, event.ts), (7, 1234));
        assert!(matches!(&event.payload, Payload::Json(r) if r.get() == r#"{"x":"y z"}"#));

        let mut message = b"8 ".to_vec();
        message.extend(encode_tail(
            5,
            &Payload::Binary(Bytes::from_static(b" \x00 ")),
        ));
        let event = decode_message(topic.clone(), &message).unwrap();
        assert!(matches!(&event.payload, Payload::Binary(b) if &b[..] == b" \x00 "));

        assert!(decode_message(topic.clone(), b"x 1 j 1").is_none());
        assert!(decode_message(topic, b"1 1 q 1").is_none());
    }

    #[test]
    fn names_are_namespaced_and_reversible() {
        let names = Names::new("herald:", RedisMode::Standalone);
        let topic = Topic::parse("chat.room-1").unwrap();
        assert_eq!(names.channel(&topic), "herald:topic:chat.room-1");
        assert_eq!(names.offset_key(&topic), "herald:offset:chat.room-1");
        assert_eq!(names.topic_of("herald:topic:chat.room-1"), Some(topic));
        assert_eq!(names.topic_of("other:topic:chat"), None);
        assert_eq!(names.topic_of("herald:topic:a.*"), None);

        // In a Redis Cluster the topic is the hash tag of both names, so
        // they share its slot.
        let tagged = Names::new("herald:", RedisMode::Cluster);
        let topic = Topic::parse("chat.room-1").unwrap();
        assert_eq!(tagged.channel(&topic), "herald:topic:{chat.room-1}");
        assert_eq!(tagged.offset_key(&topic), "herald:offset:{chat.room-1}");
        assert_eq!(tagged.topic_of("herald:topic:{chat.room-1}"), Some(topic));
        assert_eq!(tagged.topic_of("herald:topic:chat.room-1"), None);
    }

    #[test]
    fn batches_group_by_topic_in_order() {
        let (a, b) = (Topic::parse("a").unwrap(), Topic::parse("b").unwrap());
        let items = [(&a, 1), (&b, 2), (&a, 3)];
        let groups = by_topic(items.iter(), |(t, _)| *t);
        let numbers: Vec<Vec<i32>> = groups
            .iter()
            .map(|(_, g)| g.iter().map(|(_, n)| *n).collect())
            .collect();
        assert_eq!(numbers, [vec![1, 3], vec![2]]);
    }
}
