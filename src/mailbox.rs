//! A connection's mailbox: where the delivery pipeline drops the events
//! the connection subscribed to, and the connection takes them from.
//!
//! Offering an event is a few atomic operations and one non-blocking
//! send of a shared `Arc<Event>`: a subscriber never slows the pipeline.
//! The bounds are kept in two counters beside an unbounded channel, not by
//! a bounded channel's semaphore: one counter of events and one of bytes,
//! checked the same way.
//!
//! Overflow policy: each connection's mailbox is bounded, in events
//! (`limits.outbound_queue`) and in payload bytes
//! (`limits.outbound_queue_bytes`). A subscriber whose mailbox is full is
//! evicted (its connection closes with 1013, "try again later") rather than
//! slowing the publisher or the other subscribers; it can reconnect and
//! resume with `since`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::telemetry::names;

/// Identifies one connection on this node.
pub type ConnId = u64;

/// Where the pipeline drops events for one connection.
#[derive(Clone, Debug)]
pub struct Mailbox {
    pub id: ConnId,
    tx: mpsc::UnboundedSender<Arc<Event>>,
    queue: Arc<QueueState>,
    /// Cancelled when the mailbox overflowed: the connection must close.
    overflowed: CancellationToken,
}

/// What the pipeline and the connection both know of a mailbox.
#[derive(Debug)]
struct QueueState {
    /// Most events and payload bytes queued.
    capacity: usize,
    max_bytes: usize,
    /// Events queued and not yet taken by the connection.
    events: AtomicUsize,
    /// Payload bytes queued and not yet taken by the connection.
    bytes: AtomicUsize,
    /// Set once, on overflow or when the connection closes. Read on every
    /// offer, so an atomic rather than the token (whose state sits behind a
    /// mutex).
    closed: AtomicBool,
}

/// The connection's end of its mailbox.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Arc<Event>>,
    queue: Arc<QueueState>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        let event = self.rx.recv().await?;
        self.queue.events.fetch_sub(1, Ordering::Relaxed);
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
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(QueueState {
            capacity,
            max_bytes,
            events: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        let overflowed = parent.child_token();
        let mailbox = Mailbox {
            id,
            tx,
            queue: Arc::clone(&queue),
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

    /// Queues `event` unless the mailbox is closed or full (then the
    /// connection is evicted). Returns whether it was queued.
    pub(crate) fn offer(&self, event: &Arc<Event>) -> bool {
        // An evicted connection takes nothing more: it must not be sent an
        // event past the one it lost (it resumes from its last offset).
        if self.queue.closed.load(Ordering::Acquire) {
            return false;
        }
        let size = event.payload.len();
        let queue = &self.queue;
        // Counted before sending so the receiver's decrement never comes
        // first; undone when the event is not queued. One event larger
        // than the byte limit still goes into an empty mailbox.
        let events = queue.events.fetch_add(1, Ordering::Relaxed);
        let bytes = queue.bytes.fetch_add(size, Ordering::Relaxed);
        let full = events >= queue.capacity || (events > 0 && bytes + size > queue.max_bytes);
        if full || self.tx.send(Arc::clone(event)).is_err() {
            queue.events.fetch_sub(1, Ordering::Relaxed);
            queue.bytes.fetch_sub(size, Ordering::Relaxed);
            if full {
                self.evict();
            }
            // Not full: the connection is closing and will unsubscribe.
            return false;
        }
        true
    }
}
