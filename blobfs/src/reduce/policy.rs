//! The reduction policy of a directory or volume, and its compact text form
//! (for the `claudefs.reduce` xattr and RPCs).
//!
//! Text form: comma-separated items, each at most once, in any order; an
//! item left out takes its default.
//!
//! | item | meaning |
//! |---|---|
//! | `cdc` or `cdc:MIN:AVG:MAX` | FastCDC chunking (default `cdc:16k:64k:256k`) |
//! | `fixed:SIZE` | fixed-size chunking |
//! | `none`, `lz4`, `zstd` or `zstd:LEVEL` | compression (default `lz4`; `zstd` is level 3) |
//! | `enc` | encrypt (default: not) |
//!
//! Sizes are bytes, or with a `k` or `m` suffix (KiB, MiB). The displayed
//! form is canonical and complete: `cdc:16k:64k:256k,lz4,enc`,
//! `fixed:64k,none`, `cdc:16k:64k:256k,zstd:3`. Serde uses the same text,
//! so a policy in JSON is one string, checked when read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::chunking::Chunking;
use super::compress::{Compression, ZSTD_DEFAULT_LEVEL};
use super::error::ReduceError;

/// How the data of a file is reduced: chunking, compression, encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReducePolicy {
    /// Where chunks are cut (default: FastCDC 16k/64k/256k).
    pub chunking: Chunking,
    /// How chunks are compressed (default: LZ4).
    pub compression: Compression,
    /// Whether chunks are encrypted (default: no; needs a master key).
    pub encrypt: bool,
}

impl ReducePolicy {
    /// Checks the chunking parameters and the compression level.
    pub fn validate(&self) -> Result<(), ReduceError> {
        self.chunking.validate()?;
        self.compression.validate()
    }
}

fn size(s: &str) -> Result<u32, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        _ => (s, 0),
    };
    digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (bytes, or a number with k or m)"))
}

struct Size(u32);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => write!(f, "0"),
            n if n % (1 << 20) == 0 => write!(f, "{}m", n >> 20),
            n if n % (1 << 10) == 0 => write!(f, "{}k", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

impl FromStr for ReducePolicy {
    type Err = ReduceError;

    fn from_str(text: &str) -> Result<Self, ReduceError> {
        let bad = |reason: String| ReduceError::Policy { text: text.to_string(), reason };
        let (mut chunking, mut compression, mut encrypt) = (None, None, None);
        for item in text.split(',').map(str::trim) {
            let mut parts = item.split(':');
            let (kind, args) = (parts.next().unwrap_or(""), parts.collect::<Vec<_>>());
            let sizes = || args.iter().map(|a| size(a)).collect::<Result<Vec<_>, _>>().map_err(bad);
            let (slot, value) = match (kind, args.len()) {
                ("cdc", 0) => (&mut chunking, Item::Chunking(Chunking::default())),
                ("cdc", 3) => {
                    let s = sizes()?;
                    (&mut chunking, Item::Chunking(Chunking::FastCdc { min: s[0], avg: s[1], max: s[2] }))
                }
                ("fixed", 1) => (&mut chunking, Item::Chunking(Chunking::Fixed { size: sizes()?[0] })),
                ("none", 0) => (&mut compression, Item::Compression(Compression::None)),
                ("lz4", 0) => (&mut compression, Item::Compression(Compression::Lz4)),
                ("zstd", 0) => (&mut compression, Item::Compression(Compression::Zstd { level: ZSTD_DEFAULT_LEVEL })),
                ("zstd", 1) => {
                    let level =
                        args[0].parse().map_err(|_| bad(format!("zstd level {:?} is not a number", args[0])))?;
                    (&mut compression, Item::Compression(Compression::Zstd { level }))
                }
                ("enc", 0) => (&mut encrypt, Item::Encrypt),
                ("cdc" | "fixed" | "none" | "lz4" | "zstd" | "enc", n) => {
                    return Err(bad(format!(
                        "{kind:?} takes {} argument(s), not {n}",
                        match kind {
                            "cdc" => "0 or 3 (min:avg:max)",
                            "fixed" => "1 (size)",
                            "zstd" => "0 or 1 (level)",
                            _ => "no",
                        }
                    )));
                }
                _ => {
                    return Err(bad(format!(
                        "unknown item {item:?}; expected cdc[:min:avg:max], fixed:size, none, lz4, zstd[:level] or enc"
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("{item:?} repeats a setting given before it")));
            }
        }
        let policy = ReducePolicy {
            chunking: match chunking {
                Some(Item::Chunking(c)) => c,
                _ => Chunking::default(),
            },
            compression: match compression {
                Some(Item::Compression(c)) => c,
                _ => Compression::default(),
            },
            encrypt: encrypt.is_some(),
        };
        policy.validate().map_err(|e| bad(e.to_string()))?;
        Ok(policy)
    }
}

/// One parsed item of the text form.
enum Item {
    Chunking(Chunking),
    Compression(Compression),
    Encrypt,
}

impl fmt::Display for ReducePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chunking {
            Chunking::Fixed { size } => write!(f, "fixed:{}", Size(size))?,
            Chunking::FastCdc { min, avg, max } => write!(f, "cdc:{}:{}:{}", Size(min), Size(avg), Size(max))?,
        }
        match self.compression {
            Compression::None => write!(f, ",none")?,
            Compression::Lz4 => write!(f, ",lz4")?,
            Compression::Zstd { level } => write!(f, ",zstd:{level}")?,
        }
        if self.encrypt {
            write!(f, ",enc")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for ReducePolicy {
    type Error = ReduceError;
    fn try_from(s: String) -> Result<Self, ReduceError> {
        s.parse()
    }
}

impl From<ReducePolicy> for String {
    fn from(p: ReducePolicy) -> String {
        p.to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn examples_parse_and_print_canonically() {
        let cases = [
            ("cdc:16k:64k:256k,lz4,enc", "cdc:16k:64k:256k,lz4,enc"),
            ("fixed:64k,none", "fixed:64k,none"),
            ("zstd:3", "cdc:16k:64k:256k,zstd:3"),
            ("zstd", "cdc:16k:64k:256k,zstd:3"),
            ("enc , fixed:1m", "fixed:1m,lz4,enc"),
            ("cdc:1000:4096:65537,none", "cdc:1000:4k:65537,none"),
        ];
        for (text, canonical) in cases {
            let p: ReducePolicy = text.parse().unwrap();
            assert_eq!(p.to_string(), canonical);
            assert_eq!(canonical.parse::<ReducePolicy>().unwrap(), p);
        }
        assert_eq!(ReducePolicy::default().to_string(), "cdc:16k:64k:256k,lz4");
        let json = serde_json::to_string(&ReducePolicy::default()).unwrap();
        assert_eq!(json, "\"cdc:16k:64k:256k,lz4\"");
        assert_eq!(serde_json::from_str::<ReducePolicy>(&json).unwrap(), ReducePolicy::default());
        assert!(serde_json::from_str::<ReducePolicy>("\"zstd:99\"").is_err());
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let cases = [
            ("", "unknown item \"\""),
            ("lz5", "unknown item"),
            ("lz4,zstd", "repeats"),
            ("enc,enc", "repeats"),
            ("cdc:1k:2k", "0 or 3"),
            ("fixed", "1 (size)"),
            ("fixed:12q", "not a size"),
            ("fixed:4294967296", "not a size"),
            ("fixed:8m", "fixed size = 8388608"),
            ("zstd:x", "not a number"),
            ("zstd:0", "zstd level 0"),
            ("cdc:16k:60k:256k", "power of two"),
            ("lz4,", "unknown item"),
            ("enc:1", "no argument"),
        ];
        for (text, reason) in cases {
            let e = text.parse::<ReducePolicy>().unwrap_err().to_string();
            assert!(e.contains(reason), "{text:?}: {e}");
        }
    }

    pub(crate) fn policies() -> impl Strategy<Value = ReducePolicy> {
        let chunking = prop_oneof![
            (4096u32..=1 << 20).prop_map(|size| Chunking::Fixed { size }),
            (8u32..=18, 64u32..1 << 17, 1u32..1 << 19).prop_map(|(bits, min, extra)| {
                let avg = 1 << bits;
                // FastCDC's smallest allowed maximum is 1 KiB (CDC_MAX).
                let max = (avg + extra).clamp((avg + 1).max(crate::reduce::chunking::CDC_MAX.start as u32), 1 << 20);
                Chunking::FastCdc { min: min % (avg - 64) + 64, avg, max }
            }),
        ];
        let compression = prop_oneof![
            Just(Compression::None),
            Just(Compression::Lz4),
            (1i32..=19).prop_map(|level| Compression::Zstd { level })
        ];
        (chunking, compression, any::<bool>()).prop_map(|(chunking, compression, encrypt)| ReducePolicy {
            chunking,
            compression,
            encrypt,
        })
    }

    proptest! {
        #[test]
        fn policy_text_round_trips(p in policies()) {
            prop_assume!(p.validate().is_ok());
            prop_assert_eq!(p.to_string().parse::<ReducePolicy>().unwrap(), p);
        }

        #[test]
        fn policy_parser_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<ReducePolicy>();
        }
    }
}
