//! The generic part of every bdev channel: request checks, statistics,
//! queueing when the backend is full, and per-I/O timeouts.
//!
//! Submission never blocks and never fails outright: every request ends in
//! exactly one [`Completion`] returned by [`BdevChannel::poll`], errors
//! included. A request the backend has no room for waits in a FIFO and is
//! passed on, in order, as completions free room.
//!
//! A request not completed within the timeout completes with
//! [`IoError::TimedOut`] at once; the backend is asked to abort it, and its
//! buffers stay with the backend until the device lets go of them (they are
//! then freed, never handed back), so memory a device may still write is never
//! returned to the user.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{BdevDesc, Completion, Io, IoBufs, IoError, IoType};
use crate::backend::BackendChannel;
use crate::stats::IoStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Busy,
    TimedOut,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    tag: u64,
    start: u64,
    bytes: u64,
    op: IoType,
    state: SlotState,
}

/// How often timeouts are checked, at most.
const TIMEOUT_SCAN_NS: u64 = 1_000_000;

/// One reactor's channel to a bdev. See the module docs.
pub struct BdevChannel {
    desc: BdevDesc,
    block_shift: u32,
    num_blocks: u64,
    backend: BackendChannel,
    slots: Vec<Slot>,
    free: Vec<u32>,
    queued: VecDeque<Io>,
    ready: Vec<Completion>,
    scratch: Vec<Completion>,
    stats: Arc<IoStats>,
    timeout_ns: Option<u64>,
    next_scan: u64,
    outstanding: usize,
}

impl std::fmt::Debug for BdevChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevChannel")
            .field("bdev", &self.desc.bdev().name())
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl BdevChannel {
    pub(crate) fn new(desc: BdevDesc, backend: BackendChannel) -> Self {
        let bdev = desc.bdev();
        let stats = bdev.stats_registry().attach();
        Self {
            block_shift: bdev.block_size().trailing_zeros(),
            num_blocks: bdev.num_blocks(),
            desc,
            backend,
            slots: Vec::new(),
            free: Vec::new(),
            queued: VecDeque::new(),
            ready: Vec::new(),
            scratch: Vec::new(),
            stats,
            timeout_ns: None,
            next_scan: 0,
            outstanding: 0,
        }
    }

    /// The descriptor this channel was opened from.
    pub fn desc(&self) -> &BdevDesc {
        &self.desc
    }

    /// Sets the per-I/O timeout (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.timeout_ns = timeout.map(|t| t.as_nanos().max(1) as u64);
    }

    /// Requests submitted and not yet returned by [`BdevChannel::poll`].
    pub fn outstanding(&self) -> usize {
        self.outstanding + self.ready.len()
    }

    /// Whether [`BdevChannel::poll`] must be called again without waiting for
    /// a wake-up: completions are ready, or requests are outstanding on a
    /// backend that cannot wake a sleeping reactor.
    pub fn needs_poll(&self) -> bool {
        !self.ready.is_empty() || (self.outstanding > 0 && !self.backend.wakes_reactor())
    }

    /// Whether the backend wakes a sleeping reactor on completion.
    pub(crate) fn wakes_reactor(&self) -> bool {
        self.backend.wakes_reactor()
    }

    /// The poll status a poller driving this channel should report when it
    /// found nothing to do: [`pmd::PollStatus::Waiting`] if the channel needs
    /// polling, else [`pmd::PollStatus::Idle`].
    pub fn idle_status(&self) -> pmd::PollStatus {
        if self.needs_poll() { pmd::PollStatus::Waiting } else { pmd::PollStatus::Idle }
    }

    fn check(&self, io: &mut Io) -> Result<(), IoError> {
        if !self.desc.bdev().supports(io.op) {
            return Err(IoError::Unsupported);
        }
        if io.op.is_write() && !self.desc.writable() {
            return Err(IoError::ReadOnly);
        }
        match io.op {
            IoType::Read | IoType::Write => {
                let len = io.bufs.len() as u64;
                if len == 0 || len & ((1 << self.block_shift) - 1) != 0 {
                    return Err(IoError::Invalid);
                }
                io.num_blocks = len >> self.block_shift;
            }
            IoType::Unmap | IoType::WriteZeroes => {
                if io.num_blocks == 0 {
                    return Err(IoError::Invalid);
                }
            }
            IoType::Flush => return Ok(()),
        }
        match io.offset_blocks.checked_add(io.num_blocks) {
            Some(end) if end <= self.num_blocks => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    /// Submits a request at time `now`. Its completion comes from a later
    /// [`BdevChannel::poll`], whatever happens.
    pub fn submit(&mut self, now: u64, mut io: Io) {
        if let Err(e) = self.check(&mut io) {
            self.ready.push(Completion::of(io, Err(e)));
            return;
        }
        let bytes = if io.op == IoType::Flush { 0 } else { io.num_blocks << self.block_shift };
        let slot = Slot { tag: io.tag, start: now, bytes, op: io.op, state: SlotState::Busy };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        io.tag = index as u64;
        self.outstanding += 1;
        if !self.queued.is_empty() {
            self.stats.record_queued();
            self.queued.push_back(io);
        } else if let Err(io) = self.backend.submit(now, io) {
            self.stats.record_queued();
            self.queued.push_back(io);
        }
    }

    /// Runs one request from a reactor task and returns its completion: for
    /// a channel the task has to itself, with nothing else in flight (a
    /// control-path read or write, not the data path). The task yields
    /// between polls, so the reactor keeps running everything else.
    pub async fn run_one(&mut self, io: Io) -> Completion {
        self.submit(pmd::task::now(), io);
        let mut out = Vec::with_capacity(1);
        std::future::poll_fn(|cx| {
            if self.poll(pmd::task::now(), &mut out) > 0 {
                return std::task::Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await;
        out.pop().expect("a poll that returned a completion")
    }

    /// Appends the requests finished since the last call to `out` and returns
    /// how many were appended.
    pub fn poll(&mut self, now: u64, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.append(&mut self.ready);
        self.backend.poll(now, &mut self.scratch);
        for mut c in self.scratch.drain(..) {
            let index = c.tag as usize;
            let slot = &mut self.slots[index];
            match slot.state {
                SlotState::Busy => {
                    self.stats.record(slot.op, slot.bytes, now.saturating_sub(slot.start), c.status.is_ok());
                    c.tag = slot.tag;
                    out.push(c);
                }
                SlotState::TimedOut => {} // already reported; the buffers are freed here
                SlotState::Free => {
                    tracing::error!(
                        bdev = self.desc.bdev().name(),
                        slot = index,
                        "backend completed an I/O twice; dropped"
                    );
                    continue;
                }
            }
            slot.state = SlotState::Free;
            self.free.push(index as u32);
            self.outstanding -= 1;
        }
        while let Some(io) = self.queued.pop_front() {
            if let Err(io) = self.backend.submit(now, io) {
                self.queued.push_front(io);
                break;
            }
        }
        if let Some(timeout) = self.timeout_ns {
            if now >= self.next_scan {
                self.expire(now, timeout, out);
                self.next_scan = now + (timeout / 4).clamp(1, TIMEOUT_SCAN_NS);
            }
        }
        out.len() - before
    }

    fn expire(&mut self, now: u64, timeout: u64, out: &mut Vec<Completion>) {
        let expired = |slot: &Slot| slot.state == SlotState::Busy && now.saturating_sub(slot.start) >= timeout;
        // Requests still waiting for the backend: the user gets the buffers back.
        let mut i = 0;
        while i < self.queued.len() {
            let index = self.queued[i].tag as usize;
            if expired(&self.slots[index]) {
                let mut io = self.queued.remove(i).expect("index in range");
                let slot = &mut self.slots[index];
                io.tag = slot.tag;
                slot.state = SlotState::Free;
                self.free.push(index as u32);
                self.outstanding -= 1;
                self.stats.record_timeout();
                out.push(Completion::of(io, Err(IoError::TimedOut)));
            } else {
                i += 1;
            }
        }
        // Requests the backend holds: report now, abort, keep the buffers with the backend.
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if expired(slot) {
                slot.state = SlotState::TimedOut;
                self.stats.record_timeout();
                tracing::warn!(
                    bdev = self.desc.bdev().name(),
                    op = slot.op.as_str(),
                    timeout_ns = timeout,
                    "I/O timed out; aborting it"
                );
                out.push(Completion { tag: slot.tag, op: slot.op, status: Err(IoError::TimedOut), bufs: IoBufs::None });
                self.backend.abort(index as u64);
            }
        }
    }
}

impl Drop for BdevChannel {
    fn drop(&mut self) {
        self.desc.bdev().stats_registry().detach(&self.stats);
    }
}
