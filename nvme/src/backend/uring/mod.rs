//! The uring bdev: a file or block device driven through io_uring, O_DIRECT
//! by default, one ring per reactor (see `ring`).
//!
//! Reads and writes use the ring's registered buffers when the request has one
//! buffer from the DMA pool, else plain or vectored reads and writes. Flush is
//! `fdatasync`; FUA writes carry `RWF_DSYNC`. Unmap punches a hole; write
//! zeroes zeroes the range in place (`FALLOC_FL_ZERO_RANGE`: the blocks stay
//! allocated, so a later write into them does not make the file system
//! allocate, which io_uring would hand to a worker thread), or punches a hole
//! in a file whose file system cannot zero in place (tmpfs). A short transfer is continued where it
//! stopped; a transfer that makes no progress fails with EIO.

mod ring;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{opcode, squeue, types};
use pmd::IoChannel;

use crate::bdev::{Bdev, BdevRegistry, Completion, Io, IoError, IoType};
use crate::error::BdevError;
use crate::sys::Backing;
use ring::{Attachment, FileRef, GraveEntry, Ring};

/// Parameters of `bdev_uring_create`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UringConfig {
    /// Name of the new bdev.
    pub name: String,
    /// Path of the file or block device.
    pub filename: PathBuf,
    /// Block size in bytes: a power of two from 512 to 65536 and a multiple of
    /// what the file needs for O_DIRECT (default: 4096, or the device's logical
    /// block size if larger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// If the file does not exist, create it as a sparse file of this many
    /// bytes. If it exists, its size must be this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Bypass the page cache (O_DIRECT). Default true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub direct: bool,
    /// UUID (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Parameters of `bdev_uring_set_options`: process-wide ring settings, fixed
/// when the first ring is created (at `framework_start_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UringOptions {
    /// Submission queue entries per ring (the completion queue has twice as many).
    #[serde(default = "default_depth")]
    pub queue_depth: u32,
    /// Let a kernel thread poll the submission queue (IORING_SETUP_SQPOLL),
    /// saving the submit system call at the cost of a busy kernel thread.
    #[serde(default)]
    pub sqpoll: bool,
    /// Milliseconds the SQPOLL thread spins before it sleeps.
    #[serde(default = "default_sqpoll_idle")]
    pub sqpoll_idle_ms: u32,
    /// Register the DMA pool's memory with each ring (fixed buffers).
    #[serde(default = "yes")]
    pub fixed_buffers: bool,
}

fn default_depth() -> u32 {
    512
}

fn default_sqpoll_idle() -> u32 {
    1000
}

impl Default for UringOptions {
    fn default() -> Self {
        Self { queue_depth: default_depth(), sqpoll: false, sqpoll_idle_ms: default_sqpoll_idle(), fixed_buffers: true }
    }
}

/// The options set before initialisation.
static OPTIONS: Mutex<Option<UringOptions>> = Mutex::new(None);
/// The options in force, fixed by [`freeze_options`] or the first ring.
static FROZEN: OnceLock<UringOptions> = OnceLock::new();

/// Fixes the ring options (at framework initialisation, or when the first
/// ring is created) and returns them.
pub fn freeze_options() -> UringOptions {
    *FROZEN.get_or_init(|| OPTIONS.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_default())
}

/// Sets the ring options. Refused once they are fixed.
pub fn set_options(options: UringOptions) -> Result<(), BdevError> {
    if !(1..=32768).contains(&options.queue_depth) || !options.queue_depth.is_power_of_two() {
        return Err(BdevError::invalid(
            "(uring options)",
            "queue_depth",
            format!("{} is not a power of two from 1 to 32768", options.queue_depth),
        ));
    }
    if let Some(current) = FROZEN.get() {
        return Err(BdevError::TooLate(format!("io_uring options are fixed at initialisation (they are {current:?})")));
    }
    *OPTIONS.lock().unwrap_or_else(|p| p.into_inner()) = Some(options);
    Ok(())
}

/// The ring options in force (or to be).
pub fn options() -> UringOptions {
    FROZEN.get().copied().unwrap_or_else(|| OPTIONS.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_default())
}

pub(crate) struct UringDev {
    backing: Backing,
    config: UringConfig,
}

impl UringDev {
    pub(crate) fn config(&self, bdev: &Bdev) -> UringConfig {
        UringConfig { block_size: Some(bdev.block_size()), size: None, uuid: Some(bdev.uuid()), ..self.config.clone() }
    }

    pub(crate) fn channel(&self, bdev: &Arc<Bdev>, ctx: &mut pmd::Ctx<'_>) -> Result<UringChannel, BdevError> {
        let ring = ctx.io_channel(ring::device())?;
        let attachment = ring.borrow_mut().attach(&ring, self.backing.file.as_raw_fd())?;
        Ok(UringChannel {
            ring,
            attachment,
            block_size: bdev.block_size() as u64,
            zero_range: true,
            inflight: Vec::new(),
        })
    }
}

/// A request in the kernel: the request, how far it got, and its iovecs.
struct Inflight {
    io: Io,
    done: usize,
    iovecs: Vec<libc::iovec>,
}

pub(crate) struct UringChannel {
    ring: IoChannel<Ring>,
    attachment: Attachment,
    block_size: u64,
    /// Write zeroes uses `FALLOC_FL_ZERO_RANGE` (until the file system says
    /// it cannot; then it punches holes).
    zero_range: bool,
    inflight: Vec<Option<Inflight>>,
}

impl UringChannel {
    fn entry(&self, ring: &mut Ring, req: &mut Inflight) -> squeue::Entry {
        let io = &req.io;
        let offset = io.offset_blocks * self.block_size + req.done as u64;
        let len = (io.num_blocks * self.block_size) as usize - req.done;
        let rw_flags = if io.fua { libc::RWF_DSYNC } else { 0 };
        macro_rules! with_file {
            ($build:expr) => {
                match self.attachment.file {
                    FileRef::Fixed(i) => $build(types::Fixed(i)),
                    FileRef::Fd(fd) => $build(types::Fd(fd)),
                }
            };
        }
        match io.op {
            IoType::Read | IoType::Write => {
                if let Some(seg) = io.bufs.single_segment() {
                    // SAFETY: `done < seg.len` (a partial transfer never exceeds the
                    // length), so the pointer stays inside the segment.
                    let ptr = unsafe { seg.ptr.add(req.done) };
                    let fixed = ring.fixed_buffer(seg.region);
                    match (io.op, fixed) {
                        (IoType::Read, Some(i)) => {
                            with_file!(|f| opcode::ReadFixed::new(f, ptr, len as u32, i).offset(offset).build())
                        }
                        (IoType::Read, None) => {
                            with_file!(|f| opcode::Read::new(f, ptr, len as u32).offset(offset).build())
                        }
                        (_, Some(i)) => with_file!(|f| opcode::WriteFixed::new(f, ptr, len as u32, i)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build()),
                        (_, None) => with_file!(|f| opcode::Write::new(f, ptr, len as u32)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build()),
                    }
                } else {
                    req.iovecs.clear();
                    let mut skip = req.done;
                    for seg in io.bufs.segments() {
                        if skip >= seg.len {
                            skip -= seg.len;
                            continue;
                        }
                        // SAFETY: `skip < seg.len`, so the pointer stays inside the segment.
                        let base = unsafe { seg.ptr.add(skip) };
                        req.iovecs.push(libc::iovec { iov_base: base.cast(), iov_len: seg.len - skip });
                        skip = 0;
                    }
                    let (iov, n) = (req.iovecs.as_ptr(), req.iovecs.len() as u32);
                    if io.op == IoType::Read {
                        with_file!(|f| opcode::Readv::new(f, iov, n).offset(offset).build())
                    } else {
                        with_file!(|f| opcode::Writev::new(f, iov, n).offset(offset).rw_flags(rw_flags).build())
                    }
                }
            }
            IoType::Flush => with_file!(|f| opcode::Fsync::new(f).flags(types::FsyncFlags::DATASYNC).build()),
            IoType::Unmap | IoType::WriteZeroes => {
                let mode = if io.op == IoType::WriteZeroes && self.zero_range {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                with_file!(|f| opcode::Fallocate::new(f, len as u64).offset(offset).mode(mode).build())
            }
        }
    }

    fn push(&mut self, slot: u32, mut req: Inflight) -> Result<(), Io> {
        let ring_handle = self.ring.clone();
        let mut ring = ring_handle.borrow_mut();
        if !ring.has_room() {
            return Err(req.io);
        }
        let entry = self.entry(&mut ring, &mut req).user_data((self.attachment.route as u64) << 32 | slot as u64);
        // SAFETY: the request (its DmaBufs and iovecs) is stored in `self.inflight`
        // right below and stays there until `poll` reaps its completion, or moves
        // to the ring's graveyard if the channel is dropped first.
        if !unsafe { ring.push(&entry) } {
            return Err(req.io);
        }
        let slot = slot as usize;
        if self.inflight.len() <= slot {
            self.inflight.resize_with(slot + 1, || None);
        }
        self.inflight[slot] = Some(req);
        Ok(())
    }

    pub(crate) fn submit(&mut self, io: Io) -> Result<(), Io> {
        let slot = io.tag as u32;
        self.push(slot, Inflight { io, done: 0, iovecs: Vec::new() })
    }

    pub(crate) fn poll(&mut self, out: &mut Vec<Completion>) {
        let ring_handle = self.ring.clone();
        let mut results = {
            let mut ring = ring_handle.borrow_mut();
            ring.reap();
            std::mem::take(ring.results(self.attachment.route))
        };
        for (slot, res) in results.drain(..) {
            let Some(mut req) = self.inflight.get_mut(slot as usize).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for a request not in flight; ignored");
                continue;
            };
            let total = match req.io.op {
                IoType::Read | IoType::Write => (req.io.num_blocks * self.block_size) as usize,
                _ => 0,
            };
            if res == -libc::EOPNOTSUPP && req.io.op == IoType::WriteZeroes && self.zero_range {
                tracing::debug!("the file system cannot zero a range in place: write zeroes punches holes");
                self.zero_range = false;
                match self.push(slot, req) {
                    Ok(()) => continue,
                    Err(io) => {
                        out.push(Completion::of(io, Err(IoError::Os(libc::EOPNOTSUPP))));
                        continue;
                    }
                }
            }
            let status = if res < 0 {
                Err(if res == -libc::ECANCELED { IoError::Aborted } else { IoError::Os(-res) })
            } else if total > 0 && req.done + (res as usize) < total {
                if res == 0 {
                    Err(IoError::Os(libc::EIO))
                } else {
                    req.done += res as usize;
                    match self.push(slot, req) {
                        Ok(()) => continue,
                        Err(io) => {
                            // No room to continue: report the short transfer as an error.
                            out.push(Completion::of(io, Err(IoError::Os(libc::EIO))));
                            continue;
                        }
                    }
                }
            } else {
                Ok(())
            };
            out.push(Completion::of(req.io, status));
        }
        // Give the (now empty) vector back to keep its capacity.
        let mut ring = ring_handle.borrow_mut();
        let queue = ring.results(self.attachment.route);
        if queue.is_empty() {
            *queue = results;
        }
    }

    pub(crate) fn abort(&mut self, tag: u64) {
        self.ring.borrow_mut().cancel_request(self.attachment.route, tag as u32);
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let inflight = self
            .inflight
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, r)| r.take().map(|r| (slot as u32, (r.io, r.iovecs) as GraveEntry)));
        self.ring.borrow_mut().detach(&self.attachment, inflight);
    }
}

/// Creates a uring bdev. A file created for it is removed again if the
/// bdev cannot be made.
pub fn create(registry: &BdevRegistry, config: &UringConfig) -> Result<Arc<Bdev>, BdevError> {
    if registry.get(&config.name).is_ok() {
        return Err(BdevError::Exists(config.name.clone()));
    }
    let backing = crate::sys::open_backing(&config.filename, config.direct, config.size)?;
    let created = backing.created;
    let result = make(registry, config, backing);
    if result.is_err() && created {
        let _ = std::fs::remove_file(&config.filename);
    }
    result
}

fn make(registry: &BdevRegistry, config: &UringConfig, backing: Backing) -> Result<Arc<Bdev>, BdevError> {
    let block_size = config.block_size.unwrap_or_else(|| backing.min_block.max(4096));
    crate::bdev::check_block_size(&config.name, block_size)?;
    if backing.min_block > 0 && block_size % backing.min_block != 0 {
        return Err(BdevError::BlockSizeAlignment {
            path: config.filename.clone(),
            block_size,
            align: backing.min_block,
        });
    }
    if backing.size % block_size as u64 != 0 {
        return Err(BdevError::SizeNotMultiple { path: config.filename.clone(), size: backing.size, block_size });
    }
    let num_blocks = backing.size / block_size as u64;
    let dev = UringDev { config: config.clone(), backing };
    registry.register(Bdev::new(&config.name, config.uuid, block_size, num_blocks, super::Backend::Uring(dev))?)
}
