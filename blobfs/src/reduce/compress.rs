//! Compression: none, LZ4 (inline default: fast both ways) or Zstd at a
//! level (denser, for cold data or by policy).
//!
//! A chunk is stored compressed only when that makes it strictly smaller;
//! otherwise it is stored raw and its frame says so ([`Encoding::Raw`]), so
//! incompressible data costs one failed attempt at write and nothing at read.
//! Compressed blocks carry no length of their own: the frame holds the raw
//! length and the decoder refuses output of any other length.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::error::ReduceError;

/// Which compressor a policy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Compression {
    /// Store chunks as they are.
    None,
    /// LZ4 block format (`lz4_flex`).
    #[default]
    Lz4,
    /// Zstd at `level` ([`ZSTD_LEVELS`]).
    Zstd {
        /// Compression level.
        level: i32,
    },
}

/// Zstd levels a policy may ask for (20 to 22 need far more memory).
pub const ZSTD_LEVELS: RangeInclusive<i32> = 1..=19;

/// The Zstd level of `zstd` without a level.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

impl Compression {
    /// Checks the level.
    pub fn validate(&self) -> Result<(), ReduceError> {
        match *self {
            Compression::Zstd { level } if !ZSTD_LEVELS.contains(&level) => {
                Err(ReduceError::ZstdLevel { level, min: *ZSTD_LEVELS.start(), max: *ZSTD_LEVELS.end() })
            }
            _ => Ok(()),
        }
    }
}

/// How a frame's stored bytes encode the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The plaintext itself (no compression asked, or it did not help).
    Raw = 0,
    /// An LZ4 block.
    Lz4 = 1,
    /// A Zstd frame.
    Zstd = 2,
}

impl Encoding {
    /// From the frame's 2-bit field.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Lz4),
            2 => Some(Encoding::Zstd),
            _ => None,
        }
    }

    /// Its name in errors.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Lz4 => "lz4",
            Encoding::Zstd => "zstd",
        }
    }
}

/// A compressor and decompressor with reusable state: Zstd contexts and
/// the output buffer. One per thread, kept across chunks (making a Zstd
/// context per chunk would cost more than compressing a small chunk).
#[derive(Default)]
pub struct Codec {
    zstd_c: Option<(i32, zstd::bulk::Compressor<'static>)>,
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
    out: Vec<u8>,
    /// The sample [`Codec::looks_incompressible`] compresses.
    sample: Vec<u8>,
}

/// Chunks at least this long are sampled before they are compressed.
pub const SAMPLE_FROM: usize = 32 << 10;
/// The sample: this many slices...
const SAMPLE_SLICES: usize = 4;
/// ...of this many bytes, spread evenly over the chunk.
const SAMPLE_SLICE: usize = 2 << 10;

impl Codec {
    /// Compresses `input` if that makes it shorter: the encoding and the
    /// bytes to store (in the codec's buffer, valid until its next use), or
    /// `(Raw, input)`. Any failure of the compressor (including output that
    /// would not be shorter) stores the chunk raw, which is always correct.
    ///
    /// A chunk of [`SAMPLE_FROM`] bytes or more whose sample (four 2 KiB
    /// slices spread over it) LZ4 cannot shrink by 1/32 is stored raw without
    /// a full attempt: random, compressed or encrypted data then costs an
    /// eighth of a 64 KiB chunk's compression instead of all of it (the
    /// "early abort" ZFS and btrfs make too). The price: a chunk whose only
    /// redundancy lies in matches farther apart than the slices (a random
    /// block repeated within the chunk, say) is stored uncompressed.
    pub fn compress<'a>(&'a mut self, compression: Compression, input: &'a [u8]) -> (Encoding, &'a [u8]) {
        if compression != Compression::None && self.looks_incompressible(input) {
            return (Encoding::Raw, input);
        }
        // LZ4 wants room for its worst case before it starts.
        let bound = lz4_flex::block::get_maximum_output_size(input.len());
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let done = match compression {
            Compression::None => None,
            Compression::Lz4 => lz4_flex::block::compress_into(input, &mut self.out).ok().map(|n| (Encoding::Lz4, n)),
            // Zstd gives up as soon as its output reaches the input's size.
            Compression::Zstd { level } => {
                let room = input.len().saturating_sub(1);
                let Self { zstd_c, out, .. } = self;
                Self::zstd_compressor(zstd_c, level)
                    .and_then(|z| z.compress_to_buffer(input, &mut out[..room]).ok().map(|n| (Encoding::Zstd, n)))
            }
        };
        match done {
            Some((encoding, n)) if n < input.len() => (encoding, &self.out[..n]),
            _ => (Encoding::Raw, input),
        }
    }

    /// Whether LZ4 cannot shrink a sample of a long `input` by 1/32.
    fn looks_incompressible(&mut self, input: &[u8]) -> bool {
        if input.len() < SAMPLE_FROM {
            return false;
        }
        self.sample.clear();
        let step = (input.len() - SAMPLE_SLICE) / (SAMPLE_SLICES - 1);
        for i in 0..SAMPLE_SLICES {
            self.sample.extend_from_slice(&input[i * step..i * step + SAMPLE_SLICE]);
        }
        let bound = lz4_flex::block::get_maximum_output_size(self.sample.len());
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let n = lz4_flex::block::compress_into(&self.sample, &mut self.out).unwrap_or(usize::MAX);
        n > self.sample.len() - self.sample.len() / 32
    }

    fn zstd_compressor<'a>(
        slot: &'a mut Option<(i32, zstd::bulk::Compressor<'static>)>,
        level: i32,
    ) -> Option<&'a mut zstd::bulk::Compressor<'static>> {
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut().map(|(_, z)| z)
    }

    /// Decompresses `input` (untrusted) into exactly `out.len()` bytes;
    /// never writes beyond `out` nor allocates in proportion to what the
    /// input claims. The error is the codec's complaint.
    pub fn decompress(&mut self, encoding: Encoding, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        let n = match encoding {
            Encoding::Raw if input.len() == out.len() => {
                out.copy_from_slice(input);
                out.len()
            }
            Encoding::Raw => return Err(format!("{} raw bytes for {}", input.len(), out.len())),
            Encoding::Lz4 => lz4_flex::block::decompress_into(input, out).map_err(|e| e.to_string())?,
            Encoding::Zstd => {
                if self.zstd_d.is_none() {
                    self.zstd_d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let z = self.zstd_d.as_mut().ok_or("no zstd context")?;
                z.decompress_to_buffer(input, out).map_err(|e| e.to_string())?
            }
        };
        if n == out.len() { Ok(()) } else { Err(format!("{n} bytes out, {} expected", out.len())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(c: Compression, data: &[u8]) -> Encoding {
        let mut codec = Codec::default();
        let (enc, stored) = codec.compress(c, data);
        let stored = stored.to_vec();
        let mut back = vec![0; data.len()];
        codec.decompress(enc, &stored, &mut back).unwrap();
        assert_eq!(back, data);
        enc
    }

    #[test]
    fn compressible_data_compresses_and_random_is_stored_raw() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(1000);
        let mut rng = fastrand::Rng::with_seed(1);
        let random: Vec<u8> = (0..65536).map(|_| rng.u8(..)).collect();
        for c in [Compression::Lz4, Compression::Zstd { level: 1 }, Compression::Zstd { level: 19 }] {
            assert_ne!(roundtrip(c, &text), Encoding::Raw, "{c:?}");
            assert_eq!(roundtrip(c, &random), Encoding::Raw, "{c:?}");
        }
        assert_eq!(roundtrip(Compression::None, &text), Encoding::Raw);
        assert_eq!(roundtrip(Compression::Lz4, b""), Encoding::Raw);
        assert_eq!(roundtrip(Compression::Lz4, b"a"), Encoding::Raw);
    }

    /// The sample decides for long chunks: random ones are not tried in
    /// full, one that is half text is still compressed, and a random block
    /// repeated within a chunk (matches farther apart than the slices) is
    /// the documented price.
    #[test]
    fn long_chunks_are_sampled_before_they_are_compressed() {
        let mut rng = fastrand::Rng::with_seed(2);
        let mut codec = Codec::default();
        let random: Vec<u8> = (0..SAMPLE_FROM * 2).map(|_| rng.u8(..)).collect();
        assert!(codec.looks_incompressible(&random));
        let mut half = random.clone();
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(2000);
        half[SAMPLE_FROM..].copy_from_slice(&text[..SAMPLE_FROM]);
        assert!(!codec.looks_incompressible(&half));
        assert_eq!(roundtrip(Compression::Lz4, &half), Encoding::Lz4);
        let repeated = random[..16 << 10].repeat(4);
        assert_eq!(roundtrip(Compression::Lz4, &repeated), Encoding::Raw, "the price of sampling");
        assert_eq!(roundtrip(Compression::Lz4, &repeated[..SAMPLE_FROM - 1]), Encoding::Lz4, "short: tried in full");
    }

    #[test]
    fn decompression_refuses_wrong_lengths_and_garbage() {
        let text = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(10);
        let mut codec = Codec::default();
        for (c, enc) in [(Compression::Lz4, Encoding::Lz4), (Compression::Zstd { level: 3 }, Encoding::Zstd)] {
            let (e, out) = codec.compress(c, &text);
            assert_eq!(e, enc);
            let out = out.to_vec();
            let mut short = vec![0; text.len() - 1];
            assert!(codec.decompress(enc, &out, &mut short).is_err());
            let mut long = vec![0; text.len() + 1];
            assert!(codec.decompress(enc, &out, &mut long).is_err());
            let mut ok = vec![0; text.len()];
            assert!(codec.decompress(enc, &[0xff; 40], &mut ok).is_err());
        }
    }

    #[test]
    fn zstd_levels_are_validated() {
        assert!(Compression::Zstd { level: 0 }.validate().is_err());
        let e = Compression::Zstd { level: 22 }.validate().unwrap_err().to_string();
        assert!(e.contains("22") && e.contains("1..=19"), "{e}");
        Compression::Zstd { level: 19 }.validate().unwrap();
    }
}
