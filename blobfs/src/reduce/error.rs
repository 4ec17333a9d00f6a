//! Errors of the data-reduction stages.

use super::hash::ChunkHash;

/// Why a data-reduction operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    /// A chunking parameter is out of range.
    #[error("invalid chunking: {param} = {value} is not allowed; allowed: {allowed}")]
    Chunking {
        /// The parameter (`fixed size`, `cdc min`, `cdc avg`, `cdc max`).
        param: &'static str,
        /// The value given.
        value: u64,
        /// What is allowed.
        allowed: String,
    },
    /// A Zstd level is out of range.
    #[error("invalid compression: zstd level {level} is not allowed; allowed: {min}..={max}")]
    ZstdLevel {
        /// The level given.
        level: i32,
        /// Lowest level allowed.
        min: i32,
        /// Highest level allowed.
        max: i32,
    },
    /// The text form of a policy does not parse.
    #[error("bad reduce policy {text:?}: {reason}")]
    Policy {
        /// The text.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key file could not be read or has the wrong format.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Key material (not from a file) has the wrong format.
    #[error("bad master key: {0}")]
    KeyFormat(String),
    /// The passphrase key derivation failed or its parameters are refused.
    #[error("passphrase key derivation (Argon2id): {0}")]
    Kdf(String),
    /// The policy asks for encryption but the scope has no key.
    #[error("scope {scope} has no key, but the policy encrypts (give a master key)")]
    NoKey {
        /// The scope.
        scope: u64,
    },
    /// A plaintext chunk is longer than a frame may hold.
    #[error("chunk of {len} bytes is longer than the maximum of {max}")]
    ChunkTooLarge {
        /// Its length.
        len: usize,
        /// The maximum ([`super::MAX_CHUNK_SIZE`]).
        max: usize,
    },
    /// Encryption failed (the cipher refused the input).
    #[error("encrypting chunk {chunk} failed")]
    Encrypt {
        /// The chunk.
        chunk: ChunkHash,
    },
    /// A stored chunk does not decode: corrupt, tampered with, or read with
    /// the wrong key. Never answered with bytes.
    #[error("chunk {chunk}: {problem}")]
    Chunk {
        /// The chunk asked for (its expected hash).
        chunk: ChunkHash,
        /// What is wrong with its frame.
        problem: FrameProblem,
    },
}

/// What is wrong with a stored-chunk frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameProblem {
    /// Fewer bytes than the header or the lengths it gives.
    #[error("frame truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// Bytes after the end the header gives.
    #[error("frame has {extra} bytes after its end")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// Not a frame.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A frame version this code does not read.
    #[error("unsupported frame version {found} (this code reads version {supported})")]
    BadVersion {
        /// The version found.
        found: u8,
        /// The version this code reads.
        supported: u8,
    },
    /// Unknown flag bits or encoding, or a nonzero reserved field.
    #[error("bad flags {flags:#04x} / reserved {reserved:#06x}")]
    BadFlags {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
    /// A plaintext length over the maximum chunk size.
    #[error("raw length {raw_len} over the maximum chunk size {max}")]
    RawTooLong {
        /// The raw length in the header.
        raw_len: u32,
        /// The maximum.
        max: usize,
    },
    /// Stored length inconsistent with the raw length and the encoding.
    #[error("stored length {stored_len} does not fit raw length {raw_len} with encoding {encoding}")]
    BadStoredLength {
        /// Stored length.
        stored_len: u32,
        /// Raw length.
        raw_len: u32,
        /// The encoding named in the flags.
        encoding: &'static str,
    },
    /// The frame holds another chunk than the one asked for.
    #[error("frame holds chunk {found}")]
    WrongChunk {
        /// The hash in the frame.
        found: ChunkHash,
    },
    /// CRC32C mismatch (unencrypted frame).
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The CRC in the frame.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The GCM tag does not verify.
    #[error("authentication failed: tampered with, or the wrong key")]
    Authentication,
    /// The frame is encrypted and no key was given.
    #[error("frame is encrypted and no key was given")]
    NoKey,
    /// The compressed bytes do not decompress to the raw length.
    #[error("{encoding} decompression failed: {reason}")]
    Decompress {
        /// The encoding.
        encoding: &'static str,
        /// The codec's complaint.
        reason: String,
    },
    /// The decoded plaintext does not hash to the chunk's hash.
    #[error("content hash mismatch: plaintext hashes to {found}")]
    HashMismatch {
        /// The hash of the decoded plaintext.
        found: ChunkHash,
    },
}
