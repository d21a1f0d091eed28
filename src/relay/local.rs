//! A single node's relay: a loopback. Published events go straight back
//! into this node's [`Inbound`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;

use super::{Arrival, Inbound, Relay, RelayError, RelayState};
use crate::event::Event;
use crate::payload::Payload;
use crate::store::retention::Watchers;
use crate::topic::Topic;

/// Counters of topics without history kept before unwatched ones are
/// dropped (the sweep then waits until twice as many are kept).
const LIVE_SWEEP_MIN: usize = 1024;

pub struct LocalRelay {
    inbound: Inbound,
    /// The watched topics and the numbering of topics without history.
    /// Never held across an await.
    state: Mutex<State>,
}

struct State {
    watched: HashSet<Topic>,
    live: Numbering,
}

impl LocalRelay {
    pub fn new(inbound: Inbound) -> LocalRelay {
        LocalRelay {
            inbound,
            state: Mutex::new(State {
                watched: HashSet::new(),
                live: Numbering {
                    last: HashMap::new(),
                    sweep_at: LIVE_SWEEP_MIN,
                },
            }),
        }
    }

    fn locked(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Relay for LocalRelay {
    fn publish(&self, events: Vec<Arc<Event>>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for event in events {
                self.inbound.event(event).await;
            }
        })
    }

    fn publish_live(
        &self,
        events: Vec<(Topic, Payload)>,
        ts: u64,
    ) -> BoxFuture<'_, Result<Vec<u64>, RelayError>> {
        Box::pin(async move {
            let mut offsets = Vec::with_capacity(events.len());
            for (topic, payload) in events {
                // Room in the lane first, then the number and the hand-over
                // in one step: concurrent publishers' events of a topic
                // enter its lane in offset order.
                let permit = self.inbound.reserve(&topic).await;
                let mut state = self.locked();
                let offset = state.live.next(&topic);
                let event = Arc::new(Event::new(topic, offset, ts, payload));
                if let Some(permit) = permit {
                    permit.send(Arrival::Event(event));
                }
                offsets.push(offset);
            }
            let mut state = self.locked();
            let State { watched, live } = &mut *state;
            live.sweep(watched);
            Ok(offsets)
        })
    }

    fn watch(&self, topic: &Topic) -> BoxFuture<'static, ()> {
        self.locked().watched.insert(topic.clone());
        Box::pin(std::future::ready(()))
    }

    fn unwatch(&self, topic: &Topic) {
        self.locked().watched.remove(topic);
    }

    fn state(&self) -> RelayState {
        RelayState::Local
    }

    fn stopped(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Who watches a topic: this node alone.
impl Watchers for LocalRelay {
    fn unwatched(&self, topics: Vec<Topic>) -> BoxFuture<'_, Vec<Topic>> {
        let state = self.locked();
        let unwatched = topics
            .into_iter()
            .filter(|t| !state.watched.contains(t))
            .collect();
        Box::pin(std::future::ready(unwatched))
    }
}

/// The last offset of each topic without history that may still be
/// watched. A topic nobody watches is forgotten at the next sweep and
/// numbered from 1 again: no subscriber saw its old numbers, and a new
/// subscription starts without an offset. Publishing to ever new topics
/// thus keeps memory bounded by the topics watched.
struct Numbering {
    last: HashMap<Topic, u64>,
    sweep_at: usize,
}

impl Numbering {
    fn next(&mut self, topic: &Topic) -> u64 {
        let last = self.last.entry(topic.clone()).or_insert(0);
        *last += 1;
        *last
    }

    /// Drops unwatched topics once the map has grown enough to pay for it
    /// (amortized O(1) per publish).
    fn sweep(&mut self, watched: &HashSet<Topic>) {
        if self.last.len() < self.sweep_at {
            return;
        }
        self.last.retain(|topic, _| watched.contains(topic));
        self.sweep_at = (self.last.len() * 2).max(LIVE_SWEEP_MIN);
    }
}
