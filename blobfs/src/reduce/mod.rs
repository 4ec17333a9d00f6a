//! # Data reduction: the stages of the write pipeline, as a library
//!
//! File data is reduced on its way to segments, in this order (and the
//! reverse on read):
//!
//! 1. [`chunking`]: cut into chunks, fixed-size or content-defined
//!    (FastCDC), so that identical data makes identical chunks even when
//!    shifted;
//! 2. [`hash`]: a BLAKE3 content hash per chunk, keyed when the chunk is
//!    encrypted, the key of the dedupe index;
//! 3. [`compress`]: LZ4 or Zstd, kept only when the chunk gets smaller;
//! 4. encryption: AES-256-GCM with a key per chunk derived from the scope's
//!    key ([`keys`]);
//! 5. [`frame`]: the stored chunk, self-describing and checked (CRC32C or
//!    the GCM tag, then the content hash).
//!
//! A [`ReducePolicy`] chooses the stages' parameters; [`encode_all`] runs
//! them over a buffer on every core. The dedupe index, segments, garbage
//! collection and policy xattrs sit on top of this module; it does no I/O.
//! docs/reduce.md explains the frame, the keys, the nonce argument and what
//! an attacker holding the disk learns.
//!
//! ```
//! use blobfs::reduce::{MasterKey, ReducePolicy, decode_chunk, encode_all};
//!
//! let policy: ReducePolicy = "cdc:16k:64k:256k,lz4,enc".parse()?;
//! let keys = MasterKey::from_bytes([7; 32]).scope(1);
//! let data = b"hello, reduced world. ".repeat(10_000);
//! let chunks = encode_all(&policy, &keys, &data)?;
//! let mut back = Vec::new();
//! for c in &chunks {
//!     back.extend(decode_chunk(&keys, &c.hash, &c.frame)?);
//! }
//! assert_eq!(back, data);
//! # Ok::<(), blobfs::reduce::ReduceError>(())
//! ```

pub mod chunking;
pub mod compress;
mod error;
pub mod frame;
pub mod hash;
pub mod keys;
mod pipeline;
mod policy;
#[cfg(test)]
mod tests;

pub use chunking::{Chunker, Chunking};
pub use compress::Compression;
pub use error::{FrameProblem, ReduceError};
pub use frame::{FrameHeader, decode_chunk, encode_chunk};
pub use hash::ChunkHash;
pub use keys::{KdfParams, MasterKey, ScopeKeys};
pub use pipeline::{EncodedChunk, decode_all, decode_all_threads, default_threads, encode_all, encode_all_threads};
pub use policy::ReducePolicy;

/// The longest chunk a frame may hold (1 MiB): half a 2 MiB segment, and
/// the decoder's bound on what a frame may make it allocate.
pub const MAX_CHUNK_SIZE: usize = 1 << 20;
