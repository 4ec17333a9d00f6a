//! What every reactor shares about a store and its blobs.
//!
//! A blob's cluster map is read by the data path on any reactor without a
//! lock: entries are atomics, and the map as a whole is swapped (`ArcSwap`).
//! Only the store's home reactor writes it, and only two ways:
//!
//! - an entry goes from 0 to a cluster when an allocation is durable (a
//!   single atomic store: readers see either "unallocated" or the cluster);
//! - the whole map is replaced (resize, snapshot, inflate, decouple) while the
//!   blob is *frozen* (new I/O waits) and every channel has drained the I/O it
//!   submitted before the freeze (a quiesce barrier), so no request is
//!   translated with one map and executed against another.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use nvme::BdevDesc;
use pmd::{ReactorHandle, ReactorId};

use crate::format::Geometry;

/// One generation of a blob's cluster map.
pub(crate) struct ClusterMap {
    /// Physical cluster per logical cluster, 0 = not allocated in this blob.
    pub phys: Box<[AtomicU64]>,
    /// The blob unallocated clusters are read through.
    pub parent: Option<Arc<BlobShared>>,
}

impl ClusterMap {
    pub fn new(clusters: &[u64], parent: Option<Arc<BlobShared>>) -> Self {
        Self { phys: clusters.iter().map(|&c| AtomicU64::new(c)).collect(), parent }
    }
}

/// A blob as the data path sees it.
pub struct BlobShared {
    id: u64,
    map: ArcSwap<ClusterMap>,
    frozen: AtomicBool,
    read_only: AtomicBool,
}

impl std::fmt::Debug for BlobShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob").field("id", &self.id).field("clusters", &self.num_clusters()).finish()
    }
}

impl BlobShared {
    pub(crate) fn new(id: u64, clusters: &[u64], parent: Option<Arc<BlobShared>>, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            id,
            map: ArcSwap::from_pointee(ClusterMap::new(clusters, parent)),
            frozen: AtomicBool::new(false),
            read_only: AtomicBool::new(read_only),
        })
    }

    /// The blob's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.map.load().phys.len() as u64
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    pub(crate) fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Translates a read or write inside one cluster with one load of the map:
    /// `Err(())` if the blob is smaller, `Ok(None)` if the cluster must be
    /// allocated (write) or read elsewhere (read through a parent, or zeros).
    #[inline]
    pub(crate) fn translate_fast(&self, c: u64, write: bool) -> Result<Option<u64>, ()> {
        let map = self.map.load();
        match map.phys.get(c as usize).map(|p| p.load(Ordering::Acquire)) {
            None => Err(()),
            Some(0) if !write => Ok(map.parent.as_ref().and_then(|p| p.resolve(c))),
            Some(0) => Ok(None),
            Some(p) => Ok(Some(p)),
        }
    }

    /// The blob's own cluster for logical cluster `c` (0 if none).
    pub(crate) fn own(&self, c: u64) -> u64 {
        self.map.load().phys.get(c as usize).map_or(0, |p| p.load(Ordering::Acquire))
    }

    /// The cluster a read of logical cluster `c` goes to: the blob's own, or
    /// the nearest ancestor's; `None` reads as zeros.
    pub(crate) fn resolve(&self, c: u64) -> Option<u64> {
        let map = self.map.load();
        match map.phys.get(c as usize).map(|p| p.load(Ordering::Acquire)) {
            Some(0) => map.parent.as_ref().and_then(|p| p.resolve(c)),
            Some(p) => Some(p),
            None => None,
        }
    }

    /// Whether an ancestor holds data for logical cluster `c`.
    pub(crate) fn inherited(&self, c: u64) -> Option<u64> {
        self.map.load().parent.as_ref().and_then(|p| p.resolve(c))
    }

    pub(crate) fn parent(&self) -> Option<Arc<BlobShared>> {
        self.map.load().parent.clone()
    }

    /// Publishes a durable allocation (home reactor only).
    pub(crate) fn set_cluster(&self, c: u64, phys: u64) {
        if let Some(slot) = self.map.load().phys.get(c as usize) {
            slot.store(phys, Ordering::Release);
        }
    }

    /// Replaces the map (home reactor only, while frozen and quiesced).
    pub(crate) fn replace(&self, clusters: &[u64], parent: Option<Arc<BlobShared>>) {
        self.map.store(Arc::new(ClusterMap::new(clusters, parent)));
    }
}

/// What every reactor shares about a loaded store.
pub(crate) struct StoreShared {
    /// Process-unique key of this load (reactor-local lookups).
    pub key: u64,
    pub desc: BdevDesc,
    pub geometry: Geometry,
    pub home: ReactorHandle,
    pub blocks_per_page: u64,
    pub blocks_per_cluster: u64,
    pub unloaded: AtomicBool,
    /// Reactors that have a channel to the store (for barriers and wake-ups).
    pub channels: Mutex<Vec<ReactorId>>,
    /// Free clusters (for statistics from any thread).
    pub free_clusters: AtomicU64,
}

impl StoreShared {
    pub fn new(desc: BdevDesc, geometry: Geometry, home: ReactorHandle) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let block = desc.bdev().block_size() as u64;
        Arc::new(Self {
            key: NEXT.fetch_add(1, Ordering::Relaxed),
            blocks_per_page: crate::format::PAGE_SIZE as u64 / block,
            blocks_per_cluster: geometry.cluster_size as u64 / block,
            desc,
            geometry,
            home,
            unloaded: AtomicBool::new(false),
            channels: Mutex::new(Vec::new()),
            free_clusters: AtomicU64::new(0),
        })
    }

    pub fn channel_reactors(&self) -> Vec<ReactorId> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
