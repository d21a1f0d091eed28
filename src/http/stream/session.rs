//! One event stream, as the body of its HTTP response: it opens (where
//! each topic stands, what was truncated, the reconnect delay), replays
//! what the client missed a page at a time, then sends live events as its
//! mailbox takes them, a heartbeat when idle, and ends on overflow, token
//! expiry or shutdown with an `end` message. Dropped with the response
//! when the client goes: its registrations and slot are released then.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::time::{Interval, Sleep};
use tokio_util::sync::CancellationToken;

use super::format::{Entry, Format, Writer, encode_token};
use crate::auth::unix_now_secs;
use crate::event::Event;
use crate::mailbox::{Delivery, Outlet};
use crate::protocol::Reply;
use crate::registrations::Registrations;
use crate::state::{AppState, ConnectionSlot};
use crate::store::Page;
use crate::telemetry::names;
use crate::topic::Topic;

/// A chunk handed to the HTTP response stops growing past this many bytes;
/// what is left goes in the next one.
const CHUNK_BYTES: usize = 64 * 1024;

/// What the client is told to wait before reconnecting (SSE `retry:`).
pub(super) const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// One topic of a stream and where the client stands in it.
pub(super) struct Position {
    pub topic: Topic,
    /// The topic's epoch, when it keeps history (else it cannot resume).
    pub epoch: Option<Epoch>,
    /// The last offset the client has, of a topic with history.
    pub offset: u64,
    /// What the client asked for is not all there: said before the replay.
    pub truncated: bool,
    /// The last offset to replay up to (the seam); nothing when equal to
    /// `offset`.
    pub replay_until: u64,
}

/// A topic's epoch, as an NDJSON line and a resume token carry it.
pub(super) struct Epoch {
    pub json: String,
    pub fingerprint: u64,
    pub text: String,
}

/// Why a stream ends (besides its client going away).
#[derive(Debug, Clone, Copy)]
enum End {
    SlowConsumer,
    GoingAway,
    TokenExpired,
    ReplayFailed,
}

impl End {
    fn reason(self) -> &'static str {
        match self {
            End::SlowConsumer => "slow_consumer",
            End::GoingAway => "going_away",
            End::TokenExpired => "token_expired",
            End::ReplayFailed => "replay_failed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            End::SlowConsumer => {
                "slow consumer: outbound queue full; reconnect to resume after the last event received"
            }
            End::GoingAway => "server shutting down; reconnect to resume",
            End::TokenExpired => "token expired; reconnect with a fresh token to resume",
            End::ReplayFailed => {
                "the event store failed mid-replay; reconnect to resume after the last event received"
            }
        }
    }
}

/// The JSON of a `truncated` or `end` message.
#[derive(Serialize)]
struct Notice<'a> {
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    /// Where the replay starts again (`truncated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// What a subscribed stream is made of (see [`super`]).
pub(super) struct Parts {
    pub state: Arc<AppState>,
    /// Frees this stream's place under `limits.max_connections` on drop.
    pub _slot: ConnectionSlot,
    pub format: Format,
    pub grants: crate::auth::Grants,
    pub registrations: Registrations,
    pub outlet: Outlet,
    /// Cancelled on overflow and (its parent) on shutdown.
    pub overflowed: CancellationToken,
    /// In the order of the stream's sorted topics.
    pub positions: Vec<Position>,
    pub topics_fingerprint: u32,
}

pub(super) struct Stream {
    /// Released when the stream is dropped, however it ends: its slot and
    /// registrations.
    parts: Parts,
    by_topic: HashMap<Topic, usize>,
    /// Topics (by place) still to replay, in order.
    replays: VecDeque<usize>,
    heartbeat: Interval,
    expiry: Pin<Box<Sleep>>,
    /// The opening is sent.
    opened: bool,
    /// Events wait in the mailbox beyond the last chunk: take them before
    /// waiting for more.
    held: bool,
    /// Why it ended, once it has.
    ended: Option<&'static str>,
    /// The resume token, as of the positions when last brought up to date.
    token: String,
    /// A position moved since: the token must be encoded again.
    token_stale: bool,
    scratch: Vec<u8>,
    started: Instant,
}

impl Stream {
    pub(super) fn new(parts: Parts) -> Stream {
        let by_topic = parts
            .positions
            .iter()
            .enumerate()
            .map(|(i, p)| (p.topic.clone(), i))
            .collect();
        let replays: VecDeque<usize> = parts
            .positions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.replay_until > p.offset)
            .map(|(i, _)| i)
            .collect();
        metrics::counter!(names::REPLAYS).increment(replays.len() as u64);
        let every = parts.state.settings.server.heartbeat_interval;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = Box::pin(tokio::time::sleep_until(parts.grants.expires_at()));
        tracing::info!(conn = parts.registrations.mailbox.id, sub = %parts.grants.sub, format = parts.format.name(), topics = parts.positions.len(), "stream opened");
        Stream {
            parts,
            by_topic,
            replays,
            heartbeat,
            expiry,
            opened: false,
            held: false,
            ended: None,
            token: String::new(),
            token_stale: true,
            scratch: Vec::new(),
            started: Instant::now(),
        }
    }

    /// The response body: chunks until the stream ends.
    pub(super) fn body(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
        futures_util::stream::unfold(self, |mut stream| async move {
            let chunk = stream.next_chunk().await?;
            Some((Ok(chunk), stream))
        })
    }

    /// The next chunk of the response, never empty; `None` once ended.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended.is_some() {
            return None;
        }
        let mut out = Writer::new(self.parts.format);
        while out.is_empty() {
            if let Err(end) = self.step(&mut out).await {
                self.finish(end, &mut out);
                break;
            }
        }
        Some(out.into_bytes())
    }

    /// Writes what comes next: the opening, a page of replay, held
    /// events, or (after waiting) live events or a heartbeat.
    async fn step(&mut self, out: &mut Writer) -> Result<(), End> {
        // Once evicted, not one more event: the client resumes after the
        // last one it got.
        if self.parts.overflowed.is_cancelled() {
            return Err(self.stop_cause());
        }
        // A stream busy enough never to wait still ends at `exp`.
        if self.expiry.is_elapsed() {
            return Err(End::TokenExpired);
        }
        if !self.opened {
            self.opened = true;
            self.open(out);
            return Ok(());
        }
        if let Some(&place) = self.replays.front() {
            return self.replay_page(place, out).await;
        }
        if self.held {
            self.take_held(out);
            return Ok(());
        }
        tokio::select! {
            biased;
            () = self.parts.overflowed.cancelled() => Err(self.stop_cause()),
            () = &mut self.expiry => Err(End::TokenExpired),
            _ = self.heartbeat.tick() => {
                out.heartbeat();
                Ok(())
            }
            () = self.parts.outlet.woken() => {
                self.take_held(out);
                Ok(())
            }
        }
    }

    /// The stream's opening: per topic, where it stands (the `subscribed`
    /// reply a WebSocket subscribe gets) and whether the resume is
    /// truncated; then (SSE) the reconnect delay and starting position.
    fn open(&mut self, out: &mut Writer) {
        for position in &self.parts.positions {
            let epoch = position.epoch.as_ref().map(|e| e.text.as_str());
            let subscribed = Reply::Subscribed {
                id: None,
                topic: position.topic.as_str(),
                offset: epoch.map(|_| position.replay_until),
                epoch,
                truncated: position.truncated.then_some(true),
            };
            write_notice(out, "subscribed", &subscribed);
            if position.truncated {
                let notice = Notice {
                    op: "truncated",
                    topic: Some(position.topic.as_str()),
                    epoch,
                    offset: epoch.map(|_| position.offset),
                    reason: None,
                    message: None,
                };
                write_notice(out, "truncated", &notice);
            }
        }
        self.refresh_token();
        out.open(RETRY, &self.token);
    }

    /// Sends one page of a topic's replay, read once the previous page
    /// went out.
    async fn replay_page(&mut self, place: usize, out: &mut Writer) -> Result<(), End> {
        let position = &self.parts.positions[place];
        let (after, until) = (position.offset, position.replay_until);
        let page = Page::replay(self.parts.state.settings.limits.max_page_bytes);
        let state = Arc::clone(&self.parts.state);
        let topic = position.topic.clone();
        let mut range = state.broker.store().range(&topic, after, until, page);
        let events = match range.next().await {
            Ok(Some(events)) => events,
            Ok(None) => Vec::new(),
            Err(e) => {
                // Live events would follow with a hole before them: end,
                // and the client resumes after the last event it got.
                tracing::warn!(%topic, error = %e, "stream replay failed");
                return Err(End::ReplayFailed);
            }
        };
        let more = range.more() && !events.is_empty();
        self.heartbeat.reset();
        for event in &events {
            // A replay can outlast the token: it ends with it.
            if self.parts.grants.valid_until <= unix_now_secs() {
                return Err(End::TokenExpired);
            }
            self.write_event(event, out);
            metrics::counter!(names::REPLAYED_EVENTS).increment(1);
        }
        if !more || self.parts.positions[place].offset >= until {
            self.replays.pop_front();
            // What arrived live meanwhile goes after the replays.
            self.held = true;
        }
        Ok(())
    }

    /// Writes the events the mailbox holds, up to one chunk's worth.
    fn take_held(&mut self, out: &mut Writer) {
        // A heartbeat only when nothing else went out for a while.
        self.heartbeat.reset();
        self.held = true;
        while out.len() < CHUNK_BYTES {
            match self.parts.outlet.next_held() {
                Some(Delivery::Event(event)) => self.write_event(&event, out),
                // A stream does not join presence.
                Some(Delivery::Presence(_)) => {}
                None => {
                    self.held = false;
                    return;
                }
            }
        }
    }

    /// Writes one event and moves the topic's position past it.
    fn write_event(&mut self, event: &Event, out: &mut Writer) {
        let Some(&place) = self.by_topic.get(&event.topic) else {
            return;
        };
        let position = &mut self.parts.positions[place];
        if position.epoch.is_some() {
            position.offset = event.offset;
            self.token_stale = true;
        }
        // An event with no JSON form (stored before the edge checked
        // payloads) was logged and counted where it was encoded; the
        // stream says so and goes on past it, as a WebSocket does.
        let Some(json) = event.json() else {
            let message = format!(
                "event {} of \"{}\" cannot be encoded in JSON; skipped",
                event.offset, event.topic
            );
            let notice = Notice {
                op: "skipped",
                topic: Some(event.topic.as_str()),
                epoch: None,
                offset: Some(event.offset),
                reason: None,
                message: Some(&message),
            };
            write_notice(out, "skipped", &notice);
            return;
        };
        let token = match self.parts.format {
            Format::Sse => {
                self.refresh_token();
                Some(self.token.as_str())
            }
            Format::Ndjson => None,
        };
        let epoch = self.parts.positions[place]
            .epoch
            .as_ref()
            .map(|e| e.json.as_str());
        out.event(&json, token, epoch);
    }

    /// Encodes the token for the positions as they stand, once per change.
    fn refresh_token(&mut self) {
        if !self.token_stale {
            return;
        }
        let entries = self
            .parts
            .positions
            .iter()
            .enumerate()
            .filter_map(|(index, p)| {
                let epoch = p.epoch.as_ref()?;
                // Nothing received yet: resuming replays from the start.
                (p.offset > 0).then_some(Entry {
                    index,
                    epoch: epoch.fingerprint,
                    offset: p.offset,
                })
            });
        encode_token(
            self.parts.topics_fingerprint,
            entries,
            &mut self.scratch,
            &mut self.token,
        );
        self.token_stale = false;
    }

    /// The last message: why the stream ends.
    fn finish(&mut self, end: End, out: &mut Writer) {
        let notice = Notice {
            op: "end",
            topic: None,
            epoch: None,
            offset: None,
            reason: Some(end.reason()),
            message: Some(end.message()),
        };
        write_notice(out, "end", &notice);
        self.ended = Some(end.reason());
    }

    /// Why the stop token was cancelled: shutdown or overflow.
    fn stop_cause(&self) -> End {
        if self.parts.state.shutdown.is_cancelled() {
            End::GoingAway
        } else {
            End::SlowConsumer
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.parts.registrations.mailbox.close();
        let reason = self.ended.unwrap_or("client_gone");
        tracing::info!(conn = self.parts.registrations.mailbox.id, sub = %self.parts.grants.sub, format = self.parts.format.name(), duration_ms = self.started.elapsed().as_millis() as u64, reason, "stream closed");
    }
}

fn write_notice(out: &mut Writer, kind: &str, notice: &impl Serialize) {
    // Strings and numbers only: it cannot fail to serialize.
    if let Ok(json) = serde_json::to_vec(notice) {
        out.notice(kind, &json);
    }
}
