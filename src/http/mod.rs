//! The HTTP surface: publish API, health, and the one place where errors
//! become HTTP statuses and JSON bodies.

mod history;
mod introspect;
mod openapi;
pub mod pace;
mod presence;
mod publish;
mod stream;
pub mod ui;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;

use crate::auth::Grants;
use crate::auth::{AuthError, Forbidden};
use crate::broker::PublishError;
use crate::presence::PresenceError;
use crate::protocol::{ErrorCode, MAX_EPOCH_BYTES, MAX_OFFSET};
use crate::rate::PerUser;
use crate::state::{AppState, SlotError};
use crate::store::StoreError;
use crate::topic::{Topic, TopicError};

/// Registers the HTTP routes (the WebSocket route lives in `ws`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz", "GET").route(web::get().to(healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(readyz)))
        .service(resource("/api/v1/openapi.json", "GET").route(web::get().to(openapi::document)))
        .service(
            resource("/api/v1/topics/{topic}/events", "GET, POST")
                .route(web::post().to(publish::publish_one))
                .route(web::get().to(history::history)),
        )
        .service(
            resource("/api/v1/topics/{topic}/presence", "GET")
                .route(web::get().to(presence::presence)),
        )
        .service(resource("/api/v1/stream", "GET").route(web::get().to(stream::many_topics)))
        .service(resource("/api/v1/events", "POST").route(web::post().to(publish::publish_batch)))
        .service(resource("/api/v1/node", "GET").route(web::get().to(introspect::node)))
        .service(resource("/api/v1/topics/{topic}", "GET").route(web::get().to(introspect::topic)));
}

/// A route whose other methods answer 405 with `Allow: {allow}` (rather
/// than 404).
pub(crate) fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow))
    }))
}

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = Status)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

/// Ready when the node can publish and receive events (in cluster mode:
/// when its Redis relay is connected). Load balancers route on this.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "The Redis relay is not connected", body = ErrorBody),
    ),
)]
async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.broker.is_ready() {
        Ok(HttpResponse::Ok().json(Status { status: "ready" }))
    } else {
        Err(ApiError::Unavailable(PublishError::NotReady))
    }
}

/// `GET /metrics`, on the main address or on `metrics.bind`.
pub fn metrics_route(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics", "GET").route(web::get().to(metrics)));
}

/// Prometheus text exposition of the process's metrics.
async fn metrics() -> HttpResponse {
    let handle = crate::telemetry::metrics();
    handle.run_upkeep();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

/// Answers every unknown route.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// Every way an HTTP request (or a WebSocket handshake) can be refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    #[error("origin {0:?} is not in server.allowed_origins")]
    OriginNotAllowed(String),
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    #[error("{0}")]
    BadRequest(String),
    #[error("body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error(transparent)]
    Unavailable(#[from] PublishError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("topic \"{0}\" keeps no history (history = false in its retention rule)")]
    NoHistory(Topic),
    #[error("topic \"{0}\" keeps no presence (set presence = true in its [[topics]] rule)")]
    PresenceDisabled(Topic),
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error(transparent)]
    NoSlot(#[from] SlotError),
    /// Past `limits.http_publish_rate`; `retry_after` is `None` when the
    /// request alone is more than the burst.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    #[error("unsupported WebSocket version: this server speaks version 13 (RFC 6455)")]
    UnsupportedWebSocketVersion,
    #[error("no such route")]
    NotFound,
    #[error("this route takes {0}")]
    MethodNotAllowed(&'static str),
    #[error("a stream may hold {0} topics (limits.max_subscriptions)")]
    TooManyTopics(usize),
    #[error("the request body did not arrive within server.body_timeout")]
    BodyTimeout,
}

impl ApiError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::OriginNotAllowed(_) | ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::InvalidTopic(_) => ErrorCode::InvalidTopic,
            ApiError::BadRequest(_) | ApiError::UnsupportedWebSocketVersion => {
                ErrorCode::BadRequest
            }
            ApiError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::Unavailable(_)
            | ApiError::Store(_)
            | ApiError::Presence(_)
            | ApiError::NoSlot(SlotError::Node(_)) => ErrorCode::Unavailable,
            ApiError::PresenceDisabled(_) => ErrorCode::PresenceDisabled,
            ApiError::NoSlot(SlotError::User(_)) => ErrorCode::TooManyConnections,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::NotFound | ApiError::NoHistory(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ApiError::TooManyTopics(_) => ErrorCode::TooManySubscriptions,
            ApiError::BodyTimeout => ErrorCode::RequestTimeout,
        }
    }
}

/// The `{topic}` path parameter, documented once for every route.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documentation only; handlers take `web::Path<String>`
pub(crate) struct TopicPath {
    /// An exact topic: dot-separated segments of [A-Za-z0-9_-], at most 255 bytes.
    #[param(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 255)]
    topic: String,
}

/// Every error reply: a code (see docs/protocol.md) and a message.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: &'static str,
    message: &'a str,
    /// The topic refused, when the token does not grant one.
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
}

/// `{"status": "ok"}` / `{"status": "ready"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Status {
    status: &'static str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        if let ApiError::UnsupportedWebSocketVersion = self {
            return StatusCode::UPGRADE_REQUIRED;
        }
        match self.code() {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::BadRequest | ErrorCode::InvalidTopic => StatusCode::BAD_REQUEST,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RateLimited | ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManySubscriptions => StatusCode::BAD_REQUEST,
            ErrorCode::PresenceDisabled => StatusCode::NOT_FOUND,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let message = match self {
            // A database's error text names hosts, users and tables: the
            // client gets an id to quote, the log gets the details.
            ApiError::Store(e) => {
                let id = format!("{:016x}", rand::random::<u64>());
                tracing::error!(error_id = %id, error = %e, "request failed in the event store");
                format!("the event store is unavailable; retry (error id {id})")
            }
            _ => self.to_string(),
        };
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized(_) => {
                response
                    .insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::MethodNotAllowed(allow) => {
                response.insert_header((header::ALLOW, HeaderValue::from_static(allow)));
            }
            ApiError::RateLimited {
                retry_after: Some(wait),
                ..
            } => {
                // Whole seconds, rounded up (RFC 9110 §10.2.3).
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response.insert_header((header::RETRY_AFTER, secs.max(1)));
            }
            ApiError::UnsupportedWebSocketVersion => {
                response.insert_header((
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                ));
            }
            _ => {}
        }
        let topic = match self {
            ApiError::Forbidden(refused) => refused.topic().map(Topic::as_str),
            _ => None,
        };
        response.json(ErrorBody {
            error: self.code().as_str(),
            message: &message,
            topic,
        })
    }
}

/// Checks a resume position from a query (history, streams): `since`
/// within what any log reaches, `epoch` no longer than an epoch is.
pub(crate) fn check_position(since: u64, epoch: Option<&str>) -> Result<(), ApiError> {
    if epoch.is_some_and(|e| e.len() > MAX_EPOCH_BYTES) {
        return Err(ApiError::BadRequest(format!(
            "epoch must be at most {MAX_EPOCH_BYTES} bytes"
        )));
    }
    if since > MAX_OFFSET {
        return Err(ApiError::BadRequest(format!(
            "since must be at most {MAX_OFFSET}"
        )));
    }
    Ok(())
}

/// What a per-user rate limits on HTTP.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Quota {
    /// Events published (`limits.http_publish_rate`); a batch counts its
    /// events.
    Publish,
    /// Reads: history, presence, introspection (`limits.http_read_rate`).
    Read,
}

/// Takes `n` from the bucket of `limit` that the holder of `grants` has,
/// at the rate its token sets or else the node's, or says when to retry.
pub(crate) fn take_quota(
    limit: &PerUser,
    quota: Quota,
    grants: &Grants,
    n: u32,
) -> Result<(), ApiError> {
    let (what, setting, own) = match quota {
        Quota::Publish => (
            "events",
            "limits.http_publish_rate",
            grants.limits.http_publish_rate,
        ),
        Quota::Read => (
            "reads",
            "limits.http_read_rate",
            grants.limits.http_read_rate,
        ),
    };
    let rate = own.unwrap_or(limit.rate());
    limit.try_take(&grants.sub, rate, n).map_err(|retry_after| {
        let message = match retry_after {
            Some(_) => format!(
                "more than {rate} {what} per second from this user \
                 ({setting}); retry after Retry-After seconds"
            ),
            None => format!(
                "a batch of {n} {what} is more than {setting} \
                 ({rate} per second) allows at once; send smaller batches"
            ),
        };
        ApiError::RateLimited {
            message,
            retry_after,
        }
    })
}

/// Verifies the request's bearer token for a read, and counts the read
/// toward the user's `limits.http_read_rate`.
pub(crate) fn authenticate_read(req: &HttpRequest, state: &AppState) -> Result<Grants, ApiError> {
    let grants = authenticate(req, state)?;
    take_quota(&state.http_read_rate, Quota::Read, &grants, 1)?;
    Ok(grants)
}

/// Verifies the request's bearer token.
pub(crate) fn authenticate(req: &HttpRequest, state: &AppState) -> Result<Grants, ApiError> {
    let token = bearer_token(req.headers())?.ok_or(AuthError::MissingBearer)?;
    Ok(state.verifier.verify(token)?)
}

/// What a request that reads a topic as a subscriber would (history,
/// presence) carries: a token granting to subscribe to the path's topic,
/// and a query string of the fields `Q` names.
pub(crate) fn subscriber_read<Q: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    path: &str,
    state: &AppState,
) -> Result<(Topic, Q), ApiError> {
    let grants = authenticate_read(req, state)?;
    let topic = Topic::parse(path)?;
    grants.check(crate::auth::Action::Subscribe, &topic)?;
    let query = web::Query::<Q>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
    Ok((topic, query))
}

/// The token from `Authorization: Bearer <jwt>`, if that header is present.
pub(crate) fn bearer_token(headers: &header::HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(AuthError::Malformed(
            "Authorization header must be `Bearer <jwt>`".into(),
        )),
    }
}

/// Refuses browser handshakes and streams from origins not listed in
/// `server.allowed_origins` (cross-site WebSocket hijacking; a stream
/// refused before it holds a slot). Requests
/// without an `Origin` header come from non-browser clients and pass.
pub(crate) fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if origin_listed(allowed, origin.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::OriginNotAllowed(origin.to_owned()))
    }
}

/// Whether `origin` is one of `server.allowed_origins` (case aside).
fn origin_listed(allowed: &[String], origin: &[u8]) -> bool {
    allowed
        .iter()
        .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
}

/// How long a browser may cache a preflight's answer.
const CORS_MAX_AGE_SECS: usize = 3600;

/// Cross-origin access for browser apps served from other origins (the JS
/// client's stream and HTTP publishing, `EventSource`, `fetch`): the API
/// under `/api/` and the client itself (`/herald.js`), from the origins in
/// `server.allowed_origins`, any when it is empty. Operations routes
/// (`/metrics`, health) stay same-origin: a page elsewhere cannot read
/// them. Tokens travel in headers or the query, never in cookies, so no
/// credentials are allowed. A request from another origin is still served
/// (the browser withholds the answer); streams and WebSockets refuse it
/// themselves.
pub fn cors(allowed: &[String]) -> actix_cors::Cors {
    let allowed = allowed.to_vec();
    actix_cors::Cors::default()
        .allowed_origin_fn(move |origin, head| {
            let path = head.uri.path();
            // `/ws` too: a client whose WebSocket failed asks it over
            // HTTP why (a refused token answers 401 with the reason).
            let shared = path.starts_with("/api/") || path == ui::CLIENT_PATH || path == "/ws";
            shared && (allowed.is_empty() || origin_listed(&allowed, origin.as_bytes()))
        })
        .allowed_methods(["GET", "POST"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(CORS_MAX_AGE_SECS)
        .block_on_origin_mismatch(false)
}

/// Turns actix's own extractor failures (bad JSON, bad path, bad query) into
/// Herald's JSON error body.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .error_handler(|err, _req| ApiError::BadRequest(err.to_string()).into())
}
