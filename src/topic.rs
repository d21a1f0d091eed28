//! Topic names and grant patterns.
//!
//! Owns the one definition of what a topic is. A [`Topic`] is a dot-separated
//! list of segments drawn from `[A-Za-z0-9_-]`, at most [`MAX_TOPIC_BYTES`]
//! long. A [`Pattern`] (only ever found in token grants) may also hold `*`
//! (exactly one segment) and, as its last segment, `>` (one or more
//! segments). Both are parsed once at the edge; inside Herald a `Topic` is
//! always valid.

use std::fmt;
use std::sync::Arc;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;

/// Why a string is not a topic or a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong,
    #[error("topic has an empty segment (leading, trailing or double dot)")]
    EmptySegment,
    #[error("topic segment {0:?} has characters outside [A-Za-z0-9_-]")]
    BadCharacter(String),
    #[error(
        "wildcards (`*`, `>`) are only allowed in token grants; subscribe and publish take one exact topic"
    )]
    Wildcard,
    #[error("`>` may only be the last segment of a pattern")]
    TailNotLast,
}

fn is_segment_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// True when `s` may stand as one topic segment (non-empty, topic alphabet).
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_segment_char)
}

fn check_shape(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    Ok(())
}

/// A valid, exact topic name. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Which of `count` lanes the topic belongs to (`count` > 0): always the
    /// same one, on every node.
    pub fn lane(&self, count: usize) -> usize {
        use std::hash::{DefaultHasher, Hash, Hasher};
        // `DefaultHasher::new()` has fixed keys: stable within a build.
        let mut hasher = DefaultHasher::new();
        self.as_str().hash(&mut hasher);
        (hasher.finish() % count as u64) as usize
    }

    /// Parses an exact topic name; wildcards are refused.
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        check_shape(s)?;
        for seg in s.split('.') {
            if seg.is_empty() {
                return Err(TopicError::EmptySegment);
            }
            if seg == "*" || seg == ">" {
                return Err(TopicError::Wildcard);
            }
            if !is_valid_segment(seg) {
                return Err(TopicError::BadCharacter(seg.to_owned()));
            }
        }
        Ok(Topic(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl serde::Serialize for Topic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `>`: one or more segments; always last.
    Tail,
}

/// A subscription or publish grant: a topic with optional wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, TopicError> {
        check_shape(s)?;
        let parts: Vec<&str> = s.split('.').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, seg) in parts.into_iter().enumerate() {
            segments.push(match seg {
                "" => return Err(TopicError::EmptySegment),
                "*" => Segment::One,
                ">" if i == last => Segment::Tail,
                ">" => return Err(TopicError::TailNotLast),
                lit if is_valid_segment(lit) => Segment::Literal(lit.to_owned()),
                bad => return Err(TopicError::BadCharacter(bad.to_owned())),
            });
        }
        Ok(Pattern { segments })
    }

    /// Whether this pattern covers `topic`.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut parts = topic.as_str().split('.');
        for seg in &self.segments {
            match seg {
                Segment::Tail => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, topic: &str) -> bool {
        Pattern::parse(pattern)
            .unwrap()
            .matches(&Topic::parse(topic).unwrap())
    }

    #[test]
    fn valid_topics_parse() {
        for t in ["alerts", "chat.room-1", "a.b.c_d", "X", &"a".repeat(255)] {
            assert!(Topic::parse(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn invalid_topics_are_refused_with_a_reason() {
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse(&"a".repeat(256)), Err(TopicError::TooLong));
        assert_eq!(Topic::parse("a..b"), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse(".a"), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse("a."), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse("a.*"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("a.>"), Err(TopicError::Wildcard));
        assert!(matches!(
            Topic::parse("a b"),
            Err(TopicError::BadCharacter(_))
        ));
        assert!(matches!(
            Topic::parse("caf\u{e9}"),
            Err(TopicError::BadCharacter(_))
        ));
        assert!(matches!(
            Topic::parse("a{sub}"),
            Err(TopicError::BadCharacter(_))
        ));
    }

    #[test]
    fn literal_pattern_matches_itself_only() {
        assert!(m("alerts", "alerts"));
        assert!(!m("alerts", "alerts.x"));
        assert!(!m("alerts", "alert"));
        assert!(!m("a.b", "a"));
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(m("chat.*", "chat.room1"));
        assert!(!m("chat.*", "chat"));
        assert!(!m("chat.*", "chat.room1.x"));
        assert!(m("*.x", "a.x"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.b.d"));
    }

    #[test]
    fn tail_matches_one_or_more_segments() {
        assert!(m("chat.>", "chat.a"));
        assert!(m("chat.>", "chat.a.b.c"));
        assert!(!m("chat.>", "chat"));
        assert!(!m("chat.>", "other.a"));
        assert!(m(">", "anything"));
        assert!(m(">", "any.thing"));
    }

    #[test]
    fn tail_only_last() {
        assert_eq!(Pattern::parse("a.>.b"), Err(TopicError::TailNotLast));
        assert_eq!(Pattern::parse("a..b"), Err(TopicError::EmptySegment));
        assert!(matches!(
            Pattern::parse("a.b*"),
            Err(TopicError::BadCharacter(_))
        ));
    }
}
