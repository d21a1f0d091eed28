//! The WebSocket endpoint, `GET /ws`: the handshake (origin, token,
//! sub-protocol) here, the frames on the wire in [`socket`], the life of an
//! accepted connection in [`session`].
//!
//! A WebSocket handshake does not go through actix-web's router: the HTTP/1
//! dispatcher hands every request that asks for `Upgrade: websocket`, with
//! its connection, to [`upgrade`]. Herald then owns the socket, and the
//! connection's one task reads and writes it directly: no per-connection
//! HTTP buffers, no channel between the session and the socket. A `GET /ws`
//! without the upgrade goes through the router to [`not_upgraded`], which
//! runs the same checks and answers 400.

mod close;
mod session;
mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_codec::{Encoder, Framed};
use actix_http::body::BodySize;
use actix_http::h1;
use actix_http::ws::{HandshakeError, handshake_response, verify_handshake};
use actix_http::{ConnectionType, Method, Request, RequestHead, Response};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::{AuthError, Grants};
use crate::http::{ApiError, bearer_token, check_origin};
use crate::protocol::{Encoding, JSON_PROTOCOL, MSGPACK_PROTOCOL};
use crate::stall::Paced;
use crate::state::{AppState, ConnectionSlot};
use crate::telemetry::names;
pub use close::CloseCause;
pub use socket::LINGER;
use socket::Socket;
pub use socket::WsError;

/// The WebSocket route.
const PATH: &str = "/ws";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::http::resource(PATH, "GET").route(web::get().to(not_upgraded)));
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// What an accepted handshake starts the connection with.
struct Admitted {
    grants: Grants,
    encoding: Encoding,
    /// Whether the client named a sub-protocol (then the 101 names ours).
    named_protocol: bool,
    slot: ConnectionSlot,
}

/// `GET /ws` without `Upgrade: websocket`: the checks a handshake would
/// get, then 400, since nothing can be upgraded.
async fn not_upgraded(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = admit(&state.into_inner(), req.head()).and_then(|_| {
        // The dispatcher diverts `Upgrade: websocket` exactly; an upgrade
        // header this loose passed `admit` without being one.
        Err(ApiError::BadRequest(
            "not a WebSocket handshake: expected `Upgrade: websocket`".into(),
        ))
    });
    record(&result, req.peer_addr());
    result
}

/// Serves a connection that asked for `Upgrade: websocket`: answers the
/// handshake and, once accepted, runs the session on this same task until
/// the connection ends. Every error is answered on the connection itself.
pub async fn upgrade(
    state: Arc<AppState>,
    req: Request,
    framed: Framed<Paced<TcpStream>, h1::Codec>,
) -> Result<(), actix_web::Error> {
    // Out of the HTTP dispatcher, only this bounds how long a client may
    // take to read the handshake's answer.
    let limit = state.settings.server.handshake_timeout;
    // Both boxed: the handshake's state is freed once it is done, and the
    // session, held for the connection's whole life, gets a box of its own
    // size rather than a share of the HTTP dispatcher's.
    let handshake = tokio::time::timeout(limit, Box::pin(handshake(state, req, framed)));
    if let Ok(Some(accepted)) = handshake.await {
        Box::pin(session::run(accepted)).await;
    }
    Ok(())
}

/// A connection past its 101.
struct Accepted {
    state: Arc<AppState>,
    admitted: Admitted,
    socket: Socket,
    peer: Option<SocketAddr>,
}

/// Answers the handshake: the 101, or the refusal (then ends the
/// connection).
async fn handshake(
    state: Arc<AppState>,
    req: Request,
    framed: Framed<Paced<TcpStream>, h1::Codec>,
) -> Option<Accepted> {
    let head = req.head();
    let peer = head.peer_addr;
    let admitted = if head.uri.path() != PATH {
        Err(ApiError::NotFound)
    } else if head.method != Method::GET {
        Err(ApiError::MethodNotAllowed("GET"))
    } else {
        let admitted = admit(&state, head);
        record(&admitted, peer);
        admitted
    };
    // The socket leaves the HTTP wrapper: the session bounds its own writes.
    let mut parts = framed.into_parts();
    let mut io = parts.io.into_inner();
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(e) => {
            let (res, body) = e.error_response().into_parts();
            if let Ok(body) = actix_web::body::to_bytes(body).await {
                let mut res: Response<()> = res.into();
                res.head_mut().set_connection_type(ConnectionType::Close);
                let _ = parts.codec.encode(
                    h1::Message::Item((res, BodySize::Sized(body.len() as u64))),
                    &mut parts.write_buf,
                );
                if head.method != Method::HEAD {
                    parts.write_buf.extend_from_slice(&body);
                }
            }
            socket::refuse(io, &parts.write_buf).await;
            return None;
        }
    };
    let mut res = handshake_response(head);
    if admitted.named_protocol {
        res.insert_header((
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(admitted.encoding.protocol_name()),
        ));
    }
    parts
        .codec
        .encode(
            h1::Message::Item((res.finish().drop_body(), BodySize::None)),
            &mut parts.write_buf,
        )
        .ok()?;
    io.write_all(&parts.write_buf).await.ok()?;
    let limits = &state.settings.limits;
    let budget = socket::Budget::new(limits, session::max_message(limits));
    let socket = Socket::new(io, parts.read_buf, budget);
    Some(Accepted {
        state,
        admitted,
        socket,
        peer,
    })
}

/// Every check a handshake must pass before the 101, in order.
fn admit(state: &Arc<AppState>, head: &RequestHead) -> Result<Admitted, ApiError> {
    let headers = head.headers();
    check_origin(headers, &state.settings.server.allowed_origins)?;
    // Browsers cannot set headers on a WebSocket, hence the query parameter.
    let query = web::Query::<TokenQuery>::from_query(head.uri.query().unwrap_or_default())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let token = match bearer_token(headers)? {
        Some(token) => token,
        None => query.token.as_deref().ok_or(AuthError::Missing)?,
    };
    let grants = state.verifier.verify(token)?;
    let (encoding, named_protocol) = negotiate(headers)?;
    let slot = ConnectionSlot::acquire(state, &grants)?;
    verify_handshake(head).map_err(|e| match e {
        // RFC 6455 §4.2.2: name the version this server speaks.
        HandshakeError::NoVersionHeader | HandshakeError::UnsupportedVersion => {
            ApiError::UnsupportedWebSocketVersion
        }
        other => ApiError::BadRequest(format!("not a WebSocket handshake: {other}")),
    })?;
    Ok(Admitted {
        grants,
        encoding,
        named_protocol,
        slot,
    })
}

/// Counts and logs every handshake's outcome; refusals with their reason
/// (never the token).
fn record<T>(result: &Result<T, ApiError>, peer: Option<SocketAddr>) {
    match result {
        Ok(_) => metrics::counter!(names::HANDSHAKES, "result" => "accepted").increment(1),
        Err(e) => {
            let reason = e.code().as_str();
            metrics::counter!(names::HANDSHAKES, "result" => "refused", "reason" => reason)
                .increment(1);
            tracing::info!(?peer, reason, detail = %e, "handshake refused");
        }
    }
}

/// Picks the encoding from `Sec-WebSocket-Protocol`: JSON when the client
/// names none, the first Herald protocol it names otherwise. Also says
/// whether it named any.
fn negotiate(headers: &HeaderMap) -> Result<(Encoding, bool), ApiError> {
    let mut offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok((Encoding::Json, false));
    }
    offered
        .find_map(Encoding::from_protocol_name)
        .map(|encoding| (encoding, true))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no supported sub-protocol offered; use {JSON_PROTOCOL} or {MSGPACK_PROTOCOL}"
            ))
        })
}
