//! One io_uring per reactor, shared by every uring bdev channel on it.
//!
//! All io_uring system calls of the crate live here. The ring
//!
//! - registers the backing files of its channels in a sparse file table and
//!   the DMA pool's regions as fixed buffers (each 2 MiB region once, the
//!   first time a buffer from it is used), so the kernel neither looks up the
//!   fd nor pins pages per I/O; if the kernel refuses either, plain fds and
//!   buffers are used;
//! - queues submissions during a round and submits them with one
//!   `io_uring_enter` when a channel polls (a batched "doorbell"); the ring is
//!   set up with `COOP_TASKRUN` and `TASKRUN_FLAG`, so the kernel does not
//!   interrupt the polling reactor to post completions but flags them, and
//!   that same enter posts them;
//! - routes each completion to the channel that submitted it
//!   (`user_data` = route << 32 | slot);
//! - keeps an eventfd for the reactor's sleep, enabled only while the reactor
//!   sleeps (the CQ's `IORING_CQ_EVENTFD_DISABLED` flag), so a busy reactor does
//!   not pay for notifications;
//! - keeps the requests of channels dropped with I/O in flight ("the
//!   graveyard") until the kernel completes them, so no buffer is reused
//!   while the kernel may still write it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use io_uring::{IoUring, squeue};
use pmd::{Armed, EventFd, IoChannel, IoDevice, WakeSource, WeakIoChannel};

use crate::bdev::Io;
use crate::error::BdevError;

/// Registered-file table size per ring.
const FILE_SLOTS: u32 = 256;
/// Registered-buffer table size per ring: the first 1024 pool regions (2 GiB).
const BUFFER_SLOTS: u32 = 1024;
/// Marks `user_data` of cancel requests, whose completions are ignored.
const CANCEL_BIT: u64 = 1 << 63;

/// The io device whose per-reactor channel is the ring.
pub(crate) struct RingDevice;

pub(crate) fn device() -> &'static Arc<RingDevice> {
    static DEV: OnceLock<Arc<RingDevice>> = OnceLock::new();
    DEV.get_or_init(|| Arc::new(RingDevice))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fixed {
    Unknown,
    Registered,
    Refused,
}

enum Route {
    Free,
    /// A live channel's completions: (slot, result).
    Live(Vec<(u32, i32)>),
    /// A dropped channel's requests still in the kernel.
    Draining,
}

pub(crate) struct Ring {
    uring: IoUring,
    waker: Rc<RingWaker>,
    routes: Vec<Route>,
    files: Vec<bool>,
    files_registered: bool,
    buffers: Vec<Fixed>,
    /// Requests of dropped channels, by user_data.
    graveyard: HashMap<u64, GraveEntry>,
    pending: usize,
    inflight: usize,
    capacity: usize,
}

/// What a dropped channel leaves in flight: the request and its iovecs.
pub(crate) type GraveEntry = (Io, Vec<libc::iovec>);

impl IoDevice for RingDevice {
    type Channel = Ring;
    type Error = BdevError;

    fn create_channel(self: &Arc<Self>, ctx: &mut pmd::Ctx<'_>) -> Result<Ring, BdevError> {
        let opts = super::freeze_options();
        let err = |action| move |source| BdevError::Uring { action, source };
        let mut builder = IoUring::builder();
        builder.setup_cqsize(opts.queue_depth * 2);
        if opts.sqpoll {
            // The SQ thread runs completion work itself (COOP_TASKRUN is EINVAL with it).
            builder.setup_sqpoll(opts.sqpoll_idle_ms);
        } else {
            // Completions are posted when the reactor next enters the kernel (it does
            // every poll with work in flight) instead of by an IPI to a reactor that is
            // spinning anyway: 1.04-2.9x the IOPS on a loop device (docs/PERFORMANCE.md).
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        let uring = builder.build(opts.queue_depth).map_err(err("creating a ring"))?;
        let submitter = uring.submitter();
        let files_registered = match submitter.register_files_sparse(FILE_SLOTS) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("io_uring: registered files unavailable ({e}); using plain file descriptors");
                false
            }
        };
        let fixed = if opts.fixed_buffers {
            match submitter.register_buffers_sparse(BUFFER_SLOTS) {
                Ok(()) => Fixed::Unknown,
                Err(e) => {
                    tracing::info!("io_uring: registered buffers unavailable ({e}); using plain buffers");
                    Fixed::Refused
                }
            }
        } else {
            Fixed::Refused
        };
        let waker =
            Rc::new(RingWaker { efd: EventFd::new().map_err(err("creating an eventfd"))?, ring: Default::default() });
        submitter.register_eventfd(waker.efd.as_raw_fd()).map_err(err("registering the eventfd"))?;
        let mut uring = uring;
        uring.completion().disable_eventfd();
        ctx.register_wake_source(waker.clone()).map_err(err("adding the eventfd to the reactor"))?;
        let capacity = uring.completion().capacity();
        tracing::debug!(
            reactor = ctx.reactor_id(),
            depth = opts.queue_depth,
            sqpoll = opts.sqpoll,
            "io_uring ring created"
        );
        Ok(Ring {
            uring,
            waker,
            routes: Vec::new(),
            files: vec![false; FILE_SLOTS as usize],
            files_registered,
            buffers: vec![fixed; BUFFER_SLOTS as usize],
            graveyard: HashMap::new(),
            pending: 0,
            inflight: 0,
            capacity,
        })
    }
}

/// How a channel names its file in submissions.
#[derive(Clone, Copy)]
pub(crate) enum FileRef {
    Fixed(u32),
    Fd(RawFd),
}

/// What [`Ring::attach`] gives a channel.
pub(crate) struct Attachment {
    pub(crate) route: u16,
    pub(crate) file: FileRef,
}

impl Ring {
    /// Attaches a channel with its backing file. `me` is the ring's own channel
    /// handle, which the eventfd waker keeps a weak reference to.
    pub(crate) fn attach(&mut self, me: &IoChannel<Ring>, fd: RawFd) -> Result<Attachment, BdevError> {
        self.waker.ring.replace(Some(me.downgrade()));
        let route = match self.routes.iter().position(|r| matches!(r, Route::Free)) {
            Some(i) => i,
            None => {
                if self.routes.len() >= u16::MAX as usize {
                    return Err(BdevError::Uring {
                        action: "attaching a channel",
                        source: std::io::Error::other("too many channels on one ring"),
                    });
                }
                self.routes.push(Route::Free);
                self.routes.len() - 1
            }
        };
        self.routes[route] = Route::Live(Vec::new());
        let mut file = FileRef::Fd(fd);
        if self.files_registered {
            if let Some(slot) = self.files.iter().position(|used| !used) {
                match self.uring.submitter().register_files_update(slot as u32, &[fd]) {
                    Ok(_) => {
                        self.files[slot] = true;
                        file = FileRef::Fixed(slot as u32);
                    }
                    Err(e) => tracing::debug!("io_uring: registering a file failed ({e}); using its fd"),
                }
            }
        }
        Ok(Attachment { route: route as u16, file })
    }

    /// Detaches a channel. Its requests still in flight go to the graveyard.
    pub(crate) fn detach(&mut self, att: &Attachment, inflight: impl Iterator<Item = (u32, GraveEntry)>) {
        let mut draining = false;
        for (slot, entry) in inflight {
            let user_data = (att.route as u64) << 32 | slot as u64;
            self.cancel(user_data);
            self.graveyard.insert(user_data, entry);
            draining = true;
        }
        self.routes[att.route as usize] = if draining { Route::Draining } else { Route::Free };
        if let FileRef::Fixed(slot) = att.file {
            let _ = self.uring.submitter().register_files_update(slot, &[-1]);
            self.files[slot as usize] = false;
        }
        self.flush();
    }

    /// The fixed-buffer index to use for a buffer in pool region `region`, if any.
    pub(crate) fn fixed_buffer(&mut self, region: Option<u32>) -> Option<u16> {
        let index = region?;
        let state = self.buffers.get_mut(index as usize)?;
        if *state == Fixed::Unknown {
            let info = pmd::dma::region_info(index)?;
            let iov = libc::iovec { iov_base: info.addr as *mut libc::c_void, iov_len: info.len };
            // SAFETY: pool regions stay mapped for the life of the process (pmd::dma
            // never unmaps them), so the registration never outlives the memory.
            match unsafe { self.uring.submitter().register_buffers_update(index, &[iov], None) } {
                Ok(()) => *state = Fixed::Registered,
                Err(e) => {
                    tracing::info!(
                        region = index,
                        "io_uring: registering a DMA region failed ({e}); it is used unregistered"
                    );
                    *state = Fixed::Refused;
                }
            }
        }
        (*state == Fixed::Registered).then_some(index as u16)
    }

    /// Whether another request fits without risking a CQ overflow.
    pub(crate) fn has_room(&self) -> bool {
        self.inflight < self.capacity
    }

    /// Queues one submission.
    ///
    /// # Safety
    ///
    /// Every buffer and iovec the entry points to must stay valid and untouched
    /// by anyone else until its completion has been reaped (the caller keeps
    /// the request in flight until then).
    pub(crate) unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: forwarded from the caller's contract.
        if unsafe { self.uring.submission().push(entry) }.is_err() {
            self.flush();
            // SAFETY: as above.
            if unsafe { self.uring.submission().push(entry) }.is_err() {
                return false;
            }
        }
        self.pending += 1;
        self.inflight += 1;
        true
    }

    fn cancel(&mut self, user_data: u64) {
        let entry = io_uring::opcode::AsyncCancel::new(user_data).build().user_data(user_data | CANCEL_BIT);
        // SAFETY: a cancel request points to no memory.
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            self.flush();
            // SAFETY: as above.
            let _ = unsafe { self.uring.submission().push(&entry) };
        }
        self.pending += 1;
    }

    /// Asks the kernel to cancel one request of a channel.
    pub(crate) fn cancel_request(&mut self, route: u16, slot: u32) {
        self.cancel((route as u64) << 32 | slot as u64);
    }

    /// Submits everything queued and runs completion work the kernel has
    /// waiting (one `io_uring_enter` at most, none if there is neither).
    pub(crate) fn flush(&mut self) {
        if self.pending == 0 && !self.uring.submission().taskrun() {
            return;
        }
        match self.uring.submit() {
            Ok(_) => self.pending = 0,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => tracing::error!("io_uring_enter failed: {e}"),
        }
    }

    /// Submits, then moves completions to their channels' queues.
    pub(crate) fn reap(&mut self) {
        self.flush();
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            if ud & CANCEL_BIT != 0 {
                continue;
            }
            self.inflight -= 1;
            let route = (ud >> 32) as usize;
            match self.routes.get_mut(route) {
                Some(Route::Live(results)) => results.push((ud as u32, cqe.result())),
                Some(Route::Draining) => {
                    self.graveyard.remove(&ud);
                    if !self.graveyard.keys().any(|k| (k >> 32) as usize == route) {
                        self.routes[route] = Route::Free;
                    }
                }
                _ => tracing::error!(user_data = ud, "io_uring completion for an unknown channel; ignored"),
            }
        }
    }

    /// The completions queued for a channel.
    pub(crate) fn results(&mut self, route: u16) -> &mut Vec<(u32, i32)> {
        match &mut self.routes[route as usize] {
            Route::Live(r) => r,
            _ => unreachable!("a live channel's route is live"),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Wait (bounded) for requests of dropped channels; leak their buffers
        // if the kernel still holds them, rather than free memory it may write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.graveyard.is_empty() && std::time::Instant::now() < deadline {
            let _ = self.uring.submit_and_wait(1);
            self.reap();
        }
        if !self.graveyard.is_empty() {
            tracing::error!(
                requests = self.graveyard.len(),
                "io_uring requests still in the kernel at ring teardown; their buffers are leaked"
            );
            for (_, entry) in self.graveyard.drain() {
                std::mem::forget(entry);
            }
        }
    }
}

/// The ring's eventfd, as the reactor sees it.
struct RingWaker {
    efd: EventFd,
    ring: std::cell::RefCell<Option<WeakIoChannel<Ring>>>,
}

impl WakeSource for RingWaker {
    fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn arm(&self) -> Armed {
        let ring = self.ring.borrow();
        let Some(weak) = ring.as_ref() else { return Armed::Sleep };
        let Some(ring) = weak.upgrade() else { return Armed::Gone };
        let mut ring = ring.borrow_mut();
        ring.flush();
        let mut cq = ring.uring.completion();
        cq.enable_eventfd();
        cq.sync();
        if cq.is_empty() { Armed::Sleep } else { Armed::Pending }
    }

    fn disarm(&self) {
        if let Some(ring) = self.ring.borrow().as_ref().and_then(WeakIoChannel::upgrade) {
            ring.borrow_mut().uring.completion().disable_eventfd();
        }
        self.efd.drain();
    }
}
