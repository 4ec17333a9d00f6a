//! An I/O queue pair: one per reactor and controller, shared by every bdev
//! channel of that controller's namespaces on the reactor (the controller is
//! a [`pmd::IoDevice`], the queue pair its per-reactor channel).
//!
//! A request ([`Io`]) becomes one or more NVMe commands: transfers are split
//! at the controller's maximum transfer size (MDTS) and, where the buffers
//! fit neither PRPs nor SGLs in one command, at buffer boundaries; write
//! zeroes and deallocate are split at their field limits. Commands go out as
//! command ids become free; requests wait in order for them. Each command id
//! owns a 4 KiB page of DMA memory for its PRP list, SGL segment or
//! deallocate ranges. A request completes when its last command does, with
//! the first error any of them reported; completions are routed to the bdev
//! channel that submitted the request.
//!
//! [`IoQpair::poll`] runs once per reactor round from the queue pair's own
//! poller: it reaps the CQ, issues waiting commands and writes each doorbell
//! at most once. Commands older than the controller's I/O timeout are
//! aborted (an Abort admin command); a command still outstanding one more
//! timeout later triggers a controller reset, after which every request in
//! flight completes with [`IoError::Aborted`] and the queues are re-created.

use std::collections::VecDeque;
use std::sync::Arc;

use pmd::DmaBuf;

use super::ctrlr::Controller;
use super::prp::{self, SGL_LIST_ENTRIES, Seg};
use super::queue::Queue;
use super::spec::{Cqe, PAGE, Sqe};
use crate::bdev::{Completion, Io, IoError, IoType};
use crate::error::BdevError;

const FREE: u32 = u32::MAX;
/// Blocks of one Write Zeroes command at most (NLB is 16 bits, 0-based).
const MAX_ZEROES_BLOCKS: u64 = 1 << 16;
/// How often command ages are checked, at most.
const SCAN_NS: u64 = 1_000_000;

#[derive(Clone, Copy)]
struct Cmd {
    req: u32,
    start: u64,
    /// When an Abort was sent for it (0: not yet).
    abort_sent: u64,
}

struct Req {
    io: Io,
    route: u16,
    nsid: u32,
    shift: u32,
    /// Progress: bytes for reads and writes, blocks for write zeroes and
    /// deallocate, 0..1 for flush.
    next: u64,
    end: u64,
    inflight: u32,
    status: Result<(), IoError>,
    /// Split at every buffer boundary (layout fits neither PRPs nor SGLs).
    per_buffer: bool,
    /// In the `waiting` queue.
    queued: bool,
}

enum Route {
    Free,
    Live {
        done: Vec<Completion>,
        count: usize,
    },
    /// The channel is gone; its requests still finish (then their buffers are freed).
    Draining {
        count: usize,
    },
}

/// An I/O queue pair. See the module docs.
pub struct IoQpair {
    ctrl: Arc<Controller>,
    q: Queue,
    /// The controller generation its queues were created in.
    generation: u64,
    /// The queues exist on the controller.
    live: bool,
    /// When to try re-creating the queues again after a failure.
    retry_at: u64,
    lists: DmaBuf,
    lists_base: *mut u8,
    cmds: Vec<Cmd>,
    free_cids: Vec<u16>,
    reqs: Vec<Option<Req>>,
    free_reqs: Vec<u32>,
    waiting: VecDeque<u32>,
    routes: Vec<Route>,
    segs: Vec<Seg>,
    inflight: usize,
    now: u64,
    next_scan: u64,
    pub(crate) has_poller: bool,
}

impl IoQpair {
    /// A queue pair with queue id `qid` and `entries` entries, not yet on the controller.
    pub(crate) fn new(ctrl: Arc<Controller>, qid: u16, entries: u32) -> Result<Self, BdevError> {
        let q = Queue::new(ctrl.regs.clone(), qid, entries)?;
        let ids = entries as usize - 1;
        let mut lists = DmaBuf::zeroed(ids * PAGE)?;
        Ok(Self {
            generation: ctrl.generation(),
            lists_base: lists.as_mut_ptr(),
            lists,
            retry_at: 0,
            cmds: vec![Cmd { req: FREE, start: 0, abort_sent: 0 }; ids],
            free_cids: (0..ids as u16).rev().collect(),
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            waiting: VecDeque::new(),
            routes: Vec::new(),
            segs: Vec::new(),
            inflight: 0,
            now: 0,
            next_scan: 0,
            live: false,
            has_poller: false,
            ctrl,
            q,
        })
    }

    /// A queue pair of its own on `ctrl`, outside the bdev layer (for
    /// tools, tests and the cost benchmark). Drive it with
    /// [`IoQpair::submit_raw`], [`IoQpair::poll`] and [`IoQpair::completions`].
    pub fn open(ctrl: &Arc<Controller>) -> Result<Self, BdevError> {
        let qid = ctrl.alloc_qid()?;
        let mut qp = match Self::new(ctrl.clone(), qid, ctrl.queue_entries()) {
            Ok(q) => q,
            Err(e) => {
                ctrl.free_qid(qid);
                return Err(e);
            }
        };
        qp.create()?;
        qp.attach_route();
        Ok(qp)
    }

    /// Submits `io` to namespace `nsid` as it is: the bdev layer's checks
    /// (range, sizes) are left to the controller. `Err` hands it back while
    /// the controller resets.
    pub fn submit_raw(&mut self, now: u64, nsid: u32, mut io: Io) -> Result<(), Io> {
        let Some(ns) = self.ctrl.namespaces().iter().find(|n| n.nsid == nsid) else {
            self.complete_now(0, io, Err(IoError::Invalid));
            return Ok(());
        };
        let shift = ns.data.block_size.trailing_zeros();
        if matches!(io.op, IoType::Read | IoType::Write) {
            io.num_blocks = (io.bufs.len() >> shift) as u64;
        }
        self.submit(now, 0, nsid, shift, io)
    }

    /// Moves the requests finished so far to `out` (after [`IoQpair::poll`]).
    #[inline]
    pub fn completions(&mut self, out: &mut Vec<Completion>) {
        self.take(0, out);
    }

    /// The queue id.
    pub fn qid(&self) -> u16 {
        self.q.qid
    }

    /// Commands on the controller.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Whether requests are on the controller or waiting for command ids.
    pub fn busy(&self) -> bool {
        self.inflight > 0 || !self.waiting.is_empty()
    }

    /// A new route for a bdev channel's completions.
    pub(crate) fn attach_route(&mut self) -> u16 {
        let live = Route::Live { done: Vec::new(), count: 0 };
        match self.routes.iter().position(|r| matches!(r, Route::Free)) {
            Some(i) => {
                self.routes[i] = live;
                i as u16
            }
            None => {
                self.routes.push(live);
                (self.routes.len() - 1) as u16
            }
        }
    }

    /// The channel of `route` is gone: its requests finish without it.
    pub(crate) fn detach_route(&mut self, route: u16) {
        let r = &mut self.routes[route as usize];
        *r = match r {
            Route::Live { count: 0, .. } => Route::Free,
            Route::Live { count, .. } => Route::Draining { count: *count },
            _ => Route::Free,
        };
    }

    /// Moves the finished requests of `route` to `out`.
    #[inline]
    pub(crate) fn take(&mut self, route: u16, out: &mut Vec<Completion>) {
        if let Route::Live { done, .. } = &mut self.routes[route as usize] {
            out.append(done);
        }
    }

    fn list(&self, cid: u16) -> (*mut u64, u64) {
        let off = cid as usize * PAGE;
        // SAFETY: cid < number of command ids; each owns one page of `lists`.
        (unsafe { self.lists_base.add(off).cast::<u64>() }, self.lists.iova() + off as u64)
    }

    /// Makes sure the queues exist on the controller, catching up with
    /// controller resets. Returns whether commands may be issued. One atomic
    /// load while nothing changed.
    #[inline]
    fn ensure_live(&mut self) -> bool {
        (self.live && self.ctrl.state_word() == self.generation << super::ctrlr::GEN_SHIFT) || self.catch_up()
    }

    #[cold]
    fn catch_up(&mut self) -> bool {
        let state = self.ctrl.state();
        if state.generation != self.generation {
            // The controller was disabled since these queues were made: it no
            // longer touches their memory, and nothing in flight will complete.
            if self.inflight > 0 {
                tracing::warn!(
                    ctrl = self.ctrl.name(),
                    qid = self.q.qid,
                    commands = self.inflight,
                    "controller reset: failing the commands in flight"
                );
            }
            self.fail_inflight(IoError::Aborted);
            self.q.reset();
            self.live = false;
            self.generation = state.generation;
        }
        if state.failed {
            self.fail_waiting(IoError::Removed);
            return false;
        }
        if state.resetting {
            return false;
        }
        if !self.live {
            if self.now < self.retry_at {
                return false;
            }
            match self.ctrl.create_io_queues(&self.q, self.generation) {
                Ok(()) => self.live = true,
                Err(e) => {
                    tracing::error!(
                        ctrl = self.ctrl.name(),
                        qid = self.q.qid,
                        "re-creating an I/O queue pair failed: {e}"
                    );
                    self.retry_at = self.now + 1_000_000_000;
                    return false;
                }
            }
        }
        true
    }

    /// Creates the queues on the controller now (channel creation).
    pub(crate) fn create(&mut self) -> Result<(), BdevError> {
        self.ctrl.create_io_queues(&self.q, self.generation)?;
        self.live = true;
        Ok(())
    }

    fn complete_now(&mut self, route: u16, io: Io, status: Result<(), IoError>) {
        if let Route::Live { done, .. } = &mut self.routes[route as usize] {
            done.push(Completion::of(io, status));
        }
    }

    /// Takes a request. `Err` hands it back while the controller resets (the
    /// bdev layer queues it until then).
    pub(crate) fn submit(&mut self, now: u64, route: u16, nsid: u32, shift: u32, io: Io) -> Result<(), Io> {
        if !self.ensure_live() {
            if self.ctrl.state().failed {
                self.complete_now(route, io, Err(IoError::Removed));
                return Ok(());
            }
            return Err(io);
        }
        let (end, per_buffer) = match io.op {
            IoType::Read | IoType::Write => {
                let segs = io.bufs.segments();
                if let Some(b) = segs.clone().find(|b| !self.ctrl.is_dma_mapped(b.ptr as u64, b.len)) {
                    tracing::error!(
                        ctrl = self.ctrl.name(),
                        addr = b.ptr as u64,
                        len = b.len,
                        "a buffer of this request is not DMA memory mapped for the controller (its IOMMU mapping failed); request refused"
                    );
                    self.complete_now(route, io, Err(IoError::Invalid));
                    return Ok(());
                }
                let count = segs.len();
                let fits = prp::prp_compatible(segs.clone().map(|b| Seg { addr: b.ptr as u64, len: b.len as u32 }))
                    || (self.ctrl.sgl() && count <= SGL_LIST_ENTRIES);
                if !fits && segs.clone().any(|b| b.len % (1 << shift) != 0) {
                    tracing::error!(
                        ctrl = self.ctrl.name(),
                        "request buffers are neither page-aligned for PRPs nor whole blocks each, and the controller has no SGLs"
                    );
                    self.complete_now(route, io, Err(IoError::Invalid));
                    return Ok(());
                }
                ((io.num_blocks << shift), !fits)
            }
            IoType::Flush => (1, false),
            IoType::Unmap | IoType::WriteZeroes => (io.num_blocks, false),
        };
        let req = Req { io, route, nsid, shift, next: 0, end, inflight: 0, status: Ok(()), per_buffer, queued: true };
        let index = match self.free_reqs.pop() {
            Some(i) => {
                self.reqs[i as usize] = Some(req);
                i
            }
            None => {
                self.reqs.push(Some(req));
                (self.reqs.len() - 1) as u32
            }
        };
        if let Route::Live { count, .. } = &mut self.routes[route as usize] {
            *count += 1;
        }
        if self.waiting.is_empty() {
            // Nothing ahead of it: issue it directly, queueing only what does not fit.
            self.issue_one(index, now);
            if self.reqs[index as usize].as_ref().is_some_and(|r| r.queued) {
                self.waiting.push_back(index);
            }
        } else {
            self.waiting.push_back(index);
            self.issue(now);
        }
        Ok(())
    }

    /// Builds the next command of request `r` into `sqe`; false when it has none left.
    fn build(&mut self, r: u32, cid: u16, sqe: &mut Sqe) -> bool {
        let max_transfer = self.ctrl.max_transfer() as u64;
        let sgl = self.ctrl.sgl();
        let (list, list_iova) = self.list(cid);
        let req = self.reqs[r as usize].as_mut().expect("waiting requests exist");
        if req.next >= req.end || req.status.is_err() {
            return false;
        }
        let io = &req.io;
        match io.op {
            IoType::Read | IoType::Write => {
                let start = req.next;
                let mut len = (req.end - start).min(max_transfer);
                self.segs.clear();
                let mut skip = start;
                let mut left = len;
                for b in io.bufs.segments() {
                    let blen = b.len as u64;
                    if skip >= blen {
                        skip -= blen;
                        continue;
                    }
                    let n = (blen - skip).min(left);
                    self.segs.push(Seg { addr: b.ptr as u64 + skip, len: n as u32 });
                    left -= n;
                    skip = 0;
                    if left == 0 || req.per_buffer {
                        break;
                    }
                }
                len -= left;
                let blocks = (len >> req.shift) as u32;
                *sqe =
                    Sqe::rw(io.op == IoType::Write, req.nsid, io.offset_blocks + (start >> req.shift), blocks, io.fua);
                // SAFETY: the list page belongs to this command id, which is free:
                // the controller is not reading it.
                if let Err(e) = unsafe { prp::fill(sqe, &self.segs, list, list_iova, sgl) } {
                    tracing::error!(ctrl = self.ctrl.name(), "cannot describe a transfer to the controller ({e:?})");
                    req.status = Err(IoError::Invalid);
                    return false;
                }
                req.next += len;
            }
            IoType::Flush => {
                *sqe = Sqe::flush(req.nsid);
                req.next = 1;
            }
            IoType::WriteZeroes => {
                let n = (req.end - req.next).min(MAX_ZEROES_BLOCKS);
                *sqe = Sqe::write_zeroes(req.nsid, io.offset_blocks + req.next, n as u32);
                req.next += n;
            }
            IoType::Unmap => {
                let mut ranges = 0;
                while req.next < req.end && ranges < PAGE / 16 {
                    let n = (req.end - req.next).min(u32::MAX as u64);
                    // SAFETY: 2 * ranges + 1 < PAGE / 8: inside this command's list page.
                    unsafe {
                        list.add(2 * ranges).write(n << 32);
                        list.add(2 * ranges + 1).write(io.offset_blocks + req.next);
                    }
                    req.next += n;
                    ranges += 1;
                }
                *sqe = Sqe::deallocate(req.nsid, ranges as u32);
                sqe.dptr[0] = list_iova;
            }
        }
        true
    }

    /// Issues commands of waiting requests, in order, while command ids are free.
    fn issue(&mut self, now: u64) {
        while let Some(&r) = self.waiting.front() {
            if !self.issue_one(r, now) {
                break;
            }
            self.waiting.pop_front();
        }
    }

    /// Issues the commands of request `r` while command ids are free. Returns
    /// whether it has none left to issue (then it is no longer `queued`, and
    /// finished if nothing of it is in flight).
    fn issue_one(&mut self, r: u32, now: u64) -> bool {
        loop {
            let Some(cid) = self.free_cids.pop() else { return false };
            let mut sqe = Sqe::default();
            if !self.build(r, cid, &mut sqe) {
                self.free_cids.push(cid);
                let req = self.reqs[r as usize].as_mut().expect("issued requests exist");
                req.queued = false;
                if req.inflight == 0 {
                    self.finish(r);
                }
                return true;
            }
            sqe.set_cid(cid);
            self.q.push(&sqe);
            self.cmds[cid as usize] = Cmd { req: r, start: now, abort_sent: 0 };
            self.reqs[r as usize].as_mut().expect("exists").inflight += 1;
            self.inflight += 1;
        }
    }

    fn finish(&mut self, r: u32) {
        let req = self.reqs[r as usize].take().expect("finished once");
        self.free_reqs.push(r);
        let route = &mut self.routes[req.route as usize];
        match route {
            Route::Live { done, count } => {
                *count -= 1;
                done.push(Completion::of(req.io, req.status));
            }
            Route::Draining { count } => {
                *count -= 1;
                if *count == 0 {
                    *route = Route::Free;
                }
            }
            Route::Free => tracing::error!("an NVMe request finished on a free route"),
        }
    }

    fn complete(&mut self, cqe: Cqe) {
        let cid = cqe.cid as usize;
        if self.cmds.get(cid).is_none_or(|c| c.req == FREE) {
            tracing::error!(
                ctrl = self.ctrl.name(),
                qid = self.q.qid,
                cid,
                "completion for a command not in flight; ignored"
            );
            return;
        }
        let status = cqe.status();
        if status.is_ok() {
            self.retire(cid, Ok(()));
            return;
        }
        let req = self.reqs[self.cmds[cid].req as usize].as_ref().expect("commands belong to live requests");
        if req.status.is_ok() {
            tracing::warn!(
                ctrl = self.ctrl.name(),
                nsid = req.nsid,
                op = req.io.op.as_str(),
                block = req.io.offset_blocks,
                "NVMe command failed: {status}"
            );
        }
        self.retire(cid, Err(status.io_error()));
    }

    /// Ends command `cid` with `status`; its request finishes with its last command.
    fn retire(&mut self, cid: usize, status: Result<(), IoError>) {
        let r = self.cmds[cid].req;
        self.cmds[cid].req = FREE;
        self.free_cids.push(cid as u16);
        self.inflight -= 1;
        let req = self.reqs[r as usize].as_mut().expect("commands belong to live requests");
        req.inflight -= 1;
        if let Err(e) = status {
            if req.status.is_ok() {
                req.status = Err(e);
            }
            req.next = req.end;
        }
        if req.inflight == 0 && !req.queued && req.next >= req.end {
            self.finish(r);
        }
    }

    /// Fails every command on the controller with `error` (after a reset:
    /// the controller will not complete them).
    fn fail_inflight(&mut self, error: IoError) {
        for cid in 0..self.cmds.len() {
            if self.cmds[cid].req != FREE {
                self.retire(cid, Err(error));
            }
        }
    }

    fn fail_waiting(&mut self, error: IoError) {
        self.fail_inflight(IoError::Aborted);
        while let Some(r) = self.waiting.pop_front() {
            let req = self.reqs[r as usize].as_mut().expect("exists");
            req.queued = false;
            req.status = Err(error);
            if req.inflight == 0 {
                self.finish(r);
            }
        }
    }

    /// One round: catch up with resets, reap completions, issue waiting
    /// commands, write the doorbells, check command ages. Returns how many
    /// commands completed.
    pub fn poll(&mut self, now: u64) -> usize {
        self.now = now;
        if !self.ensure_live() {
            return 0;
        }
        let mut n = 0;
        while let Some(cqe) = self.q.pop() {
            self.complete(cqe);
            n += 1;
        }
        if !self.waiting.is_empty() {
            self.issue(now);
        }
        self.q.ring();
        let timeout = self.ctrl.io_timeout_ns();
        if timeout > 0 && self.inflight > 0 && now >= self.next_scan {
            self.next_scan = now + (timeout / 4).clamp(1, SCAN_NS);
            self.check_ages(now, timeout);
        }
        n
    }

    fn check_ages(&mut self, now: u64, timeout: u64) {
        for cid in 0..self.cmds.len() {
            let cmd = self.cmds[cid];
            if cmd.req == FREE {
                continue;
            }
            if cmd.abort_sent == 0 && now.saturating_sub(cmd.start) > timeout {
                self.send_abort(cid as u16, now);
            } else if cmd.abort_sent != 0 && now.saturating_sub(cmd.abort_sent) > timeout {
                tracing::error!(
                    ctrl = self.ctrl.name(),
                    qid = self.q.qid,
                    cid,
                    "command still outstanding after its Abort; resetting the controller"
                );
                self.ctrl.request_reset();
                return;
            }
        }
    }

    fn send_abort(&mut self, cid: u16, now: u64) {
        if self.ctrl.post_abort(self.q.qid, cid) {
            tracing::warn!(ctrl = self.ctrl.name(), qid = self.q.qid, cid, "NVMe command timed out; sent Abort");
            self.cmds[cid as usize].abort_sent = now.max(1);
        }
    }

    /// Asks the controller to abort the commands of request `tag` of `route`.
    pub(crate) fn abort(&mut self, route: u16, tag: u64) {
        for cid in 0..self.cmds.len() {
            let r = self.cmds[cid].req;
            if r == FREE || self.cmds[cid].abort_sent != 0 {
                continue;
            }
            let req = self.reqs[r as usize].as_ref().expect("exists");
            if req.route == route && req.io.tag == tag {
                self.send_abort(cid as u16, self.now);
            }
        }
    }
}

impl Drop for IoQpair {
    fn drop(&mut self) {
        let gone = !self.live || self.ctrl.delete_io_queues(self.q.qid, self.generation).is_ok();
        if !gone && self.ctrl.generation() == self.generation {
            // The controller may still write the queue and the buffers: leak them.
            tracing::error!(
                ctrl = self.ctrl.name(),
                qid = self.q.qid,
                "deleting an I/O queue pair failed; its memory is leaked"
            );
            for r in self.reqs.drain(..).flatten() {
                std::mem::forget(r.io);
            }
            std::mem::forget(std::mem::replace(&mut self.lists, DmaBuf::new(1).expect("one byte of DMA memory")));
            self.q.leak();
        }
        self.ctrl.free_qid(self.q.qid);
    }
}
