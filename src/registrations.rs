//! What a subscriber (a WebSocket connection or an event stream) holds on
//! the node: its mailbox, the topics it subscribed to and the presence it
//! joined, all released when the holder is dropped.

use std::collections::HashSet;
use std::sync::Arc;

use crate::mailbox::Mailbox;
use crate::state::AppState;
use crate::topic::Topic;

/// A connection's mailbox and subscriptions, released from the pipeline
/// (and the relay's watch) when dropped. The orderly end unsubscribes each
/// topic and leaves this empty; a task that ends any other way (a panic,
/// or its future dropped mid-way) still leaves no registration, no gauge
/// and no Redis subscription behind.
pub struct Registrations {
    state: Arc<AppState>,
    pub mailbox: Mailbox,
    /// The connection's user: the member it makes in a topic's presence.
    sub: String,
    topics: HashSet<Topic>,
    /// The topics (of `topics`) whose presence the connection joined.
    pub presence: HashSet<Topic>,
}

impl Registrations {
    /// No subscription yet, for the connection with `mailbox`, whose user
    /// is `sub`.
    pub fn new(state: Arc<AppState>, mailbox: Mailbox, sub: String) -> Registrations {
        Registrations {
            state,
            mailbox,
            sub,
            topics: HashSet::new(),
            presence: HashSet::new(),
        }
    }

    /// Forgets a topic, leaving its presence if joined; whether it was
    /// subscribed. The caller unsubscribes it from the broker.
    pub fn remove(&mut self, topic: &Topic) -> bool {
        self.leave_presence(topic);
        self.topics.remove(topic)
    }

    /// Leaves a topic's presence, if joined.
    pub fn leave_presence(&mut self, topic: &Topic) {
        if self.presence.remove(topic) {
            self.state.broker.presence().leave(topic, &self.sub);
        }
    }
}

impl std::ops::Deref for Registrations {
    type Target = HashSet<Topic>;
    fn deref(&self) -> &HashSet<Topic> {
        &self.topics
    }
}

impl std::ops::DerefMut for Registrations {
    fn deref_mut(&mut self) -> &mut HashSet<Topic> {
        &mut self.topics
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        self.mailbox.close();
        for topic in self.presence.drain() {
            self.state.broker.presence().leave(&topic, &self.sub);
        }
        for topic in self.topics.drain() {
            self.state.broker.release(&topic, self.mailbox.id);
        }
    }
}
