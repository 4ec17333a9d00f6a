//! Controller bring-up and the admin queue.
//!
//! Bring-up is a state machine that owns no thread or clock ([`Init::step`]
//! is given the time): disable the controller and wait for CSTS.RDY to clear
//! (within CAP.TO), program the admin queue (AQA, ASQ, ACQ), enable, wait for
//! CSTS.RDY. [`run_init`] drives it for the control path.
//!
//! Admin commands run one at a time under the controller's admin lock and
//! are waited for by polling the admin CQ ([`Admin::execute`]); Abort
//! commands from reactors are only posted ([`Admin::post`]), since their
//! effect shows on the I/O queue, and their completions are consumed by the
//! next command that waits.

use std::time::Duration;

use pmd::DmaBuf;

use super::queue::Queue;
use super::regs::Regs;
use super::spec::{Cap, Cqe, Sqe, reg};
use crate::error::BdevError;

/// Entries of the admin queues.
pub(crate) const ADMIN_ENTRIES: u32 = 32;

/// Where bring-up is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitState {
    /// Clear CC.EN.
    Disable,
    /// Wait for CSTS.RDY = 0 until the deadline.
    WaitDisabled { deadline: u64 },
    /// Wait for CSTS.RDY = 1 until the deadline.
    WaitReady { deadline: u64 },
    /// The controller is enabled with the admin queue programmed.
    Ready,
}

/// The bring-up state machine. See the module docs.
pub(crate) struct Init {
    pub(crate) state: InitState,
    cap: Cap,
    asq: u64,
    acq: u64,
    entries: u32,
}

impl Init {
    pub(crate) fn new(cap: Cap, admin: &Queue) -> Self {
        Self { state: InitState::Disable, cap, asq: admin.sq_iova(), acq: admin.cq_iova(), entries: admin.entries() }
    }

    fn timeout(&self, ctrl: &str, what: &'static str) -> BdevError {
        BdevError::ControllerTimeout { ctrl: ctrl.to_string(), what, ms: self.cap.timeout_ms }
    }

    /// Advances as far as the registers allow at time `now` (ns). Returns
    /// whether the controller is ready.
    pub(crate) fn step(&mut self, regs: &Regs, now: u64, ctrl: &str) -> Result<bool, BdevError> {
        let deadline = now + self.cap.timeout_ms * 1_000_000;
        loop {
            let csts = regs.read32(reg::CSTS);
            match self.state {
                InitState::Disable => {
                    let cc = regs.read32(reg::CC);
                    if cc & reg::CC_EN != 0 {
                        regs.write32(reg::CC, cc & !reg::CC_EN);
                    }
                    self.state = InitState::WaitDisabled { deadline };
                }
                InitState::WaitDisabled { deadline } => {
                    if csts & reg::CSTS_RDY != 0 {
                        return if now > deadline {
                            Err(self.timeout(ctrl, "CSTS.RDY to clear after CC.EN = 0"))
                        } else {
                            Ok(false)
                        };
                    }
                    let size = self.entries - 1;
                    regs.write32(reg::AQA, size << 16 | size);
                    regs.write64(reg::ASQ, self.asq);
                    regs.write64(reg::ACQ, self.acq);
                    regs.write32(reg::CC, reg::CC_IO_ENTRY_SIZES | reg::CC_EN);
                    self.state = InitState::WaitReady { deadline: now + self.cap.timeout_ms * 1_000_000 };
                }
                InitState::WaitReady { deadline } => {
                    if csts & reg::CSTS_CFS != 0 {
                        return Err(BdevError::ControllerFatal { ctrl: ctrl.to_string(), when: "enabling it" });
                    }
                    if csts & reg::CSTS_RDY == 0 {
                        return if now > deadline {
                            Err(self.timeout(ctrl, "CSTS.RDY after CC.EN = 1"))
                        } else {
                            Ok(false)
                        };
                    }
                    self.state = InitState::Ready;
                }
                InitState::Ready => return Ok(true),
            }
        }
    }
}

/// Polls `done` (with the twin's kick) until it answers or `timeout_ns` passes.
pub(crate) fn wait_for<T>(regs: &Regs, timeout_ns: u64, mut done: impl FnMut(u64) -> Option<T>) -> Option<T> {
    let start = pmd::clock::now();
    let mut spins = 0u32;
    loop {
        regs.kick();
        let now = pmd::clock::now();
        if let Some(v) = done(now) {
            return Some(v);
        }
        if now.saturating_sub(start) > timeout_ns {
            return None;
        }
        spins += 1;
        if spins > 64 {
            std::thread::sleep(Duration::from_micros(20));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Runs bring-up to the end (for the control path).
pub(crate) fn run_init(regs: &Regs, cap: Cap, admin: &mut Queue, ctrl: &str) -> Result<(), BdevError> {
    admin.reset();
    let mut init = Init::new(cap, admin);
    let mut result = Ok(false);
    wait_for(regs, u64::MAX, |now| {
        result = init.step(regs, now, ctrl);
        (!matches!(result, Ok(false))).then_some(())
    });
    result.map(|_| ())
}

/// The admin queue and a page of DMA memory for its data.
pub(crate) struct Admin {
    pub(crate) q: Queue,
    pub(crate) page: DmaBuf,
    next_cid: u16,
    /// Posted commands whose completion nobody waits for.
    posted: u32,
}

/// How long an admin command may take.
pub(crate) const ADMIN_TIMEOUT_NS: u64 = 10_000_000_000;

impl Admin {
    pub(crate) fn new(q: Queue, page: DmaBuf) -> Self {
        Self { q, page, next_cid: 0, posted: 0 }
    }

    /// Forgets posted commands (after a controller reset).
    pub(crate) fn reset(&mut self) {
        self.posted = 0;
    }

    fn push(&mut self, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.set_cid(cid);
        self.q.push(&sqe);
        self.q.ring();
        cid
    }

    fn drain(&mut self) {
        while self.q.pop().is_some() {
            self.posted = self.posted.saturating_sub(1);
        }
        self.q.ring();
    }

    /// Posts a command without waiting for it (Abort). Returns false when the
    /// admin queue has no room for it now.
    pub(crate) fn post(&mut self, sqe: Sqe) -> bool {
        self.drain();
        if self.posted + 1 >= self.q.entries() - 1 {
            return false;
        }
        self.posted += 1;
        self.push(sqe);
        true
    }

    /// Runs one command and waits for its completion.
    pub(crate) fn execute(
        &mut self,
        regs: &Regs,
        ctrl: &str,
        action: &'static str,
        sqe: Sqe,
    ) -> Result<Cqe, BdevError> {
        self.drain();
        let cid = self.push(sqe);
        let q = &mut self.q;
        let posted = &mut self.posted;
        let cqe = wait_for(regs, ADMIN_TIMEOUT_NS, |_| {
            while let Some(c) = q.pop() {
                if c.cid == cid {
                    return Some(c);
                }
                *posted = posted.saturating_sub(1);
            }
            None
        });
        self.q.ring();
        let cqe = cqe.ok_or_else(|| BdevError::ControllerTimeout {
            ctrl: ctrl.to_string(),
            what: action,
            ms: ADMIN_TIMEOUT_NS / 1_000_000,
        })?;
        if !cqe.status().is_ok() {
            return Err(BdevError::Nvme { ctrl: ctrl.to_string(), action, status: cqe.status() });
        }
        Ok(cqe)
    }

    /// Runs a command that returns up to 4 KiB of data in the admin page.
    pub(crate) fn read(
        &mut self,
        regs: &Regs,
        ctrl: &str,
        action: &'static str,
        sqe: impl FnOnce(u64) -> Sqe,
    ) -> Result<Vec<u8>, BdevError> {
        let iova = self.page.iova();
        self.execute(regs, ctrl, action, sqe(iova))?;
        Ok(self.page.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nvme::regs::tests::scratch_regs;

    #[test]
    fn bring_up_disables_programs_and_enables_within_cap_to() {
        let (regs, page) = scratch_regs();
        let cap = Cap::decode(31 | 2 << 24); // 32 entries, CAP.TO = 1 s
        let admin = Queue::new(regs.clone(), 0, 32).unwrap();
        let mut init = Init::new(cap, &admin);
        // A controller left enabled and ready by its previous owner.
        let raw = |off: usize, v: u32| {
            // SAFETY: test-only write to the scratch register page.
            unsafe { regs.as_test_ptr(off).write_volatile(v) }
        };
        raw(reg::CC, reg::CC_EN);
        raw(reg::CSTS, reg::CSTS_RDY);
        assert!(!init.step(&regs, 0, "t").unwrap());
        assert_eq!(page.read(reg::CC) & reg::CC_EN, 0, "CC.EN cleared first");
        assert!(matches!(init.state, InitState::WaitDisabled { .. }));
        assert!(init.step(&regs, 500_000_000, "t").is_ok(), "still within CAP.TO");
        let e = init.step(&regs, 1_000_000_001, "t").unwrap_err().to_string();
        assert!(e.contains("CSTS.RDY to clear") && e.contains("1000 ms"), "{e}");

        let mut init = Init::new(cap, &admin);
        init.step(&regs, 0, "t").unwrap();
        raw(reg::CSTS, 0); // the controller finished disabling
        assert!(!init.step(&regs, 10, "t").unwrap());
        assert_eq!(page.read(reg::AQA), 31 << 16 | 31);
        assert_eq!(page.read(reg::ASQ) as u64 | (page.read(reg::ASQ + 4) as u64) << 32, admin.sq_iova());
        assert_eq!(page.read(reg::CC), reg::CC_IO_ENTRY_SIZES | reg::CC_EN);
        raw(reg::CSTS, reg::CSTS_RDY);
        assert!(init.step(&regs, 20, "t").unwrap());
        assert_eq!(init.state, InitState::Ready);
    }
}
