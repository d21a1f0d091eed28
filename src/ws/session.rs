//! One WebSocket connection: a single task that owns the connection's state
//! and `select!`s over incoming frames, its mailbox (woken only when the
//! pipeline could not write an event itself), eviction, the heartbeat, the
//! token's expiry and node shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_http::ws::OpCode;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::close::CloseCause;
use super::socket::{Message, Socket};
use super::{Accepted, Admitted};
use crate::auth::{Action, AuthError, Forbidden, Grants, unix_now_secs};
use crate::broker::{PublishError, Transport};
use crate::config::LimitSettings;
use crate::event::{Event, PresenceDiff};
use crate::mailbox::{ConnId, Delivery, Mailbox, Outlet};
use crate::presence::PresenceError;
use crate::protocol::{self, ClientOp, DecodeError, ErrorCode, Reply, ws_frame};
use crate::rate::TokenBucket;
use crate::registrations::Registrations;
use crate::state::{AppState, ConnectionSlot};
use crate::store::{Head, IdempotencyKey, NewEvent, Page};
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

impl Limited {
    fn new(rate: u32, kind: LimitedOps) -> Limited {
        Limited {
            bucket: TokenBucket::new(rate),
            strikes: 0,
            kind,
        }
    }

    /// Takes one op, or refuses it: with an error frame, or (refused too
    /// often in a row) by closing the connection.
    fn admit(&mut self) -> Result<(), OpError> {
        if self.bucket.try_take() {
            self.strikes = 0;
            return Ok(());
        }
        self.strikes += 1;
        let (ops, setting) = self.kind.describe();
        if self.strikes > RATE_LIMIT_STRIKES {
            return Err(OpError::Stop(CloseCause::RateLimited(setting)));
        }
        Err(OpError::RateLimited {
            rate: self.bucket.rate(),
            ops,
            setting,
        })
    }
}

/// Why an op was refused, or the connection must end: mapped once, in
/// [`Connection::refuse`], to an error frame (the connection stays) or
/// a close.
#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error("{}", .0.message)]
    Decode(DecodeError),
    #[error(
        "this connection speaks herald.msgpack: send MessagePack in binary frames \
         (or connect without the sub-protocol for JSON)"
    )]
    TextOnMsgPack,
    #[error("more than {rate} {ops} per second ({setting}); slow down")]
    RateLimited {
        rate: f64,
        ops: &'static str,
        setting: &'static str,
    },
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error("the new token is for another sub")]
    OtherSub,
    #[error("unsubscribed from \"{0}\": the new token does not grant it")]
    Revoked(Topic),
    #[error("a connection may hold {0} subscriptions (limits.max_subscriptions)")]
    TooManySubscriptions(usize),
    #[error("payload is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Detail logged where it happened; the client gets no database text.
    #[error("the event store is unavailable; retry")]
    Store,
    #[error("event {offset} of \"{topic}\" cannot be encoded in {encoding}; skipped")]
    Unencodable {
        topic: Topic,
        offset: u64,
        encoding: &'static str,
    },
    #[error("topic \"{0}\" keeps no presence (set presence = true in its [[topics]] rule)")]
    PresenceDisabled(Topic),
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error("the connection ends")]
    Stop(CloseCause),
}

impl From<CloseCause> for OpError {
    fn from(cause: CloseCause) -> OpError {
        OpError::Stop(cause)
    }
}

impl OpError {
    fn code(&self) -> ErrorCode {
        match self {
            OpError::Decode(e) => e.code,
            OpError::TextOnMsgPack => ErrorCode::BadRequest,
            OpError::RateLimited { .. } => ErrorCode::RateLimited,
            OpError::Unauthorized(_) => ErrorCode::Unauthorized,
            OpError::Forbidden(_) | OpError::OtherSub | OpError::Revoked(_) => ErrorCode::Forbidden,
            OpError::TooManySubscriptions(_) => ErrorCode::TooManySubscriptions,
            OpError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            OpError::PresenceDisabled(_) => ErrorCode::PresenceDisabled,
            OpError::Publish(_)
            | OpError::Store
            | OpError::Presence(_)
            | OpError::Unencodable { .. }
            | OpError::Stop(_) => ErrorCode::Unavailable,
        }
    }
}

/// Room in a client frame for the envelope around the payload (op, id,
/// topic, field names).
const FRAME_ENVELOPE_BYTES: usize = 4096;

/// How long the close frame may wait for room in the socket's send queue. A
/// slow client that still reads gets its close code (e.g. 1013) after the
/// frames already queued; one that stopped reading is cut off after this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let (mailbox, outlet, overflowed) = Mailbox::new(
        id,
        socket.wire(),
        encoding,
        limits.outbound_queue,
        limits.outbound_queue_bytes,
        &state.shutdown,
    );
    let publish_rate = Limited::new(limits.publish_rate, LimitedOps::Publish);
    let subscribe_rate = Limited::new(limits.subscribe_rate, LimitedOps::Subscribe);
    let subscriptions = Registrations::new(Arc::clone(&state), mailbox, grants.sub.clone());
    let conn = Connection {
        state,
        _slot: slot,
        grants,
        publish_rate,
        subscribe_rate,
        encoding,
        socket,
        outlet,
        overflowed,
        subscriptions,
    };
    conn.run(peer).await;
}

struct Connection {
    state: Arc<AppState>,
    /// Frees this connection's place under `limits.max_connections` on drop.
    _slot: ConnectionSlot,
    grants: Grants,
    publish_rate: Limited,
    subscribe_rate: Limited,
    encoding: protocol::Encoding,
    /// Client frames are read from here.
    socket: Socket,
    /// Frames go out through here, in one order with the pipeline's.
    outlet: Outlet,
    /// Cancelled by the pipeline when the mailbox overflowed, and (a child
    /// of the shutdown token) when the node shuts down.
    overflowed: CancellationToken,
    /// The topics subscribed to; whatever is left in it is released when
    /// the connection's task ends, however it ends.
    subscriptions: Registrations,
}

impl Connection {
    /// This connection's id on the node.
    fn id(&self) -> ConnId {
        self.subscriptions.mailbox.id
    }

    async fn run(mut self, peer: Option<SocketAddr>) {
        let opened = Instant::now();
        // Cancelled on overflow and, being its child, on shutdown: one
        // future, registered once, for both.
        let stopped = self.overflowed.clone().cancelled_owned();
        tokio::pin!(stopped);
        let server = &self.state.settings.server;
        let heartbeat_timeout = server.heartbeat_timeout;
        let mut heartbeat = tokio::time::interval(server.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let expiry = tokio::time::sleep_until(self.grants.expires_at());
        tokio::pin!(expiry);
        tracing::info!(conn = self.id(), sub = %self.grants.sub, ?peer, encoding = self.encoding.protocol_name(), "connection opened");

        // The stop token first: once evicted, not one more event may go out
        // (the client resumes after the last one it got), and a mailbox that
        // never empties must not starve shutdown, expiry or the heartbeat.
        // While a client's message is handled, the pipeline's events are
        // held; they go out after its answer, before the next frame is read.
        let cause: CloseCause = loop {
            let step = tokio::select! {
                biased;
                () = &mut stopped => Err(self.stop_cause()),
                _ = &mut expiry => Err(CloseCause::TokenExpired),
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() > heartbeat_timeout {
                        Err(CloseCause::HeartbeatTimeout)
                    } else {
                        self.send(ws_frame(OpCode::Ping, b"").freeze()).await
                    }
                }
                () = self.outlet.woken() => self.catch_up().await,
                msg = self.socket.recv() => match msg {
                    Ok(None) => Err(CloseCause::ClientGone),
                    // Boxed: handling a request (subscribe, replay,
                    // publish) needs far more state than waiting does, and
                    // an idle connection should not carry it.
                    Ok(Some(msg)) => {
                        self.outlet.hold();
                        let handled = Box::pin(self.on_message(msg)).await;
                        if handled.is_ok() {
                            last_seen = Instant::now();
                            // A refresh may have moved the expiry.
                            expiry.as_mut().reset(self.grants.expires_at());
                        }
                        match handled {
                            Ok(()) => self.catch_up().await,
                            Err(cause) => Err(cause),
                        }
                    }
                    Err(err) => {
                        tracing::debug!(conn = self.id(), error = %err, "unreadable frame");
                        Err(CloseCause::Unreadable(err))
                    }
                },
            };
            if let Err(cause) = step {
                break cause;
            }
        };

        // Boxed: what ending needs is not carried through the connection's
        // life in every waiting connection's future.
        Box::pin(self.end(cause, opened, peer)).await;
    }

    /// Unsubscribes everything, sends the close frame and logs the end.
    async fn end(mut self, cause: CloseCause, opened: Instant, peer: Option<SocketAddr>) {
        let id = self.id();
        self.subscriptions.mailbox.close();
        // One at a time, each out of the drop guard before it is left: if
        // this task is dropped part-way, the guard releases the rest.
        while let Some(topic) = self.subscriptions.iter().next().cloned() {
            self.subscriptions.remove(&topic);
            self.state.broker.unsubscribe(&topic, id).await;
        }
        let close = cause.reason();
        let code = close.as_ref().map(|c| u16::from(c.code));
        if matches!(cause, CloseCause::Stalled) {
            tracing::info!(conn = id, "client stopped reading; cut off");
        } else {
            let closing = self.socket.close(&self.outlet, close);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        }
        tracing::info!(conn = id, sub = %self.grants.sub, ?peer, duration_ms = opened.elapsed().as_millis() as u64, close_code = ?code, "connection closed");
    }

    /// Handles one client message.
    async fn on_message(&mut self, msg: Message) -> Result<(), CloseCause> {
        match msg {
            Message::Text(_) if self.encoding == protocol::Encoding::MsgPack => {
                self.refuse(None, OpError::TextOnMsgPack).await
            }
            Message::Text(bytes) | Message::Binary(bytes) => self.on_frame(&bytes).await,
            Message::Ping(bytes) => self.send(ws_frame(OpCode::Pong, &bytes).freeze()).await,
            Message::Pong => Ok(()),
            Message::Close(theirs) => Err(CloseCause::ClientClosed(theirs)),
        }
    }

    async fn on_frame(&mut self, frame: &[u8]) -> Result<(), CloseCause> {
        let op = match protocol::decode(self.encoding, frame) {
            Ok(op) => op,
            Err(e) => return self.refuse(e.id, OpError::Decode(e)).await,
        };
        let id = op.id();
        let admitted = match &op {
            ClientOp::Publish { .. } => self.publish_rate.admit(),
            ClientOp::Subscribe { .. }
            | ClientOp::Unsubscribe { .. }
            | ClientOp::Refresh { .. }
            | ClientOp::Presence { .. } => self.subscribe_rate.admit(),
            ClientOp::Ping { .. } => Ok(()),
        };
        let done = match admitted {
            Ok(()) => self.on_op(op).await,
            Err(refused) => Err(refused),
        };
        match done {
            Ok(()) => Ok(()),
            Err(error) => self.refuse(id, error).await,
        }
    }

    async fn on_op(&mut self, op: ClientOp) -> Result<(), OpError> {
        match op {
            ClientOp::Ping { id } => Ok(self.reply(&Reply::Pong { id }).await?),
            ClientOp::Refresh { id, token } => self.refresh(id, &token).await,
            ClientOp::Subscribe {
                id,
                topic,
                since,
                epoch,
                presence,
            } => self.subscribe(id, topic, since, epoch, presence).await,
            ClientOp::Presence { id, topic, query } => {
                self.grants.check(Action::Subscribe, &topic)?;
                self.presence_enabled(&topic)?;
                let page = self.state.broker.presence().page(&topic, &query).await?;
                let reply = Reply::Presence {
                    id,
                    topic: topic.as_str(),
                    page: page.out(),
                };
                Ok(self.reply(&reply).await?)
            }
            ClientOp::Unsubscribe { id, topic } => {
                if self.subscriptions.remove(&topic) {
                    self.state.broker.unsubscribe(&topic, self.id()).await;
                }
                let reply = Reply::Unsubscribed {
                    id,
                    topic: topic.as_str(),
                };
                Ok(self.reply(&reply).await?)
            }
            ClientOp::Publish {
                id,
                topic,
                payload,
                key,
            } => {
                self.grants.check(Action::Publish, &topic)?;
                let limit = self.state.settings.limits.max_payload_bytes;
                if payload.len() > limit {
                    return Err(OpError::PayloadTooLarge(limit));
                }
                let event = NewEvent {
                    topic: topic.clone(),
                    payload,
                    key: key.map(|key| IdempotencyKey {
                        publisher: self.grants.sub.clone(),
                        key,
                    }),
                };
                let offsets = self
                    .state
                    .broker
                    .publish(vec![event], Transport::WebSocket)
                    .await?;
                let reply = Reply::Published {
                    id,
                    topic: topic.as_str(),
                    offset: offsets[0],
                };
                Ok(self.reply(&reply).await?)
            }
        }
    }

    /// Refuses presence on a topic that keeps none.
    fn presence_enabled(&self, topic: &Topic) -> Result<(), OpError> {
        if self.state.broker.retention().presence(topic) {
            Ok(())
        } else {
            Err(OpError::PresenceDisabled(topic.clone()))
        }
    }

    /// Subscribes, answers with the topic's head, replays what the client
    /// missed since `since`, and from then on its mailbox brings the live
    /// events: the pipeline added it at the head it answered, the seam, so
    /// there is no gap and no duplicate between the two. With `presence:
    /// true`, the user also joins the topic's presence, and its diffs come
    /// through the mailbox from before the answer on; with `false`, it
    /// leaves them. Subscribing to a topic already subscribed answers the
    /// same way and changes nothing but that.
    async fn subscribe(
        &mut self,
        id: Option<u64>,
        topic: Topic,
        since: Option<u64>,
        epoch: Option<String>,
        presence: Option<bool>,
    ) -> Result<(), OpError> {
        self.grants.check(Action::Subscribe, &topic)?;
        if presence == Some(true) {
            self.presence_enabled(&topic)?;
        }
        let max = self.state.settings.limits.max_subscriptions;
        if !self.subscriptions.contains(&topic) && self.subscriptions.len() >= max {
            return Err(OpError::TooManySubscriptions(max));
        }
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
                return Err(OpError::Store);
            }
        };
        let joined = self.subscriptions.presence.contains(&topic);
        if presence.is_some_and(|join| join != joined) {
            let state = Arc::clone(&self.state);
            let join = !joined;
            state
                .broker
                .listen(&topic, &self.subscriptions.mailbox, join)
                .await;
            if join {
                self.subscriptions.presence.insert(topic.clone());
                state.broker.presence().join(
                    &topic,
                    &self.grants.sub,
                    self.grants.presence_info.clone(),
                );
            } else {
                self.subscriptions.leave_presence(&topic);
            }
        }
        let Some(head) = head else {
            // No history: live events only, so a resume cannot be complete.
            let reply = Reply::Subscribed {
                id,
                topic: topic.as_str(),
                offset: None,
                epoch: None,
                truncated: since.map(|_| true),
            };
            return Ok(self.reply(&reply).await?);
        };
        let plan = head.plan_replay(since, epoch.as_deref());
        let reply = Reply::Subscribed {
            id,
            topic: topic.as_str(),
            offset: Some(head.last),
            epoch: Some(&head.epoch),
            truncated: (new && plan.truncated).then_some(true),
        };
        self.reply(&reply).await?;
        if new {
            self.replay(&topic, plan.after.unwrap_or(head.last), &head)
                .await?;
        }
        Ok(())
    }

    /// Sends the stored events of `topic` in `(after, head.last]`, a page
    /// at a time, each page read once the previous one was written.
    async fn replay(&mut self, topic: &Topic, after: u64, head: &Head) -> Result<(), CloseCause> {
        if after >= head.last {
            return Ok(());
        }
        metrics::counter!(names::REPLAYS).increment(1);
        let page = Page::replay(self.state.settings.limits.max_page_bytes);
        let state = Arc::clone(&self.state);
        let mut range = state.broker.store().range(topic, after, head.last, page);
        loop {
            let events = match range.next().await {
                Ok(Some(events)) => events,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // Live events would now go out with a hole before
                    // them: close instead, and the client resumes with the
                    // last offset it really got.
                    tracing::warn!(%topic, error = %e, "replay failed");
                    return Err(CloseCause::ReplayFailed);
                }
            };
            for event in &events {
                // A replay can outlast the token: it ends with it.
                if self.grants.valid_until <= unix_now_secs() {
                    return Err(CloseCause::TokenExpired);
                }
                self.send_event(event).await?;
                metrics::counter!(names::REPLAYED_EVENTS).increment(1);
            }
        }
    }

    /// Writes the events the pipeline held for this connection, then what
    /// it left waiting for room in the socket.
    async fn catch_up(&mut self) -> Result<(), CloseCause> {
        while let Some(delivery) = self.outlet.next_held() {
            match delivery {
                Delivery::Event(event) => self.send_live(&event).await?,
                Delivery::Presence(diff) => self.send_diff(&diff).await?,
            }
        }
        self.flush().await
    }

    /// Sends a presence diff, unless the connection left the topic's
    /// presence since the pipeline offered it.
    async fn send_diff(&mut self, diff: &PresenceDiff) -> Result<(), CloseCause> {
        if !self.subscriptions.presence.contains(&diff.topic) {
            return Ok(());
        }
        match diff.ws_frame(self.encoding) {
            Some(frame) => self.send(frame).await,
            // Logged and counted where it was encoded.
            None => Ok(()),
        }
    }

    /// Sends a live event, unless its topic was unsubscribed since the
    /// pipeline offered it.
    async fn send_live(&mut self, event: &Event) -> Result<(), CloseCause> {
        if !self.subscriptions.contains(&event.topic) {
            return Ok(());
        }
        self.send_event(event).await
    }

    /// Replaces the token with a newer one for the same `sub`; topics the
    /// new grants no longer allow are unsubscribed, each with an error.
    async fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<(), OpError> {
        let grants = self.state.verifier.verify(token)?;
        if grants.sub != self.grants.sub {
            return Err(OpError::OtherSub);
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
            self.state.broker.unsubscribe(&topic, self.id()).await;
            self.refuse(None, OpError::Revoked(topic)).await?;
        }
        Ok(self.reply(&Reply::Refreshed { id }).await?)
    }

    /// The one place an [`OpError`] becomes what the client sees: an error
    /// frame, or the end of the connection.
    async fn refuse(&mut self, id: Option<u64>, error: OpError) -> Result<(), CloseCause> {
        let message = error.to_string();
        if let OpError::Stop(cause) = error {
            return Err(cause);
        }
        let topic = match &error {
            OpError::Revoked(topic) => Some(topic.as_str()),
            _ => None,
        };
        self.reply(&Reply::Error {
            id,
            code: error.code(),
            message: &message,
            topic,
        })
        .await
    }

    async fn reply(&mut self, reply: &Reply<'_>) -> Result<(), CloseCause> {
        self.send(reply.encode(self.encoding).to_ws().freeze())
            .await
    }

    /// Writes an event's shared frame. An event without a form in this
    /// connection's encoding (see [`Event::ws_frame`]) is skipped with an
    /// error frame naming it; the connection lives on.
    async fn send_event(&mut self, event: &Event) -> Result<(), CloseCause> {
        match event.ws_frame(self.encoding) {
            Some(frame) => self.send(frame).await,
            // Boxed: this rare path's state must not grow every idle
            // connection's future, which holds this one's.
            None => {
                let skipped = OpError::Unencodable {
                    topic: event.topic.clone(),
                    offset: event.offset,
                    encoding: self.encoding.protocol_name(),
                };
                Box::pin(self.refuse(None, skipped)).await
            }
        }
    }

    /// Writes whole frames. A write waiting for a client that does not read
    /// is cut short by eviction or shutdown, so neither waits on that
    /// client; what it had not written yet goes out before the close frame.
    async fn send(&mut self, frames: Bytes) -> Result<(), CloseCause> {
        let sent = self
            .outlet
            .write(frames)
            .map_err(|_| CloseCause::ClientGone)?;
        if sent {
            // The usual case: the kernel took the frames at once.
            return Ok(());
        }
        self.flush().await
    }

    /// Waits until everything queued for the socket went out. Only a write
    /// left waiting registers for the stop token (overflow or, its parent,
    /// shutdown), and for a client that reads nothing at all: one whose
    /// socket takes nothing for `server.write_timeout` is cut off (one that
    /// only sends would otherwise hold its place forever, the heartbeat
    /// being checked by the loop this write holds up). A client that reads,
    /// however far behind, is bounded by its mailbox instead.
    async fn flush(&mut self) -> Result<(), CloseCause> {
        if self.outlet.is_flushed() {
            return Ok(());
        }
        let stalled = self.state.settings.server.write_timeout;
        loop {
            let all_sent = tokio::select! {
                biased;
                sent = self.outlet.flush() => sent.map_err(|_| CloseCause::ClientGone)?,
                () = self.overflowed.cancelled() => return Err(self.stop_cause()),
                () = tokio::time::sleep(stalled) => return Err(CloseCause::Stalled),
            };
            if all_sent {
                return Ok(());
            }
        }
    }

    /// Why the stop token was cancelled: shutdown or overflow.
    fn stop_cause(&self) -> CloseCause {
        if self.state.shutdown.is_cancelled() {
            CloseCause::GoingAway
        } else {
            CloseCause::SlowConsumer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;
    use crate::config::Settings;

    async fn node_state(dir: &std::path::Path) -> Arc<AppState> {
        let mut settings = Settings::defaults();
        // Drawn at random: no secret written in Herald's files starts a node.
        let secret = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        settings.auth.jwt_secret = Some(secret.into());
        settings.store.url = format!("sqlite://{}", dir.join("herald.db").display()).into();
        let verifier = Verifier::new(&settings.auth).unwrap();
        let state = AppState::new(settings, verifier, 0, CancellationToken::new());
        Arc::new(state.await.unwrap())
    }

    #[tokio::test]
    async fn a_connection_task_that_panics_leaves_no_registration_behind() {
        let dir = std::env::temp_dir().join(format!("herald-unit-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = node_state(&dir).await;
        // A real loopback connection for the mailbox's socket.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (wire, _) = listener.accept().await.unwrap();
        let (mailbox, _outlet, _) = Mailbox::new(
            7,
            Arc::new(wire),
            protocol::Encoding::Json,
            8,
            1024,
            &state.shutdown,
        );
        let topic = Topic::parse("t").unwrap();
        state.broker.subscribe(&topic, &mailbox).await.unwrap();
        let mut registrations = Registrations::new(Arc::clone(&state), mailbox, "unit".into());
        registrations.insert(topic.clone());
        assert_eq!(state.broker.local_subscribers(&topic).await, 1);

        let task = tokio::spawn(async move {
            let _registrations = registrations;
            panic!("a bug in a handler");
        });
        assert!(task.await.unwrap_err().is_panic());
        // The drop guard's release is queued to the pipeline; a count is
        // answered after it.
        assert_eq!(state.broker.local_subscribers(&topic).await, 0);
        state.shutdown.cancel();
        state.broker.stopped().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
