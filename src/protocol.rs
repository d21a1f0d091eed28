//! The WebSocket wire protocol: client operations, server frames, their two
//! encodings (`herald.json` text frames, `herald.msgpack` binary frames),
//! error codes and close codes.
//!
//! Both encodings carry the same fields. A binary payload travels as
//! `data_b64` (base64) in JSON frames and as a MessagePack `bin` in `data`
//! in MessagePack frames. See `docs/protocol.md` for examples.

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as BASE64};
use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use actix_http::ws::{OpCode, Parser};
use bytes::BytesMut;

use crate::payload::{self, Payload, Transcoded};
use crate::topic::{Topic, TopicError};

/// Decodes `data_b64` as clients write it: padded or not, and with any
/// trailing bits (encoding always writes canonical, padded base64).
pub(crate) const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Sub-protocol name of the JSON encoding (the default).
pub const JSON_PROTOCOL: &str = "herald.json";
/// Sub-protocol name of the MessagePack encoding.
pub const MSGPACK_PROTOCOL: &str = "herald.msgpack";

/// The close code Herald sends when a token's `exp` passed and no
/// `refresh` replaced it (the others are RFC 6455's; every code a node
/// sends is listed by `ws::CloseCause::codes`).
pub const TOKEN_EXPIRED: u16 = 4001;

/// How frames are encoded on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    pub fn protocol_name(self) -> &'static str {
        match self {
            Encoding::Json => JSON_PROTOCOL,
            Encoding::MsgPack => MSGPACK_PROTOCOL,
        }
    }

    pub fn from_protocol_name(name: &str) -> Option<Encoding> {
        match name {
            JSON_PROTOCOL => Some(Encoding::Json),
            MSGPACK_PROTOCOL => Some(Encoding::MsgPack),
            _ => None,
        }
    }
}

/// The `code` of an `error` frame (and of HTTP error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    InvalidTopic,
    PayloadTooLarge,
    RateLimited,
    TooManySubscriptions,
    TooManyConnections,
    NotFound,
    MethodNotAllowed,
    Unavailable,
    PresenceDisabled,
}

impl ErrorCode {
    /// Every code, for documentation checks.
    pub const ALL: &[ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::InvalidTopic,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::TooManySubscriptions,
        ErrorCode::TooManyConnections,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unavailable,
        ErrorCode::PresenceDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::PresenceDisabled => "presence_disabled",
        }
    }
}

/// A request from a client, decoded and with its topic parsed.
#[derive(Debug)]
pub enum ClientOp {
    Subscribe {
        id: Option<u64>,
        topic: Topic,
        /// Replay retained events after this offset first.
        since: Option<u64>,
        /// The epoch `since` belongs to.
        epoch: Option<String>,
        /// `true`: join the topic's presence and receive its
        /// `presence_diff`s; `false`: leave them, staying subscribed;
        /// absent: as it was.
        presence: Option<bool>,
    },
    Unsubscribe {
        id: Option<u64>,
        topic: Topic,
    },
    Publish {
        id: Option<u64>,
        topic: Topic,
        payload: Payload,
        /// Idempotency key: a retry with the same key publishes nothing new.
        key: Option<String>,
    },
    Ping {
        id: Option<u64>,
    },
    /// Replace the connection's token (and grants) before it expires.
    Refresh {
        id: Option<u64>,
        token: String,
    },
    /// A page of a topic's presence, or only its member count.
    Presence {
        id: Option<u64>,
        topic: Topic,
        query: PresenceQuery,
    },
}

/// Which page of a topic's presence a client asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceQuery {
    /// The page after this `sub` (a decoded cursor); from the start when
    /// `None`.
    pub after: Option<String>,
    /// Most members on the page (at most [`MAX_PRESENCE_PAGE`]).
    pub limit: usize,
    /// Only the count, no members.
    pub count_only: bool,
}

/// Most members on one page of presence.
pub const MAX_PRESENCE_PAGE: usize = 1000;

/// Longest cursor a client may send back, in bytes.
pub const MAX_CURSOR_BYTES: usize = 2048;

impl PresenceQuery {
    /// Checks what a client sent: `cursor` (as Herald returned it),
    /// `limit` (1 to [`MAX_PRESENCE_PAGE`], that by default) and
    /// `count_only`.
    pub fn parse(
        cursor: Option<&str>,
        limit: Option<u64>,
        count_only: bool,
    ) -> Result<PresenceQuery, String> {
        let limit = match limit {
            None => MAX_PRESENCE_PAGE,
            Some(n) if (1..=MAX_PRESENCE_PAGE as u64).contains(&n) => n as usize,
            Some(_) => return Err(format!("`limit` must be 1 to {MAX_PRESENCE_PAGE}")),
        };
        let after = match cursor {
            None | Some("") => None,
            Some(c) if c.len() > MAX_CURSOR_BYTES => return Err("`cursor` is too long".into()),
            Some(c) => {
                Some(decode_cursor(c).ok_or("`cursor` is not one Herald returned (base64url)")?)
            }
        };
        Ok(PresenceQuery {
            after,
            limit,
            count_only,
        })
    }
}

/// A presence page's `cursor`: the last `sub` on it, opaque to clients
/// (base64url, unpadded: safe in a URL as it is).
pub fn encode_cursor(sub: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sub)
}

/// What [`CURSOR_PATTERN`] admits is a cursor: a page starting after the
/// text it decodes to (any bytes that are not UTF-8 replaced), a place
/// among the `sub`s even if it is not one of them.
fn decode_cursor(cursor: &str) -> Option<String> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    let bytes = LENIENT.decode(cursor).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The cursors [`PresenceQuery::parse`] takes: unpadded base64url.
pub const CURSOR_PATTERN: &str = "^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2,3})?$";

impl ClientOp {
    /// The request's `id`, which its reply or error frame carries.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientOp::Subscribe { id, .. }
            | ClientOp::Unsubscribe { id, .. }
            | ClientOp::Publish { id, .. }
            | ClientOp::Ping { id }
            | ClientOp::Refresh { id, .. }
            | ClientOp::Presence { id, .. } => *id,
        }
    }
}

/// A client frame that could not be turned into a [`ClientOp`].
#[derive(Debug)]
pub struct DecodeError {
    /// The request's `id`, when it could be read.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn bad_request(id: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// The fields any client frame may carry; `D` is how `data` is held in the
/// frame's encoding. Unknown fields are ignored (forward compatibility).
#[derive(Deserialize)]
#[serde(bound(deserialize = "D: Deserialize<'de>"))]
struct WireOp<D> {
    op: String,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "Option::default", deserialize_with = "present")]
    data: Option<D>,
    #[serde(default)]
    data_b64: Option<String>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    presence: Option<bool>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    count_only: Option<bool>,
}

/// Largest offset a client may name (`since`): offsets are stored as
/// signed 64-bit integers.
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// Longest epoch a client may send back, in bytes.
pub const MAX_EPOCH_BYTES: usize = 64;

/// Checks an idempotency key: 1 to 255 visible ASCII characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "idempotency key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"
        ));
    }
    Ok(())
}

/// Just the `id`, read again from a frame that failed to decode, so the
/// error reply can still be correlated.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<u64>,
}

/// Deserializes a field that is present as `Some`, even when it is `null`,
/// so that `"data": null` is a (null) payload rather than a missing one.
pub(crate) fn present<'de, De: Deserializer<'de>, T: Deserialize<'de>>(
    d: De,
) -> Result<Option<T>, De::Error> {
    T::deserialize(d).map(Some)
}

/// Decodes one client frame in the connection's encoding.
pub fn decode(encoding: Encoding, frame: &[u8]) -> Result<ClientOp, DecodeError> {
    match encoding {
        Encoding::Json => match serde_json::from_slice::<WireOp<Box<RawValue>>>(frame) {
            Ok(wire) => wire.into_op(Payload::json),
            Err(e) => {
                let id = serde_json::from_slice::<IdOnly>(frame)
                    .ok()
                    .and_then(|i| i.id);
                Err(DecodeError::bad_request(id, format!("invalid frame: {e}")))
            }
        },
        Encoding::MsgPack => {
            // Read with a depth limit first: deserializing nested values
            // straight from the bytes recurses without one. rmpv counts
            // about two steps per level (and more at strings), so this
            // bounds the stack only; the payload's own nesting is checked
            // against MAX_NESTING in `Payload::from_msgpack`.
            let value =
                rmpv::decode::read_value_with_max_depth(&mut &frame[..], MSGPACK_READ_DEPTH)
                    .map_err(|e| DecodeError::bad_request(None, format!("invalid frame: {e}")))?;
            let id = value
                .as_map()
                .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("id")))
                .and_then(|(_, v)| v.as_u64());
            match rmpv::ext::from_value::<WireOp<rmpv::Value>>(value) {
                Ok(wire) => wire.into_op(Payload::from_msgpack),
                Err(e) => Err(DecodeError::bad_request(id, format!("invalid frame: {e}"))),
            }
        }
    }
}

use crate::payload::MAX_NESTING;

/// rmpv's depth budget for a MessagePack frame: room for the frame and a
/// payload at [`MAX_NESTING`], in rmpv's own steps.
const MSGPACK_READ_DEPTH: usize = 4 * (MAX_NESTING + 2);

impl<D> WireOp<D> {
    fn into_op(
        self,
        to_payload: impl FnOnce(D) -> Result<Payload, payload::PayloadError>,
    ) -> Result<ClientOp, DecodeError> {
        let id = self.id;
        let topic = |t: Option<String>| -> Result<Topic, DecodeError> {
            let t = t.ok_or_else(|| DecodeError::bad_request(id, "missing field `topic`"))?;
            Topic::parse(&t).map_err(|e: TopicError| DecodeError {
                id,
                code: ErrorCode::InvalidTopic,
                message: e.to_string(),
            })
        };
        match self.op.as_str() {
            "subscribe" => {
                if self
                    .epoch
                    .as_ref()
                    .is_some_and(|e| e.len() > MAX_EPOCH_BYTES)
                {
                    return Err(DecodeError::bad_request(id, "`epoch` is too long"));
                }
                if self.since.is_some_and(|s| s > MAX_OFFSET) {
                    return Err(DecodeError::bad_request(
                        id,
                        "`since` is larger than any offset",
                    ));
                }
                Ok(ClientOp::Subscribe {
                    id,
                    topic: topic(self.topic)?,
                    since: self.since,
                    epoch: self.epoch,
                    presence: self.presence,
                })
            }
            "unsubscribe" => Ok(ClientOp::Unsubscribe {
                id,
                topic: topic(self.topic)?,
            }),
            "publish" => {
                let topic = topic(self.topic)?;
                if let Some(key) = &self.key {
                    check_key(key).map_err(|m| DecodeError::bad_request(id, m))?;
                }
                let payload = match (self.data, self.data_b64) {
                    (Some(_), Some(_)) => {
                        return Err(DecodeError::bad_request(
                            id,
                            "send either `data` or `data_b64`, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(DecodeError::bad_request(
                            id,
                            "missing field `data` (or `data_b64` for binary)",
                        ));
                    }
                    (Some(data), None) => to_payload(data)
                        .map_err(|e| DecodeError::bad_request(id, format!("`data`: {e}")))?,
                    (None, Some(b64)) => Payload::Binary(
                        BASE64_LENIENT
                            .decode(b64.as_bytes())
                            .map(Bytes::from)
                            .map_err(|e| {
                                DecodeError::bad_request(
                                    id,
                                    format!("`data_b64` is not base64: {e}"),
                                )
                            })?,
                    ),
                };
                Ok(ClientOp::Publish {
                    id,
                    topic,
                    payload,
                    key: self.key,
                })
            }
            "ping" => Ok(ClientOp::Ping { id }),
            "presence" => {
                let query = PresenceQuery::parse(
                    self.cursor.as_deref(),
                    self.limit,
                    self.count_only.unwrap_or(false),
                )
                .map_err(|m| DecodeError::bad_request(id, m))?;
                Ok(ClientOp::Presence {
                    id,
                    topic: topic(self.topic)?,
                    query,
                })
            }
            "refresh" => match self.token {
                Some(token) => Ok(ClientOp::Refresh { id, token }),
                None => Err(DecodeError::bad_request(id, "missing field `token`")),
            },
            other => Err(DecodeError::bad_request(
                id,
                format!(
                    "unknown op {other:?}; expected subscribe, unsubscribe, publish, ping, refresh or presence"
                ),
            )),
        }
    }
}

/// A reply from the server to one client request.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Reply<'a> {
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        topic: &'a str,
        /// The topic's last offset, for topics with history.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// The topic log's epoch, for topics with history.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// Present (true) when the requested replay cannot be complete.
        #[serde(skip_serializing_if = "Option::is_none")]
        truncated: Option<bool>,
    },
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        topic: &'a str,
    },
    Published {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        topic: &'a str,
        offset: u64,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A page of a topic's presence (see [`PresencePage`]).
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        topic: &'a str,
        #[serde(flatten)]
        page: PresencePageOut<'a>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
        /// The topic concerned, when the error is about one (e.g. a
        /// subscription dropped after a refresh).
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<&'a str>,
    },
}

/// A member of a topic's presence: a token's `sub`, and what its
/// `presence_info` claim says (JSON text of an object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub sub: String,
    pub info: Option<std::sync::Arc<str>>,
}

/// A page of a topic's presence, as the presence book answers it.
#[derive(Debug, Clone)]
pub struct PresencePage {
    /// The epoch `seq` counts in.
    pub epoch: String,
    /// The sequence number of the last change this page includes.
    pub seq: u64,
    /// Distinct members in the topic.
    pub count: u64,
    /// `None` when only the count was asked for.
    pub members: Option<Vec<Member>>,
    /// Whether members follow the last one on this page.
    pub more: bool,
}

/// How a [`PresencePage`] goes out, in a `presence` reply or an HTTP body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PresencePageOut<'a> {
    /// The topic's presence epoch; `seq` counts within it.
    pub epoch: &'a str,
    /// The last presence change this page includes: apply the
    /// `presence_diff`s after it.
    pub seq: u64,
    /// Distinct members (users) in the topic.
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub members: Option<Vec<MemberOut<'a>>>,
    /// Pass it back for the next page; `null` on the last page. Absent
    /// when only the count was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cursor: Option<Option<String>>,
}

impl PresencePage {
    pub fn out(&self) -> PresencePageOut<'_> {
        let members = self
            .members
            .as_ref()
            .map(|members| members.iter().map(MemberOut::of).collect::<Vec<_>>());
        let cursor = self.members.as_ref().map(|members| {
            members
                .last()
                .filter(|_| self.more)
                .map(|last| encode_cursor(&last.sub))
        });
        PresencePageOut {
            epoch: &self.epoch,
            seq: self.seq,
            count: self.count,
            members,
            cursor,
        }
    }
}

/// A member as frames carry it: `{"sub", "info"?}`.
#[derive(Debug, Serialize)]
pub struct MemberOut<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<Transcoded<'a>>,
}

impl<'a> MemberOut<'a> {
    fn of(member: &'a Member) -> MemberOut<'a> {
        MemberOut {
            sub: &member.sub,
            info: member.info.as_deref().map(Transcoded),
        }
    }
}

#[derive(Debug, Serialize)]
struct LeaveOut<'a> {
    sub: &'a str,
}

/// The `presence_diff` frame.
#[derive(Debug, Serialize)]
pub struct PresenceDiffFrame<'a> {
    op: &'static str,
    topic: &'a str,
    epoch: &'a str,
    seq: u64,
    joins: Vec<MemberOut<'a>>,
    leaves: Vec<LeaveOut<'a>>,
}

impl<'a> PresenceDiffFrame<'a> {
    pub fn new(
        topic: &'a Topic,
        epoch: &'a str,
        seq: u64,
        joins: &'a [Member],
        leaves: &'a [String],
    ) -> PresenceDiffFrame<'a> {
        PresenceDiffFrame {
            op: "presence_diff",
            topic: topic.as_str(),
            epoch,
            seq,
            joins: joins.iter().map(MemberOut::of).collect(),
            leaves: leaves.iter().map(|sub| LeaveOut { sub }).collect(),
        }
    }

    /// The frame in `encoding`; fails only on `info` neither encoding can
    /// carry (the edge refuses such claims).
    pub fn encode(&self, encoding: Encoding) -> Result<Frame, EncodeError> {
        match encoding {
            Encoding::Json => serde_json::to_string(self)
                .map(|text| Frame::Text(text.into()))
                .map_err(|e| EncodeError(e.to_string())),
            Encoding::MsgPack => rmp_serde::to_vec_named(self)
                .map(|bytes| Frame::Binary(bytes.into()))
                .map_err(|e| EncodeError(e.to_string())),
        }
    }
}

/// The `presence_resync` frame: `topic`'s presence changes may have been
/// missed; take the pages again.
pub fn presence_resync_frame(topic: &Topic, encoding: Encoding) -> Result<Frame, EncodeError> {
    #[derive(Serialize)]
    struct Resync<'a> {
        op: &'static str,
        topic: &'a str,
    }
    let frame = Resync {
        op: "presence_resync",
        topic: topic.as_str(),
    };
    match encoding {
        Encoding::Json => serde_json::to_string(&frame)
            .map(|text| Frame::Text(text.into()))
            .map_err(|e| EncodeError(e.to_string())),
        Encoding::MsgPack => rmp_serde::to_vec_named(&frame)
            .map(|bytes| Frame::Binary(bytes.into()))
            .map_err(|e| EncodeError(e.to_string())),
    }
}

/// An encoded server frame, ready for the socket.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(ByteString),
    Binary(Bytes),
}

impl Reply<'_> {
    pub fn encode(&self, encoding: Encoding) -> Frame {
        match encoding {
            // Serializing these plain structs cannot fail: every key is a
            // string and every value a string, integer or absent.
            Encoding::Json => Frame::Text(
                serde_json::to_string(self)
                    .expect("reply serializes to JSON")
                    .into(),
            ),
            Encoding::MsgPack => Frame::Binary(
                rmp_serde::to_vec_named(self)
                    .expect("reply serializes to MessagePack")
                    .into(),
            ),
        }
    }
}

#[derive(Serialize)]
struct EventFrame<'a, D: Serialize> {
    op: &'static str,
    topic: &'a str,
    offset: u64,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<D>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_b64: Option<String>,
}

/// What an event frame says besides the payload.
#[derive(Debug, Clone, Copy)]
pub struct EventHeader<'a> {
    pub topic: &'a Topic,
    pub offset: u64,
    pub ts: u64,
}

impl<'a, D: Serialize> EventFrame<'a, D> {
    fn new(header: EventHeader<'a>, data: Option<D>, data_b64: Option<String>) -> Self {
        EventFrame {
            op: "event",
            topic: header.topic.as_str(),
            offset: header.offset,
            ts: header.ts,
            data,
            data_b64,
        }
    }
}

/// An event that cannot be written in an encoding: its payload has no form
/// there. The edge refuses such payloads ([`crate::payload`]); one stored
/// before it did is skipped for that encoding, never a panic.
#[derive(Debug, thiserror::Error)]
#[error("event cannot be encoded: {0}")]
pub struct EncodeError(String);

/// The `herald.json` event message.
pub(crate) fn encode_event_json(
    event: EventHeader<'_>,
    payload: &Payload,
) -> Result<ByteString, EncodeError> {
    let frame = match payload {
        Payload::Json(raw) => EventFrame::new(event, Some(&**raw), None),
        Payload::Binary(bytes) => EventFrame::new(event, None, Some(BASE64.encode(bytes))),
    };
    serde_json::to_string(&frame)
        .map(ByteString::from)
        .map_err(|e| EncodeError(e.to_string()))
}

/// The `herald.msgpack` event message.
pub(crate) fn encode_event_msgpack(
    event: EventHeader<'_>,
    payload: &Payload,
) -> Result<Bytes, EncodeError> {
    let encoded = match payload {
        // The transcoder the edge checked the payload with.
        Payload::Json(raw) => {
            rmp_serde::to_vec_named(&EventFrame::new(event, Some(Transcoded(raw.get())), None))
        }
        Payload::Binary(bytes) => rmp_serde::to_vec_named(&EventFrame::new(
            event,
            Some(serde_bytes::Bytes::new(bytes)),
            None,
        )),
    };
    encoded
        .map(Bytes::from)
        .map_err(|e| EncodeError(e.to_string()))
}

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_FRAME_HEADER: usize = 14;

impl Frame {
    /// The message as one WebSocket data frame: text for JSON, binary for
    /// MessagePack.
    pub fn to_ws(&self) -> BytesMut {
        match self {
            Frame::Text(text) => ws_frame(OpCode::Text, text.as_bytes()),
            Frame::Binary(bytes) => ws_frame(OpCode::Binary, bytes),
        }
    }
}

/// One unfragmented, unmasked (server) WebSocket frame (RFC 6455 §5.2).
pub fn ws_frame(op: OpCode, payload: &[u8]) -> BytesMut {
    let mut frame = BytesMut::with_capacity(payload.len() + MAX_FRAME_HEADER);
    Parser::write_message(&mut frame, payload, op, true, false);
    frame
}

/// The payload of a frame [`ws_frame`] made, without copying it: the
/// frame minus its header (2, 4 or 10 bytes by the payload's length; a
/// server frame has no mask).
pub fn ws_frame_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    #[test]
    fn a_frames_payload_is_found_after_each_size_of_header() {
        for len in [0, 125, 126, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            let frame = ws_frame(OpCode::Text, &payload).freeze();
            assert_eq!(ws_frame_payload(&frame), payload, "payload of {len} bytes");
        }
    }

    fn json(frame: &str) -> Result<ClientOp, DecodeError> {
        decode(Encoding::Json, frame.as_bytes())
    }

    #[test]
    fn decodes_every_op() {
        assert!(matches!(
            json(r#"{"op":"subscribe","id":1,"topic":"alerts"}"#),
            Ok(ClientOp::Subscribe { id: Some(1), .. })
        ));
        assert!(matches!(
            json(r#"{"op":"unsubscribe","topic":"alerts"}"#),
            Ok(ClientOp::Unsubscribe { id: None, .. })
        ));
        assert!(matches!(
            json(r#"{"op":"ping","id":4}"#),
            Ok(ClientOp::Ping { id: Some(4) })
        ));
        match json(r#"{"op":"publish","id":3,"topic":"a.b","data":{"x":[1,2]}}"#) {
            Ok(ClientOp::Publish {
                payload: Payload::Json(raw),
                ..
            }) => {
                assert_eq!(raw.get(), r#"{"x":[1,2]}"#)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_data_is_a_payload_and_missing_data_is_an_error() {
        assert!(matches!(
            json(r#"{"op":"publish","topic":"a","data":null}"#),
            Ok(ClientOp::Publish {
                payload: Payload::Json(_),
                ..
            })
        ));
        let err = json(r#"{"op":"publish","id":9,"topic":"a"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (Some(9), ErrorCode::BadRequest));
    }

    #[test]
    fn bad_frames_are_bad_requests_with_id_when_readable() {
        let err = json("not json").unwrap_err();
        assert_eq!((err.id, err.code), (None, ErrorCode::BadRequest));
        let err = json(r#"{"op":"dance","id":7}"#).unwrap_err();
        assert_eq!((err.id, err.code), (Some(7), ErrorCode::BadRequest));
        let err = json(r#"{"id":8}"#).unwrap_err();
        assert_eq!((err.id, err.code), (Some(8), ErrorCode::BadRequest));
        let err = json(r#"{"op":"subscribe","id":2,"topic":"a.*"}"#).unwrap_err();
        assert_eq!((err.id, err.code), (Some(2), ErrorCode::InvalidTopic));
    }

    #[test]
    fn every_cursor_of_the_documented_shape_is_taken_and_herald_s_own_roundtrip() {
        let alphabet = b"AZaz09_-";
        for len in 0..=9usize {
            let cursor: String = (0..len)
                .map(|i| alphabet[i % alphabet.len()] as char)
                .collect();
            // The shape CURSOR_PATTERN says: groups of 4, then 2 or 3 more.
            let documented = len % 4 != 1;
            let parsed = PresenceQuery::parse(Some(&cursor), None, false);
            assert_eq!(parsed.is_ok(), documented, "{cursor:?}");
        }
        for sub in ["ada", "Zoë 🦀", "a/b?c=d&e"] {
            let query = PresenceQuery::parse(Some(&encode_cursor(sub)), Some(5), false).unwrap();
            assert_eq!(query.after.as_deref(), Some(sub));
            assert_eq!(query.limit, 5);
        }
        assert!(PresenceQuery::parse(Some("not*base64"), None, false).is_err());
        assert!(PresenceQuery::parse(None, Some(1001), false).is_err());
    }

    #[test]
    fn error_code_list_is_complete() {
        // Adding a variant breaks this match: then add it to `ALL` too.
        for code in ErrorCode::ALL {
            match code {
                ErrorCode::BadRequest
                | ErrorCode::Unauthorized
                | ErrorCode::Forbidden
                | ErrorCode::InvalidTopic
                | ErrorCode::PayloadTooLarge
                | ErrorCode::RateLimited
                | ErrorCode::TooManySubscriptions
                | ErrorCode::TooManyConnections
                | ErrorCode::NotFound
                | ErrorCode::MethodNotAllowed
                | ErrorCode::Unavailable
                | ErrorCode::PresenceDisabled => {}
            }
        }
        assert_eq!(ErrorCode::ALL.len(), 12);
    }

    #[test]
    fn payload_nesting_limit_is_the_same_in_both_encodings() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let frame = |n: usize| format!(r#"{{"op":"publish","topic":"a","data":{}}}"#, nested(n));
        let msgpack = |n: usize| {
            // Built by hand: serde_json's own parser stops at 127 levels.
            let data = (0..n).fold(rmpv::Value::Array(vec![]), |inner, _| {
                rmpv::Value::Array(vec![inner])
            });
            let data = match data {
                rmpv::Value::Array(mut outer) => outer.pop().unwrap(),
                _ => unreachable!(),
            };
            let frame = rmpv::Value::Map(vec![
                ("op".into(), "publish".into()),
                ("topic".into(), "a".into()),
                ("data".into(), data),
            ]);
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &frame).unwrap();
            bytes
        };
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let bytes = |n| match encoding {
                Encoding::Json => frame(n).into_bytes(),
                Encoding::MsgPack => msgpack(n),
            };
            if let Err(e) = decode(encoding, &bytes(MAX_NESTING)) {
                panic!("{encoding:?}: {}", e.message);
            }
            let too_deep = decode(encoding, &bytes(MAX_NESTING + 1)).unwrap_err();
            assert!(
                too_deep.message.contains("nested deeper"),
                "{}",
                too_deep.message
            );
            assert!(
                decode(encoding, &bytes(MAX_NESTING + 1)).is_err(),
                "{encoding:?}"
            );
        }
    }

    #[test]
    fn a_number_json_cannot_carry_is_refused_with_its_reason() {
        let err = json(r#"{"op":"publish","id":3,"topic":"a","data":{"x":1e400}}"#).unwrap_err();
        assert_eq!((err.id, err.code), (Some(3), ErrorCode::BadRequest));
        assert!(err.message.contains("out of range"), "{}", err.message);
    }

    #[test]
    fn binary_payload_roundtrips_in_both_encodings() {
        let op = json(r#"{"op":"publish","topic":"a","data_b64":"AAH/"}"#).unwrap();
        let ClientOp::Publish {
            payload: Payload::Binary(b),
            ..
        } = op
        else {
            panic!()
        };
        assert_eq!(&b[..], &[0, 1, 255]);

        let event = Event::new(Topic::parse("a").unwrap(), 1, 2, Payload::Binary(b));
        let text = event.json_message().unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data_b64"], "AAH/");
        let m: rmpv::Value = rmp_serde::from_slice(&event.msgpack_message().unwrap()).unwrap();
        let data = m
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some("data"))
            .unwrap();
        assert_eq!(data.1, rmpv::Value::Binary(vec![0, 1, 255]));
    }
}
