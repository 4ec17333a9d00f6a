//! The wire format: a 32-byte frame header, the payloads of the control
//! frames, and the stream decoder the TCP transport reads through.
//!
//! Every message on every transport is one frame: a fixed header followed by
//! `length` payload bytes (docs/fabric.md draws it byte by byte). All integers
//! are little-endian.
//!
//! ```text
//!  0      4   5   6     8                16      20    22    24      28      32
//!  +------+---+---+-----+----------------+-------+-----+-----+-------+-------+
//!  |magic |ver|op |flags|   request id   |length |meth.|cred.|pay.crc|hdr.crc|
//!  +------+---+---+-----+----------------+-------+-----+-----+-------+-------+
//! ```
//!
//! The header checksum (CRC32C of bytes 0..28) is always checked before any
//! other field is trusted; the payload checksum is checked when the
//! [`flags::DIGEST`] bit says it was computed. Decoding never panics and never
//! allocates more than the configured maximum payload: every fault is a
//! [`FrameError`] naming what was wrong.
//!
//! ```
//! use fabric::frame::{Header, Opcode, HEADER_LEN};
//! let h = Header::new(Opcode::Request, 7).method(3).payload(b"hello");
//! let bytes = h.encode();
//! assert_eq!(bytes.len(), HEADER_LEN);
//! let back = Header::decode(&bytes, 1 << 20).unwrap();
//! assert_eq!((back.opcode, back.request_id, back.length, back.method), (Opcode::Request, 7, 5, 3));
//! back.check_payload(b"hello").unwrap();
//! assert!(back.check_payload(b"jello").is_err());
//! ```

use pmd::DmaBuf;

/// Bytes of every frame header.
pub const HEADER_LEN: usize = 32;
/// First four bytes of every frame: "CFSR" (ClaudeFS RPC).
pub const MAGIC: [u8; 4] = *b"CFSR";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Payloads of this many bytes or more are "bulk": moved by RMA where the
/// transport can, and checksummed only when the connection asks for it.
pub const BULK_THRESHOLD: usize = 64 * 1024;
/// The largest payload an inline frame carries on a message transport
/// (one 64 KiB receive buffer minus the header).
pub const MAX_INLINE: usize = BULK_THRESHOLD - HEADER_LEN;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Opens a connection: the sender's identity, limits and address ([`Hello`]).
    Hello = 1,
    /// Accepts a connection: the acceptor's [`Hello`].
    HelloAck = 2,
    /// A request for `method`.
    Request = 3,
    /// The answer to the request with the same id.
    Response = 4,
    /// The sender gave up on a request it sent (timeout or cancellation).
    Cancel = 5,
    /// Keepalive probe.
    Ping = 6,
    /// Keepalive answer.
    Pong = 7,
    /// The receiver of a bulk payload has read it: the sender may free it.
    BulkDone = 8,
    /// The sender closes the connection.
    Goodbye = 9,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Request,
            4 => Self::Response,
            5 => Self::Cancel,
            6 => Self::Ping,
            7 => Self::Pong,
            8 => Self::BulkDone,
            9 => Self::Goodbye,
            _ => return None,
        })
    }
}

/// Header flag bits.
pub mod flags {
    /// `payload_crc` holds the CRC32C of the payload.
    pub const DIGEST: u16 = 1 << 0;
    /// The payload is a [`super::BulkDesc`]: the real payload waits in the
    /// sender's memory for an RMA read.
    pub const BULK: u16 = 1 << 1;
    /// A response carrying a [`super::RemoteError`] instead of a result.
    pub const ERROR: u16 = 1 << 2;
    /// The payload is one piece of a larger one, sent in several frames
    /// (a message transport without RMA): it starts with a
    /// [`super::Fragment`] prefix saying where the piece goes.
    pub const FRAGMENT: u16 = 1 << 3;
    /// On `BulkDone`: it acknowledges a response's bulk payload (else a request's).
    pub const OF_RESPONSE: u16 = 1 << 4;
    /// Every defined bit.
    pub const ALL: u16 = DIGEST | BULK | ERROR | FRAGMENT | OF_RESPONSE;
}

/// CRC32C (Castagnoli), as NVMe/TCP and iSCSI use.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() <= SMALL_CRC && std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2 (checked just above).
        return unsafe { crc32c_small_sse42(data) };
    }
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// Payloads up to this many bytes are checksummed with the CPU's CRC32C
/// instruction one word at a time: below it, crc_fast's setup for its
/// folding loop costs more than the loop saves (a 64-byte message took
/// about 75 instructions there against about 25 here).
const SMALL_CRC: usize = 256;

/// [`crc32c`] of a short slice with the CPU's CRC32C instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc32c_small_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut words = data.chunks_exact(8);
    let mut crc = u64::from(u32::MAX);
    for w in &mut words {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut crc = crc as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

/// CRC32C of a header's first 28 bytes, given as [`Header::words`] and the
/// payload checksum that follows them.
fn header_crc(w: [u64; 3], payload_crc: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2 (checked just above).
        return unsafe { header_crc_sse42(w, payload_crc) };
    }
    let mut b = [0u8; 28];
    for (i, word) in w.into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    b[24..].copy_from_slice(&payload_crc.to_le_bytes());
    crc32c(&b)
}

/// [`header_crc`] with the CPU's CRC32C instruction, straight from the words
/// (it takes eight bytes at a time in little-endian order, as the bytes go).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn header_crc_sse42(w: [u64; 3], payload_crc: u32) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u64};
    let mut crc = u64::from(u32::MAX);
    for word in w {
        crc = _mm_crc32_u64(crc, word);
    }
    !_mm_crc32_u32(crc as u32, payload_crc)
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not "CFSR".
    #[error("bad magic {0:02x?} (not a ClaudeFS frame)")]
    Magic([u8; 4]),
    /// A version this code does not speak.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// The header checksum does not match.
    #[error("header checksum mismatch: computed {computed:#010x}, frame says {stored:#010x}")]
    HeaderCrc {
        /// CRC32C of the received header bytes.
        computed: u32,
        /// The checksum in the frame.
        stored: u32,
    },
    /// An opcode this code does not know.
    #[error("unknown opcode {0}")]
    Opcode(u8),
    /// Flag bits this code does not know.
    #[error("unknown flag bits {0:#06x}")]
    Flags(u16),
    /// The payload is larger than this side accepts.
    #[error("payload of {length} bytes exceeds the maximum message size {max}")]
    TooLong {
        /// Announced payload length.
        length: u64,
        /// The limit.
        max: u64,
    },
    /// The payload checksum does not match.
    #[error(
        "payload checksum mismatch on a {length}-byte payload: computed {computed:#010x}, frame says {stored:#010x}"
    )]
    PayloadCrc {
        /// Payload bytes.
        length: usize,
        /// CRC32C of the received payload.
        computed: u32,
        /// The checksum in the frame.
        stored: u32,
    },
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: {what} needs {needed} bytes, got {got}")]
    Truncated {
        /// The part that was cut.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// More bytes than the frame should have.
    #[error("{what}: {extra} unexpected trailing bytes")]
    Trailing {
        /// The part that was too long.
        what: &'static str,
        /// Extra bytes.
        extra: usize,
    },
    /// A field holds a value that makes no sense.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Memory for a payload could not be had.
    #[error("no memory for a {0}-byte payload")]
    NoMemory(usize),
}

/// A decoded frame header. Build one with [`Header::new`] and its setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub opcode: Opcode,
    /// [`flags`] bits.
    pub flags: u16,
    /// Request id (requests, responses, cancels, bulk acks) or nonce (pings).
    pub request_id: u64,
    /// Payload bytes that follow the header.
    pub length: u32,
    /// The service method (requests and responses).
    pub method: u16,
    /// Request credits this frame grants the receiver.
    pub credits: u16,
    /// CRC32C of the payload when [`flags::DIGEST`] is set.
    pub payload_crc: u32,
}

impl Header {
    /// A header with no payload, no flags, method 0 and no credits.
    pub fn new(opcode: Opcode, request_id: u64) -> Self {
        Self { opcode, flags: 0, request_id, length: 0, method: 0, credits: 0, payload_crc: 0 }
    }

    /// Sets the method.
    pub fn method(mut self, method: u16) -> Self {
        self.method = method;
        self
    }

    /// Sets the credits granted.
    pub fn credits(mut self, credits: u16) -> Self {
        self.credits = credits;
        self
    }

    /// Adds flag bits.
    pub fn flag(mut self, bits: u16) -> Self {
        self.flags |= bits;
        self
    }

    /// Sets the length and the checksum of `payload` (always digested).
    pub fn payload(self, payload: &[u8]) -> Self {
        self.payload_with(payload, true)
    }

    /// Sets the length of `payload`, and its checksum if `digest`.
    pub fn payload_with(mut self, payload: &[u8], digest: bool) -> Self {
        self.length = payload.len() as u32;
        if digest {
            self.flags |= flags::DIGEST;
            self.payload_crc = crc32c(payload);
        } else {
            self.flags &= !flags::DIGEST;
            self.payload_crc = 0;
        }
        self
    }

    /// The header's first 28 bytes as three little-endian words and the
    /// payload checksum: how it is encoded, checksummed and decoded, in
    /// registers, without reading back bytes just written one field at a time.
    fn words(&self) -> [u64; 3] {
        [
            u64::from(u32::from_le_bytes(MAGIC))
                | u64::from(VERSION) << 32
                | u64::from(self.opcode as u8) << 40
                | u64::from(self.flags) << 48,
            self.request_id,
            u64::from(self.length) | u64::from(self.method) << 32 | u64::from(self.credits) << 48,
        ]
    }

    /// The 32 bytes on the wire, header checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.encode_into(&mut b);
        b
    }

    /// Writes the 32 bytes on the wire to `out` (at least [`HEADER_LEN`] long).
    pub fn encode_into(&self, out: &mut [u8]) {
        let w = self.words();
        let crc = header_crc(w, self.payload_crc);
        let last = u64::from(self.payload_crc) | u64::from(crc) << 32;
        for (i, word) in [w[0], w[1], w[2], last].into_iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
    }

    /// Decodes and checks a header; `max_payload` bounds `length`.
    pub fn decode(b: &[u8], max_payload: u32) -> Result<Self, FrameError> {
        let Some(b) = b.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated { what: "header", needed: HEADER_LEN, got: b.len() });
        };
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (w0, w1, w2, w3) = (word(0), word(1), word(2), word(3));
        let magic = (w0 as u32).to_le_bytes();
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = (w0 >> 32) as u8;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let (payload_crc, stored) = (w3 as u32, (w3 >> 32) as u32);
        let computed = header_crc([w0, w1, w2], payload_crc);
        if stored != computed {
            return Err(FrameError::HeaderCrc { computed, stored });
        }
        let op = (w0 >> 40) as u8;
        let opcode = Opcode::from_u8(op).ok_or(FrameError::Opcode(op))?;
        let flags = (w0 >> 48) as u16;
        if flags & !flags::ALL != 0 {
            return Err(FrameError::Flags(flags & !flags::ALL));
        }
        let length = w2 as u32;
        if length > max_payload {
            return Err(FrameError::TooLong { length: length.into(), max: max_payload.into() });
        }
        Ok(Self {
            opcode,
            flags,
            request_id: w1,
            length,
            method: (w2 >> 32) as u16,
            credits: (w2 >> 48) as u16,
            payload_crc,
        })
    }

    /// Whether a flag bit is set.
    pub fn has(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    /// Checks the payload's length, and its checksum if the frame carries one.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.length as usize {
            return Err(FrameError::Truncated { what: "payload", needed: self.length as usize, got: payload.len() });
        }
        if self.has(flags::DIGEST) {
            let computed = crc32c(payload);
            if computed != self.payload_crc {
                return Err(FrameError::PayloadCrc { length: payload.len(), computed, stored: self.payload_crc });
            }
        }
        Ok(())
    }
}

/// A frame's payload: nothing, heap bytes, or DMA memory (what RMA and
/// large receives use). Dereferences to the bytes.
#[derive(Debug)]
pub enum Payload {
    /// Ordinary memory (small payloads, reassembled fragments).
    Heap(Vec<u8>),
    /// DMA memory (large payloads; RMA reads land here). Boxed, so that a
    /// payload is three words: frames and events move it on every message.
    Dma(Box<DmaBuf>),
}

impl Payload {
    /// No bytes.
    pub fn empty() -> Self {
        Self::Heap(Vec::new())
    }

    /// A copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        Self::Heap(data.to_vec())
    }

    /// The payload as DMA memory (copied if it is not already); `None` if empty.
    pub fn into_dma(self) -> Result<Option<DmaBuf>, pmd::DmaError> {
        match self {
            Self::Dma(b) => Ok(Some(*b)),
            Self::Heap(v) if v.is_empty() => Ok(None),
            Self::Heap(v) => DmaBuf::copy_from(&v).map(Some),
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self::empty()
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Heap(v) => v,
            Self::Dma(b) => b,
        }
    }
}

impl std::ops::DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(v) => v,
            Self::Dma(b) => b,
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Self::Heap(v)
    }
}

impl From<&[u8]> for Payload {
    fn from(v: &[u8]) -> Self {
        Self::copy_from(v)
    }
}

impl From<DmaBuf> for Payload {
    fn from(b: DmaBuf) -> Self {
        Self::Dma(Box::new(b))
    }
}

/// Reads little-endian fields off a byte slice, naming what was cut short.
struct Cursor<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Truncated { what: self.what, needed: n, got: self.b.len() });
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn end(self) -> Result<(), FrameError> {
        match self.b.len() {
            0 => Ok(()),
            extra => Err(FrameError::Trailing { what: self.what, extra }),
        }
    }
}

/// Longest node name in a [`Hello`].
pub const MAX_NAME: usize = 255;
/// Longest transport address in a [`Hello`].
pub const MAX_ADDR: usize = 1024;

/// Hello flag: the sender can serve RMA reads of its bulk payloads.
pub const HELLO_RMA: u32 = 1 << 0;
/// Hello flag: the sender checksums bulk payloads and wants them checksummed.
pub const HELLO_BULK_DIGEST: u32 = 1 << 1;
/// Hello flag: on a host-local transport, the sender checksums payloads and
/// wants them checksummed.
pub const HELLO_LOCAL_DIGEST: u32 = 1 << 2;

/// The payload of `Hello` and `HelloAck`: who the sender is and what it
/// accepts. The frame's `credits` field carries the sender's initial grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The largest payload the sender accepts.
    pub max_message: u32,
    /// `HELLO_*` bits.
    pub flags: u32,
    /// Random per endpoint instance: a new value means the peer restarted.
    pub incarnation: u64,
    /// The sender's id for this connection; a connectionless transport tags
    /// every message to the sender with it.
    pub token: u32,
    /// The sender's node name (UTF-8, at most [`MAX_NAME`] bytes).
    pub name: String,
    /// The sender's transport address (raw, at most [`MAX_ADDR`] bytes), so
    /// a connectionless transport can answer it.
    pub addr: Vec<u8>,
}

impl Hello {
    /// The payload bytes. Fails if the name or address is too long.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.name.len() > MAX_NAME {
            return Err(FrameError::Invalid {
                field: "hello name",
                reason: format!("{} bytes > {MAX_NAME}", self.name.len()),
            });
        }
        if self.addr.len() > MAX_ADDR {
            return Err(FrameError::Invalid {
                field: "hello address",
                reason: format!("{} bytes > {MAX_ADDR}", self.addr.len()),
            });
        }
        let mut b = Vec::with_capacity(23 + self.name.len() + self.addr.len());
        b.extend_from_slice(&self.max_message.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.token.to_le_bytes());
        b.push(self.name.len() as u8);
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.addr.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.addr);
        Ok(b)
    }

    /// Decodes and checks a hello payload.
    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor { b, what: "hello" };
        let max_message = c.u32()?;
        let flags = c.u32()?;
        let incarnation = c.u64()?;
        let token = c.u32()?;
        let name_len = c.u8()? as usize;
        let name = std::str::from_utf8(c.take(name_len)?)
            .map_err(|e| FrameError::Invalid { field: "hello name", reason: e.to_string() })?
            .to_string();
        let addr_len = c.u16()? as usize;
        if addr_len > MAX_ADDR {
            return Err(FrameError::Invalid {
                field: "hello address",
                reason: format!("{addr_len} bytes > {MAX_ADDR}"),
            });
        }
        let addr = c.take(addr_len)?.to_vec();
        c.end()?;
        Ok(Self { max_message, flags, incarnation, token, name, addr })
    }
}

/// Bytes of an encoded [`BulkDesc`].
pub const BULK_DESC_LEN: usize = 32;

/// Where a bulk payload waits for its receiver's RMA read: the payload of a
/// frame with [`flags::BULK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkDesc {
    /// Remote address to read from (as the provider wants it: virtual or offset).
    pub addr: u64,
    /// Payload bytes.
    pub len: u64,
    /// Memory-region key the provider checks.
    pub key: u64,
    /// CRC32C of the payload, if `has_crc`.
    pub data_crc: Option<u32>,
}

impl BulkDesc {
    /// The 32 bytes of the descriptor.
    pub fn encode(&self) -> [u8; BULK_DESC_LEN] {
        let mut b = [0u8; BULK_DESC_LEN];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.key.to_le_bytes());
        b[24..28].copy_from_slice(&self.data_crc.unwrap_or(0).to_le_bytes());
        b[28..32].copy_from_slice(&u32::from(self.data_crc.is_some()).to_le_bytes());
        b
    }

    /// Decodes a descriptor; `max_len` bounds the payload it announces.
    pub fn decode(b: &[u8], max_len: u32) -> Result<Self, FrameError> {
        let mut c = Cursor { b, what: "bulk descriptor" };
        let addr = c.u64()?;
        let len = c.u64()?;
        let key = c.u64()?;
        let crc = c.u32()?;
        let has_crc = c.u32()?;
        c.end()?;
        if len > u64::from(max_len) {
            return Err(FrameError::TooLong { length: len, max: max_len.into() });
        }
        if len <= MAX_INLINE as u64 {
            return Err(FrameError::Invalid {
                field: "bulk length",
                reason: format!("{len} bytes fit in one frame (up to {MAX_INLINE}): no bulk transfer needed"),
            });
        }
        let data_crc = match has_crc {
            0 => None,
            1 => Some(crc),
            v => return Err(FrameError::Invalid { field: "bulk crc flag", reason: format!("{v} is neither 0 nor 1") }),
        };
        Ok(Self { addr, len, key, data_crc })
    }
}

/// Bytes of a [`Fragment`] prefix.
pub const FRAGMENT_PREFIX: usize = 16;

/// Where the piece of a fragmented payload goes: the first 16 bytes of a
/// frame with [`flags::FRAGMENT`]. Fragments may complete out of order (a
/// provider may finish a large send after a smaller one sent later), so each
/// says where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset of the piece in the whole payload.
    pub offset: u64,
    /// Bytes of the whole payload.
    pub total: u64,
}

impl Fragment {
    /// The prefix bytes.
    pub fn encode(&self) -> [u8; FRAGMENT_PREFIX] {
        let mut b = [0u8; FRAGMENT_PREFIX];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..].copy_from_slice(&self.total.to_le_bytes());
        b
    }

    /// Splits a fragment frame's payload into its prefix and piece, checking
    /// that the piece lies inside a whole of at most `max_total` bytes.
    pub fn decode(b: &[u8], max_total: u32) -> Result<(Self, &[u8]), FrameError> {
        let mut c = Cursor { b, what: "fragment" };
        let f = Self { offset: c.u64()?, total: c.u64()? };
        let piece = c.b;
        if f.total > u64::from(max_total) {
            return Err(FrameError::TooLong { length: f.total, max: max_total.into() });
        }
        if piece.is_empty() || f.offset.checked_add(piece.len() as u64).is_none_or(|end| end > f.total) {
            return Err(FrameError::Invalid {
                field: "fragment",
                reason: format!("{} bytes at offset {} of a {}-byte payload", piece.len(), f.offset, f.total),
            });
        }
        Ok((f, piece))
    }
}

/// An error answered by the peer's service: the payload of a response with
/// [`flags::ERROR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// Error code (a negative errno by convention).
    pub code: i32,
    /// What went wrong, for people.
    pub message: String,
}

/// Error responses carry at most this many bytes of message (so that they
/// fit any peer's limit: they are exempt from the maximum message size).
pub const MAX_ERROR_MESSAGE: usize = 1000;

impl RemoteError {
    /// The payload bytes: the code, then the UTF-8 message (cut to
    /// [`MAX_ERROR_MESSAGE`] bytes at a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut cut = self.message.len().min(MAX_ERROR_MESSAGE);
        while !self.message.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut b = self.code.to_le_bytes().to_vec();
        b.extend_from_slice(&self.message.as_bytes()[..cut]);
        b
    }

    /// Decodes an error payload. A message that is not UTF-8 is replaced, not refused.
    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        let mut c = Cursor { b, what: "error response" };
        let code = c.u32()? as i32;
        Ok(Self { code, message: String::from_utf8_lossy(c.b).into_owned() })
    }
}

/// Payloads up to this size are assembled in the decoder's staging buffer
/// and copied out; larger ones are read straight into their own buffer.
const STAGING: usize = 64 * 1024;

enum ReadState {
    /// Waiting for (the rest of) a header in the staging buffer.
    Header,
    /// A small payload is still arriving in the staging buffer.
    SmallBody(Header),
    /// A large payload is being read directly into its buffer.
    LargeBody { header: Header, buf: Payload, filled: usize },
}

/// Cuts a byte stream into frames (the plain TCP transport's reader).
///
/// The caller reads from its socket into [`FrameReader::buf`], reports the
/// count with [`FrameReader::advance`], and takes complete frames from
/// [`FrameReader::next_frame`]. Small frames are staged in one 64 KiB buffer
/// (many per read); a large payload gets a buffer of its own that the socket
/// reads fill directly, so its bytes are copied once.
pub struct FrameReader {
    max_payload: u32,
    staging: Box<[u8]>,
    start: usize,
    end: usize,
    state: ReadState,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").field("buffered", &(self.end - self.start)).finish()
    }
}

impl FrameReader {
    /// A reader that refuses payloads above `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload, staging: vec![0u8; STAGING].into_boxed_slice(), start: 0, end: 0, state: ReadState::Header }
    }

    /// Changes the payload limit (after a handshake).
    pub fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max;
    }

    /// Where the next read should put its bytes (never empty).
    pub fn buf(&mut self) -> &mut [u8] {
        if let ReadState::LargeBody { buf, filled, .. } = &mut self.state {
            return &mut buf[*filled..];
        }
        if self.end == self.staging.len() {
            // Move the unread part to the front to make room.
            self.staging.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.staging[self.end..]
    }

    /// Records that `n` bytes were written into [`FrameReader::buf`].
    pub fn advance(&mut self, n: usize) {
        match &mut self.state {
            ReadState::LargeBody { filled, .. } => *filled += n,
            _ => self.end += n,
        }
    }

    /// Bytes of an unfinished frame held (0 at a frame boundary).
    pub fn partial(&self) -> usize {
        match &self.state {
            ReadState::LargeBody { filled, .. } => HEADER_LEN + filled,
            ReadState::SmallBody(_) => HEADER_LEN + self.end - self.start,
            ReadState::Header => self.end - self.start,
        }
    }

    /// Bytes the unfinished frame needs in all (the header; with the
    /// payload once the header is in).
    pub fn needed(&self) -> usize {
        match &self.state {
            ReadState::LargeBody { header, .. } | ReadState::SmallBody(header) => HEADER_LEN + header.length as usize,
            ReadState::Header => HEADER_LEN,
        }
    }

    /// The next complete frame, `None` if more bytes are needed. After an
    /// error the stream is unusable (the connection must be closed).
    pub fn next_frame(&mut self) -> Result<Option<(Header, Payload)>, FrameError> {
        loop {
            match std::mem::replace(&mut self.state, ReadState::Header) {
                ReadState::Header => {
                    let have = self.end - self.start;
                    if have >= 4 && self.staging[self.start..self.start + 4] != MAGIC {
                        // Refuse garbage as soon as it shows, not after 32 bytes.
                        let magic = self.staging[self.start..self.start + 4].try_into().expect("4 bytes");
                        return Err(FrameError::Magic(magic));
                    }
                    if have < HEADER_LEN {
                        return Ok(None);
                    }
                    let header = Header::decode(&self.staging[self.start..self.end], self.max_payload)?;
                    self.start += HEADER_LEN;
                    let len = header.length as usize;
                    if len <= STAGING - HEADER_LEN {
                        self.state = ReadState::SmallBody(header);
                        continue;
                    }
                    let mut buf = match DmaBuf::new(len) {
                        Ok(b) => Payload::from(b),
                        Err(_) => return Err(FrameError::NoMemory(len)),
                    };
                    let have = (self.end - self.start).min(len);
                    buf[..have].copy_from_slice(&self.staging[self.start..self.start + have]);
                    self.start += have;
                    self.state = ReadState::LargeBody { header, buf, filled: have };
                }
                ReadState::SmallBody(header) => {
                    let len = header.length as usize;
                    if self.end - self.start < len {
                        if self.start + len > self.staging.len() {
                            self.staging.copy_within(self.start..self.end, 0);
                            self.end -= self.start;
                            self.start = 0;
                        }
                        self.state = ReadState::SmallBody(header);
                        return Ok(None);
                    }
                    let payload = Payload::copy_from(&self.staging[self.start..self.start + len]);
                    self.start += len;
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                    }
                    header.check_payload(&payload)?;
                    return Ok(Some((header, payload)));
                }
                ReadState::LargeBody { header, buf, filled } => {
                    if filled < buf.len() {
                        self.state = ReadState::LargeBody { header, buf, filled };
                        return Ok(None);
                    }
                    header.check_payload(&buf)?;
                    return Ok(Some((header, buf)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(h: Header, payload: &[u8]) -> Vec<u8> {
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn header_round_trips_every_field() {
        let h =
            Header::new(Opcode::Response, u64::MAX - 3).method(0xbeef).credits(17).flag(flags::ERROR).payload(b"abc");
        assert_eq!(Header::decode(&h.encode(), 3).unwrap(), h);
        // The layout of the module docs, and the header checksum over bytes 0..28.
        let b = h.encode();
        assert_eq!(&b[0..6], &[b'C', b'F', b'S', b'R', VERSION, Opcode::Response as u8]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), flags::ERROR | flags::DIGEST);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), u64::MAX - 3);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 3);
        assert_eq!((u16::from_le_bytes([b[20], b[21]]), u16::from_le_bytes([b[22], b[23]])), (0xbeef, 17));
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), crc32c(b"abc"));
        for id in [0, 1, 0x0102_0304_0506_0708, u64::MAX] {
            let b = Header::new(Opcode::Request, id).method(id as u16).payload(&id.to_le_bytes()).encode();
            assert_eq!(u32::from_le_bytes(b[28..].try_into().unwrap()), crc32c(&b[..28]), "header {id:#x}");
        }
        assert_eq!(
            Header::decode(&h.encode(), 2).unwrap_err(),
            FrameError::TooLong { length: 3, max: 2 },
            "the payload limit is enforced before anything is allocated"
        );
    }

    #[test]
    fn every_header_fault_is_named() {
        let good = Header::new(Opcode::Ping, 1).encode();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((good[..31].to_vec(), "truncated frame: header needs 32 bytes, got 31"));
        let mut b = good;
        b[0] = b'X';
        cases.push((b.to_vec(), "bad magic"));
        let mut b = good;
        b[4] = 9;
        cases.push((b.to_vec(), "unsupported protocol version 9"));
        let mut b = good;
        b[10] ^= 1;
        cases.push((b.to_vec(), "header checksum mismatch"));
        // Valid checksums over invalid fields: re-sign the altered header.
        let resign = |mut b: [u8; 32]| {
            let crc = crc32c(&b[..28]);
            b[28..].copy_from_slice(&crc.to_le_bytes());
            b.to_vec()
        };
        let mut b = good;
        b[5] = 77;
        cases.push((resign(b), "unknown opcode 77"));
        let mut b = good;
        b[7] = 0x80;
        cases.push((resign(b), "unknown flag bits 0x8000"));
        for (bytes, want) in cases {
            let err = Header::decode(&bytes, 100).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn short_and_long_payloads_get_the_same_crc32c() {
        // The check value of the CRC-32/ISCSI catalogue entry.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let bytes: Vec<u8> = (0..600u32).map(|i| (i.wrapping_mul(131) >> 3) as u8).collect();
        for len in 0..=SMALL_CRC + 9 {
            for start in [0, 1, 7] {
                let s = &bytes[start..start + len];
                let reference = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, s) as u32;
                assert_eq!(crc32c(s), reference, "{len} bytes at offset {start}");
            }
        }
    }

    #[test]
    fn payload_checksums_are_checked_only_when_present() {
        let h = Header::new(Opcode::Request, 1).payload_with(b"data", false);
        assert!(!h.has(flags::DIGEST));
        h.check_payload(b"junk").unwrap();
        assert!(matches!(h.check_payload(b"jun"), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn hello_round_trips_and_rejects_bad_bytes() {
        let h = Hello {
            max_message: 1 << 24,
            flags: HELLO_RMA,
            incarnation: 42,
            token: 7,
            name: "node-1".into(),
            addr: vec![1, 2, 3],
        };
        let b = h.encode().unwrap();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        assert!(matches!(Hello::decode(&b[..b.len() - 1]), Err(FrameError::Truncated { .. })));
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(Hello::decode(&longer).unwrap_err(), FrameError::Trailing { what: "hello", extra: 1 });
        let mut bad_name = b.clone();
        bad_name[21] = 0xff;
        assert!(matches!(Hello::decode(&bad_name), Err(FrameError::Invalid { field: "hello name", .. })));
        assert!(Hello { name: "x".repeat(256), ..h }.encode().is_err());
    }

    #[test]
    fn bulk_descriptors_are_bounded() {
        let d = BulkDesc { addr: 0x1000, len: 1 << 20, key: 9, data_crc: Some(5) };
        assert_eq!(BulkDesc::decode(&d.encode(), 1 << 20).unwrap(), d);
        assert!(matches!(BulkDesc::decode(&d.encode(), 1 << 19), Err(FrameError::TooLong { .. })));
        let small = BulkDesc { len: 10, ..d };
        assert!(matches!(BulkDesc::decode(&small.encode(), 1 << 20), Err(FrameError::Invalid { .. })));
        let mut b = d.encode();
        b[28] = 2;
        assert!(matches!(BulkDesc::decode(&b, 1 << 20), Err(FrameError::Invalid { field: "bulk crc flag", .. })));
    }

    #[test]
    fn fragments_say_where_they_go_and_stay_inside() {
        let f = Fragment { offset: 10, total: 15 };
        let mut b = f.encode().to_vec();
        b.extend_from_slice(b"abcde");
        assert_eq!(Fragment::decode(&b, 100).unwrap(), (f, &b"abcde"[..]));
        b.push(b'f');
        assert!(matches!(Fragment::decode(&b, 100), Err(FrameError::Invalid { field: "fragment", .. })));
        assert!(matches!(Fragment::decode(&b, 14), Err(FrameError::TooLong { .. })));
        assert!(matches!(Fragment::decode(&f.encode(), 100), Err(FrameError::Invalid { .. })), "empty piece");
        let huge = Fragment { offset: u64::MAX, total: 100 };
        let mut b = huge.encode().to_vec();
        b.push(1);
        assert!(Fragment::decode(&b, 100).is_err());
    }

    #[test]
    fn remote_errors_round_trip() {
        let e = RemoteError { code: -5, message: "disk on fire".into() };
        assert_eq!(RemoteError::decode(&e.encode()).unwrap(), e);
        let long = RemoteError { code: 1, message: "é".repeat(MAX_ERROR_MESSAGE) };
        assert_eq!(long.encode().len(), 4 + MAX_ERROR_MESSAGE, "cut at a character boundary");
        assert!(RemoteError::decode(&[1, 2]).is_err());
    }

    /// Feeds `stream` to a reader in pieces of the given sizes (cycled).
    fn read_all(stream: &[u8], pieces: &[usize], max: u32) -> Result<Vec<(Header, Vec<u8>)>, FrameError> {
        let mut r = FrameReader::new(max);
        let mut out = Vec::new();
        let mut off = 0;
        let mut i = 0;
        while off < stream.len() {
            let buf = r.buf();
            let n = pieces[i % pieces.len()].min(buf.len()).min(stream.len() - off).max(1);
            buf[..n].copy_from_slice(&stream[off..off + n]);
            r.advance(n);
            off += n;
            i += 1;
            while let Some((h, p)) = r.next_frame()? {
                out.push((h, p.to_vec()));
            }
        }
        assert_eq!(r.partial(), 0, "nothing left over at the end of a whole stream");
        Ok(out)
    }

    #[test]
    fn the_stream_reader_finds_frames_across_any_split() {
        let sizes = [0usize, 1, 31, 32, 4000, STAGING - HEADER_LEN, STAGING - HEADER_LEN + 1, 200_000];
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            let h = Header::new(Opcode::Request, i as u64).payload(&payload);
            stream.extend(frame(h, &payload));
            want.push((h, payload));
        }
        for pieces in [&[1usize][..], &[7, 13], &[32], &[65536], &[1_000_000], &[3, 70_000, 5]] {
            assert_eq!(read_all(&stream, pieces, 1 << 20).unwrap(), want, "pieces {pieces:?}");
        }
    }

    #[test]
    fn the_stream_reader_rejects_corruption() {
        let payload = vec![1u8; 100_000];
        let mut stream = frame(Header::new(Opcode::Request, 1).payload(&payload), &payload);
        stream[HEADER_LEN + 50_000] ^= 0x10;
        assert!(matches!(read_all(&stream, &[4096], 1 << 20), Err(FrameError::PayloadCrc { length: 100_000, .. })));
        assert!(matches!(read_all(&stream, &[4096], 1000), Err(FrameError::TooLong { .. })));
        assert!(matches!(read_all(b"GET / HTTP/1.1\r\n", &[5], 1000), Err(FrameError::Magic(m)) if &m == b"GET "));
    }
}
