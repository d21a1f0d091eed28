//! Between nodes: how a publish gets its offset and reaches every node's
//! hub.
//!
//! - [`Relay::Local`] (no `redis.url`): one node; offsets are counted in
//!   memory and events go straight to the local hub.
//! - [`Relay::Redis`] (cluster mode): offsets are counted in Redis and each
//!   event is published on a namespaced Redis channel by one atomic script,
//!   so all nodes see a topic's events in offset order. Every node,
//!   including the one that took the publish, delivers an event when it
//!   comes back from Redis: one path, so each subscriber gets it once.

mod local;
pub mod redis;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::Payload;
use crate::hub::Hub;
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

pub enum Relay {
    Local(LocalRelay),
    Redis(RedisRelay),
}

impl Relay {
    /// The relay the settings ask for. The Redis relay's background task
    /// stops when `shutdown` is cancelled.
    pub fn from_settings(
        settings: &Settings,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> Result<Relay, ConfigError> {
        Ok(match &settings.redis.url {
            None => Relay::Local(LocalRelay::new(hub)),
            Some(url) => Relay::Redis(RedisRelay::start(
                url,
                &settings.redis.prefix,
                hub,
                shutdown,
            )?),
        })
    }

    /// Publishes events in order and returns their offsets.
    pub async fn publish(&self, events: Vec<(Topic, Payload)>) -> Result<Vec<u64>, PublishError> {
        match self {
            Relay::Local(local) => Ok(local.publish(events)),
            Relay::Redis(redis) => redis.publish(events).await,
        }
    }

    /// The local subscribers of `topic` changed; returns once this node's
    /// subscription matches the hub, so that a subscriber receives every
    /// event published after this returns (when Redis is down: once the
    /// topic will be restored on reconnect).
    pub async fn interest_changed(&self, topic: &Topic) {
        if let Relay::Redis(redis) = self {
            redis.interest_changed(topic).await;
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
