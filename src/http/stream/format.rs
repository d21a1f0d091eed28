//! What an event stream's bytes look like: Server-Sent Events or NDJSON,
//! and the opaque resume token an SSE `id:` carries.
//!
//! The resume token covers every topic of its stream, by the topic's place
//! in the stream's sorted list of topics: for each topic with history that
//! the client has seen at least one offset of, a fingerprint of the topic's
//! epoch and the last offset received. Version byte, a fingerprint of the
//! list of topics (a token is only good for the stream it came from), then
//! one entry per such topic, in URL-safe base64: at most
//! [`max_token_len`] characters for a stream of that many topics.

use std::time::Duration;

use actix_web::http::header::{self, HeaderMap};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::MAX_OFFSET;
use crate::topic::Topic;

/// `Accept` value for Server-Sent Events.
pub const SSE: &str = "text/event-stream";
/// `Accept` value for newline-delimited JSON.
pub const NDJSON: &str = "application/x-ndjson";

/// The first byte of every resume token.
const TOKEN_VERSION: u8 = 1;
/// Longest entry: a topic's place (2 bytes of varint for up to 16,383
/// topics), its epoch's fingerprint (8) and an offset (up to 9).
const MAX_ENTRY_BYTES: usize = 2 + 8 + 9;
/// Version byte and the fingerprint of the stream's topics.
const TOKEN_HEADER_BYTES: usize = 1 + 4;

/// A chunk's first allocation, in bytes.
const CHUNK_START: usize = 512;

/// The two formats a stream is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/event-stream`: one message per event, `id:` the resume token.
    Sse,
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
}

impl Format {
    /// The stream format `Accept` asks for: the stream type it ranks
    /// highest (`q`), unless it ranks JSON (what a page of history is)
    /// higher; `None` when it names no stream type (or only with `q=0`).
    pub fn from_accept(headers: &HeaderMap) -> Option<Format> {
        let mut stream: Option<(Format, f32)> = None;
        let mut json = 0.0f32;
        for item in headers
            .get_all(header::ACCEPT)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let mut params = item.split(';');
            let media = params.next().unwrap_or_default().trim();
            let q = params
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            if q <= 0.0 {
                continue;
            }
            let format = if media.eq_ignore_ascii_case(SSE) {
                Format::Sse
            } else if media.eq_ignore_ascii_case(NDJSON) {
                Format::Ndjson
            } else {
                if ["application/json", "application/*", "*/*"]
                    .iter()
                    .any(|m| media.eq_ignore_ascii_case(m))
                {
                    json = json.max(q);
                }
                continue;
            };
            if stream.is_none_or(|(_, best)| q > best) {
                stream = Some((format, q));
            }
        }
        stream.filter(|&(_, q)| q >= json).map(|(format, _)| format)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Sse => SSE,
            Format::Ndjson => NDJSON,
        }
    }

    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Format::Sse => "sse",
            Format::Ndjson => "ndjson",
        }
    }
}

/// Builds one chunk of a stream's response.
pub struct Writer {
    format: Format,
    buf: BytesMut,
}

impl Writer {
    pub fn new(format: Format) -> Writer {
        Writer {
            format,
            // Room for a small event and its id without growing.
            buf: BytesMut::with_capacity(CHUNK_START),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Bytes {
        self.buf.freeze()
    }

    /// SSE's first message: the reconnect delay and the position the
    /// stream starts from, so that a reconnect before any event resumes
    /// there (a message without data sets the last event id and
    /// dispatches nothing). NDJSON has neither.
    pub fn open(&mut self, retry: Duration, token: &str) {
        if self.format == Format::Sse {
            self.buf.put_slice(b"retry: ");
            self.buf.put_slice(retry.as_millis().to_string().as_bytes());
            self.buf.put_slice(b"\nid: ");
            self.buf.put_slice(token.as_bytes());
            self.buf.put_slice(b"\n\n");
        }
    }

    /// An event: SSE `id:` and `data:` (the default event type, for
    /// `EventSource.onmessage`); or an NDJSON line, the same object with
    /// the topic's `epoch` added (`epoch_json`, already JSON) when it has
    /// history. `json` is the event's `herald.json` message.
    pub fn event(&mut self, json: &[u8], token: Option<&str>, epoch_json: Option<&str>) {
        match self.format {
            Format::Sse => {
                if let Some(token) = token {
                    self.buf.put_slice(b"id: ");
                    self.buf.put_slice(token.as_bytes());
                    self.buf.put_u8(b'\n');
                }
                self.buf.put_slice(b"data: ");
                self.one_line(json);
                self.buf.put_slice(b"\n\n");
            }
            Format::Ndjson => match (epoch_json, json.strip_suffix(b"}")) {
                (Some(epoch), Some(open)) => {
                    self.one_line(open);
                    self.buf.put_slice(b",\"epoch\":");
                    self.buf.put_slice(epoch.as_bytes());
                    self.buf.put_slice(b"}\n");
                }
                _ => {
                    self.one_line(json);
                    self.buf.put_u8(b'\n');
                }
            },
        }
    }

    /// A message other than an event (`truncated`, `end`): an SSE message
    /// of that event type, or an NDJSON line. `json` names its `op`.
    pub fn notice(&mut self, kind: &str, json: &[u8]) {
        if self.format == Format::Sse {
            self.buf.put_slice(b"event: ");
            self.buf.put_slice(kind.as_bytes());
            self.buf.put_slice(b"\ndata: ");
            self.one_line(json);
            self.buf.put_slice(b"\n\n");
        } else {
            self.one_line(json);
            self.buf.put_u8(b'\n');
        }
    }

    /// Keeps an idle stream open through proxies: an SSE comment, or an
    /// empty NDJSON line (which NDJSON readers skip).
    pub fn heartbeat(&mut self) {
        match self.format {
            Format::Sse => self.buf.put_slice(b": heartbeat\n\n"),
            Format::Ndjson => self.buf.put_u8(b'\n'),
        }
    }

    /// JSON on one line. A stored payload keeps the whitespace it was
    /// published with, line breaks included; outside strings (where JSON
    /// allows no raw line break) a space means the same.
    fn one_line(&mut self, json: &[u8]) {
        let mut rest = json;
        while let Some(at) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.buf.put_slice(&rest[..at]);
            self.buf.put_u8(b' ');
            rest = &rest[at + 1..];
        }
        self.buf.put_slice(rest);
    }
}

/// A 64-bit FNV-1a hash: stable across builds and versions, which a token
/// handed to a client and read by another node needs.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fingerprint a token carries of its stream's sorted topics.
pub fn topics_fingerprint(topics: &[Topic]) -> u32 {
    let mut joined = Vec::new();
    for topic in topics {
        joined.extend_from_slice(topic.as_str().as_bytes());
        joined.push(b'\n');
    }
    fingerprint(&joined) as u32
}

/// Where the client stands in one topic of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The topic's place in the stream's sorted topics.
    pub index: usize,
    /// The fingerprint of the topic's epoch.
    pub epoch: u64,
    /// The last offset received.
    pub offset: u64,
}

/// Why a `Last-Event-ID` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Last-Event-ID is not a resume token of this server")]
    Malformed,
    #[error("Last-Event-ID belongs to a stream of other topics")]
    OtherStream,
}

/// Longest token, in characters, for a stream of `topics` topics.
pub fn max_token_len(topics: usize) -> usize {
    (TOKEN_HEADER_BYTES + topics * MAX_ENTRY_BYTES).div_ceil(3) * 4
}

/// Encodes a token into `token`; `scratch` and `token` are reused
/// between calls (a stream encodes one per event).
pub fn encode_token(
    topics: u32,
    entries: impl Iterator<Item = Entry>,
    scratch: &mut Vec<u8>,
    token: &mut String,
) {
    scratch.clear();
    scratch.push(TOKEN_VERSION);
    scratch.extend_from_slice(&topics.to_be_bytes());
    for entry in entries {
        put_varint(scratch, entry.index as u64);
        scratch.extend_from_slice(&entry.epoch.to_be_bytes());
        put_varint(scratch, entry.offset);
    }
    token.clear();
    URL_SAFE_NO_PAD.encode_string(scratch, token);
}

/// Reads a token for a stream of `count` topics whose fingerprint is
/// `topics`.
pub fn decode_token(token: &str, topics: u32, count: usize) -> Result<Vec<Entry>, TokenError> {
    if token.len() > max_token_len(count) {
        return Err(TokenError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| TokenError::Malformed)?;
    let (&version, rest) = bytes.split_first().ok_or(TokenError::Malformed)?;
    if version != TOKEN_VERSION || rest.len() < 4 {
        return Err(TokenError::Malformed);
    }
    let (fingerprint, mut rest) = rest.split_at(4);
    if fingerprint != topics.to_be_bytes() {
        return Err(TokenError::OtherStream);
    }
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let index = take_varint(&mut rest)?;
        let (epoch, after) = rest.split_first_chunk::<8>().ok_or(TokenError::Malformed)?;
        rest = after;
        let offset = take_varint(&mut rest)?;
        // No log reaches further; `since` is held to the same bound.
        if offset > MAX_OFFSET {
            return Err(TokenError::Malformed);
        }
        let index = usize::try_from(index).map_err(|_| TokenError::Malformed)?;
        if index >= count || entries.iter().any(|e: &Entry| e.index == index) {
            return Err(TokenError::Malformed);
        }
        entries.push(Entry {
            index,
            epoch: u64::from_be_bytes(*epoch),
            offset,
        });
    }
    Ok(entries)
}

/// LEB128.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, TokenError> {
    let mut n: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or(TokenError::Malformed)?;
        *input = rest;
        // The tenth byte holds the 64th bit only.
        if shift == 63 && b > 1 {
            return Err(TokenError::Malformed);
        }
        n |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err(TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(topics: u32, entries: impl Iterator<Item = Entry>) -> String {
        let mut token = String::new();
        encode_token(topics, entries, &mut Vec::new(), &mut token);
        token
    }

    fn entry(index: usize, epoch: u64, offset: u64) -> Entry {
        Entry {
            index,
            epoch,
            offset,
        }
    }

    #[test]
    fn a_token_reads_back_as_written() {
        let entries = vec![entry(0, u64::MAX, 1), entry(3, 7, (1 << 63) - 1)];
        let token = encode(42, entries.iter().copied());
        assert_eq!(decode_token(&token, 42, 4), Ok(entries));
        let empty = encode(42, std::iter::empty());
        assert_eq!(decode_token(&empty, 42, 4), Ok(vec![]));
    }

    #[test]
    fn a_token_of_every_topic_at_the_largest_offset_fits_the_bound() {
        let count = 10_000;
        let entries = (0..count).map(|i| entry(i, u64::MAX, (1 << 63) - 1));
        let token = encode(1, entries);
        assert!(token.len() <= max_token_len(count));
        assert_eq!(decode_token(&token, 1, count).unwrap().len(), count);
    }

    #[test]
    fn a_token_with_an_offset_no_log_can_reach_is_refused() {
        // Crafted: the largest u64, and an overlong varint of a small one.
        let huge = encode(42, [entry(0, 9, u64::MAX)].into_iter());
        assert_eq!(decode_token(&huge, 42, 1), Err(TokenError::Malformed));
        let mut overlong = vec![TOKEN_VERSION];
        overlong.extend_from_slice(&42u32.to_be_bytes());
        overlong.push(0); // index 0
        overlong.extend_from_slice(&9u64.to_be_bytes());
        overlong.extend_from_slice(&[0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
        let overlong = URL_SAFE_NO_PAD.encode(overlong);
        assert_eq!(decode_token(&overlong, 42, 1), Err(TokenError::Malformed));
    }

    #[test]
    fn a_foreign_or_broken_token_is_refused() {
        let token = encode(42, [entry(1, 9, 5)].into_iter());
        assert_eq!(decode_token(&token, 43, 2), Err(TokenError::OtherStream));
        // Its entry names a topic the stream does not have.
        assert_eq!(decode_token(&token, 42, 1), Err(TokenError::Malformed));
        assert_eq!(
            decode_token(&token[..token.len() - 2], 42, 2),
            Err(TokenError::Malformed)
        );
        for junk in ["", "!!", "AAAA", "0:5"] {
            assert!(decode_token(junk, 42, 2).is_err(), "{junk:?}");
        }
        let long = "A".repeat(max_token_len(2) + 1);
        assert_eq!(decode_token(&long, 42, 2), Err(TokenError::Malformed));
    }

    #[test]
    fn accept_picks_the_stream_format_ranked_highest() {
        let mut headers = HeaderMap::new();
        assert_eq!(Format::from_accept(&headers), None);
        headers.insert(
            header::ACCEPT,
            "Text/Event-Stream, application/x-ndjson".parse().unwrap(),
        );
        assert_eq!(Format::from_accept(&headers), Some(Format::Sse));
        headers.insert(header::ACCEPT, "application/x-ndjson".parse().unwrap());
        assert_eq!(Format::from_accept(&headers), Some(Format::Ndjson));
        headers.insert(header::ACCEPT, "*/*".parse().unwrap());
        assert_eq!(Format::from_accept(&headers), None);
        // Ranked: JSON first, or a stream type refused with q=0.
        headers.insert(
            header::ACCEPT,
            "application/json, application/x-ndjson;q=0.1"
                .parse()
                .unwrap(),
        );
        assert_eq!(Format::from_accept(&headers), None);
        headers.insert(header::ACCEPT, "text/event-stream;q=0".parse().unwrap());
        assert_eq!(Format::from_accept(&headers), None);
        headers.insert(
            header::ACCEPT,
            "text/event-stream;q=0.5, application/x-ndjson;q=0.8, */*;q=0.1"
                .parse()
                .unwrap(),
        );
        assert_eq!(Format::from_accept(&headers), Some(Format::Ndjson));
    }

    #[test]
    fn events_are_one_line_in_either_format() {
        let json = b"{\"op\":\"event\",\"data\":{\"a\":\r\n1}}";
        let mut sse = Writer::new(Format::Sse);
        sse.event(json, Some("tok"), Some("\"e\""));
        assert_eq!(
            &sse.into_bytes()[..],
            b"id: tok\ndata: {\"op\":\"event\",\"data\":{\"a\":  1}}\n\n"
        );
        let mut ndjson = Writer::new(Format::Ndjson);
        ndjson.event(json, Some("tok"), Some("\"e\""));
        ndjson.event(b"{\"op\":\"event\"}", None, None);
        assert_eq!(
            &ndjson.into_bytes()[..],
            b"{\"op\":\"event\",\"data\":{\"a\":  1},\"epoch\":\"e\"}\n{\"op\":\"event\"}\n"
        );
    }
}
