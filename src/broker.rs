//! The routing interface the WebSocket and HTTP layers talk to.
//!
//! [`Broker`] owns what happens to a publish (assign the topic's next offset,
//! build the event once, hand it to every subscriber) and to a subscription.
//! Today routing is in-process: offsets are counted in memory and events go
//! straight to the local [`Hub`]. Relaying between nodes plugs in here
//! without changing the callers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::event::{Event, Payload, now_ms};
use crate::hub::{ConnId, Hub, Mailbox};
use crate::topic::Topic;

/// Why a publish was not accepted. Nothing was delivered when this is
/// returned.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing is unavailable: {0}")]
    Unavailable(String),
}

#[derive(Default)]
pub struct Broker {
    hub: Hub,
    /// Last offset per topic. Held while an event is delivered so that
    /// concurrent publishers to one topic reach subscribers in offset order.
    offsets: Mutex<HashMap<Topic, u64>>,
}

impl Broker {
    pub fn new() -> Broker {
        Broker::default()
    }

    /// Publishes one event and returns its offset.
    pub async fn publish(&self, topic: Topic, payload: Payload) -> Result<u64, PublishError> {
        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        let last = offsets.entry(topic.clone()).or_insert(0);
        *last += 1;
        let event = Arc::new(Event::new(topic, *last, now_ms(), payload));
        self.hub.deliver(&event);
        Ok(event.offset)
    }

    /// Publishes events in order; returns their offsets in the same order.
    pub async fn publish_batch(
        &self,
        events: Vec<(Topic, Payload)>,
    ) -> Result<Vec<u64>, PublishError> {
        let mut offsets = Vec::with_capacity(events.len());
        for (topic, payload) in events {
            offsets.push(self.publish(topic, payload).await?);
        }
        Ok(offsets)
    }

    /// Starts delivering `topic`'s events to `mailbox`.
    pub async fn subscribe(&self, topic: &Topic, mailbox: &Mailbox) {
        self.hub.subscribe(topic, mailbox);
    }

    /// Stops delivering `topic`'s events to connection `id`.
    pub async fn unsubscribe(&self, topic: &Topic, id: ConnId) {
        self.hub.unsubscribe(topic, id);
    }
}
