//! Fuzzes the decoding of the file system's metadata state as a snapshot
//! holds it (inodes, maps, the dedupe index and segments: on-disk bytes, so
//! untrusted). A state that decodes must pass or fail `check` with a
//! description, never panic; one that passes encodes back to the same state.
#![no_main]

use blobfs::fs::raft::{decode_state, encode_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = decode_state(data) else { return };
    if state.check().is_ok() {
        let again = decode_state(&encode_state(&state)).expect("an encoded state decodes");
        assert_eq!(again, state);
    }
});
