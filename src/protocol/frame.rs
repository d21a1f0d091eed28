//! Encoded frames and the WebSocket framing around them (RFC 6455 §5.2,
//! unmasked server frames).

use actix_http::ws::{OpCode, Parser};
use bytes::Bytes;
use bytes::BytesMut;
use bytestring::ByteString;

/// An encoded server frame, ready for the socket.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(ByteString),
    Binary(Bytes),
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
