//! Accepted at the edge ⇒ encodes in both encodings. Any bytes as an HTTP
//! JSON body and as a WebSocket publish frame in both encodings: whatever
//! payload the edge accepts must become an event frame in `herald.json`
//! and in `herald.msgpack`.
#![no_main]

use herald::event::Event;
use herald::payload::Payload;
use herald::protocol::{self, ClientOp, Encoding};
use herald::topic::Topic;
use libfuzzer_sys::fuzz_target;

fn assert_encodes(payload: Payload) {
    let event = Event::new(Topic::parse("fuzz").unwrap(), 1, 0, payload);
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        assert!(
            event.ws_frame(encoding).is_some(),
            "accepted at the edge but not encodable in {encoding:?}: {:?}",
            event.payload
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = Payload::json_from_slice(data) {
        assert_encodes(payload);
    }
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        if let Ok(ClientOp::Publish { payload, .. }) = protocol::decode(encoding, data) {
            assert_encodes(payload);
        }
    }
});
