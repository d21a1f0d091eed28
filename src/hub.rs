//! Local subscriptions and fan-out on this node.
//!
//! The hub maps each topic to the mailboxes of the connections on this node
//! that subscribed to it. Delivering an event is a read lock and one
//! non-blocking `try_send` of a shared `Arc<Event>` per subscriber; no lock
//! is ever held across an `.await`.
//!
//! Overflow policy: each connection's mailbox is bounded, in events
//! (`limits.outbound_queue`) and in payload bytes
//! (`limits.outbound_queue_bytes`). A subscriber whose mailbox is full is
//! evicted (its connection closes with 1013, "try again later") rather than
//! slowing the publisher or the other subscribers; it can reconnect and
//! resume with `since`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, now_ms};
use crate::telemetry::names;
use crate::topic::Topic;

static DELIVERIES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!(names::DELIVERIES));
static FANOUT_LATENCY: LazyLock<metrics::Histogram> =
    LazyLock::new(|| metrics::histogram!(names::FANOUT_LATENCY));

/// Identifies one connection on this node.
pub type ConnId = u64;

/// Where the hub drops events for one connection.
#[derive(Clone, Debug)]
pub struct Mailbox {
    pub id: ConnId,
    tx: mpsc::Sender<Arc<Event>>,
    queue: Arc<QueueState>,
    max_bytes: usize,
    /// Cancelled when the mailbox overflowed: the connection must close.
    overflowed: CancellationToken,
}

/// What the hub and the connection both know of a mailbox.
#[derive(Debug, Default)]
struct QueueState {
    /// Payload bytes queued and not yet taken by the connection.
    bytes: AtomicUsize,
    /// Set once, on overflow or when the connection closes. Read on every
    /// offer, so an atomic rather than the token (whose state sits behind a
    /// mutex).
    closed: AtomicBool,
}

/// The connection's end of its mailbox.
pub struct Inbox {
    rx: mpsc::Receiver<Arc<Event>>,
    queue: Arc<QueueState>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        let event = self.rx.recv().await?;
        self.queue
            .bytes
            .fetch_sub(event.payload.len(), Ordering::Relaxed);
        Some(event)
    }
}

impl Mailbox {
    /// A mailbox holding at most `capacity` events and `max_bytes` payload
    /// bytes, its receiving end, and the token cancelled on overflow. That
    /// token is a child of `parent` (the node's shutdown), so a connection
    /// waits on one token for both reasons to stop.
    pub fn new(
        id: ConnId,
        capacity: usize,
        max_bytes: usize,
        parent: &CancellationToken,
    ) -> (Mailbox, Inbox, CancellationToken) {
        let (tx, rx) = mpsc::channel(capacity);
        let queue = Arc::new(QueueState::default());
        let overflowed = parent.child_token();
        let mailbox = Mailbox {
            id,
            tx,
            queue: Arc::clone(&queue),
            max_bytes,
            overflowed: overflowed.clone(),
        };
        (mailbox, Inbox { rx, queue }, overflowed)
    }

    /// Tells the connection to close as a slow consumer (once).
    fn evict(&self) {
        if !self.queue.closed.swap(true, Ordering::AcqRel) {
            self.overflowed.cancel();
            metrics::counter!(names::SLOW_CONSUMERS).increment(1);
        }
    }

    /// The connection is closing: it takes no more events.
    pub fn close(&self) {
        self.queue.closed.store(true, Ordering::Release);
    }

    fn offer(&self, event: &Arc<Event>) -> bool {
        // An evicted connection takes nothing more: it must not be sent an
        // event past the one it lost (it resumes from its last offset).
        if self.queue.closed.load(Ordering::Acquire) {
            return false;
        }
        let size = event.payload.len();
        // Counted before sending so the receiver's decrement never comes
        // first; undone when the event is not queued. One event larger
        // than the limit still goes into an empty mailbox.
        let before = self.queue.bytes.fetch_add(size, Ordering::Relaxed);
        if before > 0 && before + size > self.max_bytes {
            self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
            self.evict();
            return false;
        }
        match self.tx.try_send(Arc::clone(event)) {
            Ok(()) => true,
            Err(e) => {
                self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.evict();
                }
                // Closed: the connection is closing and will unsubscribe.
                false
            }
        }
    }
}

#[derive(Default)]
pub struct Hub {
    topics: RwLock<HashMap<Topic, Vec<Mailbox>>>,
}

impl Hub {
    /// Adds `mailbox` to `topic`. Returns true when it is the topic's first
    /// subscriber on this node. Subscribing twice is a no-op.
    pub fn subscribe(&self, topic: &Topic, mailbox: &Mailbox) -> bool {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        match topics.entry(topic.clone()) {
            Entry::Vacant(v) => {
                v.insert(vec![mailbox.clone()]);
                metrics::gauge!(names::TOPICS_ACTIVE).increment(1.0);
                metrics::gauge!(names::SUBSCRIPTIONS).increment(1.0);
                true
            }
            Entry::Occupied(mut o) => {
                if !o.get().iter().any(|m| m.id == mailbox.id) {
                    o.get_mut().push(mailbox.clone());
                    metrics::gauge!(names::SUBSCRIPTIONS).increment(1.0);
                }
                false
            }
        }
    }

    /// Removes connection `id` from `topic`. Returns true when the topic has
    /// no subscriber left on this node.
    pub fn unsubscribe(&self, topic: &Topic, id: ConnId) -> bool {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let Some(mailboxes) = topics.get_mut(topic) else {
            return false;
        };
        let Some(pos) = mailboxes.iter().position(|m| m.id == id) else {
            return false;
        };
        mailboxes.swap_remove(pos);
        metrics::gauge!(names::SUBSCRIPTIONS).decrement(1.0);
        if mailboxes.is_empty() {
            topics.remove(topic);
            metrics::gauge!(names::TOPICS_ACTIVE).decrement(1.0);
            return true;
        }
        false
    }

    /// Whether any local connection subscribes to `topic`.
    pub fn has_subscribers(&self, topic: &Topic) -> bool {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.contains_key(topic)
    }

    /// How many local connections subscribe to `topic`.
    pub fn subscriber_count(&self, topic: &Topic) -> usize {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(topic).map_or(0, Vec::len)
    }

    /// Every topic with a local subscriber.
    pub fn topics(&self) -> Vec<Topic> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.keys().cloned().collect()
    }

    /// Offers `event` to every local subscriber of its topic; returns how
    /// many accepted it.
    pub fn deliver(&self, event: &Arc<Event>) -> usize {
        let delivered = {
            let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
            topics.get(&event.topic).map_or(0, |mailboxes| {
                mailboxes.iter().filter(|m| m.offer(event)).count()
            })
        };
        // Once per event, outside the lock: never per subscriber.
        DELIVERIES.increment(delivered as u64);
        FANOUT_LATENCY.record(now_ms().saturating_sub(event.ts) as f64 / 1000.0);
        delivered
    }
}
