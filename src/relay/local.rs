//! In-process routing for a single node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Shared;
use super::order::Orderer;
use crate::event::{Event, Payload};
use crate::topic::Topic;

pub struct LocalRelay {
    shared: Shared,
    /// Last offset per topic without history. Held while an event is
    /// delivered so that concurrent publishers reach subscribers in order.
    ephemeral: Mutex<HashMap<Topic, u64>>,
    /// Puts committed events of concurrent publishers back in order.
    orderer: tokio::sync::Mutex<Orderer>,
}

impl LocalRelay {
    pub fn new(shared: Shared) -> LocalRelay {
        LocalRelay {
            shared,
            ephemeral: Mutex::default(),
            orderer: tokio::sync::Mutex::default(),
        }
    }

    pub fn publish_ephemeral(&self, events: Vec<(Topic, Payload)>, ts: u64) -> Vec<u64> {
        let mut offsets = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        events
            .into_iter()
            .map(|(topic, payload)| {
                let last = offsets.entry(topic.clone()).or_insert(0);
                *last += 1;
                let event = Arc::new(Event::new(topic, *last, ts, payload));
                self.shared.hub.deliver(&event);
                event.offset
            })
            .collect()
    }

    pub async fn broadcast(&self, events: Vec<Arc<Event>>) {
        let mut orderer = self.orderer.lock().await;
        for event in events {
            orderer
                .accept(event, &self.shared.hub, &self.shared.store)
                .await;
        }
    }

    pub async fn interest_changed(&self, topic: &Topic) {
        let Shared {
            hub,
            store,
            retention,
        } = &self.shared;
        self.orderer
            .lock()
            .await
            .sync(&[topic], hub, store, retention)
            .await;
    }
}
