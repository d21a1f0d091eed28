//! Clients that stall: every HTTP connection's socket is wrapped so that
//! neither a request the client does not finish nor a response it does not
//! take can hold the connection (and its file and memory) for long.
//!
//! - **Writes:** a write the client does not take within
//!   `server.write_timeout` fails, and the connection with it. A client
//!   that requests a large response and reads nothing thus pins the
//!   response's memory for at most that long. Only a write left waiting
//!   arms the timer.
//! - **Request heads:** from the first byte of a request, its head must be
//!   in within `server.handshake_timeout`, on every request of a
//!   kept-alive connection (actix-http bounds only the first): past it the
//!   client gets a 408 and the connection closes. The HTTP layer tells the
//!   connection's [`RequestClock`] when a request was dispatched and when
//!   its answer was done; between the two, the request's body has its own
//!   deadline (`server.body_timeout`, kept by the HTTP layer) and the
//!   answer its writes'.
//!
//! An idle kept-alive connection, with no byte of a next request, is
//! closed by the HTTP server at its keep-alive limit. WebSocket connections
//! leave the wrapper at the upgrade; their session applies the write
//! timeout to its own writes.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a client whose request head ran out of time is sent before the
/// connection closes (Herald's JSON error body, as every refusal has).
const HEAD_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: application/json\r\n\
content-length: 103\r\n\
connection: close\r\n\r\n\
{\"error\":\"request_timeout\",\"message\":\"the request head did not arrive within server.handshake_timeout\"}";

/// One connection's place between its requests, shared by its socket and
/// the HTTP layer (on the connection's own thread, hence `Cell`s).
///
/// The head's timer lives here, not in the socket, so that a dispatched
/// request drops it at once: a stale timer would wake the HTTP dispatcher,
/// and every wake of an idle connection restarts its keep-alive.
#[derive(Default)]
pub struct RequestClock {
    /// A request was dispatched and is not answered yet: its body and its
    /// answer are timed by the HTTP layer.
    busy: Cell<bool>,
    /// When the first byte of the request under way arrived, until it is
    /// dispatched.
    head_since: Cell<Option<Instant>>,
    /// The head's timer, armed once the socket waits with part of a head
    /// in (the wait after a head's last bytes included: the HTTP layer
    /// reads until the socket has nothing more before it parses).
    head: Cell<Option<Pin<Box<Sleep>>>>,
    /// The connection ends after the answer under way, by this instant at
    /// the latest: what it reads from now on is no request (the rest of a
    /// body nobody read, which the HTTP server drains, or the client's last
    /// bytes while the node lingers), so no head is timed, and a client that
    /// keeps sending cannot keep it open.
    closing: Cell<Option<Instant>>,
}

impl RequestClock {
    /// A request's head is complete and the application has it.
    pub fn dispatched(&self) {
        self.busy.set(true);
        self.head_since.set(None);
        self.head.set(None);
    }

    /// The request's answer is done (or dropped): what the client sends
    /// next is a new request.
    pub fn answered(&self) {
        self.busy.set(false);
    }

    /// The connection closes once this answer is sent (the HTTP layer said
    /// `Connection: close`), and is cut at `by` if the client still sends.
    pub fn closing(&self, by: Instant) {
        self.closing.set(Some(by));
        self.head_since.set(None);
        self.head.set(None);
    }
}

/// A socket whose writes fail once one has waited `write_limit`, and whose
/// request heads end the connection with a 408 once one has taken
/// `head_limit`.
pub struct Paced<T> {
    inner: T,
    write_limit: Duration,
    head_limit: Duration,
    /// Armed while a write waits; a connection that writes freely never
    /// allocates it.
    waiting: Option<Pin<Box<Sleep>>>,
    clock: Rc<RequestClock>,
    /// The head ran out of time: the connection reads as closed.
    timed_out: bool,
}

impl<T> Paced<T> {
    pub fn new(inner: T, write_limit: Duration, head_limit: Duration) -> Self {
        Paced {
            inner,
            write_limit,
            head_limit,
            waiting: None,
            clock: Rc::default(),
            timed_out: false,
        }
    }

    /// The clock the HTTP layer moves on (see [`RequestClock`]).
    pub fn clock(&self) -> Rc<RequestClock> {
        Rc::clone(&self.clock)
    }

    /// The socket itself (for a connection that leaves HTTP).
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Whether `deadline` passed; if not, the clock's timer wakes this
    /// connection then.
    fn expired(&self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        let mut timer = self
            .clock
            .head
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            self.clock.head.set(Some(timer));
            return false;
        }
        true
    }

    /// Passes a ready write through and disarms the timer; a pending one
    /// arms it and fails once it fires.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.write_limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing for server.write_timeout",
        )))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Paced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.clock.busy.get() {
            return polled;
        }
        if let Some(by) = self.clock.closing.get() {
            // Answered already: past `by`, the connection just ends.
            if polled.is_ready() || !self.expired(cx, by) {
                return polled;
            }
            self.timed_out = true;
            return Poll::Ready(Ok(()));
        }
        let since = match self.clock.head_since.get() {
            Some(since) => since,
            None if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before => {
                // The first byte of a request: its head's time starts.
                self.clock.head_since.set(Some(Instant::now()));
                return polled;
            }
            None => return polled,
        };
        if polled.is_ready() {
            return polled;
        }
        if !self.expired(cx, since + self.head_limit) {
            return polled;
        }
        // Out of time: the connection reads as closed, which ends it. A 408
        // goes first if the socket takes it at once, and only if no write
        // waits: the end of the last answer may still be queued behind a
        // client that reads slowly, and the 408 must not cut into it.
        self.timed_out = true;
        metrics::counter!(crate::telemetry::names::REQUEST_TIMEOUTS, "part" => "head").increment(1);
        if self.waiting.is_none() {
            let _ = Pin::new(&mut self.inner).poll_write(cx, HEAD_TIMEOUT_RESPONSE);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Paced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_timeout_response_is_well_formed() {
        let text = std::str::from_utf8(HEAD_TIMEOUT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "request_timeout");
    }
}
