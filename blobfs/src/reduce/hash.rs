//! Content hashes: BLAKE3 of a chunk's plaintext, keyed when the chunk is
//! encrypted.
//!
//! The dedupe index is keyed by this hash. For encrypted scopes the hash is
//! BLAKE3 in keyed mode with a key derived from the scope key (see
//! [`super::keys`]), so someone holding the disk but not the key cannot test
//! whether a given content is stored ("confirmation of a file") by hashing it
//! and looking for the hash. Unencrypted chunks use plain BLAKE3. An encrypted
//! and an unencrypted copy of the same content therefore never share a hash,
//! so dedupe never stores encrypted data in a plaintext chunk.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A chunk's content hash (32 bytes of BLAKE3, plain or keyed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Plain BLAKE3 of `data`.
    pub fn plain(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// BLAKE3 of `data` keyed with `key`.
    pub fn keyed(key: &[u8; 32], data: &[u8]) -> Self {
        Self(*blake3::keyed_hash(key, data).as_bytes())
    }
}

impl fmt::Display for ChunkHash {
    /// Lowercase hex, all 64 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_plain_hashes_differ_and_print_as_hex() {
        let plain = ChunkHash::plain(b"abc");
        assert_eq!(plain.to_string(), blake3::hash(b"abc").to_hex().as_str());
        assert_ne!(ChunkHash::keyed(&[7; 32], b"abc"), plain);
        assert_ne!(ChunkHash::keyed(&[7; 32], b"abc"), ChunkHash::keyed(&[8; 32], b"abc"));
    }
}
