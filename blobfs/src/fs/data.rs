//! File data: extents in a thin *pool blob*, allocated by page.
//!
//! An extent is written copy-on-write: new pages first, then the metadata
//! command that maps them ([`super::Cmd::Write`]); the pages it replaces come
//! back in the reply and are freed. A crash between the two leaves the old
//! data mapped and the new pages unreferenced, and since the allocation map
//! is rebuilt from the chunk maps at start-up, unreferenced pages are free
//! again: nothing leaks and nothing is half-written.
//!
//! The pool is thin and as large as the store; its clusters are allocated
//! as data first lands in them. Some clusters of the store stay out of its
//! reach ([`metadata_reserve`]): the metadata log and snapshots grow into
//! them, so a file system full of data still takes the unlinks that free it.
//! Of that reserve, the last half is for commands that free space (see
//! [`DataPool::metadata_space_low`]).
//!
//! Freed pages are not reused while a read that may still be reading them
//! is in flight: each read holds a ticket of the allocator's sequence, and a
//! free waits until every ticket older than it is returned.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pmd::{DmaBuf, ReactorHandle};

use super::{ChunkRef, Errno};
use crate::format::PAGE_SIZE;
use crate::{BlobIo, BlobShared, Blobstore};

/// Clusters of a store of `total` clusters of `cluster_size` bytes kept for
/// metadata (the pool does not start using a new cluster when fewer would
/// remain free): a sixteenth of the store, at least 16 clusters, at most
/// 256 MiB. The metadata log takes up to about twice
/// [`super::raft::MetaOptions::snapshot_every`] pages between snapshots.
pub fn metadata_reserve(total: u64, cluster_size: u64) -> u64 {
    (total / 16).min((256 << 20) / cluster_size).max(16)
}

/// The longest run one allocation takes (what a [`ChunkRef`] counts).
const MAX_RUN: u64 = u32::MAX as u64;

/// The pool blob's pages and which of them are in use.
pub struct DataPool {
    store: Blobstore,
    /// Clusters kept for metadata ([`metadata_reserve`]).
    reserve: u64,
    blob: Arc<BlobShared>,
    reactors: Vec<ReactorHandle>,
    next_reactor: AtomicUsize,
    alloc: Mutex<PageAlloc>,
    /// Records of the metadata log durable so far (see [`DataPool::free_after`]).
    durable: tokio::sync::watch::Receiver<u64>,
    /// Set after each data write: the metadata log flushes before its next
    /// record.
    written: Arc<std::sync::atomic::AtomicBool>,
}

struct PageAlloc {
    /// One bit per page of the pool blob: set = in use.
    bits: Vec<u64>,
    pages: u64,
    free: u64,
    /// Where the next search starts.
    hint: u64,
    /// Pool clusters backed by store clusters (data has landed in them).
    backed: Vec<bool>,
    pages_per_cluster: u64,
    /// Sequence of tickets and frees.
    seq: u64,
    /// Tickets of reads in flight: sequence → count.
    reads: BTreeMap<u64, u32>,
    /// Frees waiting for older reads: (sequence, chunk).
    deferred: Vec<(u64, ChunkRef)>,
    /// Frees waiting for the log record of the command that made them:
    /// (record, chunk).
    unlogged: Vec<(u64, ChunkRef)>,
}

/// A read in flight; freed pages stay untouched until it is dropped.
pub struct ReadTicket<'a> {
    pool: &'a DataPool,
    seq: u64,
}

impl Drop for ReadTicket<'_> {
    fn drop(&mut self) {
        let mut a = self.pool.lock();
        if let Some(n) = a.reads.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                a.reads.remove(&self.seq);
            }
        }
        a.release_deferred();
    }
}

impl PageAlloc {
    fn new(pages: u64, pages_per_cluster: u64, backed: Vec<bool>) -> PageAlloc {
        PageAlloc {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
            free: pages,
            hint: 0,
            backed,
            pages_per_cluster,
            seq: 0,
            reads: BTreeMap::new(),
            deferred: Vec::new(),
            unlogged: Vec::new(),
        }
    }

    fn is_used(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, c: ChunkRef, used: bool) {
        for p in c.page..c.page + u64::from(c.pages) {
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            debug_assert_eq!(
                self.bits[w] & b != 0,
                !used,
                "page {p} is already {}",
                if used { "used" } else { "free" }
            );
            if used {
                self.bits[w] |= b;
            } else {
                self.bits[w] &= !b;
            }
        }
        if used {
            self.free -= u64::from(c.pages);
        } else {
            self.free += u64::from(c.pages);
        }
    }

    /// Pool clusters of pages `[page, page + n)` not backed yet.
    fn unbacked(&self, page: u64, n: u64) -> Vec<usize> {
        let ppc = self.pages_per_cluster;
        (page / ppc..(page + n).div_ceil(ppc)).map(|c| c as usize).filter(|&c| !self.backed[c]).collect()
    }

    /// A free run of `n` pages, in clusters already backed if there is one
    /// (so the pool grows only when it must), else anywhere.
    fn find(&self, n: u64) -> Option<u64> {
        self.find_in(n, true).or_else(|| self.find_in(n, false))
    }

    /// A free run of `n` pages, next-fit from the hint; with `backed_only`,
    /// only in backed clusters.
    fn find_in(&self, n: u64, backed_only: bool) -> Option<u64> {
        if n > self.free {
            return None;
        }
        let mut run = 0;
        let mut checked = 0;
        let mut p = self.hint;
        while checked < self.pages + n {
            if p == self.pages {
                p = 0;
                run = 0;
            }
            // Whole free or used words at a time.
            if run == 0 && p % 64 == 0 && p + 64 <= self.pages && self.bits[(p / 64) as usize] == u64::MAX {
                p += 64;
                checked += 64;
                continue;
            }
            if self.is_used(p) || (backed_only && !self.backed[(p / self.pages_per_cluster) as usize]) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(p + 1 - n);
                }
            }
            p += 1;
            checked += 1;
        }
        None
    }

    /// Frees chunks once no read that began before now can still read them.
    fn free(&mut self, chunks: impl IntoIterator<Item = ChunkRef>) {
        self.seq += 1;
        let seq = self.seq;
        self.deferred.extend(chunks.into_iter().map(|c| (seq, c)));
        self.release_deferred();
    }

    fn release_deferred(&mut self) {
        let oldest = self.reads.keys().next().copied().unwrap_or(u64::MAX);
        let (ready, wait): (Vec<_>, Vec<_>) = self.deferred.drain(..).partition(|&(seq, _)| seq <= oldest);
        self.deferred = wait;
        for (_, c) in ready {
            self.set(c, false);
        }
    }
}

impl DataPool {
    /// A pool over `blob`, with the pages of `used` chunks in use. Requests
    /// run on `reactors` in turn; `durable` counts the metadata log's
    /// durable records, `written` is set after each data write.
    pub fn new(
        store: Blobstore,
        blob: Arc<BlobShared>,
        reactors: Vec<ReactorHandle>,
        used: impl IntoIterator<Item = ChunkRef>,
        durable: tokio::sync::watch::Receiver<u64>,
        written: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<DataPool, Errno> {
        assert!(!reactors.is_empty(), "a data pool needs a reactor");
        let pages = blob.num_clusters() * store.pages_per_cluster();
        let ppc = store.pages_per_cluster();
        let backed = (0..blob.num_clusters()).map(|c| blob.own(c) != 0).collect();
        let mut alloc = PageAlloc::new(pages, ppc, backed);
        for c in used {
            if c.blob != blob.id() || c.page + u64::from(c.pages) > pages {
                tracing::error!("a chunk map points outside the data pool: {c:?}");
                return Err(Errno::EIO);
            }
            alloc.set(c, true);
        }
        let reserve = metadata_reserve(blob.num_clusters(), u64::from(store.cluster_size()));
        Ok(DataPool {
            store,
            blob,
            reactors,
            next_reactor: AtomicUsize::new(0),
            alloc: Mutex::new(alloc),
            reserve,
            durable,
            written,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PageAlloc> {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        if !a.unlogged.is_empty() {
            let durable = *self.durable.borrow();
            let (ready, wait): (Vec<_>, Vec<_>) = a.unlogged.drain(..).partition(|&(r, _)| r <= durable);
            a.unlogged = wait;
            if !ready.is_empty() {
                a.free(ready.into_iter().map(|(_, c)| c));
            }
        }
        a
    }

    fn reactor(&self) -> &ReactorHandle {
        &self.reactors[self.next_reactor.fetch_add(1, Ordering::Relaxed) % self.reactors.len()]
    }

    /// Whether the store is down to the last half of the metadata reserve:
    /// what is left there is for commands that free space.
    pub fn metadata_space_low(&self) -> bool {
        self.store.free_clusters() < self.reserve / 2
    }

    /// Pages in the pool, and pages free.
    pub fn space(&self) -> (u64, u64) {
        let a = self.lock();
        (a.pages, a.free)
    }

    /// Allocates `pages` pages: one run if a free run is that long, else
    /// the fewest runs found by halving, each a whole number of `unit`
    /// pages but the last.
    pub fn alloc(&self, pages: u64, unit: u64) -> Result<Vec<ChunkRef>, Errno> {
        let mut a = self.lock();
        let mut runs = Vec::new();
        let (mut left, mut want) = (pages, pages.min(MAX_RUN / unit * unit));
        if pages > a.free {
            return Err(Errno::ENOSPC);
        }
        while left > 0 {
            let Some(page) = a.find(want) else {
                if want <= unit {
                    break;
                }
                want = (want / 2).max(unit) / unit * unit;
                continue;
            };
            let new = a.unbacked(page, want);
            if !new.is_empty() && self.store.free_clusters() < new.len() as u64 + self.reserve {
                break;
            }
            for c in new {
                a.backed[c] = true;
            }
            let c = ChunkRef { blob: self.blob.id(), page, pages: want as u32 };
            a.set(c, true);
            a.hint = page + want;
            runs.push(c);
            left -= want;
            want = want.min(left);
        }
        if left > 0 {
            for &c in &runs {
                a.set(c, false);
            }
            return Err(Errno::ENOSPC);
        }
        Ok(runs)
    }

    /// Frees chunks that a metadata command let go of, once that command's
    /// log `record` is durable (and no read that began before can still
    /// read them). Before that, a crash would bring back the map pointing
    /// at them: they must not be written over.
    pub fn free_after(&self, record: u64, chunks: impl IntoIterator<Item = ChunkRef>) {
        let mut a = self.lock();
        a.unlogged.extend(chunks.into_iter().map(|c| (record, c)));
    }

    /// Whether frees are waiting for their commands' log records (a
    /// metadata sync would free them).
    pub fn frees_waiting(&self) -> bool {
        !self.lock().unlogged.is_empty()
    }

    /// Frees chunks no durable map names (written, never mapped) once no
    /// read that began before now can still read them.
    pub fn free(&self, chunks: impl IntoIterator<Item = ChunkRef>) {
        self.lock().free(chunks);
    }

    /// A ticket for a read about to start.
    pub fn ticket(&self) -> ReadTicket<'_> {
        let mut a = self.lock();
        let seq = a.seq;
        *a.reads.entry(seq).or_default() += 1;
        ReadTicket { pool: self, seq }
    }

    /// Reads a run's pages and copies `out.len()` bytes of them, from byte
    /// `skip` on, into `out`.
    pub async fn read(&self, c: ChunkRef, skip: usize, out: &mut [u8]) -> Result<(), Errno> {
        debug_assert!(skip + out.len() <= c.pages as usize * PAGE_SIZE);
        let buf = DmaBuf::new(c.pages as usize * PAGE_SIZE).map_err(|_| Errno::EIO)?;
        let done = self.store.io(self.reactor(), BlobIo::read(&self.blob, c.page, buf, 0)).await.map_err(io_err)?;
        done.status.map_err(|e| {
            tracing::error!("reading file data at pool page {} failed: {e}", c.page);
            Errno(e.errno())
        })?;
        done.bufs.copy_out(skip, out);
        Ok(())
    }

    /// Writes `data` (padded with zeros to whole pages) to a run's pages.
    pub async fn write(&self, c: ChunkRef, data: &[u8]) -> Result<(), Errno> {
        debug_assert!(data.len() <= c.pages as usize * PAGE_SIZE);
        let mut buf = DmaBuf::new(c.pages as usize * PAGE_SIZE).map_err(|_| Errno::EIO)?;
        buf[..data.len()].copy_from_slice(data);
        buf[data.len()..].fill(0);
        let done = self.store.io(self.reactor(), BlobIo::write(&self.blob, c.page, buf, 0)).await.map_err(io_err)?;
        done.status.map_err(|e| {
            tracing::error!("writing file data at pool page {} failed: {e}", c.page);
            Errno(e.errno())
        })?;
        self.written.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes every completed data write durable.
    pub async fn flush(&self) -> Result<(), Errno> {
        let done = self.store.io(self.reactor(), BlobIo::flush(&self.blob, 0)).await.map_err(io_err)?;
        done.status.map_err(|e| Errno(e.errno()))
    }
}

fn io_err(e: crate::BlobError) -> Errno {
    tracing::error!("file data I/O: {e}");
    Errno(e.errno())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(pages: u64) -> PageAlloc {
        PageAlloc::new(pages, 16, vec![true; pages.div_ceil(16) as usize])
    }

    fn chunk(page: u64, pages: u32) -> ChunkRef {
        ChunkRef { blob: 1, page, pages }
    }

    #[test]
    fn runs_are_found_around_used_pages_and_wrap() {
        let mut a = alloc(200);
        a.set(chunk(0, 130), true);
        a.set(chunk(140, 50), true);
        assert_eq!(a.find(10), Some(130));
        assert_eq!(a.find(11), None, "runs of 10 only");
        a.hint = 195;
        assert_eq!(a.find(5), Some(195));
        a.hint = 198;
        assert_eq!(a.find(5), Some(130), "wraps past the end without joining the ends");
        a.set(chunk(130, 10), true);
        a.set(chunk(190, 10), true);
        assert_eq!((a.find(1), a.free), (None, 0));
    }

    #[test]
    fn backed_clusters_are_filled_before_new_ones_are_used() {
        let mut a = alloc(64);
        a.backed = vec![false, false, true, false];
        assert_eq!(a.find(4), Some(32));
        a.set(chunk(32, 16), true);
        assert_eq!(a.find(4), Some(0), "then anywhere");
        assert_eq!(a.unbacked(14, 4), [0, 1]);
    }

    #[test]
    fn frees_wait_for_reads_that_began_before_them() {
        let mut a = alloc(64);
        a.set(chunk(0, 64), true);
        // A read in flight (ticket of sequence 0), then a free at sequence 1.
        *a.reads.entry(0).or_default() += 1;
        a.seq = 1;
        a.deferred.push((1, chunk(0, 8)));
        a.release_deferred();
        assert_eq!(a.free, 0, "the read might still be reading those pages");
        a.reads.clear();
        a.release_deferred();
        assert_eq!(a.free, 8);
    }
}
