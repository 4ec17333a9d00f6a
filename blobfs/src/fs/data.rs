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

/// Bytes of pool clusters backed ahead of the writes that reach into new
/// ones ([`DataPool::alloc`]).
pub const BACK_AHEAD: u64 = 16 << 20;

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
    /// How many are.
    backed_count: u64,
    pages_per_cluster: u64,
    /// Sequence of tickets and frees.
    seq: u64,
    /// Tickets of reads in flight: sequence → count.
    reads: BTreeMap<u64, u32>,
    /// Frees waiting for older reads: sequence → runs.
    deferred: BTreeMap<u64, Vec<ChunkRef>>,
    /// Frees waiting for the log record of the command that made them:
    /// record → runs.
    unlogged: BTreeMap<u64, Vec<ChunkRef>>,
}

/// A read in flight; freed pages stay untouched until it is dropped.
pub struct ReadTicket<'a> {
    pool: &'a DataPool,
    seq: u64,
}

impl ReadTicket<'_> {
    /// The ticket without its borrow of the pool, for a read that finishes
    /// on another thread: [`DataPool::end_read`] with it ends the read.
    pub fn detach(self) -> u64 {
        let seq = self.seq;
        std::mem::forget(self);
        seq
    }
}

impl Drop for ReadTicket<'_> {
    fn drop(&mut self) {
        self.pool.end_read(self.seq);
    }
}

impl PageAlloc {
    fn new(pages: u64, pages_per_cluster: u64, backed: Vec<bool>) -> PageAlloc {
        PageAlloc {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
            free: pages,
            hint: 0,
            backed_count: backed.iter().filter(|&&b| b).count() as u64,
            backed,
            pages_per_cluster,
            seq: 0,
            reads: BTreeMap::new(),
            deferred: BTreeMap::new(),
            unlogged: BTreeMap::new(),
        }
    }

    /// Counts pool cluster `c` as backed.
    fn back(&mut self, c: usize) {
        if !std::mem::replace(&mut self.backed[c], true) {
            self.backed_count += 1;
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
    /// only in backed clusters. Whole used words, free words and clusters
    /// out of reach are stepped over at once.
    fn find_in(&self, n: u64, backed_only: bool) -> Option<u64> {
        if n > self.free {
            return None;
        }
        let ppc = self.pages_per_cluster;
        // Whether a word of the bitmap lies within one cluster.
        let words_in_clusters = ppc % 64 == 0;
        let (mut run, mut checked, mut p) = (0, 0, self.hint.min(self.pages));
        while checked < self.pages + n {
            if p == self.pages {
                p = 0;
                run = 0;
            }
            if backed_only && !self.backed[(p / ppc) as usize] {
                let next = ((p / ppc + 1) * ppc).min(self.pages);
                (checked, p, run) = (checked + next - p, next, 0);
                continue;
            }
            if p % 64 == 0 && p + 64 <= self.pages {
                let word = self.bits[(p / 64) as usize];
                if word == u64::MAX {
                    (checked, p, run) = (checked + 64, p + 64, 0);
                    continue;
                }
                if word == 0 && (!backed_only || words_in_clusters) {
                    if run + 64 >= n {
                        return Some(p - run);
                    }
                    (checked, p, run) = (checked + 64, p + 64, run + 64);
                    continue;
                }
            }
            if self.is_used(p) {
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
        self.deferred.entry(seq).or_default().extend(chunks);
        self.release_deferred();
    }

    fn release_deferred(&mut self) {
        let oldest = self.reads.keys().next().copied().unwrap_or(u64::MAX);
        for c in take_up_to(&mut self.deferred, oldest) {
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
        let durable = *self.durable.borrow();
        if a.unlogged.first_key_value().is_some_and(|(&r, _)| r <= durable) {
            let ready = take_up_to(&mut a.unlogged, durable);
            a.free(ready);
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

    /// Whether the store is down to its metadata reserve: log records
    /// should then be written as they come, not pile up in memory (a burst
    /// of queued records could take more than the reserve holds).
    pub fn metadata_space_tight(&self) -> bool {
        self.store.free_clusters() < self.reserve
    }

    /// Pages file data may take in all (those it holds and those it can
    /// still take), and pages it can still take: the free pages of the
    /// clusters the pool has, and those of the store's free clusters beyond
    /// the metadata reserve, which the pool backs as it needs them (the
    /// store's other clusters hold metadata, or are its reserve).
    pub fn space(&self) -> (u64, u64) {
        let a = self.lock();
        let ppc = a.pages_per_cluster;
        let unbacked = a.backed.len() as u64 - a.backed_count;
        let backed_free = a.free.saturating_sub(unbacked * ppc);
        let growable = self.store.free_clusters().saturating_sub(self.reserve).min(unbacked) * ppc;
        let free = backed_free + growable;
        (a.pages - a.free + free, free)
    }

    /// Allocates `pages` pages: one run if a free run is that long, else
    /// the fewest runs found by halving, each a whole number of `unit`
    /// pages but the last. When they reach into clusters the store has not
    /// backed yet, those and up to [`BACK_AHEAD`] bytes of clusters after
    /// them are backed now, in one journal record: a stream of writes then
    /// waits for one record per [`BACK_AHEAD`] bytes, not one per cluster.
    pub async fn alloc(&self, pages: u64, unit: u64) -> Result<Vec<ChunkRef>, Errno> {
        let (runs, back) = self.take(pages, unit)?;
        self.back(back).await;
        Ok(runs)
    }

    /// Backs the pool clusters [`DataPool::take`] named, ahead of the
    /// writes into them.
    pub(super) async fn back(&self, clusters: Vec<u64>) {
        if !clusters.is_empty()
            && let Err(e) = self.store.allocate_clusters(self.blob.id(), clusters).await
        {
            // The writes ask for their own clusters again, and fail if the store cannot give them.
            tracing::debug!("backing data pool clusters ahead of writes failed: {e}");
        }
    }

    /// The runs of [`DataPool::alloc`], and the pool clusters to back
    /// ([`DataPool::back`]) before writing them.
    pub(super) fn take(&self, pages: u64, unit: u64) -> Result<(Vec<ChunkRef>, Vec<u64>), Errno> {
        let mut a = self.lock();
        let mut runs = Vec::new();
        let mut back = Vec::new();
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
            if !new.is_empty() && self.store.free_clusters() < (back.len() + new.len()) as u64 + self.reserve {
                break;
            }
            for &c in &new {
                a.back(c);
            }
            back.extend(new);
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
        if let Some(&last) = back.iter().max() {
            let room = self.store.free_clusters().saturating_sub(back.len() as u64 + self.reserve);
            let ahead = (BACK_AHEAD / (a.pages_per_cluster * PAGE_SIZE as u64)).min(room) as usize;
            let more: Vec<usize> = (last + 1..a.backed.len()).take_while(|&c| !a.backed[c]).take(ahead).collect();
            for &c in &more {
                a.back(c);
            }
            back.extend(more);
        }
        Ok((runs, back.into_iter().map(|c| c as u64).collect()))
    }

    /// Frees chunks that a metadata command let go of, once that command's
    /// log `record` is durable (and no read that began before can still
    /// read them). Before that, a crash would bring back the map pointing
    /// at them: they must not be written over.
    pub fn free_after(&self, record: u64, chunks: impl IntoIterator<Item = ChunkRef>) {
        let mut a = self.lock();
        a.unlogged.entry(record).or_default().extend(chunks);
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

    /// Ends the read of a detached ticket ([`ReadTicket::detach`]).
    pub fn end_read(&self, seq: u64) {
        let mut a = self.lock();
        if let Some(n) = a.reads.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                a.reads.remove(&seq);
            }
        }
        a.release_deferred();
    }

    /// Reads a run's pages and copies `out.len()` bytes of them, from byte
    /// `skip` on, into `out`.
    pub async fn read(&self, c: ChunkRef, skip: usize, out: &mut [u8]) -> Result<(), Errno> {
        let io = read_io(&self.blob, c, skip, out.len())?;
        let done = self.store.io(self.reactor(), io).await.map_err(io_err)?;
        read_done(c, done, skip, out)
    }

    /// Reads runs of pages from one reactor into `out`: each run's bytes
    /// from byte `skip` on fill `out[range]`. Then calls `then` there with
    /// `out` (`on_reactor_then`).
    pub fn read_then(
        &self,
        runs: Vec<ReadRun>,
        mut out: Vec<u8>,
        then: impl FnOnce(Result<Vec<u8>, Errno>) + Send + 'static,
    ) {
        self.on_reactor_then(
            move |ch, blob| async move {
                let mut reads = Vec::with_capacity(runs.len());
                for &(c, skip, ref range) in &runs {
                    reads.push(ch.io(read_io(&blob, c, skip, range.len())?));
                }
                let done = futures_util::future::join_all(reads).await;
                for ((c, skip, range), done) in runs.into_iter().zip(done) {
                    read_done(c, done, skip, &mut out[range])?;
                }
                Ok(out)
            },
            then,
        );
    }

    /// Writes `buf` (as long as the run) to a run's pages.
    pub async fn write(&self, c: ChunkRef, buf: DmaBuf) -> Result<(), Errno> {
        debug_assert_eq!(buf.len(), c.pages as usize * PAGE_SIZE);
        let done = self.store.io(self.reactor(), BlobIo::write(&self.blob, c.page, buf, 0)).await.map_err(io_err)?;
        written(c, done.status, &self.written)
    }

    /// Writes runs of pages, each with its bytes, from one reactor and calls
    /// `then` there with the result (`on_reactor_then`).
    pub fn write_then(&self, runs: Vec<(ChunkRef, DmaBuf)>, then: impl FnOnce(Result<(), Errno>) + Send + 'static) {
        let flag = self.written.clone();
        self.on_reactor_then(
            move |ch, blob| async move {
                let writes = runs.into_iter().map(|(c, buf)| {
                    debug_assert_eq!(buf.len(), c.pages as usize * PAGE_SIZE);
                    let (io, flag) = (ch.io(BlobIo::write(&blob, c.page, buf, 0)), &flag);
                    async move { written(c, io.await.status, flag) }
                });
                futures_util::future::join_all(writes).await.into_iter().collect()
            },
            then,
        );
    }

    /// Runs `io` with a channel of one reactor, as a task there, and calls
    /// `then` there with its result: the caller's next step runs on the
    /// thread the device's completions reach, with no task elsewhere woken
    /// just to wait for them.
    fn on_reactor_then<T, Fut>(
        &self,
        io: impl FnOnce(crate::BlobChannel, Arc<BlobShared>) -> Fut + Send + 'static,
        then: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        Fut: std::future::Future<Output = Result<T, Errno>> + 'static,
    {
        let (store, blob) = (self.store.clone(), self.blob.clone());
        // The outcome goes to `then`, not through the returned receiver.
        drop(self.reactor().spawn(move |ctx| {
            let ch = store.channel(ctx);
            async move {
                let result = match ch {
                    Ok(ch) => io(ch, blob).await,
                    Err(e) => Err(io_err(e)),
                };
                then(result);
            }
        }));
    }

    /// Makes every completed data write durable.
    pub async fn flush(&self) -> Result<(), Errno> {
        let done = self.store.io(self.reactor(), BlobIo::flush(&self.blob, 0)).await.map_err(io_err)?;
        done.status.map_err(|e| Errno(e.errno()))
    }
}

/// The runs of `waiting` under keys up to `key`, taken out.
fn take_up_to(waiting: &mut BTreeMap<u64, Vec<ChunkRef>>, key: u64) -> Vec<ChunkRef> {
    let later = key.checked_add(1).map(|k| waiting.split_off(&k)).unwrap_or_default();
    let ready = std::mem::replace(waiting, later);
    ready.into_values().flatten().collect()
}

/// Part of a read: a run of pool pages, the byte of its first page to
/// start at, and the bytes of the output it fills.
pub type ReadRun = (ChunkRef, usize, std::ops::Range<usize>);

/// A read of a run's pages, for `len` bytes from byte `skip` on.
fn read_io(blob: &Arc<BlobShared>, c: ChunkRef, skip: usize, len: usize) -> Result<BlobIo, Errno> {
    debug_assert!(skip + len <= c.pages as usize * PAGE_SIZE);
    let buf = DmaBuf::new(c.pages as usize * PAGE_SIZE).map_err(|_| Errno::EIO)?;
    Ok(BlobIo::read(blob, c.page, buf, 0))
}

/// Copies what a read of `c` brought, from byte `skip` on, into `out`.
fn read_done(c: ChunkRef, done: crate::BlobCompletion, skip: usize, out: &mut [u8]) -> Result<(), Errno> {
    done.status.map_err(|e| {
        tracing::error!("reading file data at pool page {} failed: {e}", c.page);
        Errno(e.errno())
    })?;
    done.bufs.copy_out(skip, out);
    Ok(())
}

/// A data write's status as the file system reports it; `flag` is set
/// after each success (the metadata log flushes before its next record).
fn written(c: ChunkRef, status: Result<(), nvme::IoError>, flag: &std::sync::atomic::AtomicBool) -> Result<(), Errno> {
    status.map_err(|e| {
        tracing::error!("writing file data at pool page {} failed: {e}", c.page);
        Errno(e.errno())
    })?;
    flag.store(true, Ordering::Release);
    Ok(())
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

    /// The word- and cluster-skipping search finds what a search page by
    /// page finds, on random pools.
    #[test]
    fn the_fast_search_agrees_with_a_search_page_by_page() {
        fn slow(a: &PageAlloc, n: u64, backed_only: bool) -> Option<u64> {
            let ok = |p: u64| !a.is_used(p) && (!backed_only || a.backed[(p / a.pages_per_cluster) as usize]);
            (0..a.pages).find(|&s| s + n <= a.pages && (s..s + n).all(ok))
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for round in 0..400 {
            let ppc = [16, 64, 256][round % 3];
            let pages = ppc * rng.u64(1..12);
            let mut a = PageAlloc::new(pages, ppc, (0..pages / ppc).map(|_| rng.bool()).collect());
            let mut p = 0;
            while p < pages {
                let len = rng.u64(1..200).min(pages - p);
                if rng.u8(..3) == 0 {
                    a.set(chunk(p, len as u32), true);
                }
                p += len;
            }
            a.hint = rng.u64(..pages);
            for n in [1, 3, 64, 65, 130, 300] {
                for backed_only in [true, false] {
                    let got = a.find_in(n, backed_only);
                    if let Some(s) = got {
                        assert!(
                            s + n <= pages && (s..s + n).all(|q| !a.is_used(q)),
                            "round {round}: {s}+{n} is not free"
                        );
                        if backed_only {
                            assert!((s..s + n).all(|q| a.backed[(q / ppc) as usize]), "round {round}: unbacked");
                        }
                    }
                    assert_eq!(got.is_some(), slow(&a, n, backed_only).is_some(), "round {round}: n {n} {backed_only}");
                }
            }
        }
    }

    #[test]
    fn frees_wait_for_reads_that_began_before_them() {
        let mut a = alloc(64);
        a.set(chunk(0, 64), true);
        // A read in flight (ticket of sequence 0), then a free at sequence 1.
        *a.reads.entry(0).or_default() += 1;
        a.seq = 1;
        a.deferred.insert(1, vec![chunk(0, 8)]);
        a.release_deferred();
        assert_eq!(a.free, 0, "the read might still be reading those pages");
        a.reads.clear();
        a.release_deferred();
        assert_eq!(a.free, 8);
    }
}
