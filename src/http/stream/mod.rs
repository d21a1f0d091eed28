//! Event streams over plain HTTP, for clients that cannot or would rather
//! not speak WebSocket (`EventSource` behind a proxy that refuses
//! upgrades, `curl -N`, scripts): Server-Sent Events or NDJSON, picked by
//! `Accept` (see [`Format`]).
//!
//! - `GET /api/v1/topics/{topic}/events` with a stream `Accept` (without
//!   one, the same route answers a page of history);
//! - `GET /api/v1/stream?topic=a&topic=b` for several topics at once.
//!
//! A stream is a subscriber like a WebSocket connection: it holds a place
//! under `limits.max_connections` and `limits.max_connections_per_sub`, a
//! mailbox with the same bounds, subscribes at the same seam, replays what
//! its resume asks for, and ends on overflow, token expiry and shutdown.
//! Every refusal is a JSON error before the stream starts.

mod format;
mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

pub(crate) use format::Format;
use format::{TokenError, decode_token, fingerprint, topics_fingerprint};
use session::{Epoch, Parts, Position, Stream};

use super::{ApiError, bearer_token, check_origin, check_position};
use crate::auth::{Action, AuthError, Grants};
use crate::mailbox::Mailbox;
use crate::registrations::Registrations;
use crate::state::{AppState, ConnectionSlot};
use crate::store::Head;
use crate::topic::Topic;

/// The SSE header a browser resends on reconnecting.
const LAST_EVENT_ID: &str = "last-event-id";

/// The query of a one-topic stream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OneTopicQuery {
    since: Option<u64>,
    epoch: Option<String>,
    /// For `EventSource`, which cannot set headers.
    token: Option<String>,
    /// The resume token, for clients that cannot set `Last-Event-ID`.
    last_event_id: Option<String>,
}

/// Where a new stream starts in each topic.
enum Resume {
    /// At the head: live events only.
    Live,
    /// From an SSE resume token (`Last-Event-ID`).
    Token(String),
    /// From `since` (and `epoch`) per topic; topics not named start live.
    Since(HashMap<Topic, (u64, Option<String>)>),
}

/// What a client resuming asked for in one topic: an offset, and the
/// epoch it belongs to as the client named it.
enum Asked {
    Named(u64, Option<String>),
    Fingerprint(u64, u64),
}

/// `GET /api/v1/topics/{topic}/events` asked for as a stream.
pub(super) async fn one_topic(
    req: &HttpRequest,
    path: &str,
    state: Arc<AppState>,
    format: Format,
) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<OneTopicQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
    let grants = authenticate(req, query.token.as_deref(), &state)?;
    let topic = Topic::parse(path)?;
    let resume = match last_event_id(req, query.last_event_id)? {
        Some(token) => Resume::Token(token),
        None => match query.since {
            Some(since) => {
                check_position(since, query.epoch.as_deref())?;
                Resume::Since(HashMap::from([(topic.clone(), (since, query.epoch))]))
            }
            None if query.epoch.is_some() => {
                return Err(ApiError::BadRequest("epoch is given without since".into()));
            }
            None => Resume::Live,
        },
    };
    open(state, grants, vec![topic], resume, format, req).await
}

/// `GET /api/v1/stream?topic=a&topic=b[&since=a:42:EPOCH]`: several
/// topics in one stream.
pub(super) async fn many_topics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // This route has nothing but streams: SSE unless NDJSON is asked for.
    let format = Format::from_accept(req.headers()).unwrap_or(Format::Sse);
    let mut topics = Vec::new();
    let mut since = HashMap::new();
    let mut token = None;
    let mut resume_token = None;
    let once = |slot: &mut Option<String>, name: &str, value: String| {
        if slot.replace(value).is_some() {
            return Err(ApiError::BadRequest(format!(
                "invalid query: `{name}` is given twice"
            )));
        }
        Ok(())
    };
    for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        match &*key {
            "topic" => topics.push(Topic::parse(&value)?),
            "since" => {
                let (topic, offset, epoch) = parse_since(&value)?;
                if since.insert(topic.clone(), (offset, epoch)).is_some() {
                    return Err(ApiError::BadRequest(format!(
                        "invalid query: since is given twice for \"{topic}\""
                    )));
                }
            }
            "token" => once(&mut token, "token", value.into_owned())?,
            "last_event_id" => once(&mut resume_token, "last_event_id", value.into_owned())?,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "invalid query: unknown parameter `{other}`; expected topic, since, token or last_event_id"
                )));
            }
        }
    }
    let grants = authenticate(&req, token.as_deref(), &state)?;
    if let Some(topic) = since.keys().find(|t| !topics.contains(t)) {
        return Err(ApiError::BadRequest(format!(
            "since names topic \"{topic}\", which the stream does not (add topic={topic})"
        )));
    }
    let resume = match last_event_id(&req, resume_token)? {
        Some(token) => Resume::Token(token),
        None if since.is_empty() => Resume::Live,
        None => Resume::Since(since),
    };
    open(state.into_inner(), grants, topics, resume, format, &req).await
}

/// Checks the token (`Authorization: Bearer`, else `?token=`).
fn authenticate(
    req: &HttpRequest,
    query_token: Option<&str>,
    state: &AppState,
) -> Result<Grants, ApiError> {
    let token = match bearer_token(req.headers())? {
        Some(token) => token,
        None => query_token.ok_or(AuthError::Missing)?,
    };
    Ok(state.verifier.verify(token)?)
}

/// The resume token: `Last-Event-ID` (which a browser resends by itself,
/// so it wins over the URL's), else `?last_event_id=`. Either wins over
/// `since`. An empty one is no token.
fn last_event_id(req: &HttpRequest, query: Option<String>) -> Result<Option<String>, ApiError> {
    let header = match req.headers().get(LAST_EVENT_ID) {
        Some(value) => value
            .to_str()
            .map_err(|_| ApiError::BadRequest(TokenError::Malformed.to_string()))?
            .trim(),
        None => "",
    };
    if !header.is_empty() {
        return Ok(Some(header.to_owned()));
    }
    Ok(query.filter(|q| !q.trim().is_empty()))
}

/// `topic:offset[:epoch]`, a multi-topic stream's `since`.
fn parse_since(value: &str) -> Result<(Topic, u64, Option<String>), ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "since {value:?} is not topic:offset or topic:offset:epoch"
        ))
    };
    let mut parts = value.splitn(3, ':');
    let topic = Topic::parse(parts.next().ok_or_else(bad)?)?;
    let offset = parts
        .next()
        .and_then(|o| o.parse::<u64>().ok())
        .ok_or_else(bad)?;
    let epoch = parts.next().map(str::to_owned);
    check_position(offset, epoch.as_deref())?;
    Ok((topic, offset, epoch))
}

/// Checks everything a stream needs, subscribes each topic and answers
/// with the stream; any refusal is answered before it starts.
async fn open(
    state: Arc<AppState>,
    grants: Grants,
    mut topics: Vec<Topic>,
    resume: Resume,
    format: Format,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check_origin(req.headers(), &state.settings.server.allowed_origins)?;
    topics.sort();
    topics.dedup();
    if topics.is_empty() {
        return Err(ApiError::BadRequest(
            "name at least one topic: /api/v1/stream?topic=…".into(),
        ));
    }
    let max = state.settings.limits.max_subscriptions;
    if topics.len() > max {
        return Err(ApiError::TooManyTopics(max));
    }
    for topic in &topics {
        grants.check(Action::Subscribe, topic)?;
    }
    let fingerprinted = topics_fingerprint(&topics);
    let asked: Vec<Option<Asked>> = match resume {
        Resume::Live => topics.iter().map(|_| None).collect(),
        Resume::Since(mut since) => topics
            .iter()
            .map(|t| since.remove(t).map(|(o, e)| Asked::Named(o, e)))
            .collect(),
        Resume::Token(token) => {
            let entries = decode_token(&token, fingerprinted, topics.len())
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            // A topic the token has no entry for was not received yet.
            let mut asked: Vec<Option<Asked>> =
                topics.iter().map(|_| Some(Asked::Named(0, None))).collect();
            for entry in entries {
                asked[entry.index] = Some(Asked::Fingerprint(entry.offset, entry.epoch));
            }
            asked
        }
    };
    let slot = ConnectionSlot::acquire(&state, &grants)?;
    let limits = &state.settings.limits;
    let id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (mailbox, outlet, overflowed) = Mailbox::held(
        id,
        limits.outbound_queue,
        limits.outbound_queue_bytes,
        &state.shutdown,
    );
    // Released on any early return below, and with the stream.
    let mut registrations = Registrations::new(Arc::clone(&state), mailbox, grants.sub.clone());
    let mut positions = Vec::with_capacity(topics.len());
    for (topic, asked) in topics.into_iter().zip(asked) {
        registrations.insert(topic.clone());
        let head = state
            .broker
            .subscribe(&topic, &registrations.mailbox)
            .await
            .inspect_err(|e| tracing::warn!(%topic, error = %e, "stream subscribe failed"))?;
        positions.push(position(topic, head, asked));
    }
    let stream = Stream::new(Parts {
        state: Arc::clone(&state),
        _slot: slot,
        format,
        grants,
        registrations,
        outlet,
        overflowed,
        positions,
        topics_fingerprint: fingerprinted,
    });
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        ))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        // Proxies that buffer responses (nginx) pass this one through.
        .insert_header(("x-accel-buffering", HeaderValue::from_static("no")))
        .insert_header((header::VARY, HeaderValue::from_static("Accept")))
        .streaming(stream.body()))
}

/// Where a stream starts in `topic`, whose log stands at `head` (`None`:
/// the topic keeps no history).
fn position(topic: Topic, head: Option<Head>, asked: Option<Asked>) -> Position {
    let Some(head) = head else {
        // Live events only: a resume cannot be complete.
        return Position {
            topic,
            epoch: None,
            offset: 0,
            truncated: asked.is_some(),
            replay_until: 0,
        };
    };
    let epoch_fingerprint = fingerprint(head.epoch.as_bytes());
    let plan = match &asked {
        None => head.plan_replay(None, None),
        Some(Asked::Named(since, epoch)) => head.plan_replay(Some(*since), epoch.as_deref()),
        Some(Asked::Fingerprint(since, fingerprinted)) => {
            let epoch = (*fingerprinted == epoch_fingerprint).then_some(head.epoch.as_str());
            head.plan_replay(Some(*since), epoch)
        }
    };
    Position {
        topic,
        offset: plan.after.unwrap_or(head.last),
        truncated: plan.truncated,
        replay_until: head.last,
        epoch: Some(Epoch {
            // A string always serializes.
            json: serde_json::to_string(&head.epoch).unwrap_or_default(),
            fingerprint: epoch_fingerprint,
            text: head.epoch,
        }),
    }
}
