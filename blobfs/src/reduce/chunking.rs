//! Chunking: where a stream of file data is cut into chunks, the unit of
//! dedupe, compression and encryption.
//!
//! - [`Chunking::Fixed`] cuts every `size` bytes: cheapest, but an insertion
//!   shifts every later boundary, so shifted data no longer dedupes.
//! - [`Chunking::FastCdc`] is content-defined (FastCDC 2020, Xia et al., with
//!   normalisation level 1, from the `fastcdc` crate): a rolling Gear hash
//!   cuts where its masked bits are zero, between `min` and `max` bytes and
//!   about `avg` on average. A boundary depends only on the bytes before it
//!   within the chunk, so after an insertion the cuts resynchronise within a
//!   chunk or two and the rest of the data dedupes.
//!
//! The chunker is streaming-friendly: [`Chunker::next_cut`] looks at the
//! bytes buffered so far and says where the next chunk ends, or that it needs
//! more data. A cut it returns is final: feeding the same data in any pieces
//! gives the same chunks as one call over all of it.

use std::ops::Range;

use fastcdc::v2020;
use serde::{Deserialize, Serialize};

use super::MAX_CHUNK_SIZE;
use super::error::ReduceError;

/// How data is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunking {
    /// Every `size` bytes (the last chunk of a stream may be shorter).
    Fixed {
        /// Chunk size, [`FIXED_SIZES`].
        size: u32,
    },
    /// Content-defined, FastCDC 2020.
    FastCdc {
        /// No chunk is shorter (except the last of a stream), [`CDC_MIN`].
        min: u32,
        /// Expected size: a power of two, [`CDC_AVG`], above `min`.
        avg: u32,
        /// No chunk is longer, [`CDC_MAX`], above `avg`.
        max: u32,
    },
}

/// Allowed fixed chunk sizes.
pub const FIXED_SIZES: Range<u64> = 4096..MAX_CHUNK_SIZE as u64 + 1;
/// Allowed FastCDC minimum sizes (the crate's lower bound to ours).
pub const CDC_MIN: Range<u64> = v2020::MINIMUM_MIN as u64..MAX_CHUNK_SIZE as u64 + 1;
/// Allowed FastCDC average sizes.
pub const CDC_AVG: Range<u64> = v2020::AVERAGE_MIN as u64..MAX_CHUNK_SIZE as u64 + 1;
/// Allowed FastCDC maximum sizes.
pub const CDC_MAX: Range<u64> = v2020::MAXIMUM_MIN as u64..MAX_CHUNK_SIZE as u64 + 1;

impl Default for Chunking {
    /// FastCDC with min 16 KiB, avg 64 KiB, max 256 KiB: see docs/reduce.md,
    /// "Chunking defaults", for the measurement behind them.
    fn default() -> Self {
        Chunking::FastCdc { min: 16 << 10, avg: 64 << 10, max: 256 << 10 }
    }
}

fn in_range(param: &'static str, value: u32, allowed: Range<u64>) -> Result<(), ReduceError> {
    if allowed.contains(&u64::from(value)) {
        Ok(())
    } else {
        Err(ReduceError::Chunking {
            param,
            value: value.into(),
            allowed: format!("{}..={} bytes", allowed.start, allowed.end - 1),
        })
    }
}

impl Chunking {
    /// Checks the parameters: an error names the parameter and the allowed
    /// range.
    pub fn validate(&self) -> Result<(), ReduceError> {
        match *self {
            Chunking::Fixed { size } => in_range("fixed size", size, FIXED_SIZES),
            Chunking::FastCdc { min, avg, max } => {
                in_range("cdc min", min, CDC_MIN)?;
                in_range("cdc avg", avg, CDC_AVG)?;
                in_range("cdc max", max, CDC_MAX)?;
                if !avg.is_power_of_two() {
                    return Err(ReduceError::Chunking {
                        param: "cdc avg",
                        value: avg.into(),
                        allowed: "a power of two (FastCDC's mask has a whole number of bits)".into(),
                    });
                }
                if avg <= min {
                    return Err(ReduceError::Chunking {
                        param: "cdc avg",
                        value: avg.into(),
                        allowed: format!("above cdc min = {min}"),
                    });
                }
                if max <= avg {
                    return Err(ReduceError::Chunking {
                        param: "cdc max",
                        value: max.into(),
                        allowed: format!("above cdc avg = {avg}"),
                    });
                }
                Ok(())
            }
        }
    }

    /// The longest chunk this chunking makes.
    pub fn max_chunk(&self) -> usize {
        match *self {
            Chunking::Fixed { size } => size as usize,
            Chunking::FastCdc { max, .. } => max as usize,
        }
    }

    /// A chunker for these (validated) parameters.
    pub fn chunker(&self) -> Result<Chunker, ReduceError> {
        self.validate()?;
        Ok(match *self {
            Chunking::Fixed { size } => Chunker::Fixed { size: size as usize },
            Chunking::FastCdc { min, avg, max } => {
                // The masks `v2020::FastCDC` derives for normalisation level
                // 1; computed once here so that cutting allocates nothing.
                let bits = v2020::logarithm2(avg) as usize;
                let (mask_s, mask_l) = (v2020::MASKS[bits + 1], v2020::MASKS[bits - 1]);
                Chunker::FastCdc { min: min as usize, avg: avg as usize, max: max as usize, mask_s, mask_l }
            }
        })
    }
}

/// Finds chunk boundaries; made by [`Chunking::chunker`].
#[derive(Debug, Clone)]
pub enum Chunker {
    /// Fixed-size cuts.
    Fixed {
        /// Chunk size.
        size: usize,
    },
    /// FastCDC 2020 cuts.
    FastCdc {
        /// Minimum size.
        min: usize,
        /// Average size.
        avg: usize,
        /// Maximum size.
        max: usize,
        /// Mask below the average size (more bits: cuts rarer).
        mask_s: u64,
        /// Mask above the average size (fewer bits: cuts likelier).
        mask_l: u64,
    },
}

impl Chunker {
    /// The length of the chunk starting at `buf[0]`, or `None` when the cut
    /// depends on bytes not yet in `buf`. With `last` (no more data follows
    /// `buf`), a nonempty `buf` always gives a cut, the rest of the buffer
    /// at most. A returned cut never changes when more data is appended.
    pub fn next_cut(&self, buf: &[u8], last: bool) -> Option<usize> {
        if buf.is_empty() {
            return None;
        }
        let (cut, limit) = match *self {
            Chunker::Fixed { size } => (buf.len().min(size), size),
            Chunker::FastCdc { min, avg, max, mask_s, mask_l } => {
                let (_, cut) = v2020::cut(buf, min, avg, max, mask_s, mask_l, mask_s << 1, mask_l << 1);
                (cut, max)
            }
        };
        // A cut before the end of `buf` was found by the rolling hash (the
        // bytes after it cannot move it), and a chunk of the maximum length
        // is cut whatever follows. A cut at the end of a shorter buffer only
        // means the data ran out.
        (cut < buf.len() || cut >= limit || last).then_some(cut)
    }

    /// The end offsets of the chunks of `buf`, in order. Without `last`, the
    /// bytes after the final offset (possibly all of `buf`) are an unfinished
    /// chunk: keep them and call again with more data appended.
    pub fn cut_points(&self, buf: &[u8], last: bool) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        while let Some(len) = self.next_cut(&buf[at..], last) {
            at += len;
            ends.push(at);
        }
        ends
    }

    /// The chunks of a whole buffer (the last one ends at its end).
    pub fn chunks<'a>(&'a self, data: &'a [u8]) -> impl Iterator<Item = Range<usize>> + 'a {
        let mut at = 0;
        std::iter::from_fn(move || {
            let len = self.next_cut(&data[at..], true)?;
            at += len;
            Some(at - len..at)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn bad_parameters_name_the_parameter_and_range() {
        let cases = [
            (Chunking::Fixed { size: 100 }, "fixed size = 100", "4096..=1048576"),
            (Chunking::Fixed { size: 2 << 20 }, "fixed size", "4096..=1048576"),
            (Chunking::FastCdc { min: 10, avg: 1024, max: 4096 }, "cdc min = 10", "64..="),
            (Chunking::FastCdc { min: 64, avg: 100, max: 4096 }, "cdc avg = 100", "256..="),
            (Chunking::FastCdc { min: 64, avg: 1000, max: 4096 }, "cdc avg = 1000", "power of two"),
            (Chunking::FastCdc { min: 2048, avg: 1024, max: 4096 }, "cdc avg = 1024", "above cdc min"),
            (Chunking::FastCdc { min: 64, avg: 4096, max: 4096 }, "cdc max = 4096", "above cdc avg"),
            (Chunking::FastCdc { min: 64, avg: 4096, max: 2 << 20 }, "cdc max", "..=1048576"),
        ];
        for (c, param, allowed) in cases {
            let e = c.chunker().unwrap_err().to_string();
            assert!(e.contains(param) && e.contains(allowed), "{c:?}: {e}");
        }
        Chunking::default().validate().unwrap();
    }

    #[test]
    fn fixed_chunks_are_of_the_size_but_the_last() {
        let c = Chunking::Fixed { size: 4096 }.chunker().unwrap();
        let data = vec![0; 10_000];
        let chunks: Vec<_> = c.chunks(&data).collect();
        assert_eq!(chunks, vec![0..4096, 4096..8192, 8192..10_000]);
        assert_eq!(c.cut_points(&data, false), vec![4096, 8192]);
        assert_eq!(c.next_cut(&[], true), None);
    }

    #[test]
    fn cdc_chunks_respect_min_and_max() {
        let c = Chunking::FastCdc { min: 2048, avg: 8192, max: 32768 }.chunker().unwrap();
        let data = random(1 << 20, 1);
        let chunks: Vec<_> = c.chunks(&data).collect();
        let n = chunks.len();
        for r in &chunks[..n - 1] {
            assert!((2048..=32768).contains(&r.len()), "{r:?}");
        }
        assert_eq!(chunks.last().unwrap().end, data.len());
        // Mean near the average (normalised chunking keeps it close).
        let mean = data.len() / n;
        assert!((6000..12000).contains(&mean), "mean {mean}");
        // Zeros have no cut point: every chunk is max long.
        let zeros = vec![0; 100_000];
        assert_eq!(c.chunks(&zeros).next(), Some(0..32768));
    }

    #[test]
    fn cdc_boundaries_are_stable_under_insertions() {
        let c = Chunking::FastCdc { min: 2048, avg: 8192, max: 32768 }.chunker().unwrap();
        let data = random(4 << 20, 2);
        let mut edited = data.clone();
        // Ten small insertions and deletions spread over the data.
        let mut rng = fastrand::Rng::with_seed(3);
        for i in 0..10 {
            let at = rng.usize(..edited.len());
            if i % 2 == 0 {
                edited.splice(at..at, random(rng.usize(1..100), i));
            } else {
                edited.drain(at..(at + rng.usize(1..100)).min(edited.len()));
            }
        }
        let set = |d: &[u8]| c.chunks(d).map(|r| d[r].to_vec()).collect::<HashSet<_>>();
        let (before, after) = (set(&data), set(&edited));
        let shared = after.intersection(&before).map(|c| c.len()).sum::<usize>();
        // Each edit costs about two chunks (16 KiB) of 4 MiB.
        assert!(shared as f64 > 0.9 * edited.len() as f64, "shared {shared} of {}", edited.len());
        // Fixed-size chunks lose everything after the first edit.
        let f = Chunking::Fixed { size: 8192 }.chunker().unwrap();
        let fset = |d: &[u8]| f.chunks(d).map(|r| d[r].to_vec()).collect::<HashSet<_>>();
        let fshared = fset(&edited).intersection(&fset(&data)).map(|c| c.len()).sum::<usize>();
        assert!(fshared < shared / 2, "fixed {fshared} cdc {shared}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Feeding data in arbitrary pieces gives the cuts of one call.
        #[test]
        fn streaming_cuts_equal_one_shot_cuts(seed in any::<u64>(), len in 0usize..300_000,
                                              pieces in proptest::collection::vec(1usize..70_000, 1..20),
                                              fixed in any::<bool>()) {
            let chunking = if fixed { Chunking::Fixed { size: 4096 } }
                           else { Chunking::FastCdc { min: 1024, avg: 4096, max: 16384 } };
            let c = chunking.chunker().unwrap();
            // Low-entropy data too, so that max-length cuts happen.
            let data: Vec<u8> = random(len, seed).iter().map(|b| if seed % 2 == 0 { *b } else { b & 1 }).collect();
            let whole: Vec<usize> = c.chunks(&data).map(|r| r.end).collect();
            let mut streamed = Vec::new();
            let (mut base, mut fed) = (0, 0);
            let mut pieces = pieces.into_iter().cycle();
            while base < data.len() {
                fed = (fed + pieces.next().unwrap()).min(data.len());
                let last = fed == data.len();
                for end in c.cut_points(&data[base..fed], last) {
                    streamed.push(base + end);
                }
                base = streamed.last().copied().unwrap_or(0);
            }
            prop_assert_eq!(streamed, whole);
        }
    }
}
