//! In-process routing for a single node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::event::{Event, Payload, now_ms};
use crate::hub::Hub;
use crate::topic::Topic;

pub struct LocalRelay {
    hub: Arc<Hub>,
    /// Last offset per topic. Held while an event is delivered so that
    /// concurrent publishers to one topic reach subscribers in offset order.
    offsets: Mutex<HashMap<Topic, u64>>,
}

impl LocalRelay {
    pub fn new(hub: Arc<Hub>) -> LocalRelay {
        LocalRelay {
            hub,
            offsets: Mutex::default(),
        }
    }

    pub fn publish(&self, events: Vec<(Topic, Payload)>) -> Vec<u64> {
        let ts = now_ms();
        let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        events
            .into_iter()
            .map(|(topic, payload)| {
                let last = offsets.entry(topic.clone()).or_insert(0);
                *last += 1;
                let event = Arc::new(Event::new(topic, *last, ts, payload));
                self.hub.deliver(&event);
                event.offset
            })
            .collect()
    }
}
