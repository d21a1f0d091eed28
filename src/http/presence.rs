//! `GET /api/v1/topics/{topic}/presence?cursor=C&limit=N[&count_only=true]`:
//! a page of a topic's presence, under the same token rules as
//! subscribing.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{ApiError, ErrorBody, subscriber_read};
use crate::protocol::{PresencePageOut, PresenceQuery};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PresenceParams {
    cursor: Option<String>,
    limit: Option<u64>,
    count_only: Option<bool>,
}

/// A page of a topic's presence, as the WebSocket `presence` reply carries
/// it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Presence<'a> {
    topic: &'a str,
    #[serde(flatten)]
    page: PresencePageOut<'a>,
}

/// Who is in a topic: its members in `sub` order, a page at a time, with
/// the `seq` of the last presence change the page includes; or only their
/// count.
#[utoipa::path(
    get,
    path = "/api/v1/topics/{topic}/presence",
    tag = "presence",
    params(
        super::TopicPath,
        ("cursor" = Option<String>, Query, description = "The `cursor` of the previous page (opaque); from the first member when absent", max_length = 2048, pattern = "^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2,3})?$"),
        ("limit" = Option<u64>, Query, description = "At most this many members (1-1000, default 1000)", minimum = 1, maximum = 1000),
        ("count_only" = Option<bool>, Query, description = "Only the count (O(1)), no members"),
    ),
    responses(
        (status = 200, description = "A page of members, or the count", body = Presence),
        (status = 400, description = "Bad query or invalid topic", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token does not grant this topic", body = ErrorBody),
        (status = 404, description = "The topic keeps no presence (`presence_disabled`)", body = ErrorBody),
        (status = 429, description = "More than limits.http_read_rate reads per second from this user; see Retry-After", body = ErrorBody),
        (status = 503, description = "Presence is unavailable (Redis cannot be reached)", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn presence(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (topic, params) = subscriber_read::<PresenceParams>(&req, &path, &state)?;
    let query = PresenceQuery::parse(
        params.cursor.as_deref(),
        params.limit,
        params.count_only.unwrap_or(false),
    )
    .map_err(ApiError::BadRequest)?;
    if !state.broker.retention().presence(&topic) {
        return Err(ApiError::PresenceDisabled(topic));
    }
    let page = state.broker.presence().page(&topic, &query).await?;
    Ok(HttpResponse::Ok().json(Presence {
        topic: topic.as_str(),
        page: page.out(),
    }))
}
