//! A connection's mailbox: where the delivery pipeline drops the events
//! the connection subscribed to, and the connection takes them from.
//!
//! Offering an event is one non-blocking `try_send` of a shared
//! `Arc<Event>`: a subscriber never slows the pipeline.
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
    tx: mpsc::Sender<Arc<Event>>,
    queue: Arc<QueueState>,
    max_bytes: usize,
    /// Cancelled when the mailbox overflowed: the connection must close.
    overflowed: CancellationToken,
}

/// What the pipeline and the connection both know of a mailbox.
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

    /// Queues `event` unless the mailbox is closed or full (then the
    /// connection is evicted). Returns whether it was queued.
    pub(crate) fn offer(&self, event: &Arc<Event>) -> bool {
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
