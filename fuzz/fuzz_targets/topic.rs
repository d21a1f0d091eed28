//! Any string as a topic and as a pattern: parsing never panics, a parsed
//! topic prints back as given, and a pattern made of a topic matches it.
#![no_main]

use herald::topic::{Pattern, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    let topic = Topic::parse(data);
    let pattern = Pattern::parse(data);
    if let Ok(topic) = &topic {
        assert_eq!(topic.as_str(), data);
        let literal = pattern.as_ref().expect("every topic is a valid pattern");
        assert!(literal.matches(topic));
        assert!(Pattern::parse(">").unwrap().matches(topic));
    }
    if let (Ok(pattern), Some((head, _))) = (&pattern, data.split_once('.')) {
        if let Ok(prefix) = Topic::parse(head) {
            let _ = pattern.matches(&prefix);
        }
    }
});
