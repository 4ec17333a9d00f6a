//! One submission queue and its completion queue in DMA memory, with their
//! doorbells.
//!
//! The host writes commands at the SQ tail and tells the controller the new
//! tail through the SQ doorbell; the controller posts completions at the CQ
//! tail, each carrying a *phase tag* that flips every time the CQ wraps, so
//! the host recognises new entries without any register read: an entry is
//! new while its phase equals the phase expected at the head. The host then
//! tells the controller how far it consumed through the CQ doorbell.
//!
//! Doorbells are written by [`Queue::ring`], once per poll round for
//! everything queued since, never per command. Queue memory is touched only
//! through raw pointers with volatile accesses: the controller writes the
//! CQ behind the compiler's back.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use pmd::DmaBuf;

use super::regs::Regs;
use super::spec::{Cqe, Sqe};
use crate::error::BdevError;

pub(crate) struct Queue {
    pub(crate) qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_base: *mut Sqe,
    cq_base: *const Cqe,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    sq_dirty: bool,
    cq_dirty: bool,
    regs: Arc<Regs>,
}

// SAFETY: the raw pointers point into the DmaBufs this value owns; a queue is
// used by one thread at a time (a reactor, or under the admin lock).
unsafe impl Send for Queue {}

impl Queue {
    /// Allocates an empty queue pair of `entries` entries each.
    pub(crate) fn new(regs: Arc<Regs>, qid: u16, entries: u32) -> Result<Self, BdevError> {
        let mut sq = DmaBuf::zeroed(entries as usize * 64)?;
        let mut cq = DmaBuf::zeroed(entries as usize * 16)?;
        let (sq_base, cq_base) = (sq.as_mut_ptr().cast::<Sqe>(), cq.as_mut_ptr().cast::<Cqe>() as *const Cqe);
        Ok(Self {
            qid,
            entries,
            sq,
            cq,
            sq_base,
            cq_base,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            sq_dirty: false,
            cq_dirty: false,
            regs,
        })
    }

    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    pub(crate) fn sq_buf(&self) -> &DmaBuf {
        &self.sq
    }

    pub(crate) fn cq_buf(&self) -> &DmaBuf {
        &self.cq
    }

    pub(crate) fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    pub(crate) fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Forgets everything in flight and clears the CQ, for a controller that
    /// was disabled (it no longer touches this memory).
    pub(crate) fn reset(&mut self) {
        // SAFETY: the CQ buffer is `entries` entries long and the disabled
        // controller no longer writes it.
        unsafe { std::ptr::write_bytes(self.cq.as_mut_ptr(), 0, self.entries as usize * 16) };
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.sq_dirty = false;
        self.cq_dirty = false;
    }

    /// Gives up the queue memory without freeing it (a controller that could
    /// not be told to stop using it may still write it).
    pub(crate) fn leak(&mut self) {
        std::mem::forget(std::mem::replace(&mut self.sq, DmaBuf::new(1).expect("one byte of DMA memory")));
        std::mem::forget(std::mem::replace(&mut self.cq, DmaBuf::new(1).expect("one byte of DMA memory")));
    }

    /// Writes `sqe` at the tail. The caller guarantees room: at most
    /// `entries - 1` commands are outstanding (each holds a command id).
    #[inline]
    pub(crate) fn push(&mut self, sqe: &Sqe) {
        // SAFETY: sq_tail < entries, inside the SQ buffer; the controller reads
        // this slot only after the doorbell says so.
        unsafe { self.sq_base.add(self.sq_tail as usize).write_volatile(*sqe) };
        self.sq_tail = if self.sq_tail + 1 == self.entries { 0 } else { self.sq_tail + 1 };
        self.sq_dirty = true;
    }

    /// The next completion, if the controller posted one.
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<Cqe> {
        // SAFETY: cq_head < entries, inside the CQ buffer, which the controller
        // writes by DMA: read it with a volatile load.
        let status = unsafe { std::ptr::addr_of!((*self.cq_base.add(self.cq_head as usize)).status).read_volatile() };
        if (status & 1 == 1) != self.phase {
            return None;
        }
        // The rest of the entry must not be read before its phase tag.
        fence(Ordering::Acquire);
        // SAFETY: as above; the phase tag says the controller finished writing it.
        let cqe = unsafe { self.cq_base.add(self.cq_head as usize).read_volatile() };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        self.cq_dirty = true;
        Some(cqe)
    }

    /// Writes the doorbells that changed: the SQ tail (new commands) and the
    /// CQ head (consumed completions).
    #[inline]
    pub(crate) fn ring(&mut self) {
        if self.cq_dirty {
            self.regs.cq_doorbell(self.qid, self.cq_head);
            self.cq_dirty = false;
        }
        if self.sq_dirty {
            // Commands must be in memory before the controller hears of them.
            fence(Ordering::Release);
            self.regs.sq_doorbell(self.qid, self.sq_tail);
            self.sq_dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nvme::regs::tests::scratch_regs;

    /// Posts a completion the way a controller does.
    fn post(q: &Queue, slot: u32, phase: bool, cid: u16) {
        let cqe = Cqe { cid, status: phase as u16, ..Default::default() };
        // SAFETY: test-only: slot < entries, inside the CQ.
        unsafe { (q.cq_base as *mut Cqe).add(slot as usize).write_volatile(cqe) };
    }

    #[test]
    fn completions_are_found_by_phase_across_wrap_arounds() {
        let (regs, page) = scratch_regs();
        let mut q = Queue::new(regs, 1, 4).unwrap();
        assert_eq!(q.pop(), None, "a zeroed CQ holds nothing (phase 0 != expected 1)");
        let mut cid = 0u16;
        let mut phase = true;
        for round in 0..3 {
            for slot in 0..4 {
                post(&q, slot, phase, cid);
                let c = q.pop().unwrap_or_else(|| panic!("round {round} slot {slot}"));
                assert_eq!(c.cid, cid);
                assert_eq!(q.pop(), None, "an old entry (stale phase) is not taken again");
                cid += 1;
            }
            phase = !phase;
        }
        q.ring();
        // CQ head doorbell of queue 1 (stride 4): 0x1000 + (2 * 1 + 1) * 4.
        assert_eq!(page.read(0x100c), 0, "head back at slot 0 after 12 completions of a 4-entry queue");
        post(&q, 0, phase, 99);
        assert_eq!(q.pop().unwrap().cid, 99);
        q.ring();
        assert_eq!(page.read(0x100c), 1);
    }

    #[test]
    fn doorbells_are_written_once_per_ring_with_the_latest_tail() {
        let (regs, page) = scratch_regs();
        let mut q = Queue::new(regs, 2, 8).unwrap();
        for _ in 0..10 {
            q.push(&Sqe::flush(1));
        }
        assert_eq!(page.read(0x1010), 0, "nothing written before ring");
        assert!(q.sq_dirty);
        q.ring();
        assert_eq!(page.read(0x1010), 2, "tail after 10 pushes into 8 entries");
        assert_eq!(page.writes(), 1, "one doorbell write for ten commands");
        q.ring();
        assert_eq!(page.writes(), 1, "nothing new, no write");
    }
}
