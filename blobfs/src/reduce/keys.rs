//! The key hierarchy: a master key, per-scope keys, per-chunk keys.
//!
//! ```text
//! master key (32 bytes)       key file, or Argon2id(passphrase, KdfParams)
//!  └─ scope key               HKDF-SHA256(ikm = master, salt = none,
//!      │                                  info = "claudefs/reduce/v1/scope" ‖ scope id u64 LE)
//!      ├─ hash key            HKDF-SHA256-Expand(prk = scope key, info = "claudefs/reduce/v1/chunk-hash")
//!      └─ chunk key           HKDF-SHA256-Expand(prk = scope key,
//!                                            info = "claudefs/reduce/v1/chunk-key" ‖ chunk hash)
//! ```
//!
//! A *scope* is the unit of dedupe and of keys: a volume, or a directory tree
//! with a policy of its own. Chunks dedupe within a scope only; chunks of two
//! scopes have unrelated hashes and keys. Every secret here is wiped from
//! memory when dropped.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::error::ReduceError;
use super::hash::ChunkHash;

/// Length of every key here, in bytes (AES-256, BLAKE3 keyed mode).
pub const KEY_LEN: usize = 32;

/// HKDF info prefix of a scope key (followed by the scope id, u64 LE).
pub const INFO_SCOPE: &[u8] = b"claudefs/reduce/v1/scope";
/// HKDF info of a scope's content-hash key.
pub const INFO_CHUNK_HASH: &[u8] = b"claudefs/reduce/v1/chunk-hash";
/// HKDF info prefix of a chunk's encryption key (followed by the chunk hash).
pub const INFO_CHUNK_KEY: &[u8] = b"claudefs/reduce/v1/chunk-key";

/// The root of a store's keys: 32 secret bytes.
///
/// From a key file ([`MasterKey::from_key_file`]) or a passphrase
/// ([`MasterKey::from_passphrase`]). Wiped on drop; `Debug` prints no key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A master key of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a key file: exactly 32 raw bytes (`head -c 32 /dev/urandom`),
    /// or 64 hex digits with at most one trailing newline
    /// (`openssl rand -hex 32`). Anything else is refused.
    pub fn from_key_file(path: &Path) -> Result<Self, ReduceError> {
        let contents = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| ReduceError::KeyFile { path: path.display().to_string(), reason: e.to_string() })?,
        );
        Self::from_key_file_contents(&contents).map_err(|e| ReduceError::KeyFile {
            path: path.display().to_string(),
            reason: match e {
                ReduceError::KeyFormat(reason) => reason,
                other => other.to_string(),
            },
        })
    }

    /// Parses the contents of a key file (see [`MasterKey::from_key_file`]).
    pub fn from_key_file_contents(contents: &[u8]) -> Result<Self, ReduceError> {
        let hex = contents.strip_suffix(b"\n").unwrap_or(contents);
        if contents.len() == KEY_LEN {
            let mut key = [0; KEY_LEN];
            key.copy_from_slice(contents);
            return Ok(Self(key));
        }
        if hex.len() == 2 * KEY_LEN {
            let mut key = [0; KEY_LEN];
            for (i, pair) in hex.chunks_exact(2).enumerate() {
                match (hex_digit(pair[0]), hex_digit(pair[1])) {
                    (Some(hi), Some(lo)) => key[i] = hi << 4 | lo,
                    _ => {
                        key.zeroize();
                        return Err(ReduceError::KeyFormat(format!(
                            "64 characters but not all hex digits (at offset {})",
                            2 * i
                        )));
                    }
                }
            }
            return Ok(Self(key));
        }
        Err(ReduceError::KeyFormat(format!(
            "{} bytes; a key file holds exactly 32 raw bytes or 64 hex digits (plus an optional newline)",
            contents.len()
        )))
    }

    /// Derives the master key from a passphrase with Argon2id and `params`
    /// (whose salt is stored beside the store). Deterministic given both.
    pub fn from_passphrase(passphrase: &[u8], params: &KdfParams) -> Result<Self, ReduceError> {
        params.validate()?;
        let argon = argon2::Params::new(params.memory_kib, params.iterations, params.parallelism, Some(KEY_LEN))
            .map_err(|e| ReduceError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon);
        let mut key = [0; KEY_LEN];
        argon.hash_password_into(passphrase, &params.salt, &mut key).map_err(|e| ReduceError::Kdf(e.to_string()))?;
        Ok(Self(key))
    }

    /// The keys of scope `scope`.
    pub fn scope(&self, scope: u64) -> ScopeKeys {
        let mut info = Vec::with_capacity(INFO_SCOPE.len() + 8);
        info.extend_from_slice(INFO_SCOPE);
        info.extend_from_slice(&scope.to_le_bytes());
        let mut key = [0; KEY_LEN];
        expand(&Hkdf::<Sha256>::new(None, &self.0), &info, &mut key);
        let mut hash_key = [0; KEY_LEN];
        expand(&prk(&key), INFO_CHUNK_HASH, &mut hash_key);
        ScopeKeys { scope, secret: Some(ScopeSecret { key, hash_key }) }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// An HKDF whose pseudorandom key is `key` (already uniform: no extract step).
fn prk(key: &[u8; KEY_LEN]) -> Hkdf<Sha256> {
    Hkdf::<Sha256>::from_prk(key).expect("32 bytes is SHA-256's output length, the minimum PRK length")
}

fn expand(hkdf: &Hkdf<Sha256>, info: &[u8], out: &mut [u8; KEY_LEN]) {
    hkdf.expand(info, out).expect("32 bytes is far below HKDF-SHA256's limit of 8160");
}

/// Argon2id parameters of a passphrase-derived master key, stored beside the
/// store (they are not secret; the passphrase is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Random salt, made once when the store is created.
    pub salt: [u8; 16],
    /// Memory cost in KiB (Argon2 `m`).
    pub memory_kib: u32,
    /// Passes over the memory (Argon2 `t`).
    pub iterations: u32,
    /// Lanes (Argon2 `p`).
    pub parallelism: u32,
}

impl KdfParams {
    /// Default memory cost: 64 MiB (RFC 9106's second recommended option).
    pub const DEFAULT_MEMORY_KIB: u32 = 64 * 1024;
    /// Default passes: 3 (RFC 9106's second recommended option).
    pub const DEFAULT_ITERATIONS: u32 = 3;
    /// Default lanes: 1 (the derivation runs once, at mount).
    pub const DEFAULT_PARALLELISM: u32 = 1;
    /// Largest memory cost accepted from a parameter file (4 GiB), so that a
    /// damaged or hostile file cannot make mounting exhaust memory.
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// Largest number of passes accepted.
    pub const MAX_ITERATIONS: u32 = 64;
    /// Largest number of lanes accepted.
    pub const MAX_PARALLELISM: u32 = 16;

    /// Default costs with a fresh random salt (from the OS).
    pub fn generate() -> Self {
        let mut salt = [0; 16];
        OsRng.fill_bytes(&mut salt);
        Self::with_salt(salt)
    }

    /// Default costs with this salt.
    pub fn with_salt(salt: [u8; 16]) -> Self {
        Self {
            salt,
            memory_kib: Self::DEFAULT_MEMORY_KIB,
            iterations: Self::DEFAULT_ITERATIONS,
            parallelism: Self::DEFAULT_PARALLELISM,
        }
    }

    /// Refuses costs outside the accepted ranges.
    pub fn validate(&self) -> Result<(), ReduceError> {
        let check = |name: &str, v: u32, min: u32, max: u32| {
            if (min..=max).contains(&v) {
                Ok(())
            } else {
                Err(ReduceError::Kdf(format!("{name} = {v} is out of range; allowed: {min}..={max}")))
            }
        };
        check("parallelism", self.parallelism, 1, Self::MAX_PARALLELISM)?;
        // Argon2 needs at least 8 KiB per lane.
        check("memory_kib", self.memory_kib, 8 * self.parallelism, Self::MAX_MEMORY_KIB)?;
        check("iterations", self.iterations, 1, Self::MAX_ITERATIONS)
    }
}

#[derive(Zeroize, ZeroizeOnDrop)]
struct ScopeSecret {
    key: [u8; KEY_LEN],
    hash_key: [u8; KEY_LEN],
}

/// What encoding and decoding need to know about a scope: its id and, when
/// it is encrypted, its keys. `Debug` prints no key.
pub struct ScopeKeys {
    scope: u64,
    secret: Option<ScopeSecret>,
}

impl fmt::Debug for ScopeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeKeys").field("scope", &self.scope).field("has_key", &self.secret.is_some()).finish()
    }
}

impl ScopeKeys {
    /// A scope without keys: it stores only unencrypted chunks.
    pub fn unencrypted(scope: u64) -> Self {
        Self { scope, secret: None }
    }

    /// The scope id (bound into every encrypted frame).
    pub fn scope(&self) -> u64 {
        self.scope
    }

    /// Whether the scope has keys (can encrypt and decrypt).
    pub fn has_key(&self) -> bool {
        self.secret.is_some()
    }

    /// The content hash of `data`: keyed with the scope's hash key when
    /// `encrypted`, plain BLAKE3 otherwise.
    pub fn hash(&self, encrypted: bool, data: &[u8]) -> Result<ChunkHash, ReduceError> {
        if !encrypted {
            return Ok(ChunkHash::plain(data));
        }
        let secret = self.secret.as_ref().ok_or(ReduceError::NoKey { scope: self.scope })?;
        Ok(ChunkHash::keyed(&secret.hash_key, data))
    }

    /// The AES-256 key of chunk `hash`, or `None` without keys.
    pub(crate) fn chunk_key(&self, hash: &ChunkHash) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let secret = self.secret.as_ref()?;
        let mut info = [0; INFO_CHUNK_KEY.len() + 32];
        info[..INFO_CHUNK_KEY.len()].copy_from_slice(INFO_CHUNK_KEY);
        info[INFO_CHUNK_KEY.len()..].copy_from_slice(&hash.0);
        let mut key = Zeroizing::new([0; KEY_LEN]);
        expand(&prk(&secret.key), &info, &mut key);
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(salt: u8) -> KdfParams {
        KdfParams { salt: [salt; 16], memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    #[test]
    fn key_file_takes_32_raw_bytes_or_64_hex_digits() {
        let raw = MasterKey::from_key_file_contents(&[0xab; 32]).unwrap();
        let hex = MasterKey::from_key_file_contents(&b"ab".repeat(32)).unwrap();
        let mut nl = b"AB".repeat(32);
        nl.push(b'\n');
        let hex_nl = MasterKey::from_key_file_contents(&nl).unwrap();
        assert_eq!(raw.0, hex.0);
        assert_eq!(raw.0, hex_nl.0);
    }

    #[test]
    fn key_file_of_wrong_length_is_refused() {
        for len in [0, 16, 31, 33, 63, 66, 100] {
            let err = MasterKey::from_key_file_contents(&vec![b'a'; len]).unwrap_err();
            assert!(err.to_string().contains(&format!("{len} bytes")), "{err}");
        }
        let err = MasterKey::from_key_file_contents(&b"zz".repeat(32)).unwrap_err();
        assert!(err.to_string().contains("hex"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"short").unwrap();
        let err = MasterKey::from_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("key file") && err.contains("5 bytes"), "{err}");
        let err = MasterKey::from_key_file(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn argon2id_derivation_is_deterministic_given_the_salt() {
        let a = MasterKey::from_passphrase(b"correct horse", &cheap(1)).unwrap();
        let b = MasterKey::from_passphrase(b"correct horse", &cheap(1)).unwrap();
        let c = MasterKey::from_passphrase(b"correct horse", &cheap(2)).unwrap();
        let d = MasterKey::from_passphrase(b"wrong horse", &cheap(1)).unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
        assert_ne!(a.0, d.0);
        let json = serde_json::to_string(&cheap(1)).unwrap();
        assert_eq!(serde_json::from_str::<KdfParams>(&json).unwrap(), cheap(1));
    }

    #[test]
    fn kdf_params_out_of_range_are_refused() {
        let mut p = cheap(1);
        p.memory_kib = KdfParams::MAX_MEMORY_KIB + 1;
        assert!(MasterKey::from_passphrase(b"x", &p).unwrap_err().to_string().contains("memory_kib"));
        let mut p = cheap(1);
        p.iterations = 0;
        assert!(MasterKey::from_passphrase(b"x", &p).unwrap_err().to_string().contains("iterations"));
        assert_ne!(KdfParams::generate().salt, KdfParams::generate().salt);
        KdfParams::generate().validate().unwrap();
    }

    #[test]
    fn scopes_and_chunks_get_distinct_keys() {
        let m = MasterKey::from_bytes([9; 32]);
        let (s1, s2) = (m.scope(1), m.scope(2));
        let h = ChunkHash([1; 32]);
        assert_ne!(*s1.chunk_key(&h).unwrap(), *s2.chunk_key(&h).unwrap());
        assert_ne!(*s1.chunk_key(&h).unwrap(), *s1.chunk_key(&ChunkHash([2; 32])).unwrap());
        assert_eq!(*s1.chunk_key(&h).unwrap(), *m.scope(1).chunk_key(&h).unwrap());
        assert_ne!(s1.hash(true, b"x").unwrap(), s2.hash(true, b"x").unwrap());
        assert_eq!(s1.hash(false, b"x").unwrap(), ChunkHash::plain(b"x"));
        assert!(ScopeKeys::unencrypted(1).chunk_key(&h).is_none());
        assert!(matches!(ScopeKeys::unencrypted(1).hash(true, b"x"), Err(ReduceError::NoKey { scope: 1 })));
        assert!(!format!("{m:?}{s1:?}").contains('9'));
    }
}
