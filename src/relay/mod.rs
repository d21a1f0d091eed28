//! Between nodes: how an event gets its offset and reaches every node's
//! hub.
//!
//! Topics with history get their offsets from the store (see
//! [`crate::store`]); the relay only broadcasts them once committed, and
//! each node's [`order::Orderer`] delivers them in order, filling gaps from
//! the store. Topics without history get their offsets from the relay.
//!
//! - [`Relay::Local`] (no `redis.url`): one node; events go straight to the
//!   local hub.
//! - [`Relay::Redis`] (cluster mode): events travel on namespaced Redis
//!   channels. Every node, the one that took the publish included, delivers
//!   an event when it comes back from Redis: one path, so each subscriber
//!   gets it once.

mod local;
pub mod order;
pub mod redis;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::Event;
use crate::hub::Hub;
use crate::payload::Payload;
use crate::store::Store;
use crate::store::retention::{Retention, Watchers};
use crate::topic::Topic;

pub use self::local::LocalRelay;
pub use self::redis::RedisRelay;

/// Why a publish was not accepted. Nothing was published when this is
/// returned.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing is unavailable: {0}")]
    Unavailable(String),
}

/// What the relays share with the rest of the node.
#[derive(Clone)]
pub struct Shared {
    pub hub: Arc<Hub>,
    pub store: Arc<Store>,
    pub retention: Arc<Retention>,
}

pub enum Relay {
    Local(LocalRelay),
    Redis(RedisRelay),
}

impl Relay {
    /// The relay the settings ask for. The Redis relay's background task
    /// stops when `shutdown` is cancelled.
    pub fn from_settings(
        settings: &Settings,
        shared: Shared,
        shutdown: CancellationToken,
    ) -> Result<Relay, ConfigError> {
        Ok(match &settings.redis.url {
            None => Relay::Local(LocalRelay::new(shared)),
            Some(url) => Relay::Redis(RedisRelay::start(
                url,
                &settings.redis.prefix,
                shared,
                shutdown,
            )?),
        })
    }

    /// Assigns offsets to events of topics without history and broadcasts
    /// them, in order.
    pub async fn publish_ephemeral(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> Result<Vec<u64>, PublishError> {
        match self {
            Relay::Local(local) => Ok(local.publish_ephemeral(events, ts)),
            Relay::Redis(redis) => redis.publish_ephemeral(events, ts).await,
        }
    }

    /// Broadcasts events already committed to the store. They are durable,
    /// so a failure here is not the publisher's: nodes fill the gap from the
    /// store when the next event or the relay comes back.
    pub async fn broadcast(&self, events: Vec<Arc<Event>>) {
        match self {
            Relay::Local(local) => local.broadcast(events).await,
            Relay::Redis(redis) => redis.broadcast(&events).await,
        }
    }

    /// The local subscribers of `topic` changed; returns once this node's
    /// subscription matches the hub, so that a subscriber receives every
    /// event published after this returns (when Redis is down: once the
    /// topic will be restored on reconnect).
    pub async fn interest_changed(&self, topic: &Topic) {
        match self {
            Relay::Local(local) => local.interest_changed(topic).await,
            Relay::Redis(redis) => redis.interest_changed(topic).await,
        }
    }

    /// [`interest_changed`](Self::interest_changed) for a topic whose last
    /// local subscriber left, without waiting (callable from `Drop`).
    pub fn interest_dropped(&self, topic: &Topic) {
        match self {
            // The orderer keeps the topic's position until its next
            // subscribe or unsubscribe syncs it with the hub: still
            // correct (each delivery moves it), one map entry until then,
            // and the pruner leaves a tracked topic's log alone.
            Relay::Local(_) => {}
            Relay::Redis(redis) => redis.interest_dropped(topic),
        }
    }

    /// Whether this node can publish and receive events from other nodes.
    pub fn is_ready(&self) -> bool {
        match self {
            Relay::Local(_) => true,
            Relay::Redis(redis) => redis.is_connected(),
        }
    }

    /// Waits for the relay's background task to finish after shutdown.
    pub async fn stopped(&self) {
        if let Relay::Redis(redis) = self {
            redis.stopped().await;
        }
    }
}

/// Who watches a topic: this node's hub on its own; the whole cluster's
/// subscriptions in Redis.
impl Watchers for Relay {
    fn unwatched(&self, topics: Vec<Topic>) -> futures_util::future::BoxFuture<'_, Vec<Topic>> {
        Box::pin(async move {
            match self {
                Relay::Local(local) => topics.into_iter().filter(|t| !local.watches(t)).collect(),
                Relay::Redis(redis) => redis.unwatched(topics).await,
            }
        })
    }
}
