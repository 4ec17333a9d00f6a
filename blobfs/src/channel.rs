//! The per-reactor channel of a store: the blob data path, and the
//! metadata I/O of the home reactor's tasks, over one bdev channel.
//!
//! A blob request is in pages. The channel cuts it at cluster boundaries and
//! translates each piece through the blob's cluster map:
//!
//! - allocated in the blob: a device request;
//! - a read of a cluster the blob does not have: the nearest ancestor's
//!   cluster, or zeros if none has it;
//! - a write to a cluster the blob does not have (thin blob, clone): the
//!   request waits while the home reactor allocates the cluster (zeroed, or a
//!   copy of the ancestor's data) and makes the allocation durable; then it is
//!   translated again;
//! - unmap or write-zeroes of a cluster nobody has: nothing to do.
//!
//! A request that is one device request passes its buffers through; one that
//! spans clusters shares them between device requests as buffer parts. Requests
//! to a frozen blob wait until it thaws. Every request sent to the device is
//! counted in the current *epoch*; a quiesce barrier flips the epoch and
//! answers once the old epoch's requests are done.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::task::Waker;

use nvme::{BdevChannel, BufPart, Completion, Io, IoBufs, IoError, IoType};
use pmd::{DmaBuf, IoChannel, IoDevice, PollStatus};

use crate::format::PAGE_SIZE;
use crate::shared::{BlobShared, StoreShared};

/// A request to a blob. Offsets and lengths are in 4 KiB pages.
#[derive(Debug)]
pub struct BlobIo {
    /// The blob (from [`crate::Blob::shared`]).
    pub blob: Arc<BlobShared>,
    /// What to do.
    pub op: IoType,
    /// First page.
    pub page: u64,
    /// Pages, for unmap and write zeroes (reads and writes take it from the buffers).
    pub pages: u64,
    /// Data for reads and writes.
    pub bufs: IoBufs,
    /// Returned in the completion.
    pub tag: u64,
}

impl BlobIo {
    /// Reads the buffers' length from page `page`.
    pub fn read(blob: &Arc<BlobShared>, page: u64, bufs: impl Into<IoBufs>, tag: u64) -> Self {
        Self { blob: blob.clone(), op: IoType::Read, page, pages: 0, bufs: bufs.into(), tag }
    }

    /// Writes the buffers at page `page`.
    pub fn write(blob: &Arc<BlobShared>, page: u64, bufs: impl Into<IoBufs>, tag: u64) -> Self {
        Self { blob: blob.clone(), op: IoType::Write, page, pages: 0, bufs: bufs.into(), tag }
    }

    /// Unmaps `pages` pages.
    pub fn unmap(blob: &Arc<BlobShared>, page: u64, pages: u64, tag: u64) -> Self {
        Self { blob: blob.clone(), op: IoType::Unmap, page, pages, bufs: IoBufs::None, tag }
    }

    /// Zeroes `pages` pages.
    pub fn write_zeroes(blob: &Arc<BlobShared>, page: u64, pages: u64, tag: u64) -> Self {
        Self { blob: blob.clone(), op: IoType::WriteZeroes, page, pages, bufs: IoBufs::None, tag }
    }

    /// Makes completed writes durable.
    pub fn flush(blob: &Arc<BlobShared>, tag: u64) -> Self {
        Self { blob: blob.clone(), op: IoType::Flush, page: 0, pages: 0, bufs: IoBufs::None, tag }
    }
}

/// The end of a blob request: the bdev layer's completion, with the blob
/// request's tag (so a user of blobs and bdevs handles both alike, and a
/// single-cluster request's completion passes through unchanged).
pub type BlobCompletion = Completion;

/// How a split request's buffers go back to the user.
enum Shape {
    One,
    Many,
    Parts(Vec<BufPart>),
}

enum Bufs {
    /// The one device request carries the user's buffers.
    Direct(Option<IoBufs>),
    /// Device requests share the user's buffers (as ranges of them).
    Shared(Vec<BufPart>, Shape),
    None,
}

struct DataReq {
    tag: u64,
    op: IoType,
    parts_left: u32,
    status: Result<(), IoError>,
    epoch: usize,
    bufs: Bufs,
}

#[derive(Clone, Copy)]
enum Slot {
    Free,
    /// A request that is exactly one device request: its tag and epoch.
    Single {
        tag: u64,
        epoch: u8,
    },
    /// One device request of a split request.
    Data(u32),
    Md(u32),
}

/// Blob request tags with this bit set name a waiting task, not a user's
/// request: users' tags must leave it clear.
pub(crate) const WAITED: u64 = 1 << 63;

/// A request a task awaits: metadata I/O of the home reactor, or blob I/O
/// of a task on any reactor.
struct MdWait {
    done: Option<Completion>,
    waker: Option<Waker>,
}

/// One piece of a blob request.
struct Piece {
    /// Device cluster, or `None`: zeros (reads) / nothing (unmap, write zeroes).
    phys: Option<u64>,
    /// First page within the cluster.
    page_in_cluster: u64,
    pages: u64,
    /// Byte offset within the request's buffers.
    byte: usize,
}

pub(crate) struct BsChannel {
    store: Arc<StoreShared>,
    reactor: pmd::ReactorId,
    bdev: BdevChannel,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    reqs: Vec<Option<DataReq>>,
    free_reqs: Vec<u32>,
    md: Vec<Option<MdWait>>,
    free_md: Vec<u32>,
    done: Vec<BlobCompletion>,
    parked: VecDeque<BlobIo>,
    /// Allocations asked of the home reactor: (blob, logical cluster).
    allocating: HashSet<(u64, u64)>,
    /// Allocations that failed, reported to the requests that wait for them.
    alloc_failed: HashMap<(u64, u64), IoError>,
    kick: bool,
    /// A user polled since the store's own poller last ran.
    user_polled: bool,
    epoch: usize,
    inflight: [u64; 2],
    barrier: Option<tokio::sync::oneshot::Sender<()>>,
    scratch: Vec<Completion>,
}

impl IoDevice for StoreShared {
    type Channel = BsChannel;
    type Error = nvme::BdevError;

    fn create_channel(self: &Arc<Self>, ctx: &mut pmd::Ctx<'_>) -> Result<BsChannel, nvme::BdevError> {
        let bdev = self.desc.channel(ctx)?;
        let reactor = ctx.reactor_id();
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).push(reactor);
        Ok(BsChannel {
            store: self.clone(),
            reactor,
            bdev,
            slots: Vec::new(),
            free_slots: Vec::new(),
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            md: Vec::new(),
            free_md: Vec::new(),
            done: Vec::new(),
            parked: VecDeque::new(),
            allocating: HashSet::new(),
            alloc_failed: HashMap::new(),
            kick: false,
            user_polled: false,
            epoch: 0,
            inflight: [0; 2],
            barrier: None,
            scratch: Vec::new(),
        })
    }
}

impl Drop for BsChannel {
    fn drop(&mut self) {
        let mut chans = self.store.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = chans.iter().position(|&r| r == self.reactor) {
            chans.swap_remove(i);
        }
    }
}

/// Gets (creating it and its poller on first use) this reactor's channel to `store`.
pub(crate) fn channel(
    store: &Arc<StoreShared>,
    ctx: &mut pmd::Ctx<'_>,
) -> Result<IoChannel<BsChannel>, nvme::BdevError> {
    if let Some(ch) = ctx.existing_io_channel(store) {
        return Ok(ch);
    }
    let ch = ctx.io_channel(store)?;
    let weak = ch.downgrade();
    ctx.register_poller("blobstore", 0, move |ctx| match weak.upgrade() {
        Some(ch) => ch.borrow_mut().poll_for_store(ctx.now()),
        None => {
            if let Some(id) = ctx.current_poller() {
                ctx.unregister_poller(id);
            }
            PollStatus::Idle
        }
    });
    Ok(ch)
}

impl BsChannel {
    fn slot(&mut self, s: Slot) -> u64 {
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i as u64
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn fail(&mut self, io: BlobIo, e: IoError) {
        self.finish(Completion { tag: io.tag, op: io.op, status: Err(e), bufs: io.bufs });
    }

    /// Fails a user's request before it enters the channel (its tag is
    /// returned as it was, whatever its bits).
    pub(crate) fn refuse(&mut self, io: BlobIo, e: IoError) {
        self.done.push(Completion { tag: io.tag, op: io.op, status: Err(e), bufs: io.bufs });
    }

    /// Hands a finished blob request to whoever waits for it: a task (the
    /// tag names its waiter) or the channel's user (through `take_done`).
    fn finish(&mut self, c: Completion) {
        if c.tag & WAITED != 0 {
            self.wake_waiter((c.tag & !WAITED) as u32, c);
        } else {
            self.done.push(c);
        }
    }

    fn wake_waiter(&mut self, w: u32, c: Completion) {
        if let Some(Some(wait)) = self.md.get_mut(w as usize) {
            wait.done = Some(c);
            if let Some(waker) = wait.waker.take() {
                waker.wake();
            }
        }
    }

    fn new_waiter(&mut self) -> u32 {
        match self.free_md.pop() {
            Some(i) => {
                self.md[i as usize] = Some(MdWait { done: None, waker: None });
                i
            }
            None => {
                self.md.push(Some(MdWait { done: None, waker: None }));
                (self.md.len() - 1) as u32
            }
        }
    }

    /// Takes a blob request whose completion a task awaits with
    /// [`BsChannel::waited_poll`]; returns the waiter.
    pub fn submit_waited(&mut self, now: u64, mut io: BlobIo) -> u32 {
        let w = self.new_waiter();
        io.tag = WAITED | u64::from(w);
        self.submit(now, io);
        w
    }

    /// Takes a blob request. Its completion comes from a later [`BsChannel::take_done`].
    pub fn submit(&mut self, now: u64, io: BlobIo) {
        if self.store.unloaded.load(std::sync::atomic::Ordering::Acquire) {
            return self.fail(io, IoError::Removed);
        }
        let page = PAGE_SIZE as u64;
        // The common case first: a read or write of whole pages inside one
        // allocated cluster of a blob that is not frozen.
        let ppc = self.store.geometry.pages_per_cluster();
        let len = io.bufs.len() as u64;
        let write = io.op == IoType::Write;
        if (write || io.op == IoType::Read)
            && len > 0
            && len % page == 0
            && io.page % ppc + len / page <= ppc
            && !matches!(io.bufs, IoBufs::Parts(_))
            && !(write && io.blob.is_read_only())
            && !io.blob.is_frozen()
        {
            if let Ok(Some(phys)) = io.blob.translate_fast(io.page / ppc, write) {
                return self.send_single(now, io, phys);
            }
        }
        let pages = match io.op {
            IoType::Read | IoType::Write => {
                let len = io.bufs.len() as u64;
                if len == 0 || len % page != 0 {
                    return self.fail(io, IoError::Invalid);
                }
                len / page
            }
            IoType::Unmap | IoType::WriteZeroes if io.pages == 0 => return self.fail(io, IoError::Invalid),
            IoType::Unmap | IoType::WriteZeroes => io.pages,
            IoType::Flush => 0,
        };
        if io.op.is_write() && io.op != IoType::Flush && io.blob.is_read_only() {
            return self.fail(io, IoError::ReadOnly);
        }
        let ppc = self.store.geometry.pages_per_cluster();
        if io.page.checked_add(pages).is_none_or(|end| end > io.blob.num_clusters() * ppc) {
            return self.fail(io, IoError::OutOfRange);
        }
        if io.blob.is_frozen() {
            self.parked.push_back(io);
            return;
        }
        self.start(now, io, pages);
    }

    /// Translates and sends a request, or parks it until its clusters are allocated.
    fn start(&mut self, now: u64, io: BlobIo, pages: u64) {
        let ppc = self.store.geometry.pages_per_cluster();
        let mut pieces = Vec::new();
        let mut missing = Vec::new();
        let (mut p, end) = (io.page, io.page + pages);
        while p < end {
            let c = p / ppc;
            let in_cluster = p % ppc;
            let n = (ppc - in_cluster).min(end - p);
            let phys = match io.op {
                IoType::Read => io.blob.resolve(c),
                IoType::Write => match io.blob.own(c) {
                    0 => {
                        missing.push(c);
                        None
                    }
                    x => Some(x),
                },
                IoType::Unmap | IoType::WriteZeroes => match (io.blob.own(c), io.blob.inherited(c)) {
                    (0, None) => None,
                    (0, Some(_)) if io.op == IoType::WriteZeroes => {
                        missing.push(c);
                        None
                    }
                    (0, Some(_)) => None,
                    (x, _) => Some(x),
                },
                IoType::Flush => unreachable!("flushes are not cut into pieces"),
            };
            pieces.push(Piece {
                phys,
                page_in_cluster: in_cluster,
                pages: n,
                byte: ((p - io.page) * PAGE_SIZE as u64) as usize,
            });
            p += n;
        }
        if io.op == IoType::Flush {
            pieces.push(Piece { phys: Some(0), page_in_cluster: 0, pages: 0, byte: 0 });
        }
        if !missing.is_empty() {
            let key = |c| (io.blob.id(), c);
            if let Some(e) = missing.iter().find_map(|&c| self.alloc_failed.get(&key(c)).copied()) {
                return self.fail(io, e);
            }
            for c in missing {
                if self.allocating.insert(key(c)) {
                    crate::engine::request_allocation(&self.store, io.blob.id(), c, self.reactor);
                }
            }
            self.parked.push_back(io);
            return;
        }
        self.execute(now, io, pieces);
    }

    /// Sends a request that is one device request on cluster `phys`; its
    /// completion is the device's, with the user's tag.
    fn send_single(&mut self, now: u64, io: BlobIo, phys: u64) {
        let ppc = self.store.geometry.pages_per_cluster();
        self.inflight[self.epoch] += 1;
        let tag = self.slot(Slot::Single { tag: io.tag, epoch: self.epoch as u8 });
        let lba = phys * self.store.blocks_per_cluster + (io.page % ppc) * self.store.blocks_per_page;
        self.bdev.submit(now, Io { op: io.op, offset_blocks: lba, num_blocks: 0, bufs: io.bufs, fua: false, tag });
    }

    fn execute(&mut self, now: u64, mut io: BlobIo, pieces: Vec<Piece>) {
        let device: Vec<&Piece> = pieces.iter().filter(|p| p.phys.is_some()).collect();
        let zero_fill = io.op == IoType::Read && device.len() < pieces.len();
        if zero_fill && device.is_empty() {
            io.bufs.fill(0, io.bufs.len(), 0);
            return self.finish(Completion { tag: io.tag, op: io.op, status: Ok(()), bufs: io.bufs });
        }
        if device.is_empty() {
            return self.finish(Completion { tag: io.tag, op: io.op, status: Ok(()), bufs: io.bufs });
        }
        let direct = device.len() == 1 && !zero_fill && !matches!(io.bufs, IoBufs::Parts(_));
        let (bufs, shared) = if direct || io.bufs.is_empty() {
            (if io.bufs.is_empty() { Bufs::None } else { Bufs::Direct(None) }, None)
        } else {
            let (ranges, shape) = share(std::mem::take(&mut io.bufs));
            (Bufs::Shared(ranges.clone(), shape), Some(ranges))
        };
        if let (Some(ranges), true) = (&shared, zero_fill) {
            for piece in pieces.iter().filter(|p| p.phys.is_none()) {
                let mut part = parts_of(ranges, piece.byte, (piece.pages * PAGE_SIZE as u64) as usize);
                part.fill(0, part.len(), 0);
            }
        }
        let req = DataReq {
            tag: io.tag,
            op: io.op,
            parts_left: device.len() as u32,
            status: Ok(()),
            epoch: self.epoch,
            bufs,
        };
        self.inflight[self.epoch] += 1;
        let r = match self.free_reqs.pop() {
            Some(i) => {
                self.reqs[i as usize] = Some(req);
                i
            }
            None => {
                self.reqs.push(Some(req));
                (self.reqs.len() - 1) as u32
            }
        };
        let (bpc, bpp) = (self.store.blocks_per_cluster, self.store.blocks_per_page);
        let mut user_bufs = Some(io.bufs);
        for piece in device {
            let tag = self.slot(Slot::Data(r));
            let lba = piece.phys.expect("device pieces have a cluster") * bpc + piece.page_in_cluster * bpp;
            let bytes = (piece.pages * PAGE_SIZE as u64) as usize;
            let dev_io = match io.op {
                IoType::Flush => Io::flush(tag),
                IoType::Unmap => Io::unmap(lba, piece.pages * bpp, tag),
                IoType::WriteZeroes => Io::write_zeroes(lba, piece.pages * bpp, tag),
                op => {
                    let bufs = match &shared {
                        Some(ranges) => parts_of(ranges, piece.byte, bytes),
                        None => user_bufs.take().expect("a direct request has one device piece"),
                    };
                    Io { op, offset_blocks: lba, num_blocks: 0, bufs, fua: false, tag }
                }
            };
            self.bdev.submit(now, dev_io);
        }
    }

    /// The store's own poller: polls the device unless a user of the channel
    /// did since the last round (metadata tasks and parked requests depend on
    /// it when nobody else polls).
    fn poll_for_store(&mut self, now: u64) -> PollStatus {
        if std::mem::take(&mut self.user_polled) && !self.kick {
            return if self.bdev.needs_poll() { PollStatus::Waiting } else { PollStatus::Idle };
        }
        self.poll_device(now)
    }

    /// Polls the device and dispatches completions. Returns the poller status.
    pub fn poll_device(&mut self, now: u64) -> PollStatus {
        let mut scratch = std::mem::take(&mut self.scratch);
        let n = self.bdev.poll(now, &mut scratch);
        for c in scratch.drain(..) {
            let i = c.tag as usize;
            let slot = std::mem::replace(&mut self.slots[i], Slot::Free);
            self.free_slots.push(i as u32);
            match slot {
                Slot::Single { tag, epoch } => {
                    self.inflight[epoch as usize] -= 1;
                    self.finish(Completion { tag, ..c });
                }
                Slot::Data(r) => self.data_done(r, c),
                Slot::Md(w) => self.wake_waiter(w, c),
                Slot::Free => tracing::error!(tag = c.tag, "blobstore: completion for no request"),
            }
        }
        self.scratch = scratch;
        let old = self.epoch ^ 1;
        if self.barrier.is_some() && self.inflight[old] == 0 {
            let _ = self.barrier.take().expect("checked").send(());
        }
        let kicked = self.kick;
        if kicked {
            self.kick = false;
            self.restart_parked(now);
        }
        if n > 0 || kicked {
            PollStatus::Busy
        } else if self.bdev.needs_poll() {
            PollStatus::Waiting
        } else {
            PollStatus::Idle
        }
    }

    fn data_done(&mut self, r: u32, c: Completion) {
        let req = self.reqs[r as usize].as_mut().expect("a data slot points to a live request");
        if req.status.is_ok() {
            req.status = c.status;
        }
        match &mut req.bufs {
            Bufs::Direct(slot) => *slot = Some(c.bufs),
            // Let go of this part's share of the buffers now.
            _ => drop(c.bufs),
        }
        req.parts_left -= 1;
        if req.parts_left > 0 {
            return;
        }
        let req = self.reqs[r as usize].take().expect("checked above");
        self.free_reqs.push(r);
        self.inflight[req.epoch] -= 1;
        let bufs = match req.bufs {
            Bufs::Direct(b) => b.unwrap_or_default(),
            Bufs::Shared(ranges, shape) => unshare(ranges, shape),
            Bufs::None => IoBufs::None,
        };
        self.finish(Completion { tag: req.tag, op: req.op, status: req.status, bufs });
    }

    fn restart_parked(&mut self, now: u64) {
        let parked = std::mem::take(&mut self.parked);
        for io in parked {
            if io.blob.is_frozen() {
                self.parked.push_back(io);
            } else {
                let pages = match io.op {
                    IoType::Read | IoType::Write => io.bufs.len() as u64 / PAGE_SIZE as u64,
                    _ => io.pages,
                };
                self.start(now, io, pages);
            }
        }
        self.alloc_failed.clear();
    }

    /// Moves finished requests to `out` (a user's poll).
    pub fn take_done(&mut self, out: &mut Vec<BlobCompletion>) -> usize {
        self.user_polled = true;
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    /// Requests submitted and not yet taken.
    pub fn outstanding(&self) -> usize {
        let singles = self.slots.iter().filter(|s| matches!(s, Slot::Single { .. })).count();
        singles + self.reqs.iter().filter(|r| r.is_some()).count() + self.parked.len() + self.done.len()
    }

    /// An allocation this channel asked for is settled: retry what waits for it.
    pub fn allocation_done(&mut self, blob: u64, cluster: u64, result: Result<(), IoError>) {
        self.allocating.remove(&(blob, cluster));
        if let Err(e) = result {
            self.alloc_failed.insert((blob, cluster), e);
        }
        self.kick = true;
    }

    /// A blob thawed: retry what waits.
    pub fn wake(&mut self) {
        self.kick = true;
    }

    /// Starts a quiesce barrier; `reply` fires once every request sent to the
    /// device before now has completed.
    pub fn barrier(&mut self, reply: tokio::sync::oneshot::Sender<()>) {
        debug_assert!(self.barrier.is_none(), "barriers are serialised by the home reactor");
        let old = self.epoch;
        self.epoch ^= 1;
        if self.inflight[old] == 0 {
            let _ = reply.send(());
        } else {
            self.barrier = Some(reply);
        }
    }

    /// Sends a metadata request; returns the waiter index for [`BsChannel::waited_poll`].
    pub fn md_submit(&mut self, now: u64, mut io: Io) -> u32 {
        let w = self.new_waiter();
        io.tag = self.slot(Slot::Md(w));
        self.bdev.submit(now, io);
        w
    }

    /// The completion of waited request `w` (metadata or blob), or
    /// registers `waker`.
    pub fn waited_poll(&mut self, w: u32, waker: &Waker) -> Option<Completion> {
        let wait = self.md[w as usize].as_mut().expect("a live metadata waiter");
        match wait.done.take() {
            Some(c) => {
                self.md[w as usize] = None;
                self.free_md.push(w);
                Some(c)
            }
            None => {
                wait.waker = Some(waker.clone());
                None
            }
        }
    }
}

/// Turns a request's buffers into shared ranges (and how to give them back).
fn share(bufs: IoBufs) -> (Vec<BufPart>, Shape) {
    let whole = |b: DmaBuf| {
        let len = b.len();
        BufPart { buf: Arc::new(b), offset: 0, len }
    };
    match bufs {
        IoBufs::One(b) => (vec![whole(b)], Shape::One),
        IoBufs::Many(v) => (v.into_iter().map(whole).collect(), Shape::Many),
        IoBufs::Parts(parts) => (parts.clone(), Shape::Parts(parts)),
        IoBufs::None => (Vec::new(), Shape::Many),
    }
}

/// The parts of `ranges` covering bytes `[start, start + len)` of the request.
fn parts_of(ranges: &[BufPart], start: usize, len: usize) -> IoBufs {
    let mut out = Vec::new();
    let (mut skip, mut left) = (start, len);
    for r in ranges {
        if left == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let take = (r.len - skip).min(left);
        out.push(BufPart { buf: r.buf.clone(), offset: r.offset + skip, len: take });
        left -= take;
        skip = 0;
    }
    IoBufs::Parts(out)
}

/// Gives shared buffers back in the shape the user sent them.
fn unshare(ranges: Vec<BufPart>, shape: Shape) -> IoBufs {
    match shape {
        Shape::Parts(parts) => IoBufs::Parts(parts),
        Shape::One | Shape::Many => {
            let mut owned: Vec<DmaBuf> = ranges
                .into_iter()
                .map(|r| {
                    Arc::try_unwrap(r.buf)
                        .unwrap_or_else(|_| unreachable!("every device part is done, so no other reference remains"))
                })
                .collect();
            match shape {
                Shape::One => IoBufs::One(owned.pop().expect("one buffer")),
                _ => IoBufs::Many(owned),
            }
        }
    }
}
