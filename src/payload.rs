//! Event payloads, and the one rule for what the edge accepts: exactly what
//! both wire encodings can carry.
//!
//! A JSON payload is kept as published (raw text) and sent as it is to
//! `herald.json` subscribers; `herald.msgpack` subscribers get it transcoded
//! to MessagePack. Some valid JSON has no MessagePack form (`1e400` is not a
//! finite number), and some MessagePack has no JSON form (NaN, extension
//! types, non-string map keys). The edge (HTTP publish, WebSocket publish)
//! checks a payload with [`Payload::json`] or [`Payload::from_msgpack`],
//! which run the very transcoder delivery runs, under the same nesting
//! limit, so an accepted payload always encodes in both.

use std::io;

use bytes::Bytes;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// Deepest nesting of arrays and objects in a payload, in either encoding.
/// Documented in `docs/protocol.md`.
pub const MAX_NESTING: usize = 128;

/// An event's body: JSON as published, or opaque bytes.
#[derive(Debug, Clone)]
pub enum Payload {
    /// JSON text, kept as published (no re-serialization). Built through
    /// [`Payload::json`] at the edge; read back from the store as stored.
    Json(Box<RawValue>),
    Binary(Bytes),
}

/// Why a payload was refused at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("JSON is nested deeper than {MAX_NESTING} levels")]
    TooDeep,
    #[error("data is not valid JSON: {0}")]
    InvalidJson(String),
    /// Valid in one encoding, with no form in the other.
    #[error("data cannot be carried in both JSON and MessagePack: {0}")]
    NotPortable(String),
}

impl Payload {
    /// A JSON payload, accepted only if it is within [`MAX_NESTING`] and
    /// transcodes to MessagePack (every number finite).
    pub fn json(raw: Box<RawValue>) -> Result<Payload, PayloadError> {
        check_json(raw.get())?;
        Ok(Payload::Json(raw))
    }

    /// A JSON payload from bytes (an HTTP body).
    pub fn json_from_slice(bytes: &[u8]) -> Result<Payload, PayloadError> {
        let raw: Box<RawValue> =
            serde_json::from_slice(bytes).map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
        Payload::json(raw)
    }

    /// A payload sent as MessagePack: `bin` is a binary payload, any other
    /// value must have a JSON form (and then passes [`Payload::json`]).
    pub fn from_msgpack(value: rmpv::Value) -> Result<Payload, PayloadError> {
        if let rmpv::Value::Binary(bytes) = value {
            return Ok(Payload::Binary(Bytes::from(bytes)));
        }
        check_msgpack_portable(&value)?;
        let raw = serde_json::value::to_raw_value(&value)
            .map_err(|e| PayloadError::NotPortable(e.to_string()))?;
        Payload::json(raw)
    }

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

/// JSON text serialized as what it holds, in whatever format the
/// serializer writes (MessagePack for `herald.msgpack` frames): the one
/// transcoder both the edge's check and delivery use. Fails, rather than
/// panics, on JSON deeper than [`MAX_NESTING`] or with a number out of
/// range.
#[derive(Debug)]
pub struct Transcoded<'a>(pub &'a str);

impl Serialize for Transcoded<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        check_nesting(self.0).map_err(serde::ser::Error::custom)?;
        Nested(self.0).serialize(serializer)
    }
}

/// JSON text already found within [`MAX_NESTING`], transcoded.
struct Nested<'a>(&'a str);

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut de = serde_json::Deserializer::from_str(self.0);
        // serde_json's own limit (127 levels) is one short of ours; the
        // depth was bounded before, so the stack is too.
        de.disable_recursion_limit();
        serde_transcode::transcode(&mut de, serializer)
    }
}

/// Checks that JSON text is a payload both encodings carry: its nesting,
/// then the transcoder delivery runs (the text is scanned once for depth).
pub fn check_json(json: &str) -> Result<(), PayloadError> {
    check_nesting(json)?;
    rmp_serde::encode::write_named(&mut io::sink(), &Nested(json))
        .map(|_| ())
        .map_err(|e| PayloadError::NotPortable(e.to_string()))
}

/// Refuses JSON nested deeper than [`MAX_NESTING`] without parsing it (raw
/// JSON is validated by serde_json without a depth limit).
pub fn check_nesting(json: &str) -> Result<(), PayloadError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(PayloadError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// What MessagePack can hold and JSON cannot: non-finite floats, extension
/// types and map keys that are not strings.
fn check_msgpack_portable(value: &rmpv::Value) -> Result<(), PayloadError> {
    use rmpv::Value;
    match value {
        Value::F32(f) if !f.is_finite() => Err(not_portable("a float that is NaN or infinite")),
        Value::F64(f) if !f.is_finite() => Err(not_portable("a float that is NaN or infinite")),
        Value::Ext(..) => Err(not_portable("a MessagePack extension type")),
        Value::Array(items) => items.iter().try_for_each(check_msgpack_portable),
        Value::Map(entries) => entries.iter().try_for_each(|(k, v)| {
            if !k.is_str() {
                return Err(not_portable("a map key that is not a string"));
            }
            check_msgpack_portable(v)
        }),
        _ => Ok(()),
    }
}

fn not_portable(what: &str) -> PayloadError {
    PayloadError::NotPortable(format!("{what} has no JSON form"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn nested(n: usize) -> String {
        format!("{}{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn numbers_without_a_finite_form_are_refused() {
        for json in [r#"{"x":1e400}"#, "-1e400", &format!("1{}", "0".repeat(400))] {
            let err = Payload::json(raw(json)).unwrap_err();
            assert!(matches!(err, PayloadError::NotPortable(_)), "{json}: {err}");
            assert!(err.to_string().contains("out of range"), "{err}");
        }
        assert!(Payload::json(raw("[1e300, -0, 18446744073709551615, 1e-400]")).is_ok());
    }

    #[test]
    fn nesting_limit_is_the_same_for_check_and_transcoder() {
        assert!(Payload::json(raw(&nested(MAX_NESTING))).is_ok());
        assert_eq!(
            Payload::json(raw(&nested(MAX_NESTING + 1))).unwrap_err(),
            PayloadError::TooDeep
        );
        let mut out = Vec::new();
        rmp_serde::encode::write_named(&mut out, &Transcoded(&nested(MAX_NESTING))).unwrap();
        assert!(
            rmp_serde::encode::write_named(&mut out, &Transcoded(&nested(MAX_NESTING + 1)))
                .is_err()
        );
    }

    #[test]
    fn strings_do_not_count_as_nesting() {
        let in_string = format!(r#"{{"a":"{}\"["}}"#, "[".repeat(500));
        assert!(check_nesting(&in_string).is_ok());
    }

    #[test]
    fn msgpack_without_a_json_form_is_refused() {
        use rmpv::Value;
        for value in [
            Value::F64(f64::NAN),
            Value::F32(f32::INFINITY),
            Value::Ext(1, vec![1]),
            Value::Map(vec![(Value::from(1), Value::from(2))]),
        ] {
            assert!(
                matches!(
                    Payload::from_msgpack(value.clone()),
                    Err(PayloadError::NotPortable(_))
                ),
                "{value:?}"
            );
        }
        assert!(matches!(
            Payload::from_msgpack(Value::Binary(vec![1])),
            Ok(Payload::Binary(_))
        ));
        assert!(matches!(
            Payload::from_msgpack(Value::Map(vec![(Value::from("a"), Value::F64(1.5))])),
            Ok(Payload::Json(_))
        ));
    }
}
