//! What the server sends: replies, presence pages and diffs, event frames,
//! each encoded in either encoding.

use super::{Encoding, ErrorCode, Frame, encode_cursor};
use crate::payload::{Payload, Transcoded};
use crate::topic::Topic;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use bytestring::ByteString;
use serde::Serialize;

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
