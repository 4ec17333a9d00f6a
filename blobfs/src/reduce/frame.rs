//! The stored-chunk frame: what a chunk looks like on disk after
//! compression and encryption. docs/reduce.md draws it; in short, all
//! integers little-endian:
//!
//! ```text
//! offset len  field
//!      0   4  magic "CFSC"
//!      4   1  version (1)
//!      5   1  flags: bits 0-1 encoding (0 raw, 1 lz4, 2 zstd), bit 2 encrypted, others 0
//!      6   2  reserved, 0
//!      8   4  raw length: plaintext bytes, at most MAX_CHUNK_SIZE
//!     12   4  stored length: bytes after the header (before the tag);
//!             = raw length when raw, < raw length when compressed
//!     16  32  chunk hash (BLAKE3 of the plaintext; keyed when encrypted)
//!     48  12  nonce (encrypted), else 0
//!     60   4  CRC32C of bytes 0..60 and the stored bytes (unencrypted), else 0
//!     64   n  stored bytes (AES-256-GCM ciphertext when encrypted)
//!   64+n  16  GCM tag (encrypted only)
//! ```
//!
//! Encrypted frames are authenticated with the 64 header bytes and the scope
//! id as associated data, so no header field can be changed without the tag
//! failing. Unencrypted frames are checked by their CRC. Either way the
//! decoded plaintext must hash to the hash asked for.

use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce, Tag};

use super::MAX_CHUNK_SIZE;
use super::compress::{Codec, Encoding};
use super::error::{FrameProblem, ReduceError};
use super::hash::ChunkHash;
use super::keys::ScopeKeys;
use super::policy::ReducePolicy;

/// Bytes of a frame's header.
pub const HEADER_LEN: usize = 64;
/// Bytes of the GCM tag after an encrypted frame's ciphertext.
pub const TAG_LEN: usize = 16;
/// A frame's first four bytes.
pub const MAGIC: [u8; 4] = *b"CFSC";
/// The frame version this code writes and reads.
pub const VERSION: u8 = 1;
const FLAG_ENCRYPTED: u8 = 1 << 2;
const NONCE_AT: usize = 48;
const CRC_AT: usize = 60;

/// A parsed and checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// How the stored bytes encode the plaintext.
    pub encoding: Encoding,
    /// Whether the stored bytes are encrypted (and a tag follows).
    pub encrypted: bool,
    /// Plaintext length.
    pub raw_len: u32,
    /// Stored length (before the tag).
    pub stored_len: u32,
    /// The chunk's hash.
    pub hash: ChunkHash,
}

impl FrameHeader {
    /// Parses and checks the header at the start of `bytes` (untrusted):
    /// magic, version, flags, and lengths within bounds and consistent.
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameProblem> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(FrameProblem::Truncated { needed: HEADER_LEN, found: bytes.len() })?;
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(FrameProblem::BadMagic { found: magic });
        }
        if h[4] != VERSION {
            return Err(FrameProblem::BadVersion { found: h[4], supported: VERSION });
        }
        let (flags, reserved) = (h[5], u16::from_le_bytes([h[6], h[7]]));
        let encoding = Encoding::from_bits(flags & 3);
        let (Some(encoding), 0, 0) = (encoding, flags & !(3 | FLAG_ENCRYPTED), reserved) else {
            return Err(FrameProblem::BadFlags { flags, reserved });
        };
        let (raw_len, stored_len) = (u32_at(8), u32_at(12));
        if raw_len as usize > MAX_CHUNK_SIZE {
            return Err(FrameProblem::RawTooLong { raw_len, max: MAX_CHUNK_SIZE });
        }
        let consistent = match encoding {
            Encoding::Raw => stored_len == raw_len,
            Encoding::Lz4 | Encoding::Zstd => stored_len < raw_len,
        };
        if !consistent {
            return Err(FrameProblem::BadStoredLength { stored_len, raw_len, encoding: encoding.name() });
        }
        let mut hash = [0; 32];
        hash.copy_from_slice(&h[16..48]);
        Ok(Self { encoding, encrypted: flags & FLAG_ENCRYPTED != 0, raw_len, stored_len, hash: ChunkHash(hash) })
    }

    /// The whole frame's length: header, stored bytes and tag.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.stored_len as usize + if self.encrypted { TAG_LEN } else { 0 }
    }

    fn write(&self, h: &mut [u8]) {
        h[..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = self.encoding as u8 | if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        h[6..8].fill(0);
        h[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        h[16..48].copy_from_slice(&self.hash.0);
        h[48..HEADER_LEN].fill(0);
    }
}

/// The associated data of an encrypted frame: the header (CRC field zero)
/// and the scope id.
fn aad(header: &[u8], scope: u64) -> [u8; HEADER_LEN + 8] {
    let mut aad = [0; HEADER_LEN + 8];
    aad[..HEADER_LEN].copy_from_slice(&header[..HEADER_LEN]);
    aad[HEADER_LEN..].copy_from_slice(&scope.to_le_bytes());
    aad
}

fn crc(header: &[u8], stored: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_AT]), stored)
}

/// Encodes one chunk with `policy`: its hash and its frame.
pub fn encode_chunk(
    policy: &ReducePolicy,
    keys: &ScopeKeys,
    plaintext: &[u8],
) -> Result<(ChunkHash, Vec<u8>), ReduceError> {
    policy.validate()?;
    encode_with(&mut Codec::default(), policy, keys, plaintext)
}

/// [`encode_chunk`] with a caller's codec (reused across chunks) and a
/// policy already validated.
pub(crate) fn encode_with(
    codec: &mut Codec,
    policy: &ReducePolicy,
    keys: &ScopeKeys,
    plaintext: &[u8],
) -> Result<(ChunkHash, Vec<u8>), ReduceError> {
    if plaintext.len() > MAX_CHUNK_SIZE {
        return Err(ReduceError::ChunkTooLarge { len: plaintext.len(), max: MAX_CHUNK_SIZE });
    }
    let hash = keys.hash(policy.encrypt, plaintext)?;
    encode_hashed(codec, policy, keys, plaintext, hash).map(|frame| (hash, frame))
}

/// [`encode_with`] of a chunk whose hash the caller has already taken
/// (`keys.hash(policy.encrypt, plaintext)`, at most [`MAX_CHUNK_SIZE`]
/// bytes): the frame.
pub(crate) fn encode_hashed(
    codec: &mut Codec,
    policy: &ReducePolicy,
    keys: &ScopeKeys,
    plaintext: &[u8],
    hash: ChunkHash,
) -> Result<Vec<u8>, ReduceError> {
    debug_assert!(plaintext.len() <= MAX_CHUNK_SIZE);
    let (encoding, stored) = codec.compress(policy.compression, plaintext);
    // Both lengths fit in u32: at most MAX_CHUNK_SIZE.
    let header = FrameHeader {
        encoding,
        encrypted: policy.encrypt,
        raw_len: plaintext.len() as u32,
        stored_len: stored.len() as u32,
        hash,
    };
    let mut frame = Vec::with_capacity(header.frame_len());
    frame.extend_from_slice(&[0; HEADER_LEN]);
    frame.extend_from_slice(stored);
    frame.resize(header.frame_len(), 0);
    let stored_len = stored.len();
    let (head, body) = frame.split_at_mut(HEADER_LEN);
    header.write(head);
    if policy.encrypt {
        let key = keys.chunk_key(&hash).ok_or(ReduceError::NoKey { scope: keys.scope() })?;
        let cipher = Aes256Gcm::new(&(*key).into());
        // A fresh random nonce per encryption (see docs/reduce.md, "Nonces").
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        head[NONCE_AT..CRC_AT].copy_from_slice(&nonce);
        let (stored, tag) = body.split_at_mut(stored_len);
        let t = cipher
            .encrypt_in_place_detached(&nonce, &aad(head, keys.scope()), stored)
            .map_err(|_| ReduceError::Encrypt { chunk: hash })?;
        tag.copy_from_slice(&t);
    } else {
        let c = crc(head, body);
        head[CRC_AT..].copy_from_slice(&c.to_le_bytes());
    }
    Ok(frame)
}

/// Decodes a frame (untrusted bytes) of chunk `expected`: checks the header,
/// the CRC or the GCM tag, decompresses and checks the plaintext's hash. Any
/// problem is an error naming the chunk; never wrong bytes.
pub fn decode_chunk(keys: &ScopeKeys, expected: &ChunkHash, frame: &[u8]) -> Result<Vec<u8>, ReduceError> {
    let header = FrameHeader::parse(frame).map_err(|problem| ReduceError::Chunk { chunk: *expected, problem })?;
    let mut out = vec![0; header.raw_len as usize];
    decode_into(&mut Codec::default(), &mut Vec::new(), keys, expected, &header, frame, &mut out)?;
    Ok(out)
}

/// Decodes `frame`, whose header is `header`, into `out` (exactly
/// `header.raw_len` bytes). `scratch` holds the decrypted bytes of a
/// compressed frame and is reused across calls.
pub(crate) fn decode_into(
    codec: &mut Codec,
    scratch: &mut Vec<u8>,
    keys: &ScopeKeys,
    expected: &ChunkHash,
    header: &FrameHeader,
    frame: &[u8],
    out: &mut [u8],
) -> Result<(), ReduceError> {
    let fail = |problem| ReduceError::Chunk { chunk: *expected, problem };
    let len = header.frame_len();
    if frame.len() < len {
        return Err(fail(FrameProblem::Truncated { needed: len, found: frame.len() }));
    }
    if frame.len() > len {
        return Err(fail(FrameProblem::TrailingBytes { extra: frame.len() - len }));
    }
    if header.hash != *expected {
        return Err(fail(FrameProblem::WrongChunk { found: header.hash }));
    }
    let (head, body) = frame.split_at(HEADER_LEN);
    let stored = &body[..header.stored_len as usize];
    if header.encrypted {
        let key = keys.chunk_key(expected).ok_or(fail(FrameProblem::NoKey))?;
        let cipher = Aes256Gcm::new(&(*key).into());
        let nonce = Nonce::from_slice(&head[NONCE_AT..CRC_AT]);
        let tag = Tag::from_slice(&body[header.stored_len as usize..]);
        // Raw: decrypt straight into `out`; compressed: into `scratch`.
        let buf: &mut [u8] = if header.encoding == Encoding::Raw {
            out.copy_from_slice(stored);
            &mut *out
        } else {
            scratch.clear();
            scratch.extend_from_slice(stored);
            &mut scratch[..]
        };
        cipher
            .decrypt_in_place_detached(nonce, &aad(head, keys.scope()), buf, tag)
            .map_err(|_| fail(FrameProblem::Authentication))?;
        if header.encoding != Encoding::Raw {
            codec
                .decompress(header.encoding, scratch, out)
                .map_err(|reason| fail(FrameProblem::Decompress { encoding: header.encoding.name(), reason }))?;
        }
    } else {
        let stored_crc = u32::from_le_bytes([head[60], head[61], head[62], head[63]]);
        let computed = crc(head, stored);
        if stored_crc != computed {
            return Err(fail(FrameProblem::BadChecksum { stored: stored_crc, computed }));
        }
        codec
            .decompress(header.encoding, stored, out)
            .map_err(|reason| fail(FrameProblem::Decompress { encoding: header.encoding.name(), reason }))?;
    }
    let found = keys.hash(header.encrypted, out).map_err(|_| fail(FrameProblem::NoKey))?;
    if found != *expected {
        return Err(fail(FrameProblem::HashMismatch { found }));
    }
    Ok(())
}
