//! Introspection for operators: `GET /api/v1/node` (admin token) and
//! `GET /api/v1/topics/{topic}` (a token that may publish to the topic, or
//! an admin token).

use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;

use super::{ApiError, ErrorBody, authenticate_read};
use crate::auth::{Action, Forbidden};
use crate::state::AppState;
use crate::store::Backend;
use crate::topic::Topic;

/// This node's identity and state.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct NodeInfo<'a> {
    node_id: &'a str,
    version: &'static str,
    uptime_seconds: u64,
    connections: usize,
    relay: &'static str,
    store: StoreInfo,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct StoreInfo {
    backend: &'static str,
    reachable: bool,
}

/// Node id, version, uptime, connections, relay and store state.
#[utoipa::path(
    get,
    path = "/api/v1/node",
    tag = "operations",
    responses(
        (status = 200, description = "This node", body = NodeInfo),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token lacks the admin claim", body = ErrorBody),
        (status = 429, description = "More than limits.http_read_rate reads per second from this user; see Retry-After", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn node(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grants = authenticate_read(&req, &state)?;
    if !grants.admin {
        return Err(
            Forbidden::new("node introspection needs a token with the `admin` claim").into(),
        );
    }
    let store = state.broker.store();
    Ok(HttpResponse::Ok().json(NodeInfo {
        node_id: &state.node_id,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        connections: state.connections.load(Ordering::Relaxed),
        relay: state.broker.relay_state().as_str(),
        store: StoreInfo {
            backend: match store.backend() {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            },
            reachable: store.ping().await.is_ok(),
        },
    }))
}

/// A topic as this node sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TopicInfo<'a> {
    topic: &'a str,
    history: bool,
    /// The last offset, for topics with history.
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
    /// Events retained in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    retained: Option<u64>,
    /// Connections on this node subscribed to the topic.
    local_subscribers: usize,
}

/// Last offset, retained count and local subscribers of a topic.
#[utoipa::path(
    get,
    path = "/api/v1/topics/{topic}",
    tag = "operations",
    params(super::TopicPath),
    responses(
        (status = 200, description = "The topic", body = TopicInfo),
        (status = 400, description = "Bad body or invalid topic", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token does not grant this topic", body = ErrorBody),
        (status = 429, description = "More than limits.http_read_rate reads per second from this user; see Retry-After", body = ErrorBody),
        (status = 503, description = "The event store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn topic(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grants = authenticate_read(&req, &state)?;
    let topic = Topic::parse(&path)?;
    if !grants.admin {
        grants.check(Action::Publish, &topic)?;
    }
    let history = state.broker.retention().history(&topic);
    let (offset, epoch, retained) = if history {
        let store = state.broker.store();
        let head = store.head(&topic).await?;
        (
            Some(head.last),
            Some(head.epoch),
            Some(store.retained(&topic).await?),
        )
    } else {
        (None, None, None)
    };
    Ok(HttpResponse::Ok().json(TopicInfo {
        topic: topic.as_str(),
        history,
        offset,
        epoch,
        retained,
        local_subscribers: state.broker.local_subscribers(&topic).await,
    }))
}
