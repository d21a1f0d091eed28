//! Any bytes as a client frame, in both encodings: decoding must answer
//! (an op or an error), never panic or overflow the stack.
#![no_main]

use herald::protocol::{self, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let _ = protocol::decode(encoding, data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herald::payload::check_json(text);
    }
});
