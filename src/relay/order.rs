//! In-order, gap-free delivery on one node.
//!
//! Events of a topic with history can reach a node out of order (two
//! publishers commit 5 and 6, and 6 is relayed first) or not at all (a
//! message lost while Redis was away). For every such topic with local
//! subscribers the orderer remembers the last offset it delivered; a later
//! offset with a hole before it first gets the hole filled from the store
//! (an event is committed before it is relayed, and offsets are committed
//! in order, so the store always has the missing ones), and an offset
//! already delivered is dropped. Subscribers thus see each topic's events
//! in strictly increasing offset order, gap-free, exactly once.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::Event;
use crate::hub::Hub;
use crate::store::retention::Retention;
use crate::store::{Page, Store};
use crate::topic::Topic;

/// Events read from the store per query while filling a gap, at most
/// 1 MiB of payloads.
const FILL_PAGE: Page = Page {
    events: 500,
    bytes: 1 << 20,
};

#[derive(Default)]
pub struct Orderer {
    /// Last offset delivered, per tracked topic.
    last: HashMap<Topic, u64>,
}

impl Orderer {
    /// Starts or stops tracking `topics` to match the hub: tracked while
    /// they have local subscribers and keep history. Tracking starts at the
    /// store's current last offset: anything before is the subscribers'
    /// to replay, anything after arrives live. Heads are read in one query.
    pub async fn sync(
        &mut self,
        topics: &[&Topic],
        hub: &Hub,
        store: &Store,
        retention: &Retention,
    ) {
        let mut start = Vec::new();
        for &topic in topics {
            let wanted = hub.has_subscribers(topic) && retention.history(topic);
            if !wanted {
                self.last.remove(topic);
            } else if !self.last.contains_key(topic) && !start.contains(&topic) {
                start.push(topic);
            }
        }
        if start.is_empty() {
            return;
        }
        // One query for the whole batch: a burst of new topics must not
        // take the store pool from publishers.
        match store.heads(&start).await {
            Ok(heads) => {
                for (topic, head) in start.into_iter().zip(heads) {
                    self.last.insert(topic.clone(), head.last);
                }
            }
            // Untracked, events are delivered as they come; the next
            // subscribe tries again.
            Err(e) => {
                tracing::warn!(topics = start.len(), error = %e, "cannot read the topics' heads; delivering unordered")
            }
        }
    }

    /// Whether `topic`'s position is kept.
    pub fn tracks(&self, topic: &Topic) -> bool {
        self.last.contains_key(topic)
    }

    /// Delivers `event` to the hub in its place: after filling any gap
    /// before it, and not at all if it was delivered already.
    pub async fn accept(&mut self, event: Arc<Event>, hub: &Hub, store: &Store) {
        let Some(&last) = self.last.get(&event.topic) else {
            hub.deliver(&event);
            return;
        };
        if event.offset <= last {
            return;
        }
        if event.offset > last + 1 {
            self.fill(&event.topic, event.offset - 1, hub, store).await;
        }
        hub.deliver(&event);
        self.last.insert(event.topic.clone(), event.offset);
    }

    /// Delivers every stored event of tracked topics that is newer than what
    /// was delivered (after the relay was away, events may be missing with
    /// no later event to reveal the gap).
    pub async fn catch_up(&mut self, hub: &Hub, store: &Store) {
        let topics: Vec<Topic> = self.last.keys().cloned().collect();
        for topic in topics {
            match store.head(&topic).await {
                Ok(head) => self.fill(&topic, head.last, hub, store).await,
                Err(e) => tracing::warn!(%topic, error = %e, "cannot catch up the topic"),
            }
        }
    }

    /// Delivers stored events of `topic` after the last delivered one, up to
    /// and including `until`.
    async fn fill(&mut self, topic: &Topic, until: u64, hub: &Hub, store: &Store) {
        let Some(last) = self.last.get_mut(topic) else {
            return;
        };
        while *last < until {
            let page = Page {
                events: (until - *last).min(FILL_PAGE.events),
                ..FILL_PAGE
            };
            let events = match store.read(topic, *last, page).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(%topic, error = %e, from = *last + 1, until, "cannot fill a gap from the store; skipping it");
                    break;
                }
            };
            let Some(newest) = events.last().map(|e| e.offset) else {
                // Pruned already: nothing left to deliver below `until`.
                break;
            };
            for event in events.into_iter().filter(|e| e.offset <= until) {
                hub.deliver(&Arc::new(event));
            }
            *last = newest.min(until);
        }
        *last = (*last).max(until);
    }
}
