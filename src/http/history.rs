//! `GET /api/v1/topics/{topic}/events?since=N&limit=M[&epoch=E]`: retained
//! events, under the same token rules as subscribing.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ApiError, authenticate};
use crate::auth::Action;
use crate::startup::AppState;
use crate::topic::Topic;

/// Events returned when `limit` is not given.
pub const DEFAULT_LIMIT: u64 = 100;
/// Most events one request returns.
pub const MAX_LIMIT: u64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<u64>,
    limit: Option<u64>,
    epoch: Option<String>,
}

#[derive(Serialize)]
struct History<'a> {
    topic: &'a str,
    epoch: &'a str,
    /// The topic's last offset.
    offset: u64,
    truncated: bool,
    /// Event frames, exactly as a WebSocket client receives them.
    events: Vec<Box<RawValue>>,
}

pub(super) async fn history(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grants = authenticate(&req, &state)?;
    let topic = Topic::parse(&path)?;
    grants.check(Action::Subscribe, &topic)?;
    let query = web::Query::<HistoryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
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
    let plan = head.plan_replay(Some(query.since.unwrap_or(0)), query.epoch.as_deref());
    let after = plan.after.unwrap_or(head.last);
    let events = store
        .read(&topic, after, limit)
        .await?
        .iter()
        .filter(|e| e.offset <= head.last)
        // An event frame is JSON written by serde_json, so it parses.
        .map(|e| RawValue::from_string(e.json_frame().to_string()).expect("event frames are JSON"))
        .collect();
    Ok(HttpResponse::Ok().json(History {
        topic: topic.as_str(),
        epoch: &head.epoch,
        offset: head.last,
        truncated: plan.truncated,
        events,
    }))
}
