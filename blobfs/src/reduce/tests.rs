//! Tests of the stages together: frames and the parallel pipeline.

use proptest::prelude::*;

use super::compress::Encoding;
use super::frame::{HEADER_LEN, TAG_LEN};
use super::policy::tests::policies;
use super::*;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Text-like data: words from a small vocabulary.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = ["block ", "chunk ", "segment ", "the ", "of ", "reactor ", "blob ", "data\n"];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
    }
    out.truncate(len);
    out
}

fn keys() -> ScopeKeys {
    MasterKey::from_bytes([42; 32]).scope(7)
}

fn policy(text: &str) -> ReducePolicy {
    text.parse().unwrap()
}

fn assert_names_chunk(err: ReduceError, hash: &ChunkHash) -> FrameProblem {
    let msg = err.to_string();
    assert!(msg.contains(&hash.to_string()), "error does not name the chunk: {msg}");
    match err {
        ReduceError::Chunk { chunk, problem } if chunk == *hash => problem,
        other => panic!("not a chunk error: {other}"),
    }
}

#[test]
fn frames_round_trip_for_every_compression_and_encryption() {
    let data = text(100_000, 1);
    for p in ["none", "lz4", "zstd:1", "zstd:19", "none,enc", "lz4,enc", "zstd:3,enc"] {
        let (hash, frame) = encode_chunk(&policy(p), &keys(), &data).unwrap();
        assert_eq!(decode_chunk(&keys(), &hash, &frame).unwrap(), data, "{p}");
        let header = FrameHeader::parse(&frame).unwrap();
        assert_eq!(header.frame_len(), frame.len());
        assert_eq!(header.encrypted, p.ends_with("enc"));
        assert_eq!(header.encoding == Encoding::Raw, p.starts_with("none"), "{p}");
    }
    // Empty chunks too.
    let (hash, frame) = encode_chunk(&policy("lz4,enc"), &keys(), b"").unwrap();
    assert_eq!(decode_chunk(&keys(), &hash, &frame).unwrap(), b"");
}

#[test]
fn incompressible_data_is_stored_raw() {
    let data = random(65536, 2);
    for p in ["lz4", "zstd:3", "zstd:19,enc"] {
        let (_, frame) = encode_chunk(&policy(p), &keys(), &data).unwrap();
        let header = FrameHeader::parse(&frame).unwrap();
        assert_eq!(header.encoding, Encoding::Raw, "{p}");
        assert_eq!(header.stored_len as usize, data.len());
    }
    let (_, frame) = encode_chunk(&policy("zstd:3"), &keys(), &text(65536, 3)).unwrap();
    assert!(frame.len() < 65536 / 2, "text compresses: {}", frame.len());
}

#[test]
fn flipping_any_byte_of_an_encrypted_frame_is_an_error_naming_the_chunk() {
    for p in ["none,enc", "lz4,enc"] {
        let (hash, frame) = encode_chunk(&policy(p), &keys(), &text(3000, 4)).unwrap();
        for i in 0..frame.len() {
            for bit in [0x01, 0x80] {
                let mut bad = frame.clone();
                bad[i] ^= bit;
                let err = decode_chunk(&keys(), &hash, &bad).expect_err(&format!("{p}: flip at {i} decoded"));
                assert_names_chunk(err, &hash);
            }
        }
    }
}

#[test]
fn flipping_any_byte_of_a_plain_frame_is_an_error_naming_the_chunk() {
    for p in ["none", "lz4"] {
        let (hash, frame) = encode_chunk(&policy(p), &keys(), &text(3000, 5)).unwrap();
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let err = decode_chunk(&keys(), &hash, &bad).expect_err(&format!("{p}: flip at {i} decoded"));
            assert_names_chunk(err, &hash);
        }
    }
}

#[test]
fn a_wrong_key_or_scope_is_an_authentication_error() {
    let (hash, frame) = encode_chunk(&policy("lz4,enc"), &keys(), &text(5000, 6)).unwrap();
    let other_master = MasterKey::from_bytes([43; 32]).scope(7);
    let other_scope = MasterKey::from_bytes([42; 32]).scope(8);
    for k in [other_master, other_scope] {
        let problem = assert_names_chunk(decode_chunk(&k, &hash, &frame).unwrap_err(), &hash);
        assert_eq!(problem, FrameProblem::Authentication);
    }
    let problem = assert_names_chunk(decode_chunk(&ScopeKeys::unencrypted(7), &hash, &frame).unwrap_err(), &hash);
    assert_eq!(problem, FrameProblem::NoKey);
    // Encrypting without a key is refused up front.
    let err = encode_chunk(&policy("lz4,enc"), &ScopeKeys::unencrypted(3), b"x").unwrap_err();
    assert!(matches!(err, ReduceError::NoKey { scope: 3 }), "{err}");
}

#[test]
fn malformed_frames_are_errors_naming_the_problem() {
    let (hash, frame) = encode_chunk(&policy("lz4"), &keys(), &text(5000, 7)).unwrap();
    let decode = |f: &[u8]| assert_names_chunk(decode_chunk(&keys(), &hash, f).unwrap_err(), &hash);
    let with = |at: usize, bytes: &[u8]| {
        let mut f = frame.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    assert!(matches!(decode(&frame[..10]), FrameProblem::Truncated { needed: HEADER_LEN, found: 10 }));
    assert!(matches!(decode(&frame[..frame.len() - 1]), FrameProblem::Truncated { .. }));
    let mut long = frame.clone();
    long.push(0);
    assert_eq!(decode(&long), FrameProblem::TrailingBytes { extra: 1 });
    assert!(matches!(decode(&with(0, b"XXXX")), FrameProblem::BadMagic { found } if &found == b"XXXX"));
    assert_eq!(decode(&with(4, &[9])), FrameProblem::BadVersion { found: 9, supported: 1 });
    assert!(matches!(decode(&with(5, &[0x13])), FrameProblem::BadFlags { flags: 0x13, .. }));
    assert!(matches!(decode(&with(5, &[0x03])), FrameProblem::BadFlags { .. }));
    assert!(matches!(decode(&with(6, &[1])), FrameProblem::BadFlags { reserved: 1, .. }));
    assert!(matches!(decode(&with(8, &u32::MAX.to_le_bytes())), FrameProblem::RawTooLong { .. }));
    assert!(matches!(decode(&with(12, &u32::MAX.to_le_bytes())), FrameProblem::BadStoredLength { .. }));
    assert!(matches!(decode(&with(16, &[0; 32])), FrameProblem::WrongChunk { .. }));
    assert!(matches!(decode(&with(60, &[0; 4])), FrameProblem::BadChecksum { .. }));
    let last = frame.len() - 1;
    assert!(matches!(decode(&with(last, &[frame[last] ^ 1])), FrameProblem::BadChecksum { .. }));
    // A frame of another chunk, and an unencrypted frame claiming a keyed
    // hash: refused.
    let (other, other_frame) = encode_chunk(&policy("lz4"), &keys(), b"other").unwrap();
    assert!(matches!(decode(&other_frame), FrameProblem::WrongChunk { found } if found == other));
    let (enc_hash, _) = encode_chunk(&policy("lz4,enc"), &keys(), b"other").unwrap();
    let mut forged = other_frame.clone();
    forged[16..48].copy_from_slice(&enc_hash.0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&forged[..60]), &forged[HEADER_LEN..]);
    forged[60..64].copy_from_slice(&crc.to_le_bytes());
    let problem = assert_names_chunk(decode_chunk(&keys(), &enc_hash, &forged).unwrap_err(), &enc_hash);
    assert!(matches!(problem, FrameProblem::HashMismatch { .. }), "{problem}");
}

#[test]
fn compressed_garbage_with_a_valid_checksum_is_a_decompression_error() {
    let (hash, mut frame) = encode_chunk(&policy("lz4"), &keys(), &text(5000, 8)).unwrap();
    frame[HEADER_LEN..].fill(0xff);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..60]), &frame[HEADER_LEN..]);
    frame[60..64].copy_from_slice(&crc.to_le_bytes());
    let problem = assert_names_chunk(decode_chunk(&keys(), &hash, &frame).unwrap_err(), &hash);
    assert!(matches!(problem, FrameProblem::Decompress { encoding: "lz4", .. }), "{problem}");
}

#[test]
fn oversized_chunks_are_refused() {
    let err = encode_chunk(&policy("lz4"), &keys(), &vec![0; MAX_CHUNK_SIZE + 1]).unwrap_err();
    assert!(matches!(err, ReduceError::ChunkTooLarge { .. }), "{err}");
}

#[test]
fn encrypted_frames_differ_but_hashes_dedupe() {
    let data = text(10_000, 9);
    let (h1, f1) = encode_chunk(&policy("lz4,enc"), &keys(), &data).unwrap();
    let (h2, f2) = encode_chunk(&policy("lz4,enc"), &keys(), &data).unwrap();
    assert_eq!(h1, h2);
    assert_ne!(f1[HEADER_LEN..], f2[HEADER_LEN..], "fresh nonce per encryption");
    assert_eq!(f1.len(), HEADER_LEN + FrameHeader::parse(&f1).unwrap().stored_len as usize + TAG_LEN);
}

#[test]
fn parallel_pipeline_equals_serial_and_decodes() {
    let mut data = text(3 << 20, 10);
    data.extend(random(2 << 20, 11));
    for p in ["cdc:16k:64k:256k,lz4,enc", "fixed:64k,zstd:3", "cdc:4k:16k:64k,none"] {
        let p = policy(p);
        let serial = encode_all_threads(&p, &keys(), &data, 1).unwrap();
        let parallel = encode_all_threads(&p, &keys(), &data, 3).unwrap();
        let ranges = |v: &[EncodedChunk]| v.iter().map(|c| (c.range.clone(), c.hash)).collect::<Vec<_>>();
        assert_eq!(ranges(&serial), ranges(&parallel));
        let expected: Vec<_> = p.chunking.chunker().unwrap().chunks(&data).collect();
        assert_eq!(serial.iter().map(|c| c.range.clone()).collect::<Vec<_>>(), expected);
        let frames: Vec<_> = parallel.iter().map(|c| (c.hash, &c.frame[..])).collect();
        assert_eq!(decode_all_threads(&keys(), &frames, 3).unwrap(), data);
        assert_eq!(decode_all_threads(&keys(), &frames, 1).unwrap(), data);
    }
    assert!(encode_all(&ReducePolicy::default(), &keys(), b"").unwrap().is_empty());
    assert!(decode_all(&keys(), &[]).unwrap().is_empty());
}

#[test]
fn decode_all_names_the_bad_chunk() {
    let data = text(1 << 20, 12);
    let chunks = encode_all(&policy("cdc:16k:64k:256k,lz4,enc"), &keys(), &data).unwrap();
    let mut frames: Vec<_> = chunks.iter().map(|c| (c.hash, c.frame.clone())).collect();
    let victim = frames.len() / 2;
    let at = frames[victim].1.len() - 20;
    frames[victim].1[at] ^= 1;
    let refs: Vec<_> = frames.iter().map(|(h, f)| (*h, &f[..])).collect();
    let problem = assert_names_chunk(decode_all(&keys(), &refs).unwrap_err(), &chunks[victim].hash);
    assert_eq!(problem, FrameProblem::Authentication);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every policy, random or text-like data: encode_all then decode_all
    /// gives the data back; chunks tile the input within the size limits.
    #[test]
    fn every_policy_round_trips(p in policies(), seed in any::<u64>(), len in 0usize..600_000, texty in any::<bool>()) {
        let data = if texty { text(len, seed) } else { random(len, seed) };
        let keys = if p.encrypt { keys() } else { ScopeKeys::unencrypted(7) };
        let chunks = encode_all(&p, &keys, &data).unwrap();
        let mut at = 0;
        for c in &chunks {
            prop_assert_eq!(c.range.start, at);
            prop_assert!(c.range.len() <= p.chunking.max_chunk());
            at = c.range.end;
            prop_assert_eq!(decode_chunk(&keys, &c.hash, &c.frame).unwrap(), &data[c.range.clone()]);
        }
        prop_assert_eq!(at, data.len());
        let frames: Vec<_> = chunks.iter().map(|c| (c.hash, &c.frame[..])).collect();
        prop_assert_eq!(decode_all(&keys, &frames).unwrap(), data);
    }

    /// The decoder never panics on arbitrary bytes or on mutated frames.
    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                     flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
        let hash = ChunkHash([1; 32]);
        let _ = decode_chunk(&keys(), &hash, &bytes);
        let (hash, mut frame) = encode_chunk(&policy("zstd:3"), &keys(), &text(2000, 1)).unwrap();
        for (at, x) in flips {
            let n = frame.len();
            frame[at % n] ^= x;
        }
        let _ = decode_chunk(&keys(), &hash, &frame);
    }
}

/// The decode_chunk fuzz target's seeds (blobfs/fuzz/seeds/decode_chunk) are
/// valid frames of every encoding, preceded by the target's mode byte (0:
/// keys of scope 7). This checks they still decode; with
/// CLAUDEFS_WRITE_SEEDS=1 it writes them afresh (after a format change).
#[test]
fn fuzz_seeds_are_valid_frames() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode_chunk");
    let data = text(1500, 13);
    let policies = ["none", "lz4", "zstd:3", "none,enc", "lz4,enc", "zstd:3,enc"];
    if std::env::var_os("CLAUDEFS_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for p in policies {
            let (_, frame) = encode_chunk(&policy(p), &keys(), &data).unwrap();
            let name = p.replace([',', ':'], "-");
            std::fs::write(dir.join(name), [&[0u8][..], &frame].concat()).unwrap();
        }
    }
    for p in policies {
        let seed = std::fs::read(dir.join(p.replace([',', ':'], "-"))).unwrap();
        let frame = &seed[1..];
        let hash = FrameHeader::parse(frame).unwrap().hash;
        assert_eq!(decode_chunk(&keys(), &hash, frame).unwrap(), data, "seed {p}");
    }
}
