//! Inputs that once crashed or misled the decoders (found by tests or the
//! fuzz targets in `fuzz/`), replayed on every run.

use herald::protocol::{self, Encoding};

#[test]
fn every_kept_client_frame_is_answered_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions/client_frame");
    let mut replayed = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            // Deeply nested inputs must be refused, not crash the thread.
            let _ = protocol::decode(encoding, &input);
        }
        replayed += 1;
    }
    assert!(replayed >= 2, "the regression inputs are in {dir}");
}
