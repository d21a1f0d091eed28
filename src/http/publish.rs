//! `POST /api/v1/topics/{topic}/events` and `POST /api/v1/events`.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Quota;
use super::{ApiError, ErrorBody, authenticate};
use crate::auth::Action;
use crate::auth::Grants;
use crate::broker::Transport;
use crate::payload::Payload;
use crate::protocol::{BASE64_LENIENT, check_key};
use crate::state::AppState;
use crate::store::{IdempotencyKey, NewEvent};
use crate::topic::Topic;

/// Reads the body, refusing it (413) as soon as it passes `limit` bytes.
async fn read_body(req: &HttpRequest, body: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match body.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!("cannot read body: {e}"))),
        Err(_) => Err(ApiError::PayloadTooLarge(limit)),
    }
}

/// What a single-event body is, by its `Content-Type`: the rule a curl
/// user would guess.
enum BodyKind {
    /// `application/json`, `application/*+json`: the event's JSON data.
    Json,
    /// `text/*`, `application/x-www-form-urlencoded` (curl's `-d`): the
    /// body as a JSON string (UTF-8).
    Text,
    /// Anything else, or no `Content-Type`: opaque bytes.
    Binary,
}

fn body_kind(req: &HttpRequest) -> Result<(BodyKind, String), ApiError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok((BodyKind::Binary, String::new()));
    };
    let text = value.to_str().unwrap_or_default().to_owned();
    let mime: mime::Mime = text
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("Content-Type {text:?} is not a media type")))?;
    let kind = if mime.type_() == mime::APPLICATION
        && (mime.subtype() == mime::JSON || mime.suffix() == Some(mime::JSON))
    {
        BodyKind::Json
    } else if mime.type_() == mime::TEXT
        || (mime.type_() == mime::APPLICATION && mime.subtype() == mime::WWW_FORM_URLENCODED)
    {
        let charset = mime.get_param(mime::CHARSET);
        if charset.is_some_and(|c| c != mime::UTF_8 && c != "us-ascii") {
            return Err(ApiError::BadRequest(format!(
                "Content-Type {text:?}: text bodies must be UTF-8"
            )));
        }
        BodyKind::Text
    } else {
        BodyKind::Binary
    };
    Ok((kind, mime.essence_str().to_owned()))
}

/// The event's payload from a single-event body, as its `Content-Type`
/// says; a body that is not what its type claims is refused, naming it.
fn payload_of(req: &HttpRequest, body: Bytes) -> Result<Payload, ApiError> {
    let (kind, media_type) = body_kind(req)?;
    match kind {
        BodyKind::Json => Payload::json_from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("body (Content-Type {media_type}): {e}"))),
        BodyKind::Text => {
            let text = std::str::from_utf8(&body).map_err(|_| {
                ApiError::BadRequest(format!(
                    "body is not UTF-8 text, as its Content-Type {media_type} says; \
                     send bytes as application/octet-stream"
                ))
            })?;
            let raw = serde_json::value::to_raw_value(text)
                .map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
            Payload::json(raw).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
        }
        BodyKind::Binary => Ok(Payload::Binary(body)),
    }
}

/// The `Idempotency-Key` header, checked, as `publisher`'s key.
fn idempotency_key(req: &HttpRequest, publisher: &str) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("Idempotency-Key is not ASCII".into()))?;
    check_key(key).map_err(ApiError::BadRequest)?;
    Ok(Some(IdempotencyKey {
        publisher: publisher.to_owned(),
        key: key.to_owned(),
    }))
}

/// Counts `events` against the user's `limits.http_publish_rate`.
fn take_quota(state: &AppState, grants: &Grants, events: usize) -> Result<(), ApiError> {
    let n = u32::try_from(events).unwrap_or(u32::MAX);
    super::take_quota(&state.http_publish_rate, Quota::Publish, grants, n)
}

/// A published event's place in its topic.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Published<'a> {
    topic: &'a str,
    offset: u64,
}

/// Publish one event. A JSON body (`application/json` or `application/*+json`)
/// is the event's data; a text body (`text/*`, or a form-encoded one as
/// `curl -d` sends) is a JSON string; any other body is a binary payload.
#[utoipa::path(
    post,
    path = "/api/v1/topics/{topic}/events",
    tag = "publish",
    params(super::TopicPath, ("Idempotency-Key" = Option<String>, Header, description = "Retries by the same publisher (token sub) with the same key on the same topic publish once", pattern = r"^[!-~]+$", min_length = 1, max_length = 255)),
    request_body(content(("application/json"), ("text/plain"), ("application/octet-stream")), description = "The event's data: JSON, UTF-8 text (sent as a JSON string) or bytes"),
    responses(
        (status = 201, description = "Committed and published", body = Published),
        (status = 400, description = "Bad body or invalid topic", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token does not grant this topic", body = ErrorBody),
        (status = 413, description = "Body larger than limits.max_payload_bytes", body = ErrorBody),
        (status = 408, description = "The body did not arrive within server.body_timeout; the connection closes", body = ErrorBody),
        (status = 429, description = "More than limits.http_publish_rate events per second from this user; see Retry-After", body = ErrorBody),
        (status = 503, description = "Relay or store unavailable; retry", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn publish_one(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grants = authenticate(&req, &state)?;
    let topic = Topic::parse(&path)?;
    grants.check(Action::Publish, &topic)?;
    let limit = state.settings.limits.max_payload_bytes;
    let body = read_body(&req, body, limit).await?;
    let payload = payload_of(&req, body)?;
    let key = idempotency_key(&req, &grants.sub)?;
    take_quota(&state, &grants, 1)?;
    let event = NewEvent {
        topic: topic.clone(),
        payload,
        key,
    };
    let offsets = state.broker.publish(vec![event], Transport::Http).await?;
    Ok(HttpResponse::Created().json(Published {
        topic: topic.as_str(),
        offset: offsets[0],
    }))
}

/// One item of a batch: `data` (JSON) or `data_b64` (binary).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    topic: String,
    #[serde(default, deserialize_with = "crate::protocol::present")]
    data: Option<Box<RawValue>>,
    /// Base64 bytes, for a binary payload.
    #[serde(default)]
    data_b64: Option<String>,
    /// Idempotency key of this event.
    #[serde(default)]
    key: Option<String>,
}

/// How a batch item is documented: exactly one of `data` or `data_b64`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documentation only; requests parse into `BatchItem`
pub(super) enum BatchItemDoc {
    Json(JsonItemDoc),
    Binary(BinaryItemDoc),
}

/// An event whose data is JSON.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct JsonItemDoc {
    #[schema(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 255)]
    topic: String,
    /// Any JSON value (`null` included).
    #[schema(value_type = Value)]
    data: (),
    #[schema(pattern = r"^[!-~]+$", min_length = 1, max_length = 255)]
    key: Option<String>,
}

/// An event whose data is bytes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct BinaryItemDoc {
    #[schema(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 255)]
    topic: String,
    /// Base64 (padding optional).
    #[schema(
        pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2,3})?$"
    )]
    data_b64: String,
    #[schema(pattern = r"^[!-~]+$", min_length = 1, max_length = 255)]
    key: Option<String>,
}

/// The offsets of a batch, in request order.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BatchPublished {
    offsets: Vec<u64>,
}

/// Publish a batch in order, all or nothing.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "publish",
    request_body(content = Vec<BatchItemDoc>, content_type = "application/json"),
    responses(
        (status = 201, description = "Every event committed and published", body = BatchPublished),
        (status = 400, description = "Bad body or invalid topic", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token does not grant this topic", body = ErrorBody),
        (status = 413, description = "Body larger than limits.max_batch_bytes, or an event above limits.max_payload_bytes", body = ErrorBody),
        (status = 408, description = "The body did not arrive within server.body_timeout; the connection closes", body = ErrorBody),
        (status = 429, description = "More than limits.http_publish_rate events per second from this user; see Retry-After", body = ErrorBody),
        (status = 503, description = "Relay or store unavailable; retry", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn publish_batch(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let grants = authenticate(&req, &state)?;
    let limits = &state.settings.limits;
    let body = read_body(&req, body, limits.max_batch_bytes).await?;
    let items: Vec<BatchItem> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be a JSON array of {{\"topic\", \"data\" | \"data_b64\"}}: {e}"
        ))
    })?;
    if items.len() > limits.max_batch_events {
        return Err(ApiError::BadRequest(format!(
            "batch has {} events; the limit is {} (limits.max_batch_events)",
            items.len(),
            limits.max_batch_events
        )));
    }
    // Check every item before publishing any: a batch is refused whole.
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |msg: String| ApiError::BadRequest(format!("event {i}: {msg}"));
        let topic = Topic::parse(&item.topic)?;
        grants.check(Action::Publish, &topic)?;
        let payload = match (item.data, item.data_b64) {
            (Some(data), None) => Payload::json(data).map_err(|e| at(format!("`data`: {e}")))?,
            (None, Some(b64)) => Payload::Binary(Bytes::from(
                BASE64_LENIENT
                    .decode(b64.as_bytes())
                    .map_err(|e| at(format!("`data_b64` is not base64: {e}")))?,
            )),
            _ => return Err(at("needs exactly one of `data` or `data_b64`".into())),
        };
        if payload.len() > limits.max_payload_bytes {
            return Err(ApiError::PayloadTooLarge(limits.max_payload_bytes));
        }
        if let Some(key) = &item.key {
            check_key(key).map_err(at)?;
        }
        events.push(NewEvent {
            topic,
            payload,
            key: item.key.map(|key| IdempotencyKey {
                publisher: grants.sub.clone(),
                key,
            }),
        });
    }
    take_quota(&state, &grants, events.len())?;
    let offsets = state.broker.publish(events, Transport::Http).await?;
    Ok(HttpResponse::Created().json(BatchPublished { offsets }))
}
