//! Cluster mode: the Redis relay. It moves bytes on namespaced channels and
//! knows nothing of ordering.
//!
//! Events of topics with history are committed to the store first (which
//! assigns their offsets) and then `PUBLISH`ed; each node's pipeline puts
//! them in order. For topics without history, one Lua script
//! per publish (or batch) atomically increments each topic's offset counter
//! in Redis and `PUBLISH`es the event with that offset; scripts run one at a
//! time, so Redis hands every node those events in offset order.
//!
//! Receiving runs on a dedicated pub/sub connection owned by one background
//! task, which hands each message to the node's [`Inbound`] lanes. It
//! subscribes only to the topics the node watches (`SUBSCRIBE` on watch,
//! `UNSUBSCRIBE` on unwatch), reconnects with capped exponential backoff
//! when Redis goes away, and then re-subscribes every watched topic and
//! tells the pipeline to resynchronise, without any client action.
//!
//! Keys and channels all start with `redis.prefix`; topic names can only
//! hold `[A-Za-z0-9_.-]` and are never used as patterns, so a topic cannot
//! collide with or inject into anything else.
//!
//! Relay message, on channel `{prefix}topic:{topic}`:
//! `{offset} {ts} {kind} {payload}`, where `kind` is `j` (JSON text) or `b`
//! (raw bytes); or `p {json}`, a presence diff (see
//! [`crate::event::PresenceDiff::from_relayed`]), published by the
//! presence book's scripts on the same channel so that it reaches exactly
//! the nodes that watch the topic.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Arrival, Inbound, Relay, RelayError, RelayState};
use crate::config::ConfigError;
use crate::event::{Event, PresenceDiff};
use crate::payload::Payload;
use crate::store::retention::Watchers;
use crate::telemetry::names;
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
/// Channels counted by one `PUBSUB NUMSUB`.
const NUMSUB_CHUNK: usize = 500;
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
/// event.
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
    let invalid = |e| ConfigError::invalid("redis.url", "HERALD__REDIS__URL", e);
    let client = redis::Client::open(url.expose_secret()).map_err(invalid)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(MAX_BACKOFF);
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(invalid)?;
    Ok((client, conn))
}

/// Builds the namespaced Redis names.
#[derive(Clone)]
struct Names {
    prefix: String,
}

/// The channel `topic`'s events and presence diffs travel on.
pub fn channel(prefix: &str, topic: &Topic) -> String {
    format!("{prefix}topic:{topic}")
}

impl Names {
    fn channel(&self, topic: &Topic) -> String {
        channel(&self.prefix, topic)
    }

    fn offset_key(&self, topic: &Topic) -> String {
        format!("{}offset:{}", self.prefix, topic)
    }

    fn topic_of(&self, channel: &str) -> Option<Topic> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix("topic:")?;
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

pub struct RedisRelay {
    publisher: ConnectionManager,
    script: redis::Script,
    names: Names,
    /// Unbounded so that the pipeline hands changes over in order without
    /// waiting; each is one client's subscribe or unsubscribe, themselves
    /// bounded by `limits.subscribe_rate`.
    interest: mpsc::UnboundedSender<Interest>,
    connected: Arc<AtomicBool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl RedisRelay {
    /// Opens the publishing connection lazily and starts the subscriber
    /// task. A Redis that is down at start-up is not an error: the node
    /// starts unready and connects when Redis appears.
    pub fn start(
        url: &SecretString,
        prefix: &str,
        inbound: Inbound,
        shutdown: CancellationToken,
    ) -> Result<RedisRelay, ConfigError> {
        let (client, publisher) = connect_lazily(url)?;
        let names = Names {
            prefix: prefix.to_owned(),
        };
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            client,
            inbound,
            wanted: HashSet::new(),
            ever_connected: false,
            names: names.clone(),
            interest: interest_rx,
            connected: Arc::clone(&connected),
            shutdown,
        };
        let task = tokio::spawn(subscriber.run());
        Ok(RedisRelay {
            publisher,
            script: redis::Script::new(PUBLISH_SCRIPT),
            names,
            interest,
            connected,
            task: Mutex::new(Some(task)),
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
        let mut pipe = redis::pipe();
        for event in events {
            let mut message = format!("{} ", event.offset).into_bytes();
            message.extend(encode_tail(event.ts, &event.payload));
            pipe.publish(self.names.channel(&event.topic), message)
                .ignore();
        }
        // The publishing connection reconnects after a failed command (e.g.
        // the first one after Redis came back), so retrying is worth it.
        let mut conn = self.publisher.clone();
        for (attempt, delay) in BROADCAST_RETRY_DELAYS.iter().enumerate() {
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return,
                Err(e) if attempt + 1 == BROADCAST_RETRY_DELAYS.len() => {
                    tracing::warn!(error = %e, "committed events not relayed; nodes fill the gap from the store with the next event");
                }
                Err(_) => tokio::time::sleep(*delay).await,
            }
        }
    }

    async fn publish_numbered(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> Result<Vec<u64>, RelayError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(EPHEMERAL_COUNTER_TTL_MS);
        for (topic, payload) in &events {
            invocation
                .key(self.names.offset_key(topic))
                .key(self.names.channel(topic))
                .arg(encode_tail(ts, payload));
        }
        let mut conn = self.publisher.clone();
        let offsets: Vec<u64> = invocation.invoke_async(&mut conn).await.map_err(|e| {
            tracing::debug!(error = %e, "publish through redis failed");
            RelayError::Unreachable(e)
        })?;
        if offsets.len() != events.len() {
            return Err(RelayError::UnexpectedReply {
                sent: events.len(),
                got: offsets.len(),
            });
        }
        Ok(offsets)
    }

    /// Of `topics`, those no node subscribes to, by `PUBSUB NUMSUB` of
    /// their channels; none when Redis cannot say.
    async fn count_unwatched(&self, topics: Vec<Topic>) -> Vec<Topic> {
        let mut unwatched = Vec::new();
        let mut conn = self.publisher.clone();
        for chunk in topics.chunks(NUMSUB_CHUNK) {
            let mut cmd = redis::cmd("PUBSUB");
            cmd.arg("NUMSUB");
            for topic in chunk {
                cmd.arg(self.names.channel(topic));
            }
            match cmd.query_async::<Vec<(String, u64)>>(&mut conn).await {
                Ok(counts) if counts.len() == chunk.len() => unwatched.extend(
                    chunk
                        .iter()
                        .zip(counts)
                        .filter(|(_, (_, n))| *n == 0)
                        .map(|(t, _)| t.clone()),
                ),
                Ok(_) => return Vec::new(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot count a topic's subscribers; its log stays");
                    return Vec::new();
                }
            }
        }
        unwatched
    }
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

    fn stopped(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(task) = self.task.lock().await.take() {
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

/// The background task that owns the pub/sub connection.
struct Subscriber {
    client: redis::Client,
    inbound: Inbound,
    /// The topics the node watches: subscribed whenever connected.
    wanted: HashSet<Topic>,
    /// Whether a connection succeeded before (the next one is a reconnect).
    ever_connected: bool,
    names: Names,
    interest: mpsc::UnboundedReceiver<Interest>,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

/// Why a connected session of the subscriber ended.
enum Ended {
    Shutdown,
    Lost,
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut was_down_logged = false;
        loop {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub());
            let pubsub = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                attempt = attempt => attempt.ok().and_then(Result::ok),
            };
            if let Some(pubsub) = pubsub {
                let (sink, stream) = pubsub.split();
                match self.serve(sink, stream, &mut backoff).await {
                    Ended::Shutdown => return,
                    Ended::Lost => {
                        tracing::warn!("redis relay disconnected; reconnecting");
                        was_down_logged = true;
                    }
                }
            } else if !was_down_logged {
                tracing::warn!("redis relay unavailable; retrying with backoff");
                was_down_logged = true;
            }
            if self.wait(backoff).await.is_err() {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits `delay` before reconnecting. Subscription changes meanwhile are
    /// acknowledged at once: the watched topics are subscribed on
    /// reconnect. `Err` on shutdown.
    async fn wait(&mut self, delay: Duration) -> Result<(), ()> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(()),
                _ = &mut sleep => return Ok(()),
                Some(change) = self.interest.recv() => {
                    self.apply(&change);
                    acknowledge(change);
                }
            }
        }
    }

    /// Records a change in the watched set.
    fn apply(&mut self, change: &Interest) {
        if change.watch {
            self.wanted.insert(change.topic.clone());
        } else {
            self.wanted.remove(&change.topic);
        }
    }

    /// Runs one connected session: restore subscriptions, then hand over
    /// messages and apply subscription changes until the connection drops.
    async fn serve(
        &mut self,
        mut sink: PubSubSink,
        mut stream: redis::aio::PubSubStream,
        backoff: &mut Duration,
    ) -> Ended {
        let mut subscribed: HashSet<Topic> = HashSet::new();
        if !self.wanted.is_empty() {
            let channels: Vec<String> = self.wanted.iter().map(|t| self.names.channel(t)).collect();
            if confirmed(sink.subscribe(channels)).await.is_err() {
                return Ended::Lost;
            }
            subscribed.clone_from(&self.wanted);
        }
        self.connected.store(true, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(1.0);
        if self.ever_connected {
            metrics::counter!(names::RELAY_RECONNECTS).increment(1);
        }
        self.ever_connected = true;
        *backoff = MIN_BACKOFF;
        tracing::info!(topics = subscribed.len(), "redis relay connected");
        // Events relayed while we were away are in the store.
        self.inbound.resync().await;

        let ended = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Shutdown,
                message = stream.next() => match message {
                    Some(message) => self.hand_over(&message).await,
                    None => break Ended::Lost,
                },
                Some(change) = self.interest.recv() => {
                    // Changes that queued up meanwhile go together: one
                    // SUBSCRIBE / UNSUBSCRIBE round trip for all of them.
                    let mut changes = vec![change];
                    while changes.len() < MAX_CHANGES_AT_ONCE
                        && let Ok(change) = self.interest.try_recv()
                    {
                        changes.push(change);
                    }
                    changes.iter().for_each(|c| self.apply(c));
                    let topics: Vec<&Topic> = changes.iter().map(|c| &c.topic).collect();
                    let lost = reconcile(&self.wanted, &self.names, &mut sink, &mut subscribed, &topics)
                        .await
                        .is_err();
                    changes.into_iter().for_each(acknowledge);
                    if lost {
                        break Ended::Lost;
                    }
                }
            }
        };
        self.connected.store(false, Ordering::Relaxed);
        metrics::gauge!(names::RELAY_CONNECTED).set(0.0);
        ended
    }

    async fn hand_over(&mut self, message: &redis::Msg) {
        let arrival = self
            .names
            .topic_of(message.get_channel_name())
            .and_then(|topic| decode(topic, message.get_payload_bytes()));
        match arrival {
            Some(Arrival::Event(event)) => self.inbound.event(event).await,
            Some(Arrival::Presence(diff)) => self.inbound.presence(diff).await,
            Some(Arrival::Resync) | None => tracing::warn!(
                channel = message.get_channel_name(),
                "dropped a relay message that is not Herald's format"
            ),
        }
    }
}

/// Brings the Redis subscriptions of `topics` in line with the watched
/// set.
async fn reconcile(
    wanted: &HashSet<Topic>,
    names: &Names,
    sink: &mut PubSubSink,
    subscribed: &mut HashSet<Topic>,
    topics: &[&Topic],
) -> redis::RedisResult<()> {
    let (mut add, mut remove): (Vec<Topic>, Vec<Topic>) = (Vec::new(), Vec::new());
    for &topic in topics {
        let wanted = wanted.contains(topic);
        if wanted && !subscribed.contains(topic) && !add.contains(topic) {
            add.push(topic.clone());
        } else if !wanted && subscribed.contains(topic) && !remove.contains(topic) {
            remove.push(topic.clone());
        }
    }
    if !add.is_empty() {
        let channels: Vec<String> = add.iter().map(|t| names.channel(t)).collect();
        confirmed(sink.subscribe(channels)).await?;
        subscribed.extend(add);
    }
    if !remove.is_empty() {
        let channels: Vec<String> = remove.iter().map(|t| names.channel(t)).collect();
        confirmed(sink.unsubscribe(channels)).await?;
        for topic in &remove {
            subscribed.remove(topic);
        }
    }
    Ok(())
}

/// A (UN)SUBSCRIBE confirmation within [`RESPONSE_TIMEOUT`]; a half-open
/// connection must not hold the task (and every waiting subscriber).
async fn confirmed(
    command: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> redis::RedisResult<()> {
    tokio::time::timeout(RESPONSE_TIMEOUT, command)
        .await
        .map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "no confirmation from Redis"))
        })?
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
        let names = Names {
            prefix: "herald:".into(),
        };
        let topic = Topic::parse("chat.room-1").unwrap();
        assert_eq!(names.channel(&topic), "herald:topic:chat.room-1");
        assert_eq!(names.offset_key(&topic), "herald:offset:chat.room-1");
        assert_eq!(names.topic_of("herald:topic:chat.room-1"), Some(topic));
        assert_eq!(names.topic_of("other:topic:chat"), None);
        assert_eq!(names.topic_of("herald:topic:a.*"), None);
    }
}
