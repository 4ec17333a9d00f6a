//! Backends: what a bdev is made of. Dispatch is by enum on the hot path
//! (no virtual call per I/O), in the spirit of Firecracker's `FileEngine`.
//!
//! A backend is two things: the device, shared by all reactors
//! ([`Backend`]), and its per-reactor channel ([`BackendChannel`]). A channel
//! takes requests whose `tag` is the generic layer's slot number and hands
//! each one back exactly once through `poll`.

pub mod crash;
pub mod error;
pub mod malloc;
pub mod null;
pub mod nvme;
pub mod uring;

use std::sync::Arc;

use crate::BdevConfig;
use crate::bdev::{Bdev, Completion, Io, IoType};
use crate::error::BdevError;

pub(crate) enum Backend {
    Null(null::NullDev),
    Malloc(malloc::MallocDev),
    Uring(uring::UringDev),
    Error(error::ErrorDev),
    Crash(crash::CrashDev),
    Nvme(nvme::NvmeNs),
}

impl Backend {
    /// The kind, as in `bdev_<kind>_create`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Backend::Null(_) => "null",
            Backend::Malloc(_) => "malloc",
            Backend::Uring(_) => "uring",
            Backend::Error(_) => "error",
            Backend::Crash(_) => "crash",
            Backend::Nvme(_) => "nvme",
        }
    }

    pub(crate) fn product_name(&self) -> &'static str {
        match self {
            Backend::Null(_) => "Null disk",
            Backend::Malloc(_) => "Malloc disk",
            Backend::Uring(_) => "URING bdev",
            Backend::Error(_) => "Error Injection Disk",
            Backend::Crash(_) => "Crash Simulation Disk",
            Backend::Nvme(_) => "NVMe disk",
        }
    }

    pub(crate) fn supports(&self, op: IoType) -> bool {
        match self {
            Backend::Null(_) | Backend::Malloc(_) | Backend::Uring(_) => true,
            Backend::Error(d) => d.base().supports(op),
            Backend::Crash(d) => d.base().supports(op),
            Backend::Nvme(d) => d.supports(op),
        }
    }

    pub(crate) fn config(&self, bdev: &Bdev) -> BdevConfig {
        match self {
            Backend::Null(_) => BdevConfig::Null(null::NullConfig::of(bdev)),
            Backend::Malloc(_) => BdevConfig::Malloc(malloc::MallocConfig::of(bdev)),
            Backend::Uring(d) => BdevConfig::Uring(d.config(bdev)),
            Backend::Error(d) => BdevConfig::Error(d.config(bdev)),
            Backend::Crash(d) => BdevConfig::Crash(d.config(bdev)),
            Backend::Nvme(d) => BdevConfig::Nvme(d.ctrl.config.clone()),
        }
    }

    pub(crate) fn open_channel(&self, bdev: &Arc<Bdev>, ctx: &mut pmd::Ctx<'_>) -> Result<BackendChannel, BdevError> {
        Ok(match self {
            Backend::Null(_) => BackendChannel::Null(null::NullChannel::default()),
            Backend::Malloc(d) => BackendChannel::Malloc(d.channel(bdev)),
            Backend::Uring(d) => BackendChannel::Uring(d.channel(bdev, ctx)?),
            Backend::Error(d) => BackendChannel::Error(Box::new(d.channel(bdev.clone(), ctx)?)),
            Backend::Crash(d) => BackendChannel::Crash(Box::new(d.channel(bdev.clone(), ctx)?)),
            Backend::Nvme(d) => BackendChannel::Nvme(d.channel(ctx)?),
        })
    }

    /// Called once when the bdev leaves the registry: wrappers let go of their base.
    pub(crate) fn unregister(&self) {
        match self {
            Backend::Error(d) => d.release(),
            Backend::Crash(d) => d.release(),
            Backend::Null(_) | Backend::Malloc(_) | Backend::Uring(_) | Backend::Nvme(_) => {}
        }
    }
}

pub(crate) enum BackendChannel {
    Null(null::NullChannel),
    Malloc(malloc::MallocChannel),
    Uring(uring::UringChannel),
    Error(Box<error::ErrorChannel>),
    Crash(Box<crash::CrashChannel>),
    Nvme(nvme::NvmeChannel),
}

impl BackendChannel {
    /// Takes a request, or hands it back when there is no room.
    #[inline]
    pub(crate) fn submit(&mut self, now: u64, io: Io) -> Result<(), Io> {
        match self {
            BackendChannel::Null(c) => {
                c.submit(io);
                Ok(())
            }
            BackendChannel::Malloc(c) => {
                c.submit(io);
                Ok(())
            }
            BackendChannel::Uring(c) => c.submit(io),
            BackendChannel::Error(c) => c.submit(now, io),
            BackendChannel::Crash(c) => c.submit(now, io),
            BackendChannel::Nvme(c) => c.submit(now, io),
        }
    }

    /// Appends finished requests to `out`.
    #[inline]
    pub(crate) fn poll(&mut self, now: u64, out: &mut Vec<Completion>) {
        match self {
            BackendChannel::Null(c) => out.append(&mut c.done),
            BackendChannel::Malloc(c) => out.append(&mut c.done),
            BackendChannel::Uring(c) => c.poll(out),
            BackendChannel::Error(c) => c.poll(now, out),
            BackendChannel::Crash(c) => c.poll(now, out),
            BackendChannel::Nvme(c) => c.poll(out),
        }
    }

    /// Asks the backend to give up on request `tag` (best effort; it still
    /// completes, possibly with [`crate::IoError::Aborted`]).
    pub(crate) fn abort(&mut self, tag: u64) {
        match self {
            BackendChannel::Null(_) | BackendChannel::Malloc(_) => {}
            BackendChannel::Uring(c) => c.abort(tag),
            BackendChannel::Error(c) => c.abort(tag),
            BackendChannel::Crash(c) => c.abort(tag),
            BackendChannel::Nvme(c) => c.abort(tag),
        }
    }

    /// Whether completions of this backend wake a sleeping reactor by themselves.
    pub(crate) fn wakes_reactor(&self) -> bool {
        match self {
            // NVMe completions are polled (no interrupts).
            BackendChannel::Null(_) | BackendChannel::Malloc(_) | BackendChannel::Nvme(_) => false,
            BackendChannel::Uring(_) => true,
            BackendChannel::Error(c) => c.wakes_reactor(),
            BackendChannel::Crash(c) => c.wakes_reactor(),
        }
    }
}
