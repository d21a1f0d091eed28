//! A connection's mailbox: where the delivery pipeline hands over the
//! events the connection subscribed to, and the one queue of everything
//! waiting to go out on its socket.
//!
//! The pipeline writes an event's shared frame (see
//! [`Event::ws_frame`]) straight to the socket, with one non-blocking
//! write, whenever nothing waits ahead of it: an idle subscriber costs the
//! pipeline one write and wakes no task. The connection's task is woken
//! only when the socket pushes back (it then waits for room and sends
//! what was left), and it holds the pipeline's events back while it
//! handles a client's message: a subscribe's reply and replay, or an
//! unsubscribe's reply, go out before the live events that arrived
//! meanwhile, which the connection then writes itself.
//!
//! Overflow policy: what waits in a mailbox is bounded, in events
//! (`limits.outbound_queue`) and in bytes (`limits.outbound_queue_bytes`:
//! payload bytes of held events, frame bytes of unsent ones). A subscriber
//! whose mailbox is full is evicted (its connection closes with 1013, "try
//! again later") rather than slowing the publisher or the other
//! subscribers; it can reconnect and resume with `since`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, PresenceDiff};
use crate::protocol::Encoding;
use crate::telemetry::names;

/// Identifies one connection on this node.
pub type ConnId = u64;

/// Most unsent frames handed to the kernel in one vectored write.
const MAX_SLICES: usize = 64;

/// What the pipeline hands a connection.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    Presence(Arc<PresenceDiff>),
}

/// Where the pipeline drops events for one connection.
#[derive(Clone)]
pub struct Mailbox {
    pub id: ConnId,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").field("id", &self.id).finish()
    }
}

/// The connection's end of its mailbox: it writes its own frames through
/// it, in one order with the pipeline's, and takes the events held for it.
pub struct Outlet {
    shared: Arc<Shared>,
}

/// What the pipeline and the connection both hold.
struct Shared {
    queue: Mutex<Queue>,
    /// The connection's socket, written by whichever side finds nothing
    /// waiting ahead of its frame; `None` for a subscriber that takes
    /// every delivery itself (an event stream: see [`Mailbox::held`]).
    wire: Option<Arc<TcpStream>>,
    /// The connection's encoding: which of an event's frames it takes.
    encoding: Encoding,
    /// Most events and bytes waiting.
    capacity: usize,
    max_bytes: usize,
    /// Wakes the connection: bytes wait for room in the socket, or events
    /// wait for it to write them.
    wake: Notify,
    /// Cancelled when the mailbox overflowed: the connection must close.
    overflowed: CancellationToken,
}

/// What waits to go out, in order: `held` events first, then the
/// `unsent` bytes ahead of anything new.
#[derive(Default)]
struct Queue {
    /// Set once, on overflow or when the connection closes: nothing more
    /// is taken.
    closed: bool,
    /// The connection is handling a client's message: events wait in
    /// `held` for it.
    holding: bool,
    /// Events and diffs for the connection to write itself, in order,
    /// with the bytes each counts for.
    held: VecDeque<(Delivery, usize)>,
    /// Whole frames, or the unwritten tail of one, accepted for the socket
    /// but not yet taken by the kernel.
    unsent: VecDeque<Bytes>,
    /// Payload bytes of `held` plus bytes of `unsent`.
    bytes: usize,
    /// Why a write to the socket failed: nothing more can go out, and the
    /// connection ends with this error when it next writes or flushes.
    failed: Option<io::ErrorKind>,
}

impl Queue {
    /// Whether one more thing of `size` bytes would overflow the bounds.
    /// One thing larger than the byte bound still goes into an empty queue.
    fn full(&self, size: usize, capacity: usize, max_bytes: usize) -> bool {
        let waiting = self.held.len() + self.unsent.len();
        waiting >= capacity || (waiting > 0 && self.bytes + size > max_bytes)
    }

    /// Takes `n` written bytes off the front of `unsent`.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let front = self
                .unsent
                .front_mut()
                .expect("no more written than queued");
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.unsent.pop_front();
        }
    }
}

impl Shared {
    /// The socket; a held mailbox has none to write to.
    fn wire(&self) -> io::Result<&TcpStream> {
        self.wire
            .as_deref()
            .ok_or_else(|| io::ErrorKind::Unsupported.into())
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No critical section here can panic half-way.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what the kernel takes of `frame` now, when nothing waits
    /// ahead of it, and queues the rest. Returns whether the whole frame
    /// went out.
    fn write(&self, queue: &mut Queue, frame: Bytes) -> io::Result<bool> {
        if let Some(kind) = queue.failed {
            return Err(kind.into());
        }
        let wire = self.wire()?;
        let written = if queue.unsent.is_empty() {
            match wire.try_write(&frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    queue.failed = Some(e.kind());
                    return Err(e);
                }
            }
        } else {
            0
        };
        if written == frame.len() {
            return Ok(true);
        }
        queue.bytes += frame.len() - written;
        queue.unsent.push_back(frame.slice(written..));
        Ok(false)
    }
}

impl Mailbox {
    /// A mailbox for the connection on `wire`, holding at most `capacity`
    /// events and `max_bytes` bytes; the connection's end of it; and the
    /// token cancelled on overflow. That token is a child of `parent` (the
    /// node's shutdown), so a connection waits on one token for both
    /// reasons to stop.
    pub fn new(
        id: ConnId,
        wire: Arc<TcpStream>,
        encoding: Encoding,
        capacity: usize,
        max_bytes: usize,
        parent: &CancellationToken,
    ) -> (Mailbox, Outlet, CancellationToken) {
        Mailbox::build(id, Some(wire), encoding, capacity, max_bytes, parent)
    }

    /// A mailbox that holds every delivery for its owner to take with
    /// [`Outlet::next_held`] (woken by [`Outlet::woken`]), under the same
    /// bounds and overflow policy: for an event stream, whose bytes go out
    /// through the HTTP response rather than straight to a socket.
    pub fn held(
        id: ConnId,
        capacity: usize,
        max_bytes: usize,
        parent: &CancellationToken,
    ) -> (Mailbox, Outlet, CancellationToken) {
        Mailbox::build(id, None, Encoding::Json, capacity, max_bytes, parent)
    }

    fn build(
        id: ConnId,
        wire: Option<Arc<TcpStream>>,
        encoding: Encoding,
        capacity: usize,
        max_bytes: usize,
        parent: &CancellationToken,
    ) -> (Mailbox, Outlet, CancellationToken) {
        let overflowed = parent.child_token();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wire,
            encoding,
            capacity,
            max_bytes,
            wake: Notify::new(),
            overflowed: overflowed.clone(),
        });
        let outlet = Outlet {
            shared: Arc::clone(&shared),
        };
        (Mailbox { id, shared }, outlet, overflowed)
    }

    /// The connection is closing: it takes no more events.
    pub fn close(&self) {
        self.shared.lock().closed = true;
    }

    /// Delivers `event`: written to the socket at once when nothing waits
    /// ahead of it, queued otherwise, unless the mailbox is closed or full
    /// (then the connection is evicted). Never waits. Returns whether the
    /// event was taken.
    pub(crate) fn offer(&self, event: &Arc<Event>) -> bool {
        let frame = self.frame(|encoding| event.ws_frame(encoding));
        self.take(frame, event.payload.len(), || {
            Delivery::Event(Arc::clone(event))
        })
    }

    /// Delivers a presence diff, as [`offer`](Self::offer) does an event.
    pub(crate) fn offer_presence(&self, diff: &Arc<PresenceDiff>) -> bool {
        let frame = self.frame(|encoding| diff.ws_frame(encoding));
        self.take(frame, diff.size(), || Delivery::Presence(Arc::clone(diff)))
    }

    /// The frame to write to the socket, when there is a socket.
    fn frame(&self, frame: impl FnOnce(Encoding) -> Option<Bytes>) -> Option<Bytes> {
        self.shared.wire.as_ref()?;
        frame(self.shared.encoding)
    }

    /// Writes `frame`, or holds what `held` makes (`size` bytes) for the
    /// connection: see [`offer`](Self::offer).
    fn take(&self, frame: Option<Bytes>, size: usize, held: impl FnOnce() -> Delivery) -> bool {
        let shared = &*self.shared;
        let mut queue = shared.lock();
        // An evicted connection takes nothing more: it must not be sent an
        // event past the one it lost (it resumes from its last offset).
        if queue.closed {
            return false;
        }
        let direct = shared.wire.is_some() && !queue.holding && queue.held.is_empty();
        let size = match (&frame, direct) {
            (Some(frame), true) => frame.len(),
            // Held: for the connection to write once it is done with a
            // client's message, or (an event without a frame in this
            // encoding) to answer with an error frame.
            _ => size,
        };
        if queue.full(size, shared.capacity, shared.max_bytes) {
            queue.closed = true;
            drop(queue);
            shared.overflowed.cancel();
            metrics::counter!(names::SLOW_CONSUMERS).increment(1);
            return false;
        }
        let wake = match frame {
            Some(frame) if direct => match shared.write(&mut queue, frame) {
                Ok(sent) => !sent,
                // The socket failed: nothing more goes out, and the
                // connection meets the error when it next flushes.
                Err(_) => {
                    queue.closed = true;
                    true
                }
            },
            _ => {
                queue.bytes += size;
                queue.held.push_back((held(), size));
                // Held until the connection has written every held event:
                // nothing offered meanwhile may overtake this one.
                !std::mem::replace(&mut queue.holding, true)
            }
        };
        drop(queue);
        if wake {
            shared.wake.notify_one();
        }
        true
    }
}

impl Outlet {
    /// Holds the pipeline's events back until [`next_held`](Self::next_held)
    /// has given them all to the connection.
    pub fn hold(&self) {
        self.shared.lock().holding = true;
    }

    /// The next event (or diff) held for the connection to write; once
    /// none is left, the pipeline writes to the socket itself again.
    pub fn next_held(&self) -> Option<Delivery> {
        let mut queue = self.shared.lock();
        match queue.held.pop_front() {
            Some((delivery, size)) => {
                queue.bytes -= size;
                Some(delivery)
            }
            None => {
                queue.holding = false;
                // An idle connection keeps no buffer.
                queue.held = VecDeque::new();
                None
            }
        }
    }

    /// Writes what the kernel takes of `frame` (one or more whole frames)
    /// now and queues the rest behind what already waits, without
    /// waiting; [`flush`](Self::flush) sends it. Returns whether
    /// everything went out.
    pub fn write(&self, frame: Bytes) -> io::Result<bool> {
        let mut queue = self.shared.lock();
        self.shared.write(&mut queue, frame)
    }

    /// Whether nothing waits for room in the socket (and it has not
    /// failed).
    pub fn is_flushed(&self) -> bool {
        let queue = self.shared.lock();
        queue.unsent.is_empty() && queue.failed.is_none()
    }

    /// Writes what is queued, the pipeline's and the connection's, until
    /// all of it went out (`true`) or the kernel took part of it and
    /// pushed back (`false`: progress, and more to send, the pipeline's
    /// too). Waits only while the kernel's send queue is full. Cancel-safe:
    /// what is not written yet stays queued.
    pub async fn flush(&self) -> io::Result<bool> {
        let shared = &*self.shared;
        loop {
            {
                let mut queue = shared.lock();
                if let Some(kind) = queue.failed {
                    return Err(kind.into());
                }
                if queue.unsent.is_empty() {
                    queue.unsent = VecDeque::new();
                    return Ok(true);
                }
                let slices: Vec<IoSlice<'_>> = queue
                    .unsent
                    .iter()
                    .take(MAX_SLICES)
                    .map(|b| IoSlice::new(b))
                    .collect();
                let written = shared.wire()?.try_write_vectored(&slices);
                drop(slices);
                match written {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        queue.advance(n);
                        if !queue.unsent.is_empty() {
                            return Ok(false);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        queue.failed = Some(e.kind());
                        return Err(e);
                    }
                }
            }
            shared.wire()?.writable().await?;
        }
    }

    /// [`flush`](Self::flush) until everything went out.
    pub async fn flush_all(&self) -> io::Result<()> {
        while !self.flush().await? {}
        Ok(())
    }

    /// Waits until the pipeline leaves the connection something to do:
    /// bytes to flush, or events to write.
    pub async fn woken(&self) {
        self.shared.wake.notified().await;
    }
}
