//! The routing interface the WebSocket and HTTP layers talk to.
//!
//! [`Broker`] ties the local [`Hub`] (who on this node wants which topic) to
//! the [`Relay`] (how a publish gets its offset and reaches every node).
//! Callers never see which relay runs: single node or cluster, the
//! WebSocket and HTTP code is the same.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::event::Payload;
use crate::hub::{ConnId, Hub, Mailbox};
pub use crate::relay::PublishError;
use crate::relay::Relay;
use crate::topic::Topic;

pub struct Broker {
    hub: Arc<Hub>,
    relay: Relay,
}

impl Broker {
    pub fn new(settings: &Settings, shutdown: CancellationToken) -> Result<Broker, ConfigError> {
        let hub = Arc::new(Hub::default());
        let relay = Relay::from_settings(settings, Arc::clone(&hub), shutdown)?;
        Ok(Broker { hub, relay })
    }

    /// Publishes one event and returns its offset.
    pub async fn publish(&self, topic: Topic, payload: Payload) -> Result<u64, PublishError> {
        let offsets = self.relay.publish(vec![(topic, payload)]).await?;
        offsets
            .first()
            .copied()
            .ok_or_else(|| PublishError::Unavailable("no offset returned".into()))
    }

    /// Publishes events in order; returns their offsets in the same order.
    pub async fn publish_batch(
        &self,
        events: Vec<(Topic, Payload)>,
    ) -> Result<Vec<u64>, PublishError> {
        self.relay.publish(events).await
    }

    /// Starts delivering `topic`'s events to `mailbox`. Returns once events
    /// published from now on will reach it.
    pub async fn subscribe(&self, topic: &Topic, mailbox: &Mailbox) {
        self.hub.subscribe(topic, mailbox);
        // Not only for the topic's first local subscriber: a second one
        // must also wait until the first one's Redis subscription is
        // confirmed. The relay applies changes in order and skips no-ops.
        self.relay.interest_changed(topic).await;
    }

    /// Stops delivering `topic`'s events to connection `id`.
    pub async fn unsubscribe(&self, topic: &Topic, id: ConnId) {
        if self.hub.unsubscribe(topic, id) {
            self.relay.interest_changed(topic).await;
        }
    }

    /// Whether this node can publish and receive events right now.
    pub fn is_ready(&self) -> bool {
        self.relay.is_ready()
    }

    /// Waits for background work to finish once shutdown was requested.
    pub async fn stopped(&self) {
        self.relay.stopped().await;
    }
}
