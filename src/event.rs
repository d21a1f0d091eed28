//! Events: what a publish produces and a subscriber receives.
//!
//! An [`Event`] is built once per publish and shared (`Arc`) by every
//! subscriber on the node. Its WebSocket frame is encoded lazily, at most
//! once per encoding, and the bytes are then written as they are to every
//! connection that uses that encoding.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;
use serde_json::value::RawValue;

use crate::protocol::{self, Encoding, Frame};
use crate::topic::Topic;
use crate::ws;

/// An event's body: JSON as published, or opaque bytes.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Validated JSON text, kept as published (no re-serialization).
    Json(Box<RawValue>),
    Binary(Bytes),
}

impl Payload {
    /// Size of the payload on the wire, in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.get().len(),
            Payload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
pub struct Event {
    pub topic: Topic,
    /// Position in the topic's sequence, from 1.
    pub offset: u64,
    /// Publish time, Unix milliseconds.
    pub ts: u64,
    pub payload: Payload,
    /// The complete WebSocket frames (header and payload), per encoding.
    ws_json: OnceLock<Bytes>,
    ws_msgpack: OnceLock<Bytes>,
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

    /// The `herald.json` event message.
    pub fn json_message(&self) -> ByteString {
        protocol::encode_event_json(self)
    }

    /// The `herald.msgpack` event message.
    pub fn msgpack_message(&self) -> Bytes {
        protocol::encode_event_msgpack(self)
    }

    /// The event as one WebSocket frame in `encoding`, encoded on first use
    /// and shared by every subscriber.
    pub fn ws_frame(&self, encoding: Encoding) -> Bytes {
        let cell = match encoding {
            Encoding::Json => &self.ws_json,
            Encoding::MsgPack => &self.ws_msgpack,
        };
        cell.get_or_init(|| {
            let message = match encoding {
                Encoding::Json => Frame::Text(self.json_message()),
                Encoding::MsgPack => Frame::Binary(self.msgpack_message()),
            };
            ws::data_frame(&message).freeze()
        })
        .clone()
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
