//! The WebSocket wire protocol: client operations, server frames, their two
//! encodings (`herald.json` text frames, `herald.msgpack` binary frames),
//! error codes and close codes.
//!
//! Both encodings carry the same fields. A binary payload travels as
//! `data_b64` (base64) in JSON frames and as a MessagePack `bin` in `data`
//! in MessagePack frames. See `docs/protocol.md` for examples.
//!
//! Here: the encodings, the error codes and the limits every side shares;
//! what a client sends in `client` (ops, decoding, presence cursors); what
//! the server sends in `server` (replies, presence frames, event frames);
//! the bytes on the wire in `frame` (WebSocket framing). Everything is
//! re-exported here: users name `protocol::…`, not the submodule.

mod client;
mod frame;
mod server;

pub use client::*;
pub use frame::*;
pub use server::*;

use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use serde::Serialize;

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
    RequestTimeout,
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
        ErrorCode::RequestTimeout,
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
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_http::ws::OpCode;

    use super::*;
    use crate::event::Event;
    use crate::payload::{MAX_NESTING, Payload};
    use crate::topic::Topic;

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
                | ErrorCode::PresenceDisabled
                | ErrorCode::RequestTimeout => {}
            }
        }
        assert_eq!(ErrorCode::ALL.len(), 13);
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
