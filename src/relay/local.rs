//! In-process routing for a single node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Shared;
use super::order::Orderer;
use crate::event::Event;
use crate::hub::Hub;
use crate::payload::Payload;
use crate::topic::Topic;

/// Counters of topics without history kept before unwatched ones are
/// dropped (the sweep then waits until twice as many are kept).
const EPHEMERAL_SWEEP_MIN: usize = 1024;

pub struct LocalRelay {
    shared: Shared,
    /// Numbering of topics without history. Held while an event is
    /// delivered so that concurrent publishers reach subscribers in order.
    ephemeral: Mutex<Ephemeral>,
    /// Puts committed events of concurrent publishers back in order.
    orderer: tokio::sync::Mutex<Orderer>,
}

impl LocalRelay {
    pub fn new(shared: Shared) -> LocalRelay {
        LocalRelay {
            shared,
            ephemeral: Mutex::new(Ephemeral {
                last: HashMap::new(),
                sweep_at: EPHEMERAL_SWEEP_MIN,
            }),
            orderer: tokio::sync::Mutex::default(),
        }
    }

    pub fn publish_ephemeral(&self, events: Vec<(Topic, Payload)>, ts: u64) -> Vec<u64> {
        let mut ephemeral = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        let offsets = events
            .into_iter()
            .map(|(topic, payload)| {
                let last = ephemeral.last.entry(topic.clone()).or_insert(0);
                *last += 1;
                let event = Arc::new(Event::new(topic, *last, ts, payload));
                self.shared.hub.deliver(&event);
                event.offset
            })
            .collect();
        ephemeral.sweep(&self.shared.hub);
        offsets
    }

    pub async fn broadcast(&self, events: Vec<Arc<Event>>) {
        let mut orderer = self.orderer.lock().await;
        for event in events {
            orderer
                .accept(event, &self.shared.hub, &self.shared.store)
                .await;
        }
    }

    /// Whether the topic is watched here: subscribed in the hub, or still
    /// tracked by the orderer (whose position a removed log would
    /// contradict). Busy orderer: taken as watched.
    pub fn watches(&self, topic: &Topic) -> bool {
        self.shared.hub.has_subscribers(topic)
            || self.orderer.try_lock().map_or(true, |o| o.tracks(topic))
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

/// The last offset of each topic without history that may still be
/// watched. A topic nobody subscribes to is forgotten at the next sweep and
/// numbered from 1 again: no subscriber saw its old numbers, and a new
/// subscription starts without an offset. Publishing to ever new topics
/// thus keeps memory bounded by the topics subscribed to.
struct Ephemeral {
    last: HashMap<Topic, u64>,
    sweep_at: usize,
}

impl Ephemeral {
    /// Drops unwatched topics once the map has grown enough to pay for it
    /// (amortized O(1) per publish). Runs under the lock that publishes,
    /// so no event is delivered between the check and the removal.
    fn sweep(&mut self, hub: &Hub) {
        if self.last.len() < self.sweep_at {
            return;
        }
        self.last.retain(|topic, _| hub.has_subscribers(topic));
        self.sweep_at = (self.last.len() * 2).max(EPHEMERAL_SWEEP_MIN);
    }
}
