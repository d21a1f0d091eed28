//! One WebSocket connection: a single task that owns the connection's state
//! and `select!`s over incoming frames, its mailbox of events, eviction,
//! the heartbeat, the token's expiry and node shutdown.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_http::ws::{CloseCode, CloseReason, OpCode};
use tokio_util::sync::CancellationToken;

use super::socket::{Message, Socket};
use super::{Accepted, Admitted, ConnectionSlot};
use crate::auth::{Action, Grants, unix_now_secs};
use crate::broker::Transport;
use crate::config::LimitSettings;
use crate::event::Event;
use crate::hub::{ConnId, Inbox, Mailbox};
use crate::protocol::{self, ClientOp, ErrorCode, Reply};
use crate::rate::TokenBucket;
use crate::startup::AppState;
use crate::store::{IdempotencyKey, NewEvent, Page};
use crate::telemetry::names;
use crate::topic::Topic;

/// Ops refused by a rate limit in a row before the connection is closed
/// (1008): one burst is a mistake, a stream of them abuse.
const RATE_LIMIT_STRIKES: u32 = 20;

/// One per-connection rate limit on a kind of op, and how many of those
/// ops it refused in a row. Kept small: every connection holds two.
struct Limited {
    bucket: TokenBucket,
    strikes: u32,
    kind: LimitedOps,
}

/// Which ops a [`Limited`] counts.
#[derive(Clone, Copy)]
enum LimitedOps {
    Publish,
    Subscribe,
}

impl LimitedOps {
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            LimitedOps::Publish => ("publishes", "limits.publish_rate"),
            LimitedOps::Subscribe => (
                "subscribe, unsubscribe and refresh ops",
                "limits.subscribe_rate",
            ),
        }
    }
}

/// What a rate limit says of one op.
enum Admission {
    Allowed,
    /// Answer with a `rate_limited` error frame.
    Refused(String),
    /// Refused too often in a row: close with 1008.
    Close(String),
}

impl Limited {
    fn new(rate: u32, kind: LimitedOps) -> Limited {
        Limited {
            bucket: TokenBucket::new(rate),
            strikes: 0,
            kind,
        }
    }

    fn admit(&mut self) -> Admission {
        if self.bucket.try_take() {
            self.strikes = 0;
            return Admission::Allowed;
        }
        self.strikes += 1;
        let (ops, setting) = self.kind.describe();
        if self.strikes > RATE_LIMIT_STRIKES {
            return Admission::Close(format!("{setting} rate limit exceeded repeatedly"));
        }
        Admission::Refused(format!(
            "more than {} {ops} per second ({setting}); slow down",
            self.bucket.rate()
        ))
    }
}

/// Longest a connection's token is taken to live (ten years); `exp` beyond
/// it is treated as this.
const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// Events read from the store per query while replaying (and at most
/// `limits.max_page_bytes`); the next page is read once this one is
/// written.
const REPLAY_PAGE: u64 = 500;

/// Room in a client frame for the envelope around the payload (op, id,
/// topic, field names).
const FRAME_ENVELOPE_BYTES: usize = 4096;

/// How long the close frame may wait for room in the socket's send queue. A
/// slow client that still reads gets its close code (e.g. 1013) after the
/// frames already queued; one that stopped reading is cut off after this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection cannot go on: the client is gone, or a write was cut short
/// by eviction or shutdown (see [`Connection::abort_reason`]).
struct Gone;

/// The largest message a client may send: the largest payload, in its
/// largest form (base64 makes binary 4/3 larger in JSON), plus envelope.
pub(super) fn max_message(limits: &LimitSettings) -> usize {
    limits.max_payload_bytes / 3 * 4 + FRAME_ENVELOPE_BYTES
}

/// Runs an accepted connection until the client leaves, it is evicted or
/// closed, or the node shuts down.
pub(super) async fn run(accepted: Accepted) {
    let Accepted {
        state,
        admitted:
            Admitted {
                grants,
                encoding,
                slot,
                ..
            },
        socket,
        peer,
    } = accepted;
    let limits = &state.settings.limits;
    let id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (mailbox, events, overflowed) = Mailbox::new(
        id,
        limits.outbound_queue,
        limits.outbound_queue_bytes,
        &state.shutdown,
    );
    let publish_rate = Limited::new(limits.publish_rate, LimitedOps::Publish);
    let subscribe_rate = Limited::new(limits.subscribe_rate, LimitedOps::Subscribe);
    let subscriptions = Registrations {
        state: Arc::clone(&state),
        mailbox,
        topics: HashSet::new(),
    };
    let conn = Connection {
        state,
        _slot: slot,
        grants,
        publish_rate,
        subscribe_rate,
        encoding,
        socket,
        overflowed,
        subscriptions,
        delivered: HashMap::new(),
        close_with: None,
        stalled: false,
    };
    conn.run(events, peer).await;
}

struct Connection {
    state: Arc<AppState>,
    /// Frees this connection's place under `limits.max_connections` on drop.
    _slot: ConnectionSlot,
    grants: Grants,
    publish_rate: Limited,
    subscribe_rate: Limited,
    encoding: protocol::Encoding,
    socket: Socket,
    /// Cancelled by the hub when the mailbox overflowed, and (a child of
    /// the shutdown token) when the node shuts down.
    overflowed: CancellationToken,
    /// The topics subscribed to; whatever is left in it is released when
    /// the connection's task ends, however it ends.
    subscriptions: Registrations,
    /// Last offset sent, per subscribed topic with history: events at or
    /// below it (already replayed) are not sent again.
    delivered: HashMap<Topic, u64>,
    /// Why to close, when a handler ends the connection on purpose.
    close_with: Option<CloseReason>,
    /// A write waited `write_timeout` for a client that reads nothing:
    /// it is cut off without a close frame, which could not reach it.
    stalled: bool,
}

impl Connection {
    /// This connection's id on the node.
    fn id(&self) -> ConnId {
        self.subscriptions.mailbox.id
    }

    async fn run(mut self, mut events: Inbox, peer: Option<SocketAddr>) {
        let opened = Instant::now();
        let shutdown = self.state.shutdown.clone();
        // Cancelled on overflow and, being its child, on shutdown: one
        // future, registered once, for both.
        let stopped = self.overflowed.clone().cancelled_owned();
        tokio::pin!(stopped);
        let server = &self.state.settings.server;
        let heartbeat_timeout = server.heartbeat_timeout;
        let mut heartbeat = tokio::time::interval(server.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let expiry = tokio::time::sleep_until(expiry_instant(self.grants.valid_until));
        tokio::pin!(expiry);
        tracing::info!(conn = self.id(), sub = %self.grants.sub, ?peer, encoding = self.encoding.protocol_name(), "connection opened");

        // The stop token first: once evicted, not one more event may go out
        // (the client resumes after the last one it got), and a mailbox that
        // never empties must not starve shutdown, expiry or the heartbeat.
        let close: Option<CloseReason> = loop {
            tokio::select! {
                biased;
                () = &mut stopped => {
                    break Some(if shutdown.is_cancelled() { going_away() } else { slow_consumer() });
                }
                _ = &mut expiry => break Some(token_expired()),
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() > heartbeat_timeout {
                        break Some(reason(CloseCode::Policy, "heartbeat timeout: no pong"));
                    }
                    if self.send(&super::frame(OpCode::Ping, b"")).await.is_err() {
                        break self.abort_reason();
                    }
                }
                Some(event) = events.recv() => {
                    if self.send_live(&event).await.is_err() {
                        break self.abort_reason();
                    }
                }
                msg = self.socket.recv() => match msg {
                    Ok(None) => break None,
                    // Boxed: handling a request (subscribe, replay,
                    // publish) needs far more state than waiting does, and
                    // an idle connection should not carry it.
                    Ok(Some(msg)) => match Box::pin(self.on_message(msg)).await {
                        Ok(None) => {
                            last_seen = Instant::now();
                            // A refresh may have moved the expiry.
                            expiry.as_mut().reset(expiry_instant(self.grants.valid_until));
                        }
                        Ok(Some(close)) => break Some(close),
                        Err(Gone) => break self.abort_reason(),
                    },
                    Err(err) => {
                        tracing::debug!(conn = self.id(), error = %err, "unreadable frame");
                        break err.close_reason();
                    }
                },
            }
        };

        // Boxed: what ending needs is not carried through the connection's
        // life in every waiting connection's future.
        Box::pin(self.end(close, opened, peer)).await;
    }

    /// Unsubscribes everything, sends the close frame and logs the end.
    async fn end(mut self, close: Option<CloseReason>, opened: Instant, peer: Option<SocketAddr>) {
        let id = self.id();
        self.subscriptions.mailbox.close();
        let topics: Vec<Topic> = self.subscriptions.drain().collect();
        for topic in topics {
            self.state.broker.unsubscribe(&topic, id).await;
        }
        let code = close.as_ref().map(|c| u16::from(c.code));
        if self.stalled {
            tracing::info!(conn = id, "client stopped reading; cut off");
        } else {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.close(close)).await;
        }
        tracing::info!(conn = id, sub = %self.grants.sub, ?peer, duration_ms = opened.elapsed().as_millis() as u64, close_code = ?code, "connection closed");
    }

    /// Handles one client message; returns a close reason to end the
    /// connection.
    async fn on_message(&mut self, msg: Message) -> Result<Option<CloseReason>, Gone> {
        match msg {
            Message::Text(_) if self.encoding == protocol::Encoding::MsgPack => {
                let message = "this connection speaks herald.msgpack: send MessagePack in \
                               binary frames (or connect without the sub-protocol for JSON)";
                self.error(None, ErrorCode::BadRequest, message)
                    .await
                    .map(|()| None)
            }
            Message::Text(bytes) | Message::Binary(bytes) => self.on_frame(&bytes).await,
            Message::Ping(bytes) => self
                .send(&super::frame(OpCode::Pong, &bytes))
                .await
                .map(|()| None),
            Message::Pong => Ok(None),
            // Echo the client's close code, as RFC 6455 asks.
            Message::Close(theirs) => Ok(Some(
                theirs.unwrap_or_else(|| reason(CloseCode::Normal, "")),
            )),
        }
    }

    async fn on_frame(&mut self, frame: &[u8]) -> Result<Option<CloseReason>, Gone> {
        let op = match protocol::decode(self.encoding, frame) {
            Ok(op) => op,
            Err(e) => return self.error(e.id, e.code, &e.message).await.map(|()| None),
        };
        let (limit, id) = match &op {
            ClientOp::Publish { id, .. } => (&mut self.publish_rate, *id),
            ClientOp::Subscribe { id, .. }
            | ClientOp::Unsubscribe { id, .. }
            | ClientOp::Refresh { id, .. } => (&mut self.subscribe_rate, *id),
            ClientOp::Ping { .. } => return self.on_op(op).await.map(|()| None),
        };
        match limit.admit() {
            Admission::Allowed => {}
            Admission::Refused(message) => {
                return self
                    .error(id, ErrorCode::RateLimited, &message)
                    .await
                    .map(|()| None);
            }
            Admission::Close(description) => {
                return Ok(Some(reason(CloseCode::Policy, &description)));
            }
        }
        self.on_op(op).await.map(|()| None)
    }

    async fn on_op(&mut self, op: ClientOp) -> Result<(), Gone> {
        match op {
            ClientOp::Ping { id } => self.reply(&Reply::Pong { id }).await,
            ClientOp::Refresh { id, token } => self.refresh(id, &token).await,
            ClientOp::Subscribe {
                id,
                topic,
                since,
                epoch,
            } => self.subscribe(id, topic, since, epoch).await,
            ClientOp::Unsubscribe { id, topic } => {
                if self.subscriptions.remove(&topic) {
                    self.delivered.remove(&topic);
                    self.state.broker.unsubscribe(&topic, self.id()).await;
                }
                self.reply(&Reply::Unsubscribed {
                    id,
                    topic: topic.as_str(),
                })
                .await
            }
            ClientOp::Publish {
                id,
                topic,
                payload,
                key,
            } => {
                if let Err(denied) = self.grants.check(Action::Publish, &topic) {
                    return self
                        .error(id, ErrorCode::Forbidden, &denied.to_string())
                        .await;
                }
                let limit = self.state.settings.limits.max_payload_bytes;
                if payload.len() > limit {
                    let msg = format!("payload is larger than the limit of {limit} bytes");
                    return self.error(id, ErrorCode::PayloadTooLarge, &msg).await;
                }
                let event = NewEvent {
                    topic: topic.clone(),
                    payload,
                    key: key.map(|key| IdempotencyKey {
                        publisher: self.grants.sub.clone(),
                        key,
                    }),
                };
                match self
                    .state
                    .broker
                    .publish(vec![event], Transport::WebSocket)
                    .await
                {
                    Ok(offsets) => {
                        let reply = Reply::Published {
                            id,
                            topic: topic.as_str(),
                            offset: offsets[0],
                        };
                        self.reply(&reply).await
                    }
                    Err(e) => self.error(id, ErrorCode::Unavailable, &e.to_string()).await,
                }
            }
        }
    }

    /// Subscribes, answers with the topic's head, replays what the client
    /// missed since `since`, and from then on sends live events above the
    /// replayed ones: no gap and no duplicate at the seam.
    async fn subscribe(
        &mut self,
        id: Option<u64>,
        topic: Topic,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(), Gone> {
        if let Err(denied) = self.grants.check(Action::Subscribe, &topic) {
            return self
                .error(id, ErrorCode::Forbidden, &denied.to_string())
                .await;
        }
        let max = self.state.settings.limits.max_subscriptions;
        if !self.subscriptions.contains(&topic) && self.subscriptions.len() >= max {
            let message =
                format!("a connection may hold {max} subscriptions (limits.max_subscriptions)");
            return self
                .error(id, ErrorCode::TooManySubscriptions, &message)
                .await;
        }
        // Registered before the head is read: every event after the head
        // arrives live, every one up to it can be replayed.
        let new = self.subscriptions.insert(topic.clone());
        let head = match self
            .state
            .broker
            .subscribe(&topic, &self.subscriptions.mailbox)
            .await
        {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(%topic, error = %e, "subscribe failed");
                // A repeated subscribe keeps the subscription it already had.
                if new {
                    self.subscriptions.remove(&topic);
                    self.state.broker.unsubscribe(&topic, self.id()).await;
                }
                return self
                    .error(
                        id,
                        ErrorCode::Unavailable,
                        "the event store is unavailable; retry",
                    )
                    .await;
            }
        };
        let Some(head) = head else {
            // No history: live events only, so a resume cannot be complete.
            let truncated = since.map(|_| true);
            let reply = Reply::Subscribed {
                id,
                topic: topic.as_str(),
                offset: None,
                epoch: None,
                truncated,
            };
            return self.reply(&reply).await;
        };
        let plan = head.plan_replay(since, epoch.as_deref());
        let reply = Reply::Subscribed {
            id,
            topic: topic.as_str(),
            offset: Some(head.last),
            epoch: Some(&head.epoch),
            truncated: plan.truncated.then_some(true),
        };
        self.reply(&reply).await?;
        let mut after = plan.after.unwrap_or(head.last);
        if after < head.last {
            metrics::counter!(names::REPLAYS).increment(1);
        }
        while after < head.last {
            let page = match self
                .state
                .broker
                .store()
                .read(
                    &topic,
                    after,
                    Page {
                        events: REPLAY_PAGE,
                        bytes: self.state.settings.limits.max_page_bytes,
                    },
                )
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    // Live events would now go out with a hole before
                    // them: close instead, and the client resumes with the
                    // last offset it really got.
                    tracing::warn!(%topic, error = %e, "replay failed");
                    self.close_with = Some(reason(
                        CloseCode::Error,
                        "replay failed: event store unavailable; reconnect and resume",
                    ));
                    return Err(Gone);
                }
            };
            let Some(newest) = page.last().map(|e| e.offset) else {
                break;
            };
            for event in page.iter().filter(|e| e.offset <= head.last) {
                // A replay can outlast the token: it ends with it.
                if self.grants.valid_until <= unix_now_secs() {
                    self.close_with = Some(token_expired());
                    return Err(Gone);
                }
                self.send_event(event).await?;
                metrics::counter!(names::REPLAYED_EVENTS).increment(1);
            }
            after = newest;
        }
        let delivered = self.delivered.entry(topic).or_insert(0);
        *delivered = (*delivered).max(head.last);
        Ok(())
    }

    /// Sends a live event unless it was replayed already.
    async fn send_live(&mut self, event: &Event) -> Result<(), Gone> {
        if let Some(last) = self.delivered.get_mut(&event.topic) {
            if event.offset <= *last {
                return Ok(());
            }
            *last = event.offset;
        }
        self.send_event(event).await
    }

    /// Replaces the token with a newer one for the same `sub`; topics the
    /// new grants no longer allow are unsubscribed, each with an error.
    async fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<(), Gone> {
        let grants = match self.state.verifier.verify(token) {
            Ok(grants) => grants,
            Err(e) => {
                return self
                    .error(id, ErrorCode::Unauthorized, &e.to_string())
                    .await;
            }
        };
        if grants.sub != self.grants.sub {
            let message = "the new token is for another sub";
            return self.error(id, ErrorCode::Forbidden, message).await;
        }
        self.grants = grants;
        let dropped: Vec<Topic> = self
            .subscriptions
            .iter()
            .filter(|t| self.grants.check(Action::Subscribe, t).is_err())
            .cloned()
            .collect();
        for topic in dropped {
            self.subscriptions.remove(&topic);
            self.delivered.remove(&topic);
            self.state.broker.unsubscribe(&topic, self.id()).await;
            let message = format!("unsubscribed from \"{topic}\": the new token does not grant it");
            let reply = Reply::Error {
                id: None,
                code: ErrorCode::Forbidden,
                message: &message,
                topic: Some(topic.as_str()),
            };
            self.reply(&reply).await?;
        }
        self.reply(&Reply::Refreshed { id }).await
    }

    async fn error(&mut self, id: Option<u64>, code: ErrorCode, message: &str) -> Result<(), Gone> {
        self.reply(&Reply::Error {
            id,
            code,
            message,
            topic: None,
        })
        .await
    }

    async fn reply(&mut self, reply: &Reply<'_>) -> Result<(), Gone> {
        self.send(&super::data_frame(&reply.encode(self.encoding)))
            .await
    }

    /// Writes an event's shared frame. An event without a form in this
    /// connection's encoding (see [`Event::ws_frame`]) is skipped with an
    /// error frame naming it; the connection lives on.
    async fn send_event(&mut self, event: &Event) -> Result<(), Gone> {
        match event.ws_frame(self.encoding) {
            Some(frame) => self.send(&frame).await,
            // Boxed: this rare path's state must not grow every idle
            // connection's future, which holds this one's.
            None => Box::pin(self.skipped(event)).await,
        }
    }

    /// Tells the client an event was skipped: it has no form in this
    /// connection's encoding.
    async fn skipped(&mut self, event: &Event) -> Result<(), Gone> {
        let message = format!(
            "event {} of \"{}\" cannot be encoded in {}; skipped",
            event.offset,
            event.topic,
            self.encoding.protocol_name()
        );
        self.reply(&Reply::Error {
            id: None,
            code: ErrorCode::Unavailable,
            message: &message,
            topic: None,
        })
        .await
    }

    /// Writes whole frames. A write waiting for a client that does not read
    /// is cut short by eviction or shutdown, so neither waits on that
    /// client; what it had not written yet goes out before the close frame.
    async fn send(&mut self, frames: &[u8]) -> Result<(), Gone> {
        self.socket.queue(frames).map_err(|_| Gone)?;
        if self.socket.is_flushed() {
            // The usual case: the kernel took the frames at once.
            return Ok(());
        }
        // Only a write left waiting registers for the stop token (overflow
        // or, its parent, shutdown), and for a client that reads nothing at
        // all: one that only sends would otherwise hold its place forever,
        // the heartbeat being checked by the loop this write holds up.
        let stalled = self.state.settings.server.write_timeout;
        tokio::select! {
            biased;
            sent = self.socket.flush() => sent.map_err(|_| Gone),
            () = self.overflowed.cancelled() => Err(Gone),
            () = tokio::time::sleep(stalled) => {
                self.stalled = true;
                Err(Gone)
            }
        }
    }

    /// The close frame owed after a write was cut short; none when the client
    /// simply went away.
    fn abort_reason(&mut self) -> Option<CloseReason> {
        if let Some(close) = self.close_with.take() {
            Some(close)
        } else if self.state.shutdown.is_cancelled() {
            Some(going_away())
        } else if self.overflowed.is_cancelled() {
            Some(slow_consumer())
        } else {
            None
        }
    }
}

/// A connection's mailbox and subscriptions, released from the hub (and
/// the relay's interest) when dropped. The orderly end unsubscribes each topic and
/// leaves this empty; a task that ends any other way (a panic, or its
/// future dropped mid-way) still leaves no registration, no gauge and no
/// Redis subscription behind.
struct Registrations {
    state: Arc<AppState>,
    mailbox: Mailbox,
    topics: HashSet<Topic>,
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
        for topic in self.topics.drain() {
            self.state.broker.release(&topic, self.mailbox.id);
        }
    }
}

fn token_expired() -> CloseReason {
    reason(
        CloseCode::Other(protocol::close::TOKEN_EXPIRED),
        "token expired",
    )
}

fn going_away() -> CloseReason {
    reason(CloseCode::Away, "server shutting down")
}

fn slow_consumer() -> CloseReason {
    reason(CloseCode::Again, "slow consumer: outbound queue full")
}

/// When a token with `exp` (Unix seconds) expires, on the runtime's clock.
fn expiry_instant(exp: u64) -> tokio::time::Instant {
    // Capped: an issuer's far-future `exp` must not overflow the clock.
    let left = Duration::from_secs(
        exp.saturating_sub(unix_now_secs())
            .min(MAX_TOKEN_LIFETIME_SECS),
    );
    tokio::time::Instant::now() + left
}

fn reason(code: CloseCode, description: &str) -> CloseReason {
    CloseReason {
        code,
        description: (!description.is_empty()).then(|| description.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;
    use crate::config::Settings;

    async fn node_state(dir: &std::path::Path) -> Arc<AppState> {
        let mut settings = Settings::defaults();
        settings.auth.jwt_secret = Some("unit-test-secret-0123456789abcdef".into());
        settings.store.url = format!("sqlite://{}", dir.join("herald.db").display()).into();
        let verifier = Verifier::new(&settings.auth).unwrap();
        let state = AppState::new(settings, verifier, CancellationToken::new());
        Arc::new(state.await.unwrap())
    }

    #[tokio::test]
    async fn a_connection_task_that_panics_leaves_no_registration_behind() {
        let dir = std::env::temp_dir().join(format!("herald-unit-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = node_state(&dir).await;
        let (mailbox, _inbox, _) = Mailbox::new(7, 8, 1024, &state.shutdown);
        let topic = Topic::parse("t").unwrap();
        state.broker.subscribe(&topic, &mailbox).await.unwrap();
        let mut registrations = Registrations {
            state: Arc::clone(&state),
            mailbox,
            topics: HashSet::new(),
        };
        registrations.insert(topic.clone());
        assert_eq!(state.broker.local_subscribers(&topic), 1);

        let task = tokio::spawn(async move {
            let _registrations = registrations;
            panic!("a bug in a handler");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(state.broker.local_subscribers(&topic), 0);
        state.shutdown.cancel();
        state.broker.stopped().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
