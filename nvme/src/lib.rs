//! # nvme — the bdev layer of ClaudeFS
//!
//! A *bdev* (block device, as in SPDK) is anything that reads and writes
//! fixed-size blocks: an NVMe namespace driven from user space, a file or
//! block device through io_uring, RAM, or nothing at all. Everything above
//! (the blobstore, bdevperf) sees the same small interface:
//!
//! - [`BdevRegistry`]: named bdevs, with UUIDs, claims and open descriptors;
//! - [`BdevDesc::channel`]: a per-reactor [`BdevChannel`] taking [`Io`]
//!   requests (read, write, flush, unmap, write zeroes; vectored; FUA) and
//!   handing back one [`Completion`] each from `poll`, with statistics,
//!   queueing when the backend is full and per-I/O timeouts;
//! - buffers are [`pmd::DmaBuf`]s, moved into the request and handed back in
//!   the completion.
//!
//! Backends: [`null`], [`malloc`], [`uring`], and [`nvme`](mod@nvme): the
//! userspace NVMe driver over [`vfio`]; the wrappers `error` (fault
//! injection) and [`crash`] (a volatile write cache that a simulated power cut
//! tears) exist for tests.
//!
//! ```
//! use nvme::{BdevRegistry, Io, malloc};
//! let registry = BdevRegistry::new();
//! malloc::create(&registry, &malloc::MallocConfig { name: "m0".into(), num_blocks: 16, block_size: 512, uuid: None }).unwrap();
//! let desc = registry.open("m0", true).unwrap();
//! let mut reactor = pmd::Reactor::group(1).pop().unwrap();
//! let mut ch = reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap();
//! ch.submit(0, Io::write(3, pmd::DmaBuf::copy_from(&[7u8; 512]).unwrap(), 1));
//! let mut done = Vec::new();
//! ch.poll(1, &mut done);
//! assert_eq!((done[0].tag, done[0].status), (1, Ok(())));
//! ```

#![deny(missing_docs)]

mod backend;
mod bdev;
mod error;
pub mod stats;
mod sys;
pub mod vfio;

pub use backend::{crash, error as error_bdev, malloc, null, nvme, uring};
pub use bdev::{
    Bdev, BdevChannel, BdevDesc, BdevRegistry, BufPart, Claim, Completion, Io, IoBufs, IoError, IoType, Segment,
    Segments,
};
pub use error::BdevError;

/// The block size bdevs get when none is given.
pub(crate) fn default_block_size() -> u32 {
    4096
}

/// The parameters that recreate a bdev, by kind (what `save_config` writes).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum BdevConfig {
    /// `bdev_null_create`.
    Null(null::NullConfig),
    /// `bdev_malloc_create`.
    Malloc(malloc::MallocConfig),
    /// `bdev_uring_create`.
    Uring(uring::UringConfig),
    /// `bdev_error_create`.
    Error(error_bdev::ErrorConfig),
    /// `bdev_crash_create`.
    Crash(crash::CrashConfig),
    /// `bdev_nvme_attach_controller` (one call per controller, whatever its namespaces).
    Nvme(nvme::NvmeAttachConfig),
}

impl BdevConfig {
    /// The kind: `bdev_<kind>_create` recreates it.
    pub fn kind(&self) -> &'static str {
        match self {
            BdevConfig::Null(_) => "null",
            BdevConfig::Malloc(_) => "malloc",
            BdevConfig::Uring(_) => "uring",
            BdevConfig::Error(_) => "error",
            BdevConfig::Crash(_) => "crash",
            BdevConfig::Nvme(_) => "nvme",
        }
    }

    /// The method that recreates it: `bdev_<kind>_create`, or
    /// `bdev_nvme_attach_controller` for an NVMe namespace (whose controller
    /// brings back all its namespaces).
    pub fn method(&self) -> String {
        match self {
            BdevConfig::Nvme(_) => "bdev_nvme_attach_controller".into(),
            other => format!("bdev_{}_create", other.kind()),
        }
    }
}
