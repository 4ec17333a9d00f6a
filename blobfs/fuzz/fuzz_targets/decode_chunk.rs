//! Fuzzes the stored-chunk decoder with untrusted frames: it must return the
//! plaintext or an error naming the problem; never panic, hang or allocate
//! more than the maximum chunk size.
//!
//! Input: byte 0 picks the keys (even: a scope with a key, odd: none) and
//! the expected hash (bit 1: the hash the frame claims, else a fixed one);
//! the rest is the frame. Seeds are valid frames of every encoding, so the
//! mutations reach the CRC, the GCM tag and the decompressors.
#![no_main]

use blobfs::reduce::{ChunkHash, FrameHeader, MasterKey, ScopeKeys, decode_chunk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frame)) = data.split_first() else { return };
    let keys = if mode & 1 == 0 { MasterKey::from_bytes([42; 32]).scope(7) } else { ScopeKeys::unencrypted(7) };
    let expected = match FrameHeader::parse(frame) {
        Ok(h) if mode & 2 == 0 => h.hash,
        _ => ChunkHash([1; 32]),
    };
    if let Ok(plain) = decode_chunk(&keys, &expected, frame) {
        // Whatever decodes is the chunk asked for.
        assert_eq!(keys.hash(FrameHeader::parse(frame).unwrap().encrypted, &plain).unwrap(), expected);
    }
});
