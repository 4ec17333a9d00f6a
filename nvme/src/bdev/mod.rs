//! Block devices: the [`Bdev`] object, the [`BdevRegistry`] of named bdevs,
//! descriptors and claims.
//!
//! A bdev is shared by every reactor. To do I/O, a user opens a
//! [`BdevDesc`] (read-only or writable) and gets a [`BdevChannel`] on each
//! reactor it runs on. A *claim* gives one owner (a virtual bdev such as an
//! error or crash wrapper, or a blobstore) exclusive write access; a claimed
//! bdev can be neither claimed again nor deleted.

mod channel;
pub(crate) mod io;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use channel::BdevChannel;
pub use io::{BufPart, Completion, Io, IoBufs, IoError, IoType, Segment, Segments};

use crate::BdevConfig;
use crate::backend::Backend;
use crate::error::BdevError;
use crate::stats::{BdevStats, StatsSnapshot};

/// A block device. See the module docs.
pub struct Bdev {
    name: String,
    uuid: uuid::Uuid,
    block_size: u32,
    num_blocks: u64,
    pub(crate) backend: Backend,
    claim: Mutex<Option<String>>,
    opens: AtomicUsize,
    stats: BdevStats,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

/// Checks a block size: a power of two from 512 bytes to 64 KiB.
pub(crate) fn check_block_size(name: &str, block_size: u32) -> Result<(), BdevError> {
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(BdevError::invalid(
            name,
            "block_size",
            format!("{block_size} is not a power of two from 512 to 65536"),
        ));
    }
    Ok(())
}

impl Bdev {
    pub(crate) fn new(
        name: &str,
        uuid: Option<uuid::Uuid>,
        block_size: u32,
        num_blocks: u64,
        backend: Backend,
    ) -> Result<Self, BdevError> {
        if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c == '/') {
            return Err(BdevError::invalid(
                name,
                "name",
                "must be 1 to 255 characters, without '/' or control characters".into(),
            ));
        }
        check_block_size(name, block_size)?;
        if num_blocks == 0 {
            return Err(BdevError::invalid(name, "num_blocks", "a bdev needs at least one block".into()));
        }
        Ok(Self {
            name: name.to_string(),
            uuid: uuid.unwrap_or_else(uuid::Uuid::new_v4),
            block_size,
            num_blocks,
            backend,
            claim: Mutex::new(None),
            opens: AtomicUsize::new(0),
            stats: BdevStats::default(),
        })
    }

    /// Unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Unique id, stable across restarts when saved in the config.
    pub fn uuid(&self) -> uuid::Uuid {
        self.uuid
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// What the backend is, e.g. "Malloc disk".
    pub fn product_name(&self) -> &'static str {
        self.backend.product_name()
    }

    /// Whether the bdev does `op`.
    pub fn supports(&self, op: IoType) -> bool {
        self.backend.supports(op)
    }

    /// Who holds the claim, if anyone.
    pub fn claimed_by(&self) -> Option<String> {
        self.claim.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Number of open descriptors.
    pub fn open_count(&self) -> usize {
        self.opens.load(Ordering::Acquire)
    }

    /// The parameters that recreate this bdev (for `save_config`).
    pub fn config(&self) -> BdevConfig {
        self.backend.config(self)
    }

    /// I/O statistics summed over all channels.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub(crate) fn stats_registry(&self) -> &BdevStats {
        &self.stats
    }

    /// Claims the bdev for `owner`. The claim lasts until the [`Claim`] is dropped.
    pub fn claim(self: &Arc<Self>, owner: &str) -> Result<Claim, BdevError> {
        let mut claim = self.claim.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(by) = claim.as_ref() {
            return Err(BdevError::Claimed { name: self.name.clone(), by: by.clone() });
        }
        *claim = Some(owner.to_string());
        Ok(Claim { bdev: self.clone() })
    }
}

/// An exclusive claim on a bdev; released on drop.
#[derive(Debug)]
pub struct Claim {
    bdev: Arc<Bdev>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        *self.bdev.claim.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

struct DescInner {
    bdev: Arc<Bdev>,
    writable: bool,
}

impl Drop for DescInner {
    fn drop(&mut self) {
        self.bdev.opens.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open bdev. Cheap to clone; the bdev stays open until the last clone
/// (and every channel made from it) is dropped.
#[derive(Clone)]
pub struct BdevDesc {
    inner: Arc<DescInner>,
}

impl std::fmt::Debug for BdevDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevDesc").field("bdev", &self.inner.bdev.name).field("writable", &self.inner.writable).finish()
    }
}

impl BdevDesc {
    /// The open bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.inner.bdev
    }

    /// Whether writes are allowed through this descriptor.
    pub fn writable(&self) -> bool {
        self.inner.writable
    }

    /// Opens this reactor's channel for I/O.
    pub fn channel(&self, ctx: &mut pmd::Ctx<'_>) -> Result<BdevChannel, BdevError> {
        let backend = self.inner.bdev.backend.open_channel(&self.inner.bdev, ctx)?;
        Ok(BdevChannel::new(self.clone(), backend))
    }
}

/// The named bdevs of a process, in creation order.
#[derive(Debug, Default)]
pub struct BdevRegistry {
    bdevs: Mutex<Vec<Arc<Bdev>>>,
}

impl BdevRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Bdev>>> {
        self.bdevs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a bdev; its name and UUID must be new.
    pub(crate) fn register(&self, bdev: Bdev) -> Result<Arc<Bdev>, BdevError> {
        let mut bdevs = self.lock();
        if bdevs.iter().any(|b| b.name == bdev.name) {
            return Err(BdevError::Exists(bdev.name));
        }
        if let Some(b) = bdevs.iter().find(|b| b.uuid == bdev.uuid) {
            return Err(BdevError::invalid(
                &bdev.name,
                "uuid",
                format!("{} is already the UUID of bdev {:?}", bdev.uuid, b.name),
            ));
        }
        let bdev = Arc::new(bdev);
        bdevs.push(bdev.clone());
        tracing::info!(
            name = bdev.name,
            product = bdev.product_name(),
            blocks = bdev.num_blocks,
            block_size = bdev.block_size,
            "bdev created"
        );
        Ok(bdev)
    }

    /// Finds a bdev by name or UUID.
    pub fn get(&self, name: &str) -> Result<Arc<Bdev>, BdevError> {
        self.lock()
            .iter()
            .find(|b| b.name == name || b.uuid.to_string() == name)
            .cloned()
            .ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// All bdevs, in creation order.
    pub fn list(&self) -> Vec<Arc<Bdev>> {
        self.lock().clone()
    }

    /// Opens a bdev for I/O. A claimed bdev opens read-only only: its
    /// claimer opened it before claiming.
    pub fn open(&self, name: &str, writable: bool) -> Result<BdevDesc, BdevError> {
        let bdevs = self.lock();
        let bdev = bdevs
            .iter()
            .find(|b| b.name == name || b.uuid.to_string() == name)
            .cloned()
            .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        if writable {
            if let Some(by) = bdev.claimed_by() {
                return Err(BdevError::Claimed { name: bdev.name.clone(), by });
            }
        }
        bdev.opens.fetch_add(1, Ordering::AcqRel);
        Ok(BdevDesc { inner: Arc::new(DescInner { bdev, writable }) })
    }

    /// Removes a bdev. Refused while it is claimed or open. `kind` is the
    /// product the caller expects (e.g. `bdev_malloc_delete` deletes only
    /// malloc bdevs), `None` for any.
    pub fn unregister(&self, name: &str, kind: Option<&str>) -> Result<(), BdevError> {
        let mut bdevs = self.lock();
        let i = bdevs.iter().position(|b| b.name == name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        let bdev = &bdevs[i];
        if let Some(kind) = kind {
            if bdev.backend.kind() != kind {
                return Err(BdevError::WrongKind {
                    name: name.to_string(),
                    kind: bdev.backend.kind(),
                    expected: kind.to_string(),
                });
            }
        }
        if let Some(by) = bdev.claimed_by() {
            return Err(BdevError::Claimed { name: name.to_string(), by });
        }
        let opens = bdev.open_count();
        if opens > 0 {
            return Err(BdevError::Busy { name: name.to_string(), opens });
        }
        let bdev = bdevs.remove(i);
        drop(bdevs);
        bdev.backend.unregister();
        tracing::info!(name, "bdev deleted");
        Ok(())
    }
}
