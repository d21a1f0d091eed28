//! Events: what a publish produces and a subscriber receives.
//!
//! An [`Event`] is built once per publish and shared (`Arc`) by every
//! subscriber on the node. Its wire frame is encoded lazily, at most once
//! per encoding, and the bytes are then shared by every connection that uses
//! that encoding.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;
use serde_json::value::RawValue;

use crate::protocol;
use crate::topic::Topic;

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
    json_frame: OnceLock<ByteString>,
    msgpack_frame: OnceLock<Bytes>,
}

impl Event {
    pub fn new(topic: Topic, offset: u64, ts: u64, payload: Payload) -> Event {
        Event {
            topic,
            offset,
            ts,
            payload,
            json_frame: OnceLock::new(),
            msgpack_frame: OnceLock::new(),
        }
    }

    /// The `herald.json` event frame, encoded on first use.
    pub fn json_frame(&self) -> ByteString {
        self.json_frame
            .get_or_init(|| protocol::encode_event_json(self))
            .clone()
    }

    /// The `herald.msgpack` event frame, encoded on first use.
    pub fn msgpack_frame(&self) -> Bytes {
        self.msgpack_frame
            .get_or_init(|| protocol::encode_event_msgpack(self))
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
