//! Core masks in SPDK's notation: `0x3`, `3` (hex without prefix), or a list
//! such as `[0,2-3]`.

use std::fmt;

/// The set of CPU cores reactors run on, in ascending order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreMask(Vec<usize>);

/// Why a core mask was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreMaskError {
    /// The text is neither a hex mask nor a core list.
    #[error("invalid core mask {text:?}: {reason} (examples: 0x3, 3, [0,2-3])")]
    Syntax {
        /// The mask as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The mask selects no core.
    #[error("core mask {0:?} selects no core")]
    Empty(String),
    /// The mask names a core this process may not run on.
    #[error("core mask {mask:?} names core {core}, but this process may only run on cores {allowed:?}")]
    Unavailable {
        /// The mask as given.
        mask: String,
        /// The first core that is not available.
        core: usize,
        /// The cores the process may use.
        allowed: Vec<usize>,
    },
}

/// Highest core number a mask may name.
const MAX_CORE: usize = 1023;

impl CoreMask {
    /// Parses a mask without checking the cores exist.
    pub fn parse(text: &str) -> Result<Self, CoreMaskError> {
        let t = text.trim();
        let syntax = |reason: &str| CoreMaskError::Syntax { text: text.to_string(), reason: reason.to_string() };
        let mut cores = Vec::new();
        if let Some(list) = t.strip_prefix('[') {
            let list = list.strip_suffix(']').ok_or_else(|| syntax("a core list must end with ']'"))?;
            for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (lo, hi) = match part.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (part, part),
                };
                let num = |s: &str| s.parse::<usize>().map_err(|_| syntax(&format!("{s:?} is not a core number")));
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(syntax(&format!("range {lo}-{hi} is reversed")));
                }
                if hi > MAX_CORE {
                    return Err(syntax(&format!("core {hi} is above {MAX_CORE}")));
                }
                cores.extend(lo..=hi);
            }
        } else {
            let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
            if hex.is_empty() {
                return Err(syntax("empty mask"));
            }
            for (i, c) in hex.chars().rev().enumerate() {
                let v = c.to_digit(16).ok_or_else(|| syntax(&format!("{c:?} is not a hex digit")))?;
                for bit in 0..4 {
                    if v & (1 << bit) != 0 {
                        let core = i * 4 + bit;
                        if core > MAX_CORE {
                            return Err(syntax(&format!("core {core} is above {MAX_CORE}")));
                        }
                        cores.push(core);
                    }
                }
            }
        }
        cores.sort_unstable();
        cores.dedup();
        if cores.is_empty() {
            return Err(CoreMaskError::Empty(text.to_string()));
        }
        Ok(Self(cores))
    }

    /// Parses a mask and checks that every core is one this process may run on.
    pub fn parse_available(text: &str) -> Result<Self, CoreMaskError> {
        let mask = Self::parse(text)?;
        let allowed = crate::sys::allowed_cpus().unwrap_or_default();
        if let Some(&core) = mask.0.iter().find(|c| !allowed.contains(c)) {
            return Err(CoreMaskError::Unavailable { mask: text.to_string(), core, allowed });
        }
        Ok(mask)
    }

    /// A mask with the first `n` cores (`0..n`), for tests and tools.
    pub fn first(n: usize) -> Self {
        Self((0..n.max(1)).collect())
    }

    /// The cores, ascending.
    pub fn cores(&self) -> &[usize] {
        &self.0
    }

    /// Number of cores.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a parsed mask; here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for CoreMask {
    /// Formats as a hex mask, the way SPDK prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = *self.0.last().unwrap_or(&0);
        let mut digits = vec![0u8; top / 4 + 1];
        for &c in &self.0 {
            digits[c / 4] |= 1 << (c % 4);
        }
        write!(f, "0x")?;
        for d in digits.iter().rev() {
            write!(f, "{d:x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_lists() {
        assert_eq!(CoreMask::parse("0x3").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("5").unwrap().cores(), &[0, 2]);
        assert_eq!(CoreMask::parse("0x10").unwrap().cores(), &[4]);
        assert_eq!(CoreMask::parse("[0,2-3]").unwrap().cores(), &[0, 2, 3]);
        assert_eq!(CoreMask::parse("[3, 1]").unwrap().cores(), &[1, 3]);
    }

    #[test]
    fn formats_as_hex() {
        assert_eq!(CoreMask::parse("[0,2-3]").unwrap().to_string(), "0xd");
        assert_eq!(CoreMask::parse("0x10").unwrap().to_string(), "0x10");
    }

    #[test]
    fn rejects_bad_masks_with_reasons() {
        let err = CoreMask::parse("0xg").unwrap_err().to_string();
        assert!(err.contains("'g' is not a hex digit"), "{err}");
        assert_eq!(CoreMask::parse("0x0").unwrap_err(), CoreMaskError::Empty("0x0".into()));
        assert!(CoreMask::parse("[1-0]").unwrap_err().to_string().contains("reversed"));
        assert!(CoreMask::parse("[0,2").unwrap_err().to_string().contains("must end with ']'"));
        assert!(CoreMask::parse("").unwrap_err().to_string().contains("empty mask"));
        assert!(CoreMask::parse("[5000]").unwrap_err().to_string().contains("above"));
    }

    #[test]
    fn refuses_cores_the_process_cannot_use() {
        let err = CoreMask::parse_available("[1000]").unwrap_err();
        assert!(matches!(err, CoreMaskError::Unavailable { core: 1000, .. }), "{err}");
    }
}
