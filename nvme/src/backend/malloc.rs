//! The malloc bdev: a RAM disk. Requests are served by copying at submission;
//! their completions are returned by the next poll.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::bdev::Segment;
use crate::bdev::{Bdev, BdevRegistry, Completion, Io, IoType};
use crate::error::BdevError;

/// Parameters of `bdev_malloc_create`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MallocConfig {
    /// Name of the new bdev.
    pub name: String,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size in bytes (power of two, 512 to 65536).
    #[serde(default = "crate::default_block_size")]
    pub block_size: u32,
    /// UUID (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

impl MallocConfig {
    pub(crate) fn of(bdev: &Bdev) -> Self {
        Self {
            name: bdev.name().into(),
            num_blocks: bdev.num_blocks(),
            block_size: bdev.block_size(),
            uuid: Some(bdev.uuid()),
        }
    }
}

/// The RAM behind a malloc bdev. Like a device's media, it is reached only
/// through raw pointers, never through references: requests from several
/// reactors may touch it at once, and overlapping concurrent writes leave
/// whichever bytes land last, as on real hardware.
pub(crate) struct MallocDev {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is owned by the device and only accessed by copies
// through raw pointers (see the type's docs).
unsafe impl Send for MallocDev {}
// SAFETY: as above.
unsafe impl Sync for MallocDev {}

impl Drop for MallocDev {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` come from `Box::<[u8]>::into_raw` in `create`, freed once here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.len)) });
    }
}

impl MallocDev {
    pub(crate) fn channel(&self, bdev: &Arc<Bdev>) -> MallocChannel {
        MallocChannel { dev: bdev.clone(), block_size: bdev.block_size() as usize, done: Vec::new() }
    }
}

pub(crate) struct MallocChannel {
    dev: Arc<Bdev>,
    block_size: usize,
    pub(crate) done: Vec<Completion>,
}

impl MallocChannel {
    fn mem(&self) -> &MallocDev {
        match &self.dev.backend {
            super::Backend::Malloc(m) => m,
            _ => unreachable!("a malloc channel belongs to a malloc bdev"),
        }
    }

    #[inline]
    pub(crate) fn submit(&mut self, io: Io) {
        let mem = self.mem();
        let start = io.offset_blocks as usize * self.block_size;
        let len = io.num_blocks as usize * self.block_size;
        // The generic layer checked that [start, start + len) lies within the device.
        debug_assert!(io.op == IoType::Flush || start + len <= mem.len);
        match io.op {
            IoType::Read | IoType::Write => {
                let mut at = start;
                let mut copy = |seg: Segment| {
                    // SAFETY: the device range [at, at + len) lies within the device (the
                    // generic layer checked the request); the segment is memory this
                    // request owns for `len` bytes while it is in flight.
                    unsafe {
                        let dev = mem.base.as_ptr().add(at);
                        if io.op == IoType::Read {
                            std::ptr::copy_nonoverlapping(dev, seg.ptr, seg.len)
                        } else {
                            std::ptr::copy_nonoverlapping(seg.ptr, dev, seg.len)
                        }
                    };
                    at += seg.len;
                };
                match io.bufs.single_segment() {
                    Some(seg) => copy(seg),
                    None => io.bufs.segments().for_each(copy),
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: the range lies within the device.
                unsafe { std::ptr::write_bytes(mem.base.as_ptr().add(start), 0, len) };
            }
            IoType::Flush => {}
        }
        self.done.push(Completion::of(io, Ok(())));
    }
}

/// Creates a malloc bdev (zero-filled).
pub fn create(registry: &BdevRegistry, config: &MallocConfig) -> Result<Arc<Bdev>, BdevError> {
    crate::bdev::check_block_size(&config.name, config.block_size)?;
    let len = config
        .num_blocks
        .checked_mul(config.block_size as u64)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| BdevError::invalid(&config.name, "num_blocks", "size overflows".into()))?;
    if len == 0 {
        return Err(BdevError::invalid(&config.name, "num_blocks", "a bdev needs at least one block".into()));
    }
    let mut mem = Vec::new();
    mem.try_reserve_exact(len)
        .map_err(|e| BdevError::invalid(&config.name, "num_blocks", format!("cannot allocate {len} bytes: {e}")))?;
    mem.resize(len, 0u8);
    let raw = Box::into_raw(mem.into_boxed_slice());
    // SAFETY: Box::into_raw never returns null.
    let base = unsafe { NonNull::new_unchecked(raw.cast::<u8>()) };
    let dev = MallocDev { base, len };
    let bdev = Bdev::new(&config.name, config.uuid, config.block_size, config.num_blocks, super::Backend::Malloc(dev))?;
    registry.register(bdev)
}
