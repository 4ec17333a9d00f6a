//! Access to the controller's registers in BAR0: volatile 32-bit loads and
//! stores (64-bit registers as two halves, low first, as the specification
//! allows), and the doorbells at `0x1000 + (2 * qid + is_cq) * stride`.

use std::sync::Arc;

use super::spec::reg;
use crate::vfio::Kick;

pub(crate) struct Regs {
    base: *mut u8,
    len: usize,
    stride: std::sync::atomic::AtomicUsize,
    kick: Option<Kick>,
    /// Whatever keeps the memory behind `base` alive (the twin's register page).
    _owner: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: `base` points to device registers (or the twin's register page) that
// outlive this value; every access is a volatile load or store of an aligned
// 32-bit word, which the device serialises.
unsafe impl Send for Regs {}
// SAFETY: as above.
unsafe impl Sync for Regs {}

impl Regs {
    /// Registers at `base` (`len` bytes), with the twin's hook if any.
    ///
    /// # Safety
    ///
    /// `base` must point to `len` bytes of mapped device registers (or memory
    /// standing in for them) that stay mapped while the value lives.
    pub(crate) unsafe fn new(
        base: *mut u8,
        len: usize,
        kick: Option<Kick>,
        owner: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Self {
        Self { base, len, stride: std::sync::atomic::AtomicUsize::new(4), kick, _owner: owner }
    }

    /// Sets the doorbell stride (from CAP.DSTRD).
    pub(crate) fn set_doorbell_stride(&self, stride: usize) {
        self.stride.store(stride, std::sync::atomic::Ordering::Relaxed);
    }

    #[inline]
    fn at(&self, offset: usize) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "register offset {offset:#x} outside BAR0 ({} bytes)",
            self.len
        );
        // SAFETY: in bounds (checked above).
        unsafe { self.base.add(offset).cast() }
    }

    pub(crate) fn read32(&self, offset: usize) -> u32 {
        // SAFETY: an aligned register inside BAR0 (see `at`).
        unsafe { self.at(offset).read_volatile() }
    }

    pub(crate) fn write32(&self, offset: usize, v: u32) {
        // SAFETY: as in read32.
        unsafe { self.at(offset).write_volatile(v) };
        self.kick();
    }

    pub(crate) fn read64(&self, offset: usize) -> u64 {
        self.read32(offset) as u64 | (self.read32(offset + 4) as u64) << 32
    }

    pub(crate) fn write64(&self, offset: usize, v: u64) {
        // SAFETY: as in read32.
        unsafe {
            self.at(offset).write_volatile(v as u32);
            self.at(offset + 4).write_volatile((v >> 32) as u32);
        }
        self.kick();
    }

    #[inline]
    fn doorbell(&self, index: usize, v: u32) {
        let offset = reg::DOORBELLS + index * self.stride.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as in read32.
        unsafe { self.at(offset).write_volatile(v) };
        self.kick();
    }

    #[inline]
    pub(crate) fn sq_doorbell(&self, qid: u16, tail: u32) {
        self.doorbell(2 * qid as usize, tail);
    }

    #[inline]
    pub(crate) fn cq_doorbell(&self, qid: u16, head: u32) {
        self.doorbell(2 * qid as usize + 1, head);
    }

    /// Lets the twin's controller run (after a register write, or while waiting).
    #[inline]
    pub(crate) fn kick(&self) {
        if let Some(k) = &self.kick {
            k();
        }
    }

    /// The raw address of a register, for tests that play the controller.
    #[cfg(test)]
    pub(crate) fn as_test_ptr(&self, offset: usize) -> *mut u32 {
        self.at(offset)
    }

    /// The largest I/O queue id whose doorbells fit in BAR0.
    pub(crate) fn max_qid(&self) -> u16 {
        let stride = self.stride.load(std::sync::atomic::Ordering::Relaxed);
        (((self.len - reg::DOORBELLS) / (2 * stride)).saturating_sub(1)).min(u16::MAX as usize) as u16
    }
}

/// Memory standing in for BAR0 (the twin's controllers, tests): 32-bit
/// words reached only through raw pointers, freed on drop.
pub(crate) struct RegisterPage {
    ptr: *mut u32,
    words: usize,
}

// SAFETY: the page is plain memory owned by this value; accesses go through
// raw pointers with volatile loads and stores.
unsafe impl Send for RegisterPage {}
// SAFETY: as above.
unsafe impl Sync for RegisterPage {}

impl RegisterPage {
    pub(crate) fn new(bytes: usize) -> Self {
        let words = bytes / 4;
        let ptr = Box::into_raw(vec![0u32; words].into_boxed_slice()).cast::<u32>();
        Self { ptr, words }
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.cast()
    }

    pub(crate) fn len(&self) -> usize {
        self.words * 4
    }

    pub(crate) fn read(&self, offset: usize) -> u32 {
        assert!(offset / 4 < self.words);
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(offset / 4).read_volatile() }
    }

    pub(crate) fn write(&self, offset: usize, v: u32) {
        assert!(offset / 4 < self.words);
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(offset / 4).write_volatile(v) }
    }
}

impl Drop for RegisterPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`words` come from Box::into_raw in `new`, freed once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.words)) });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A register page in memory that counts register writes.
    pub(crate) struct ScratchPage {
        mem: Arc<RegisterPage>,
        writes: Arc<AtomicUsize>,
    }

    impl ScratchPage {
        pub(crate) fn read(&self, offset: usize) -> u32 {
            self.mem.read(offset)
        }

        pub(crate) fn writes(&self) -> usize {
            self.writes.load(Ordering::Relaxed)
        }
    }

    pub(crate) fn scratch_regs() -> (Arc<Regs>, ScratchPage) {
        let mem = Arc::new(RegisterPage::new(0x2000));
        let writes = Arc::new(AtomicUsize::new(0));
        let w = writes.clone();
        let kick: Kick = Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        // SAFETY: the page is 8 KiB and kept alive by the Regs (owner).
        let regs = unsafe { Regs::new(mem.base(), mem.len(), Some(kick), Some(mem.clone())) };
        (Arc::new(regs), ScratchPage { mem, writes })
    }

    #[test]
    fn doorbells_follow_the_stride() {
        let (regs, page) = scratch_regs();
        regs.sq_doorbell(0, 5);
        regs.cq_doorbell(0, 6);
        regs.set_doorbell_stride(16);
        regs.sq_doorbell(1, 7);
        assert_eq!((page.read(0x1000), page.read(0x1004), page.read(0x1020)), (5, 6, 7));
        assert_eq!(regs.max_qid(), (0x1000 / 32 - 1) as u16);
        regs.write64(reg::ASQ, 0x1_2345_6000);
        assert_eq!(regs.read64(reg::ASQ), 0x1_2345_6000);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| regs.read32(0x2000))).is_err());
    }
}
