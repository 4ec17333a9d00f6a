//! DMA memory: buffers a device may read or write directly.
//!
//! Buffers come from a process-wide pool of 2 MiB regions, backed by hugepages
//! when they are reserved (`/proc/sys/vm/nr_hugepages`), else by ordinary
//! memory, so that nothing but VFIO needs hugepages or root. Regions are carved
//! into power-of-two size classes from 4 KiB to 2 MiB; larger buffers get a
//! mapping of their own. Every buffer starts on a 4 KiB boundary (O_DIRECT and
//! NVMe PRP entries need it); on hugepages a buffer of a class is also aligned
//! to its size. Regions are never returned to the OS while the process runs,
//! so their addresses stay valid for a VFIO IOMMU mapping with IOVA = virtual
//! address.
//!
//! # Who may look at the bytes
//!
//! A [`DmaBuf`] dereferences to `[u8]` only while you own it. Submitting I/O
//! moves the buffer into the request, and the completion hands it back, so
//! memory a device may still write can never be read as `&[u8]` (the compiler
//! enforces it: the buffer is not yours during the I/O).
//!
//! ```
//! let mut buf = pmd::DmaBuf::new(8192).unwrap();
//! buf[..5].copy_from_slice(b"hello");
//! assert_eq!(buf.as_ptr() as usize % 4096, 0);
//! assert_eq!(buf.len(), 8192);
//! ```

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crossbeam_queue::SegQueue;

use crate::sys::{HUGEPAGE_SIZE, Mapping};

/// Every buffer is aligned to at least this many bytes.
pub const DMA_ALIGN: usize = 4096;
const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 21; // 2 MiB
const NUM_CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// Whether the pool uses hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HugepageMode {
    /// Hugepages while reserved ones remain, else ordinary memory.
    Auto,
    /// Hugepages only (VFIO devices need them); allocation fails without them.
    Require,
    /// Ordinary memory only.
    Never,
}

/// How the process-wide pool behaves. Set once with [`init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaOptions {
    /// Hugepage use.
    pub hugepages: HugepageMode,
    /// Upper bound on memory mapped for DMA, in bytes (`None`: no bound).
    pub max_bytes: Option<u64>,
}

impl Default for DmaOptions {
    fn default() -> Self {
        Self { hugepages: HugepageMode::Auto, max_bytes: None }
    }
}

/// Why DMA memory could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Hugepages are required but none are left.
    #[error(
        "no free 2 MiB hugepages for a {bytes}-byte DMA region ({free} of {total} free): reserve more with \
         `echo N > /proc/sys/vm/nr_hugepages` (or HUGEMEM=<MiB> hack/setup.sh)"
    )]
    NoHugepages {
        /// Size of the region that could not be mapped.
        bytes: usize,
        /// Reserved hugepages.
        total: u64,
        /// Free hugepages.
        free: u64,
    },
    /// Mapping memory failed.
    #[error("mapping {bytes} bytes of DMA memory failed: {source}")]
    Map {
        /// Size of the mapping.
        bytes: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configured bound would be exceeded.
    #[error("DMA memory exhausted: {mapped} bytes mapped, {requested} more requested, limit {limit}")]
    Exhausted {
        /// Bytes mapped so far.
        mapped: u64,
        /// Bytes the allocation needed.
        requested: u64,
        /// The limit.
        limit: u64,
    },
    /// [`init`] was called after the pool had started with other options.
    #[error("the DMA pool is already running with {0:?}; options must be set before the first allocation")]
    AlreadyInitialized(DmaOptions),
    /// A zero-length buffer was requested.
    #[error("a DMA buffer must not be empty")]
    Empty,
}

/// One mapped region, as a device driver needs to see it (e.g. to map it into an IOMMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Start address (also the IOVA).
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
    /// Backed by hugepages.
    pub huge: bool,
}

/// Told about DMA memory as it comes and goes (see the module docs). Calls
/// are made with the pool's region lock held: a listener must not allocate
/// DMA buffers from inside them.
pub trait DmaListener: Send + Sync {
    /// `region` is now DMA memory (a pool region or a large buffer's mapping).
    fn mapped(&self, region: RegionInfo);
    /// `region` (a large buffer's mapping) is about to be unmapped.
    fn unmapped(&self, region: RegionInfo);
}

/// Identifies a registered [`DmaListener`] (see [`remove_listener`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerId(u64);

#[derive(Default)]
struct Listeners {
    next_id: u64,
    list: Vec<(ListenerId, std::sync::Arc<dyn DmaListener>)>,
    /// Live mappings of buffers above 2 MiB, for listeners added later.
    dedicated: Vec<RegionInfo>,
}

#[derive(Default)]
struct ClassStats {
    total: AtomicU64,
    in_use: AtomicU64,
}

struct Pool {
    options: DmaOptions,
    /// Free blocks per class: (address, region index).
    free: [SegQueue<(usize, u32)>; NUM_CLASSES],
    stats: [ClassStats; NUM_CLASSES],
    regions: Mutex<Vec<Mapping>>,
    /// Always locked after `regions` when both are held.
    listeners: Mutex<Listeners>,
    mapped: AtomicU64,
    huge_bytes: AtomicU64,
    dedicated_in_use: AtomicU64,
    warned_fallback: AtomicBool,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the pool's options. Must come before the first buffer is allocated;
/// calling it again with the same options is harmless.
pub fn init(options: DmaOptions) -> Result<(), DmaError> {
    let pool = POOL.get_or_init(|| Pool::new(options));
    if pool.options != options {
        return Err(DmaError::AlreadyInitialized(pool.options));
    }
    Ok(())
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(DmaOptions::default()))
}

impl Pool {
    fn new(options: DmaOptions) -> Self {
        Self {
            options,
            free: std::array::from_fn(|_| SegQueue::new()),
            stats: std::array::from_fn(|_| ClassStats::default()),
            regions: Mutex::new(Vec::new()),
            listeners: Mutex::new(Listeners::default()),
            mapped: AtomicU64::new(0),
            huge_bytes: AtomicU64::new(0),
            dedicated_in_use: AtomicU64::new(0),
            warned_fallback: AtomicBool::new(false),
        }
    }

    fn check_limit(&self, bytes: usize) -> Result<(), DmaError> {
        if let Some(limit) = self.options.max_bytes {
            let mapped = self.mapped.load(Ordering::Relaxed);
            if mapped + bytes as u64 > limit {
                return Err(DmaError::Exhausted { mapped, requested: bytes as u64, limit });
            }
        }
        Ok(())
    }

    /// Maps `len` bytes (a multiple of 2 MiB) per the hugepage mode.
    fn map(&self, len: usize) -> Result<Mapping, DmaError> {
        self.check_limit(len)?;
        let mapping = match self.options.hugepages {
            HugepageMode::Never => Mapping::ordinary(len).map_err(|source| DmaError::Map { bytes: len, source })?,
            mode => match Mapping::hugepages(len) {
                Ok(m) => m,
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) || e.raw_os_error() == Some(libc::EINVAL) => {
                    let (total, free) = crate::sys::hugepage_counts();
                    if mode == HugepageMode::Require {
                        return Err(DmaError::NoHugepages { bytes: len, total, free });
                    }
                    if !self.warned_fallback.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            total,
                            free,
                            "no free hugepages; DMA memory falls back to ordinary pages (fine for io_uring and malloc bdevs, not for VFIO)"
                        );
                    }
                    Mapping::ordinary(len).map_err(|source| DmaError::Map { bytes: len, source })?
                }
                Err(source) => return Err(DmaError::Map { bytes: len, source }),
            },
        };
        self.mapped.fetch_add(len as u64, Ordering::Relaxed);
        if mapping.is_huge() {
            self.huge_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(mapping)
    }

    fn alloc_class(&self, class: usize) -> Result<(NonNull<u8>, u32), DmaError> {
        let stats = &self.stats[class];
        loop {
            if let Some((addr, region)) = self.free[class].pop() {
                stats.in_use.fetch_add(1, Ordering::Relaxed);
                // A free-list entry is always a non-null address inside a region.
                return Ok((NonNull::new(addr as *mut u8).expect("free list holds no null"), region));
            }
            let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
            if !self.free[class].is_empty() {
                continue; // another thread refilled it while we waited
            }
            let region = self.map(HUGEPAGE_SIZE)?;
            // Listeners map the region (into IOMMUs) before any buffer of it exists.
            self.notify(|l| l.mapped(info_of(&region)));
            let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
            let base = region.as_ptr().as_ptr() as usize;
            let index = regions.len() as u32;
            for off in (0..HUGEPAGE_SIZE).step_by(size) {
                self.free[class].push((base + off, index));
            }
            stats.total.fetch_add((HUGEPAGE_SIZE / size) as u64, Ordering::Relaxed);
            regions.push(region);
        }
    }
}

impl Pool {
    fn listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, f: impl Fn(&dyn DmaListener)) {
        for (_, l) in &self.listeners().list {
            f(l.as_ref());
        }
    }
}

fn info_of(m: &Mapping) -> RegionInfo {
    RegionInfo { addr: m.as_ptr().as_ptr() as usize, len: m.len(), huge: m.is_huge() }
}

/// Registers a listener: it is called at once for every existing region and
/// large-buffer mapping, then for every new one before buffers from it are
/// handed out. Returns an id for [`remove_listener`].
pub fn add_listener(listener: std::sync::Arc<dyn DmaListener>) -> ListenerId {
    let pool = pool();
    let regions = pool.regions.lock().unwrap_or_else(|p| p.into_inner());
    let mut listeners = pool.listeners();
    for m in regions.iter() {
        listener.mapped(info_of(m));
    }
    for r in &listeners.dedicated {
        listener.mapped(*r);
    }
    let id = ListenerId(listeners.next_id);
    listeners.next_id += 1;
    listeners.list.push((id, listener));
    id
}

/// Unregisters a listener; it is not called again once this returns.
pub fn remove_listener(id: ListenerId) {
    let pool = pool();
    let _regions = pool.regions.lock().unwrap_or_else(|p| p.into_inner());
    pool.listeners().list.retain(|(i, _)| *i != id);
}

fn class_of(len: usize) -> Option<usize> {
    let shift = len.next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

enum Backing {
    /// A block of a size class, returned to its free list on drop.
    Class { class: usize, region: u32 },
    /// A mapping of its own (buffers above 2 MiB).
    Dedicated(Mapping),
}

/// A buffer of DMA memory, owned by whoever holds it. See the module docs.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    backing: Backing,
}

// SAFETY: a DmaBuf is the unique owner of its memory, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only allow reads through `Deref`.
unsafe impl Sync for DmaBuf {}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl DmaBuf {
    /// Allocates a buffer of `len` bytes from the process-wide pool. Its
    /// contents are whatever the memory last held (zeros when fresh).
    pub fn new(len: usize) -> Result<Self, DmaError> {
        if len == 0 {
            return Err(DmaError::Empty);
        }
        let pool = pool();
        match class_of(len) {
            Some(class) => {
                let (ptr, region) = pool.alloc_class(class)?;
                Ok(Self {
                    ptr,
                    len,
                    capacity: 1 << (class as u32 + MIN_CLASS_SHIFT),
                    backing: Backing::Class { class, region },
                })
            }
            None => {
                let size = len.next_multiple_of(HUGEPAGE_SIZE);
                let mapping = pool.map(size)?;
                {
                    let _regions = pool.regions.lock().unwrap_or_else(|p| p.into_inner());
                    let mut listeners = pool.listeners();
                    let info = info_of(&mapping);
                    for (_, l) in &listeners.list {
                        l.mapped(info);
                    }
                    listeners.dedicated.push(info);
                }
                pool.dedicated_in_use.fetch_add(size as u64, Ordering::Relaxed);
                Ok(Self { ptr: mapping.as_ptr(), len, capacity: size, backing: Backing::Dedicated(mapping) })
            }
        }
    }

    /// Allocates a buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Result<Self, DmaError> {
        let mut buf = Self::new(len)?;
        buf.fill(0);
        Ok(buf)
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Result<Self, DmaError> {
        let mut buf = Self::new(data.len())?;
        buf.copy_from_slice(data);
        Ok(buf)
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: buffers are at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the capacity. Panics beyond it.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "DmaBuf::set_len({len}) beyond capacity {}", self.capacity);
        self.len = len;
    }

    /// The address a device uses for this buffer (IOVA = virtual address).
    pub fn iova(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Raw pointer to the first byte, for device drivers. Writing through it
    /// while the buffer is shared is the caller's responsibility.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw pointer to the first byte without borrowing the contents, for a
    /// buffer shared by several requests that each own a disjoint part of it
    /// (`Arc<DmaBuf>`). Creates no reference to the bytes; whoever writes
    /// through it must own the range written.
    pub fn dma_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The index of the pool region holding the buffer ([`region_info`]);
    /// `None` for buffers above 2 MiB, which have a mapping of their own.
    pub fn region(&self) -> Option<u32> {
        match self.backing {
            Backing::Class { region, .. } => Some(region),
            Backing::Dedicated(_) => None,
        }
    }

    /// Whether the buffer lies in hugepage memory.
    pub fn is_hugepage(&self) -> bool {
        match &self.backing {
            Backing::Dedicated(m) => m.is_huge(),
            Backing::Class { region, .. } => region_info(*region).is_some_and(|r| r.huge),
        }
    }
}

impl Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `capacity >= len` bytes of initialised memory
        // (mappings start zeroed) that only this owner can reach.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let pool = pool();
        match &self.backing {
            Backing::Class { class, region } => {
                pool.stats[*class].in_use.fetch_sub(1, Ordering::Relaxed);
                pool.free[*class].push((self.ptr.as_ptr() as usize, *region));
            }
            Backing::Dedicated(m) => {
                {
                    let _regions = pool.regions.lock().unwrap_or_else(|p| p.into_inner());
                    let mut listeners = pool.listeners();
                    let info = info_of(m);
                    listeners.dedicated.retain(|r| r.addr != info.addr);
                    for (_, l) in &listeners.list {
                        l.unmapped(info);
                    }
                }
                pool.dedicated_in_use.fetch_sub(m.len() as u64, Ordering::Relaxed);
                pool.mapped.fetch_sub(m.len() as u64, Ordering::Relaxed);
                if m.is_huge() {
                    pool.huge_bytes.fetch_sub(m.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Usage of one size class.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassUsage {
    /// Block size in bytes.
    pub size: usize,
    /// Blocks carved so far.
    pub total: u64,
    /// Blocks handed out.
    pub in_use: u64,
}

/// What the pool holds, for `env_get_mem_stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemStats {
    /// Hugepage mode in force.
    pub hugepage_mode: HugepageMode,
    /// Limit on mapped bytes, if any.
    pub max_bytes: Option<u64>,
    /// Bytes mapped for DMA (pool regions and dedicated buffers).
    pub mapped_bytes: u64,
    /// Part of `mapped_bytes` on hugepages.
    pub hugepage_bytes: u64,
    /// Pool regions (2 MiB each).
    pub regions: usize,
    /// Bytes in buffers above 2 MiB, each with its own mapping.
    pub dedicated_in_use_bytes: u64,
    /// Size classes that have been used.
    pub classes: Vec<ClassUsage>,
    /// 2 MiB hugepages reserved in the system.
    pub system_hugepages_total: u64,
    /// 2 MiB hugepages free in the system.
    pub system_hugepages_free: u64,
}

/// The pool's current usage.
pub fn mem_stats() -> MemStats {
    let pool = pool();
    let (total, free) = crate::sys::hugepage_counts();
    MemStats {
        hugepage_mode: pool.options.hugepages,
        max_bytes: pool.options.max_bytes,
        mapped_bytes: pool.mapped.load(Ordering::Relaxed),
        hugepage_bytes: pool.huge_bytes.load(Ordering::Relaxed),
        regions: pool.regions.lock().unwrap_or_else(|p| p.into_inner()).len(),
        dedicated_in_use_bytes: pool.dedicated_in_use.load(Ordering::Relaxed),
        classes: (0..NUM_CLASSES)
            .filter_map(|c| {
                let s = &pool.stats[c];
                let total = s.total.load(Ordering::Relaxed);
                (total > 0).then(|| ClassUsage {
                    size: 1 << (c as u32 + MIN_CLASS_SHIFT),
                    total,
                    in_use: s.in_use.load(Ordering::Relaxed),
                })
            })
            .collect(),
        system_hugepages_total: total,
        system_hugepages_free: free,
    }
}

/// The pool's regions (for mapping them into an IOMMU).
pub fn regions() -> Vec<RegionInfo> {
    let count = pool().regions.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
    (0..count).filter_map(region_info).collect()
}

/// The pool region with index `index` (see [`DmaBuf::region`]).
pub fn region_info(index: u32) -> Option<RegionInfo> {
    let regions = pool().regions.lock().unwrap_or_else(|p| p.into_inner());
    regions.get(index as usize).map(|m| RegionInfo {
        addr: m.as_ptr().as_ptr() as usize,
        len: m.len(),
        huge: m.is_huge(),
    })
}

/// The pool's options.
pub fn options() -> DmaOptions {
    pool().options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(2 << 20), Some(NUM_CLASSES - 1));
        assert_eq!(class_of((2 << 20) + 1), None);
    }

    #[test]
    fn buffers_are_aligned_and_reused() {
        let a = DmaBuf::new(4096).unwrap();
        assert_eq!(a.iova() % DMA_ALIGN as u64, 0);
        assert_eq!(a.capacity(), 4096);
        let b = DmaBuf::new(100_000).unwrap();
        assert_eq!(b.capacity(), 128 * 1024);
        let r = region_info(b.region().unwrap()).unwrap();
        assert!((r.addr..r.addr + r.len).contains(&(b.iova() as usize)), "the buffer lies in its region");
        assert_eq!(b.iova() % 4096, 0);
        let addr = b.iova();
        drop(b);
        // Freed blocks go back to their class; some thread's next allocation gets one.
        let again: Vec<DmaBuf> = (0..32).map(|_| DmaBuf::new(128 * 1024).unwrap()).collect();
        assert!(again.iter().any(|x| x.iova() == addr));
        let stats = mem_stats();
        assert!(stats.mapped_bytes >= 2 * HUGEPAGE_SIZE as u64);
        assert!(stats.classes.iter().any(|c| c.size == 128 * 1024 && c.in_use >= 32));
    }

    #[test]
    fn large_buffers_get_their_own_mapping() {
        let mut big = DmaBuf::zeroed(5 << 20).unwrap();
        assert_eq!(big.capacity(), 6 << 20);
        big[(5 << 20) - 1] = 7;
        assert!(big.iter().take(1000).all(|&b| b == 0));
        let before = mem_stats().dedicated_in_use_bytes;
        assert!(before >= 6 << 20);
        drop(big);
        assert!(mem_stats().dedicated_in_use_bytes <= before - (6 << 20));
    }

    #[test]
    fn zero_length_is_refused_and_set_len_is_bounded() {
        assert!(matches!(DmaBuf::new(0), Err(DmaError::Empty)));
        let mut b = DmaBuf::copy_from(b"abc").unwrap();
        assert_eq!(&b[..], b"abc");
        b.set_len(4096);
        assert_eq!(b.len(), 4096);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.set_len(4097))).is_err());
    }

    #[test]
    fn listeners_see_every_region_before_its_buffers() {
        #[derive(Default)]
        struct Seen(Mutex<Vec<(bool, RegionInfo)>>);
        impl DmaListener for Seen {
            fn mapped(&self, r: RegionInfo) {
                self.0.lock().unwrap().push((true, r));
            }
            fn unmapped(&self, r: RegionInfo) {
                self.0.lock().unwrap().push((false, r));
            }
        }
        let covered = |seen: &Seen, addr: u64| {
            seen.0.lock().unwrap().iter().any(|(m, r)| *m && (r.addr..r.addr + r.len).contains(&(addr as usize)))
        };
        let early = DmaBuf::new(4096).unwrap();
        let big_early = DmaBuf::new(3 << 20).unwrap();
        let seen = std::sync::Arc::new(Seen::default());
        let id = add_listener(seen.clone());
        assert!(covered(&seen, early.iova()), "existing regions are replayed");
        assert!(covered(&seen, big_early.iova()), "existing large mappings are replayed");
        // Enough buffers of a fresh class to need new regions.
        let many: Vec<DmaBuf> = (0..4).map(|_| DmaBuf::new(1 << 20).unwrap()).collect();
        assert!(many.iter().all(|b| covered(&seen, b.iova())), "new regions are announced");
        let big = DmaBuf::new(5 << 20).unwrap();
        let addr = big.iova() as usize;
        assert!(covered(&seen, big.iova()));
        drop(big);
        assert!(seen.0.lock().unwrap().iter().any(|(m, r)| !*m && r.addr == addr), "large mappings are withdrawn");
        remove_listener(id);
        let n = seen.0.lock().unwrap().len();
        let _late = DmaBuf::new(6 << 20).unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), n, "a removed listener hears nothing");
    }

    #[test]
    fn options_are_fixed_after_first_use() {
        let _ = DmaBuf::new(1).unwrap();
        let current = options();
        init(current).unwrap();
        let other = DmaOptions { max_bytes: Some(1), ..current };
        assert!(matches!(init(other), Err(DmaError::AlreadyInitialized(_))));
    }
}
