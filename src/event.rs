//! Events: what a publish produces and a subscriber receives; and
//! presence diffs, the other thing a subscriber receives.
//!
//! An [`Event`] is built once per publish and shared (`Arc`) by every
//! subscriber on the node. Its WebSocket frame is encoded lazily, at most
//! once per encoding, and the bytes are then written as they are to every
//! connection that uses that encoding.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;

use crate::payload::Payload;
use crate::protocol::{self, EncodeError, Encoding, EventHeader, Frame, Member};
use crate::telemetry::names;
use crate::topic::Topic;

#[derive(Debug)]
pub struct Event {
    pub topic: Topic,
    /// Position in the topic's sequence, from 1.
    pub offset: u64,
    /// Publish time, Unix milliseconds.
    pub ts: u64,
    pub payload: Payload,
    /// The complete WebSocket frames (header and payload), per encoding;
    /// `None` when the payload has no form in that encoding (a stored
    /// event from before the edge checked it).
    ws_json: OnceLock<Option<Bytes>>,
    ws_msgpack: OnceLock<Option<Bytes>>,
}

impl Event {
    pub fn new(topic: Topic, offset: u64, ts: u64, payload: Payload) -> Event {
        Event {
            topic,
            offset,
            ts,
            payload,
            ws_json: OnceLock::new(),
            ws_msgpack: OnceLock::new(),
        }
    }

    fn header(&self) -> EventHeader<'_> {
        EventHeader {
            topic: &self.topic,
            offset: self.offset,
            ts: self.ts,
        }
    }

    /// The `herald.json` event message.
    pub fn json_message(&self) -> Result<ByteString, EncodeError> {
        protocol::encode_event_json(self.header(), &self.payload)
    }

    /// The `herald.msgpack` event message.
    pub fn msgpack_message(&self) -> Result<Bytes, EncodeError> {
        protocol::encode_event_msgpack(self.header(), &self.payload)
    }

    /// The `herald.json` event message as text: the payload of the shared
    /// JSON WebSocket frame, the same bytes (an event stream's line).
    /// `None` when the event cannot be encoded (see
    /// [`ws_frame`](Self::ws_frame)).
    pub fn json(&self) -> Option<Bytes> {
        let frame = self.ws_frame(Encoding::Json)?;
        Some(protocol::ws_frame_payload(&frame))
    }

    /// The event as one WebSocket frame in `encoding`, encoded on first use
    /// and shared by every subscriber. An event that cannot be encoded is
    /// logged and counted once, here, and `None` for every subscriber.
    pub fn ws_frame(&self, encoding: Encoding) -> Option<Bytes> {
        let cell = match encoding {
            Encoding::Json => &self.ws_json,
            Encoding::MsgPack => &self.ws_msgpack,
        };
        cell.get_or_init(|| {
            let message = match encoding {
                Encoding::Json => self.json_message().map(Frame::Text),
                Encoding::MsgPack => self.msgpack_message().map(Frame::Binary),
            };
            match message {
                Ok(message) => Some(message.to_ws().freeze()),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, offset = self.offset, encoding = encoding.protocol_name(), error = %e, "event cannot be encoded; not sent in this encoding");
                    metrics::counter!(names::ENCODE_FAILURES, "encoding" => encoding.protocol_name()).increment(1);
                    None
                }
            }
        })
        .clone()
    }
}

/// Registers the encoding failure series at zero, one per encoding (the
/// other series are registered by [`crate::telemetry::metrics`]).
pub fn register_metrics() {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        metrics::counter!(names::ENCODE_FAILURES, "encoding" => encoding.protocol_name())
            .increment(0);
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A change in a topic's presence: the members who joined and left, as
/// one `presence_diff` frame. Like an [`Event`], built once per node and
/// shared by every subscriber that asked for presence; its frame is
/// encoded at most once per encoding.
#[derive(Debug)]
pub struct PresenceDiff {
    pub topic: Topic,
    /// The topic's presence epoch: sequence numbers count within it.
    pub epoch: String,
    /// The topic's presence sequence number after this change.
    pub seq: u64,
    pub joins: Vec<Member>,
    /// The `sub`s that left.
    pub leaves: Vec<String>,
    /// Not a change but word that changes may have been missed (the
    /// node's link to Redis dropped): a `presence_resync` frame.
    pub resync: bool,
    ws_json: OnceLock<Option<Bytes>>,
    ws_msgpack: OnceLock<Option<Bytes>>,
}

/// A diff as Redis carries it between nodes (see `presence`'s scripts).
#[derive(serde::Deserialize)]
struct DiffWire {
    epoch: String,
    seq: u64,
    joins: Vec<MemberWire>,
    leaves: Vec<LeaveWire>,
}

#[derive(serde::Deserialize)]
struct MemberWire {
    sub: String,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
}

#[derive(serde::Deserialize)]
struct LeaveWire {
    sub: String,
}

impl PresenceDiff {
    pub fn new(
        topic: Topic,
        epoch: String,
        seq: u64,
        joins: Vec<Member>,
        leaves: Vec<String>,
    ) -> PresenceDiff {
        PresenceDiff {
            topic,
            epoch,
            seq,
            joins,
            leaves,
            resync: false,
            ws_json: OnceLock::new(),
            ws_msgpack: OnceLock::new(),
        }
    }

    /// Word to `topic`'s listeners that they may have missed changes.
    pub fn resync(topic: Topic) -> PresenceDiff {
        PresenceDiff {
            resync: true,
            ..PresenceDiff::new(topic, String::new(), 0, Vec::new(), Vec::new())
        }
    }

    /// Reads a diff relayed between nodes: the JSON object
    /// `{"epoch","seq","joins":[{"sub","info"?}],"leaves":[{"sub"}]}`.
    pub fn from_relayed(topic: Topic, json: &[u8]) -> Option<PresenceDiff> {
        let wire: DiffWire = serde_json::from_slice(json).ok()?;
        let joins = wire
            .joins
            .into_iter()
            .map(|m| Member {
                sub: m.sub,
                info: m.info.map(|info| Arc::from(info.get())),
            })
            .collect();
        let leaves = wire.leaves.into_iter().map(|l| l.sub).collect();
        Some(PresenceDiff::new(
            topic, wire.epoch, wire.seq, joins, leaves,
        ))
    }

    /// Bytes a diff takes as a frame, about, for the bounds of a mailbox:
    /// its members and the JSON around each.
    pub fn size(&self) -> usize {
        const AROUND: usize = 20;
        let member = |m: &Member| AROUND + m.sub.len() + m.info.as_ref().map_or(0, |i| i.len());
        64 + self.joins.iter().map(member).sum::<usize>()
            + self
                .leaves
                .iter()
                .map(|sub| AROUND + sub.len())
                .sum::<usize>()
    }

    /// The diff as one WebSocket frame in `encoding`, encoded on first use.
    pub fn ws_frame(&self, encoding: Encoding) -> Option<Bytes> {
        let cell = match encoding {
            Encoding::Json => &self.ws_json,
            Encoding::MsgPack => &self.ws_msgpack,
        };
        cell.get_or_init(|| {
            let encoded = if self.resync {
                protocol::presence_resync_frame(&self.topic, encoding)
            } else {
                protocol::PresenceDiffFrame::new(
                    &self.topic,
                    &self.epoch,
                    self.seq,
                    &self.joins,
                    &self.leaves,
                )
                .encode(encoding)
            };
            match encoded {
                Ok(frame) => Some(frame.to_ws().freeze()),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, encoding = encoding.protocol_name(), error = %e, "presence diff cannot be encoded; not sent in this encoding");
                    metrics::counter!(names::ENCODE_FAILURES, "encoding" => encoding.protocol_name()).increment(1);
                    None
                }
            }
        })
        .clone()
    }
}
