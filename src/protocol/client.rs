//! What a client sends: its ops, decoded from either encoding with every
//! field checked, and the errors a frame that cannot be decoded gets.

use super::{BASE64_LENIENT, Encoding, ErrorCode};
use crate::payload::{self, MAX_NESTING, Payload};
use crate::topic::{Topic, TopicError};
use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

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
