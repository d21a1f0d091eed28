//! Every request's pace, on the HTTP side: tells the connection's
//! [`RequestClock`] when a request is dispatched and when its answer is
//! done (so that the socket times the head of the next one, see
//! [`crate::stall`]), and gives a request's body `server.body_timeout` to
//! arrive. A body still arriving past it ends the request with 408 and the
//! connection with it.
//!
//! This is the outermost middleware: every answer, a CORS preflight's and
//! an error's included, passes through it.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::ConnectionType;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{Error, HttpMessage as _, ResponseError as _, web};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use super::ApiError;
use crate::stall::RequestClock;
use crate::state::AppState;

/// The middleware (`actix_web::middleware::from_fn(pace)`).
pub async fn pace<B: MessageBody + 'static>(
    mut req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<Answer<EitherBody<B>>>, Error> {
    let clock = req.conn_data::<Rc<RequestClock>>().cloned();
    if let Some(clock) = &clock {
        clock.dispatched();
    }
    let body = Rc::new(Cell::new(Body::Reading));
    let with_body = has_body(&req);
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map_or(DEFAULT_BODY_TIMEOUT, |s| s.settings.server.body_timeout);
    // The body's deadline: read by the handler or drained by the HTTP
    // server, it is in by then or the connection ends.
    let deadline = Instant::now() + limit;
    if with_body {
        let inner = req.take_payload();
        req.set_payload(Payload::Stream {
            payload: Box::pin(Timed {
                inner,
                deadline,
                timer: None,
                body: Rc::clone(&body),
            }),
        });
    }
    let res = next.call(req).await;
    let late = body.get() == Body::Late;
    if late {
        metrics::counter!(crate::telemetry::names::REQUEST_TIMEOUTS, "part" => "body").increment(1);
    }
    let mut res = match res {
        Ok(res) if late => {
            let (request, _) = res.into_parts();
            let res = ApiError::BodyTimeout.error_response();
            ServiceResponse::new(request, res).map_into_right_body()
        }
        Ok(res) => res.map_into_left_body(),
        // Answered by actix-web outside this middleware, where the answer
        // cannot be followed: what the client sends from now on is a new
        // request.
        Err(e) => {
            if let Some(clock) = &clock {
                clock.answered();
            }
            return Err(if late {
                ApiError::BodyTimeout.into()
            } else {
                e
            });
        }
    };
    // A body the handler did not read to its end (it answered first, or
    // ran out of time) ends the connection: what follows on it is that
    // body's rest, not a next request.
    if with_body && body.get() != Body::Done {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
        if let Some(clock) = &clock {
            clock.closing(deadline);
        }
    }
    Ok(res.map_body(|_, body| Answer { body, clock }))
}

/// Used only if the node's state is missing (it never is on a node).
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the request says it carries a body.
fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// How far a request's body was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Not to its end (perhaps not at all).
    Reading,
    /// To its end.
    Done,
    /// Its deadline passed first.
    Late,
}

/// A request body that fails once its deadline passes.
struct Timed {
    inner: Payload,
    deadline: Instant,
    /// Armed the first time the body makes the reader wait.
    timer: Option<Pin<Box<Sleep>>>,
    body: Rc<Cell<Body>>,
}

impl Stream for Timed {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            if item.is_none() {
                this.body.set(Body::Done);
            }
            return Poll::Ready(item);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.body.set(Body::Late);
        Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the request body did not arrive within server.body_timeout",
        )))))
    }
}

pin_project_lite::pin_project! {
    /// A response body that tells the connection's clock when it is done
    /// (sent in full, or dropped with the connection).
    pub struct Answer<B> {
        #[pin]
        body: B,
        clock: Option<Rc<RequestClock>>,
    }

    impl<B> PinnedDrop for Answer<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(clock) = &this.clock {
                clock.answered();
            }
        }
    }
}

impl<B: MessageBody> MessageBody for Answer<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}
