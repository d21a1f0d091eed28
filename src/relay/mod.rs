//! Between nodes: how an event reaches every node.
//!
//! A relay only moves events. Every relay has the same capabilities
//! ([`Relay`]):
//! - publish committed events, and number and publish events of topics
//!   without history (their offsets come from the relay);
//! - watch a topic and unwatch it: which topics this node wants to
//!   receive;
//! - a stream of incoming events: what arrives, from any node (this one
//!   included), goes into the node's [`Inbound`] lanes, which the delivery
//!   pipeline reads.
//!
//! Ordering, gap-fill and who on the node gets an event are the
//! pipeline's (see [`crate::pipeline`]); a relay knows nothing of them.
//!
//! - [`LocalRelay`] (no `redis.url`): one node; a loopback.
//! - [`RedisRelay`] (`redis.url` set): events travel on namespaced Redis
//!   channels, of one Redis or sharded over a Redis Cluster's masters.
//!
//! Adding a relay means implementing [`Relay`] and naming it in
//! [`from_settings`].

mod local;
pub mod redis;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::{Event, PresenceDiff};
use crate::payload::Payload;
use crate::store::retention::Watchers;
use crate::topic::Topic;

pub use self::local::LocalRelay;
pub use self::redis::RedisRelay;

/// Why a relay could not publish. Nothing was published when this is
/// returned, except in a Redis Cluster for a batch over topics on several
/// masters: each topic's events are published (or not) together on its
/// own master, so those of topics whose master answered may have been.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the relay (Redis) cannot be reached")]
    Unreachable(#[source] ::redis::RedisError),
    #[error("the relay (Redis) answered {got} offsets for {sent} events")]
    UnexpectedReply { sent: usize, got: usize },
}

/// Whether a relay reaches the other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// A single node: nothing to reach.
    Local,
    Connected,
    Disconnected,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Local => "local",
            RelayState::Connected => "connected",
            RelayState::Disconnected => "disconnected",
        }
    }
}

/// How events move between nodes. As [`Watchers`], a relay tells the
/// pruner which topics no node watches.
pub trait Relay: Watchers + Send + Sync {
    /// Sends events already committed to the store to every node. They are
    /// durable, so a failure here is not the publisher's: it is logged, and
    /// nodes fill the gap from the store when the next event or the relay
    /// comes back.
    fn publish(&self, events: Vec<Arc<Event>>) -> BoxFuture<'_, ()>;

    /// Numbers events of topics without history (per topic, from 1) and
    /// sends them to every node, in that order; returns their offsets.
    fn publish_live(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> BoxFuture<'_, Result<Vec<u64>, RelayError>>;

    /// Starts receiving `topic`'s events. Changes take effect in the order
    /// they are made; the future resolves once this one is in force, so
    /// that every event published after it arrives (when Redis is down: at
    /// once, since watched topics are restored on reconnect).
    fn watch(&self, topic: &Topic) -> BoxFuture<'static, ()>;

    /// Stops receiving `topic`'s events, without waiting.
    fn unwatch(&self, topic: &Topic);

    fn state(&self) -> RelayState;

    /// Whether a publish to `topic` can reach its subscribers now: with
    /// one Redis, whether it is connected; in a Redis Cluster, whether the
    /// master of the topic's slot is (as far as this node knows).
    fn reachable(&self, _topic: &Topic) -> bool {
        self.state() != RelayState::Disconnected
    }

    /// Waits for the relay's background work to end after shutdown.
    fn stopped(&self) -> BoxFuture<'_, ()>;
}

/// The relay the settings ask for, handing what arrives to `inbound`. Its
/// background task, if any, stops when `shutdown` is cancelled.
pub fn from_settings(
    settings: &Settings,
    inbound: Inbound,
    shutdown: CancellationToken,
) -> Result<Arc<dyn Relay>, ConfigError> {
    Ok(match &settings.redis.url {
        None => Arc::new(LocalRelay::new(inbound)),
        Some(url) => Arc::new(RedisRelay::start(
            url,
            settings.redis.mode,
            &settings.redis.prefix,
            inbound,
            shutdown,
        )?),
    })
}

/// What a relay hands the node.
#[derive(Debug)]
pub enum Arrival {
    Event(Arc<Event>),
    /// A change in a topic's presence.
    Presence(Arc<PresenceDiff>),
    /// The relay was away: events of watched topics may have been missed
    /// with no later event to reveal it.
    Resync,
}

/// Events waiting in one lane; a relay waits when its lane is full.
const LANE_CAPACITY: usize = 1024;

/// Where relays hand what arrives: one ordered lane per pipeline shard, a
/// topic always in the same lane, so each topic's events stay in the order
/// the relay received them.
#[derive(Clone)]
pub struct Inbound {
    lanes: Arc<[mpsc::Sender<Arrival>]>,
}

impl Inbound {
    /// `count` lanes, and the receiving end of each, in lane order.
    pub fn new(count: usize) -> (Inbound, Vec<mpsc::Receiver<Arrival>>) {
        let (senders, receivers) = (0..count.max(1))
            .map(|_| mpsc::channel(LANE_CAPACITY))
            .unzip::<_, _, Vec<_>, Vec<_>>();
        (
            Inbound {
                lanes: senders.into(),
            },
            receivers,
        )
    }

    /// The lane of `topic`: the same on every call.
    pub fn lane_of(&self, topic: &Topic) -> usize {
        topic.lane(self.lanes.len())
    }

    /// Hands over an event; waits while its lane is full.
    pub async fn event(&self, event: Arc<Event>) {
        let lane = self.lane_of(&event.topic);
        self.hand(lane, Arrival::Event(event)).await;
    }

    /// Hands over a presence diff, in its topic's lane; waits while the
    /// lane is full.
    pub async fn presence(&self, diff: Arc<PresenceDiff>) {
        let lane = self.lane_of(&diff.topic);
        self.hand(lane, Arrival::Presence(diff)).await;
    }

    /// Puts `arrival` in lane `lane`, waiting while it is full.
    async fn hand(&self, lane: usize, arrival: Arrival) {
        // Closed only when the node is stopping.
        let _ = self.lanes[lane].send(arrival).await;
    }

    /// Room for one event of `topic`, taken now and filled later without
    /// waiting: lets a relay number and hand over an event in one step.
    pub async fn reserve(&self, topic: &Topic) -> Option<mpsc::OwnedPermit<Arrival>> {
        let lane = &self.lanes[self.lane_of(topic)];
        lane.clone().reserve_owned().await.ok()
    }

    /// Tells every lane the relay was away.
    pub async fn resync(&self) {
        for lane in self.lanes.iter() {
            let _ = lane.send(Arrival::Resync).await;
        }
    }
}
