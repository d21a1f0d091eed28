//! `GET /api/v1/topics/{topic}/events?since=N&limit=M[&epoch=E]`: retained
//! events, under the same token rules as subscribing; with a stream
//! `Accept` (SSE, NDJSON), the topic's events as a stream (see
//! [`super::stream`]).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::stream::Format;
use super::{ApiError, ErrorBody, check_position, subscriber_read};
use crate::state::AppState;
use crate::store::Page;

/// Events returned when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 100;
/// Most events one request returns.
pub const MAX_LIMIT: u64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    since: Option<u64>,
    limit: Option<u64>,
    epoch: Option<String>,
}

/// Retained events of a topic.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct History<'a> {
    topic: &'a str,
    epoch: &'a str,
    /// The topic's last offset.
    offset: u64,
    truncated: bool,
    /// More events follow the last one returned (the page was full, in
    /// events or in `limits.max_page_bytes`): ask again with `since` set
    /// to the last offset received.
    more: bool,
    /// Event frames, exactly as a WebSocket client receives them.
    #[schema(value_type = Vec<Object>)]
    events: Vec<Box<RawValue>>,
}

/// Retained events after `since` (trusted only with its `epoch`).
#[utoipa::path(
    get,
    path = "/api/v1/topics/{topic}/events",
    tag = "history",
    params(
        super::TopicPath,
        ("since" = Option<u64>, Query, description = "Return events after this offset (default 0)", maximum = 9223372036854775807_u64),
        ("limit" = Option<u64>, Query, description = "At most this many events (1-1000, default 100), and at most limits.max_page_bytes of payloads; `more` says whether events follow", minimum = 1, maximum = 1000),
        ("epoch" = Option<String>, Query, description = "The epoch `since` belongs to", max_length = 64),
    ),
    responses(
        (status = 200, description = "Retained events", body = History),
        (status = 400, description = "Bad body or invalid topic", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token does not grant this topic", body = ErrorBody),
        (status = 404, description = "The topic keeps no history", body = ErrorBody),
        (status = 429, description = "More than limits.http_read_rate reads per second from this user; see Retry-After", body = ErrorBody),
        (status = 503, description = "The event store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn history(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if let Some(format) = Format::from_accept(req.headers()) {
        return super::stream::one_topic(&req, &path, state.into_inner(), format).await;
    }
    let (topic, query) = subscriber_read::<HistoryQuery>(&req, &path, &state)?;
    let since = query.since.unwrap_or(0);
    check_position(since, query.epoch.as_deref())?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    if !state.broker.retention().history(&topic) {
        return Err(ApiError::NoHistory(topic));
    }
    let store = state.broker.store();
    let head = store.head(&topic).await?;
    let plan = head.plan_replay(Some(since), query.epoch.as_deref());
    let after = plan.after.unwrap_or(head.last);
    let page = Page {
        events: limit,
        bytes: state.settings.limits.max_page_bytes,
    };
    // Up to the head: what was published after it waits for the next page.
    let mut range = store.range(&topic, after, head.last, page);
    let read = range.next().await?.unwrap_or_default();
    let events = read
        .iter()
        // A stored payload is valid JSON (the store checks it on reading),
        // so its frame is too; one that is not is skipped, never a panic.
        .filter_map(|e| {
            let frame = e.json_message().ok()?;
            RawValue::from_string(frame.to_string()).ok()
        })
        .collect();
    let more = range.more();
    drop(read);
    Ok(HttpResponse::Ok()
        // The same URL streams with another `Accept`.
        .insert_header((header::VARY, "Accept"))
        .json(History {
            topic: topic.as_str(),
            epoch: &head.epoch,
            offset: head.last,
            truncated: plan.truncated,
            more,
            events,
        }))
}
