//! The WebSocket endpoint, `GET /ws`: the handshake (origin, token,
//! sub-protocol) here, the life of an accepted connection in [`session`].

mod rate;
mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::auth::AuthError;
use crate::http::{ApiError, bearer_token};
use crate::protocol::{Encoding, JSON_PROTOCOL, MSGPACK_PROTOCOL};
use crate::startup::AppState;
use crate::telemetry::names;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::http::resource("/ws", "GET").route(web::get().to(handshake)));
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Counts and logs every handshake's outcome; refusals with their reason
/// (never the token).
async fn handshake(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = accept(&req, body, state).await;
    match &result {
        Ok(_) => metrics::counter!(names::HANDSHAKES, "result" => "accepted").increment(1),
        Err(e) => {
            let reason = e.code().as_str();
            metrics::counter!(names::HANDSHAKES, "result" => "refused", "reason" => reason)
                .increment(1);
            tracing::info!(peer = ?req.peer_addr(), reason, detail = %e, "handshake refused");
        }
    }
    result
}

async fn accept(
    req: &HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let req = req.clone();
    check_origin(&req, &state.settings.server.allowed_origins)?;
    // Browsers cannot set headers on a WebSocket, hence the query parameter.
    let query = web::Query::<TokenQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let token = match bearer_token(&req)? {
        Some(token) => token,
        None => query.token.as_deref().ok_or(AuthError::Missing)?,
    };
    let grants = state.verifier.verify(token)?;
    let encoding = negotiate(&req)?;
    let slot = ConnectionSlot::acquire(&state)?;

    let (response, ws_session, stream) =
        actix_ws::handle_with_protocols(&req, body, &[JSON_PROTOCOL, MSGPACK_PROTOCOL])
            .map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}")))?;
    let peer = req.peer_addr();
    session::spawn(
        state.into_inner(),
        slot,
        grants,
        encoding,
        ws_session,
        stream,
        peer,
    );
    Ok(response)
}

/// One place under `limits.max_connections`, given back when dropped.
pub(crate) struct ConnectionSlot(Arc<AppState>);

impl ConnectionSlot {
    fn acquire(state: &web::Data<AppState>) -> Result<ConnectionSlot, ApiError> {
        let max = state.settings.limits.max_connections;
        if state.connections.fetch_add(1, Ordering::Relaxed) >= max {
            state.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::TooManyConnections(max));
        }
        metrics::gauge!(names::CONNECTIONS).increment(1.0);
        Ok(ConnectionSlot(state.clone().into_inner()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(names::CONNECTIONS).decrement(1.0);
    }
}

/// Refuses browser handshakes from origins not listed in
/// `server.allowed_origins` (cross-site WebSocket hijacking). Requests
/// without an `Origin` header come from non-browser clients and pass.
fn check_origin(req: &HttpRequest, allowed: &[String]) -> Result<(), ApiError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(ApiError::OriginNotAllowed(origin.to_owned()))
    }
}

/// Picks the encoding from `Sec-WebSocket-Protocol`: JSON when the client
/// names none, the first Herald protocol it names otherwise.
fn negotiate(req: &HttpRequest) -> Result<Encoding, ApiError> {
    let mut offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(Encoding::Json);
    }
    offered
        .find_map(Encoding::from_protocol_name)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no supported sub-protocol offered; use {JSON_PROTOCOL} or {MSGPACK_PROTOCOL}"
            ))
        })
}
