//! Data pointers: how a command tells the controller where its data is.
//!
//! **PRP** (Physical Region Page) entries name memory pages: PRP1 the first
//! (it may start inside its page), PRP2 the second, or, when the transfer
//! touches more than two pages, a *PRP list* — a page of 8-byte entries, one
//! per further page. Every piece but the first must start on a page boundary
//! and every piece but the last must end on one. **SGL** (Scatter Gather
//! List) descriptors name byte ranges of any alignment: one Data Block
//! descriptor in the command, or a Last Segment descriptor pointing at a
//! list of them.
//!
//! Each command has a 4 KiB page of DMA memory of its own for the list
//! (its slot in the queue pair's list area), so building a pointer never
//! allocates.

use super::spec::{PAGE, PSDT_SGL, Sqe};

/// One contiguous piece of a transfer: device address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub(crate) addr: u64,
    pub(crate) len: u32,
}

/// PRP entries that fit a list page.
pub(crate) const PRP_LIST_ENTRIES: usize = PAGE / 8;
/// SGL descriptors that fit a list page.
pub(crate) const SGL_LIST_ENTRIES: usize = PAGE / 16;

/// Whether the pieces can be described by PRPs (see the module docs).
pub(crate) fn prp_compatible(segs: impl Iterator<Item = Seg>) -> bool {
    let page = PAGE as u64;
    let mut prev_end_aligned = true;
    for (i, s) in segs.enumerate() {
        if s.addr % 4 != 0 || (i > 0 && (!prev_end_aligned || s.addr % page != 0)) {
            return false;
        }
        prev_end_aligned = (s.addr + s.len as u64) % page == 0;
    }
    true
}

/// Pages a PRP description of the pieces needs.
fn prp_entries(segs: &[Seg]) -> usize {
    let page = PAGE as u64;
    segs.iter().map(|s| ((s.addr + s.len as u64).div_ceil(page) - s.addr / page) as usize).sum()
}

/// Why a data pointer could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The pieces break the PRP rules and SGLs are not available.
    NotPrp,
    /// More pieces or pages than a list page holds.
    TooLong,
}

/// Sets the data pointer of `sqe` for `segs`: PRPs when the pieces allow,
/// else SGL descriptors when `sgl`. `list` is the command's list page (its
/// device address `list_iova`).
///
/// # Safety
///
/// `list` must point to a writable, 8-byte aligned page of [`PAGE`] bytes
/// that the device does not use while this runs.
pub(crate) unsafe fn fill(
    sqe: &mut Sqe,
    segs: &[Seg],
    list: *mut u64,
    list_iova: u64,
    sgl: bool,
) -> Result<(), Layout> {
    if prp_compatible(segs.iter().copied()) {
        let n = prp_entries(segs);
        if n > PRP_LIST_ENTRIES + 1 {
            return Err(Layout::TooLong);
        }
        let page = PAGE as u64;
        let mut k = 0;
        for (i, s) in segs.iter().enumerate() {
            let mut addr = s.addr;
            let end = s.addr + s.len as u64;
            while addr < end {
                if i == 0 && k == 0 {
                    sqe.dptr[0] = addr;
                } else {
                    // SAFETY: k - 1 < PRP_LIST_ENTRIES (checked above), inside the page.
                    unsafe { list.add(k - 1).write(addr) };
                }
                k += 1;
                addr = (addr / page + 1) * page;
            }
        }
        sqe.dptr[1] = match n {
            1 => 0,
            // SAFETY: entry 0 was written above.
            2 => unsafe { list.read() },
            _ => list_iova,
        };
        return Ok(());
    }
    if !sgl {
        return Err(Layout::NotPrp);
    }
    if segs.len() > SGL_LIST_ENTRIES {
        return Err(Layout::TooLong);
    }
    sqe.cdw0 |= PSDT_SGL;
    if let [s] = segs {
        // Data Block descriptor (type 0) in the command itself.
        sqe.dptr = [s.addr, s.len as u64];
        return Ok(());
    }
    for (i, s) in segs.iter().enumerate() {
        // SAFETY: 2 * i + 1 < 2 * SGL_LIST_ENTRIES = PAGE / 8 entries.
        unsafe {
            list.add(2 * i).write(s.addr);
            list.add(2 * i + 1).write(s.len as u64);
        }
    }
    // Last Segment descriptor (type 3) pointing at the list.
    sqe.dptr = [list_iova, (segs.len() * 16) as u64 | 0x30 << 56];
    Ok(())
}

/// Reads the pieces a command's data pointer describes (the controller's
/// side of [`fill`], used by the emulated controller). `read_list(addr, i)`
/// reads entry `i` (8 bytes) of the list at device address `addr`.
pub(crate) fn walk(sqe: &Sqe, len: usize, mut read_list: impl FnMut(u64, usize) -> u64) -> Result<Vec<Seg>, ()> {
    let mut out = Vec::new();
    if sqe.cdw0 & PSDT_SGL != 0 {
        let kind = (sqe.dptr[1] >> 60) as u8;
        if kind == 0 {
            out.push(Seg { addr: sqe.dptr[0], len: sqe.dptr[1] as u32 });
        } else if kind == 3 {
            let n = (sqe.dptr[1] as u32 / 16) as usize;
            for i in 0..n {
                let addr = read_list(sqe.dptr[0], 2 * i);
                let d = read_list(sqe.dptr[0], 2 * i + 1);
                if d >> 60 != 0 {
                    return Err(());
                }
                out.push(Seg { addr, len: d as u32 });
            }
        } else {
            return Err(());
        }
        return if out.iter().map(|s| s.len as usize).sum::<usize>() == len { Ok(out) } else { Err(()) };
    }
    let page = PAGE as u64;
    let first = ((page - sqe.dptr[0] % page) as usize).min(len);
    out.push(Seg { addr: sqe.dptr[0], len: first as u32 });
    let mut left = len - first;
    if left == 0 {
        return Ok(out);
    }
    if left <= PAGE {
        if sqe.dptr[1] % page != 0 {
            return Err(());
        }
        out.push(Seg { addr: sqe.dptr[1], len: left as u32 });
        return Ok(out);
    }
    let mut i = 0;
    while left > 0 {
        if i >= PRP_LIST_ENTRIES {
            return Err(());
        }
        let addr = read_list(sqe.dptr[1], i);
        if addr % page != 0 {
            return Err(());
        }
        let n = left.min(PAGE);
        out.push(Seg { addr, len: n as u32 });
        left -= n;
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(segs: &[Seg], sgl: bool) -> (Result<(), Layout>, Sqe, Vec<u64>) {
        let mut page = vec![0u64; PAGE / 8];
        let mut sqe = Sqe::default();
        // SAFETY: `page` is a writable, aligned page of PAGE bytes.
        let r = unsafe { fill(&mut sqe, segs, page.as_mut_ptr(), 0xabc000, sgl) };
        (r, sqe, page)
    }

    fn round_trip(segs: &[Seg], sgl: bool) -> Vec<Seg> {
        let (r, sqe, page) = build(segs, sgl);
        r.unwrap();
        let len = segs.iter().map(|s| s.len as usize).sum();
        let pieces = walk(&sqe, len, |addr, i| {
            assert_eq!(addr, 0xabc000);
            page[i]
        })
        .unwrap();
        // Merge pages back into contiguous pieces for comparison.
        let mut merged: Vec<Seg> = Vec::new();
        for p in pieces {
            match merged.last_mut() {
                Some(m) if m.addr + m.len as u64 == p.addr => m.len += p.len,
                _ => merged.push(p),
            }
        }
        merged
    }

    #[test]
    fn one_and_two_pages_use_prp1_and_prp2() {
        let (_, s, _) = build(&[Seg { addr: 0x10000, len: 4096 }], false);
        assert_eq!(s.dptr, [0x10000, 0]);
        let (_, s, _) = build(&[Seg { addr: 0x10000, len: 8192 }], false);
        assert_eq!(s.dptr, [0x10000, 0x11000]);
        // 512 bytes in the middle of a page, then to its end and one more page.
        let (_, s, _) = build(&[Seg { addr: 0x10e00, len: 512 + 4096 }], false);
        assert_eq!(s.dptr, [0x10e00, 0x11000]);
    }

    #[test]
    fn longer_transfers_use_a_prp_list_and_scattered_buffers_are_joined() {
        let segs =
            [Seg { addr: 0x20000, len: 3 * 4096 }, Seg { addr: 0x80000, len: 4096 }, Seg { addr: 0x40000, len: 512 }];
        let (r, s, page) = build(&segs, false);
        assert_eq!(r, Ok(()));
        assert_eq!(s.dptr, [0x20000, 0xabc000]);
        assert_eq!(&page[..4], &[0x21000, 0x22000, 0x80000, 0x40000]);
        assert_eq!(round_trip(&segs, false), vec![segs[0], segs[1], segs[2]]);
        // 2 MiB + an unaligned start: 513 pages, 512 in the list (the most a page holds).
        let big = [Seg { addr: 0x100800, len: 2 << 20 }];
        assert_eq!(round_trip(&big, false), big.to_vec());
        let too_big = [Seg { addr: 0x100800, len: (2 << 20) + 4096 }];
        assert_eq!(build(&too_big, false).0, Err(Layout::TooLong));
    }

    #[test]
    fn pieces_breaking_prp_rules_need_sgl() {
        // A 512-byte buffer followed by another: the first does not end on a page boundary.
        let segs = [Seg { addr: 0x30000, len: 512 }, Seg { addr: 0x50000, len: 4096 }];
        assert!(!prp_compatible(segs.iter().copied()));
        assert_eq!(build(&segs, false).0, Err(Layout::NotPrp));
        assert_eq!(round_trip(&segs, true), segs.to_vec());
        let (_, s, _) = build(&segs, true);
        assert_eq!(s.cdw0 & PSDT_SGL, PSDT_SGL);
        assert_eq!(s.dptr[1] >> 56, 0x30);
        // One piece always fits PRPs, even inside a page.
        let one = [Seg { addr: 0x30200, len: 512 }];
        assert_eq!(build(&one, false).1.dptr, [0x30200, 0]);
    }
}
